//! Media quotas on each user's home shard (docs/media.md): `media_upload` reserves the
//! announced size against the user's quota and answers a grant (`crate::media::Grant`) the
//! HTTP side accepts; uploads collected unfinished, media collected or deleted give their size
//! back (`MediaReleased`). `media_delete` answers a deletion grant (`crate::media::Deletion`)
//! for `DELETE /media/{id}`, where the store checks that the asker uploaded the medium.
//! The bytes themselves never pass through the engine.

use serde_json::json;

use super::effects::Deferred;
use super::ops::{Asker, Outcome};
use super::Shard;
use crate::ids::UserId;
use crate::media::{valid_media_id, valid_mime, Deletion, Grant, DELETION_TTL_S, GRANT_TTL_S};
use crate::protocol::{self as p, ok_frame, ErrorCode};
use crate::storage::{keys, MediaUsage, Storage, StorageError};

impl<S: Storage> Shard<S> {
    pub(super) fn media_upload(&mut self, now_ms: u64, by: Asker, req: p::MediaUpload) -> Outcome {
        let bad = |m: &str| Err((ErrorCode::BadRequest, m.to_owned()));
        if req.size == 0 || req.size > self.cfg.media_bytes_max {
            return bad(&format!(
                "size must be 1 to {} bytes",
                self.cfg.media_bytes_max
            ));
        }
        if !valid_mime(&req.mime) {
            return bad("type must be a media type (type/subtype), at most 127 bytes");
        }
        let mut sha256 = [0u8; 32];
        if req.sha256.len() != 64
            || !req
                .sha256
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return bad("sha256 must be 64 lower-case hex digits");
        }
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&req.sha256[2 * i..2 * i + 2], 16).unwrap_or_default();
        }
        let user = by.session.user;
        let mut usage = self
            .media_usage(user)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let quota = self.cfg.media_quota_bytes;
        if usage.bytes.saturating_add(req.size) > quota {
            return Err((
                ErrorCode::LimitReached,
                format!("media quota: {} of {quota} bytes used", usage.bytes),
            ));
        }
        usage.bytes += req.size;
        self.put(keys::media_usage(user), usage.encode());
        let expires_s = now_ms / 1000 + GRANT_TTL_S;
        let grant = Grant {
            user,
            size: req.size,
            sha256,
            mime: req.mime,
            expires_s,
        }
        .seal(&self.tokens);
        let frame = ok_frame(
            by.rid,
            &json!({ "grant": grant, "expires": expires_s, "quota_used": usage.bytes, "quota": quota }),
        );
        self.defer(Deferred::Reply {
            conn: by.conn,
            rid: by.rid,
            frame,
        });
        Ok(())
    }

    /// `media_delete`: a grant for `DELETE /media/{id}` (nothing is stored here: the medium's
    /// record names its uploader, which the HTTP side checks against the grant's user).
    pub(super) fn media_delete(&mut self, now_ms: u64, by: Asker, req: p::MediaDelete) -> Outcome {
        if !valid_media_id(&req.media) {
            return Err((
                ErrorCode::BadRequest,
                "media must be a medium's id (32 lower-case hex digits)".into(),
            ));
        }
        let expires_s = now_ms / 1000 + DELETION_TTL_S;
        let grant = Deletion {
            user: by.session.user,
            media: req.media,
            expires_s,
        }
        .seal(&self.tokens);
        self.send(
            by.conn,
            ok_frame(by.rid, &json!({ "grant": grant, "expires": expires_s })),
        );
        Ok(())
    }

    fn media_usage(&self, user: UserId) -> Result<MediaUsage, StorageError> {
        let key = keys::media_usage(user);
        Ok(match self.get_latest(&key)? {
            Some(bytes) => MediaUsage::decode(&key, &bytes)?,
            None => MediaUsage::default(),
        })
    }

    /// An upload of `user` (homed here) was collected unfinished.
    pub(super) fn media_released(&mut self, user: UserId, bytes: u64) {
        match self.media_usage(user) {
            Ok(mut usage) => {
                usage.bytes = usage.bytes.saturating_sub(bytes);
                self.put(keys::media_usage(user), usage.encode());
            }
            Err(e) => tracing::error!(shard = %self.cfg.shard, error = %e, "reading media usage"),
        }
    }
}

//! The media path's signed texts (docs/media.md): the **grant** a user's home shard issues for
//! one upload (`media_upload`: user, size, type, SHA-256, expiry), the **deletion** grant it
//! issues for one medium (`media_delete`: user, medium, expiry), and the **capability** that
//! reads one medium until an expiry. Both are sealed with the server secret (`TokenKey::seal`),
//! so any shard of any node checks them without a lookup. Pure: the driver's `src/media.rs`
//! stores and serves the bytes.

use crate::auth::TokenKey;
use crate::ids::UserId;

const GRANT_VERSION: u8 = b'G';
const DELETION_VERSION: u8 = b'D';
const CAPABILITY_VERSION: u8 = b'M';

/// A deletion grant stays usable this long after `media_delete` answered it.
pub const DELETION_TTL_S: u64 = 300;

/// Longest media type (`type/subtype` with parameters), in bytes.
pub const MIME_BYTES_MAX: usize = 127;

/// A grant stays usable this long after `media_upload` answered it.
pub const GRANT_TTL_S: u64 = 3_600;

/// One upload, as the user's home shard allowed it (size reserved against their quota).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub user: UserId,
    pub size: u64,
    pub sha256: [u8; 32],
    pub mime: String,
    pub expires_s: u64,
}

impl Grant {
    pub fn seal(&self, key: &TokenKey) -> String {
        let mut p = Vec::with_capacity(58 + self.mime.len());
        p.push(GRANT_VERSION);
        p.extend_from_slice(&self.user.0.to_be_bytes());
        p.extend_from_slice(&self.size.to_be_bytes());
        p.extend_from_slice(&self.sha256);
        p.extend_from_slice(&self.expires_s.to_be_bytes());
        p.extend_from_slice(self.mime.as_bytes());
        key.seal(&p)
    }

    /// The grant in `sealed` if it is genuine and not expired at `now_s`.
    pub fn open(key: &TokenKey, sealed: &str, now_s: u64) -> Option<Grant> {
        let p = key.unseal(sealed, 256)?;
        if p.first() != Some(&GRANT_VERSION) || p.len() < 57 {
            return None;
        }
        let u64_at = |at| be_u64(&p, at);
        let grant = Grant {
            user: UserId(u64_at(1)?),
            size: u64_at(9)?,
            sha256: p.get(17..49)?.try_into().ok()?,
            expires_s: u64_at(49)?,
            mime: std::str::from_utf8(p.get(57..)?).ok()?.to_owned(),
        };
        (now_s < grant.expires_s).then_some(grant)
    }
}

/// `user` asks to delete medium `media` (the HTTP side deletes it only if `user` uploaded it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub user: UserId,
    pub media: String,
    pub expires_s: u64,
}

impl Deletion {
    pub fn seal(&self, key: &TokenKey) -> String {
        let mut p = Vec::with_capacity(17 + self.media.len());
        p.push(DELETION_VERSION);
        p.extend_from_slice(&self.user.0.to_be_bytes());
        p.extend_from_slice(&self.expires_s.to_be_bytes());
        p.extend_from_slice(self.media.as_bytes());
        key.seal(&p)
    }

    /// The deletion in `sealed` if it is genuine and not expired at `now_s`.
    pub fn open(key: &TokenKey, sealed: &str, now_s: u64) -> Option<Deletion> {
        let p = key.unseal(sealed, 128)?;
        if p.first() != Some(&DELETION_VERSION) {
            return None;
        }
        let u64_at = |at| be_u64(&p, at);
        let deletion = Deletion {
            user: UserId(u64_at(1)?),
            expires_s: u64_at(9)?,
            media: std::str::from_utf8(p.get(17..)?).ok()?.to_owned(),
        };
        (now_s < deletion.expires_s).then_some(deletion)
    }
}

/// Whether `id` has the form of a medium's id: 32 lower-case hex digits.
pub fn valid_media_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The big-endian `u64` at `at` in a sealed payload, if it is long enough.
fn be_u64(p: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `mime` is a plausible media type: `type/subtype`, printable ASCII, no spaces
/// around the slash, at most `MIME_BYTES_MAX` bytes (served back as `Content-Type`, so no
/// control characters may reach a response head).
pub fn valid_mime(mime: &str) -> bool {
    mime.len() <= MIME_BYTES_MAX
        && mime.bytes().all(|c| (0x20..0x7f).contains(&c))
        && mime
            .split_once('/')
            .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && !t.contains(' '))
}

/// The query string that reads medium `id` (32 hex digits) until `expires_s`: `e=…&s=…`.
pub fn capability(key: &TokenKey, id: &str, expires_s: u64) -> String {
    format!(
        "e={expires_s}&s={}",
        key.seal(&capability_payload(id, expires_s))
    )
}

/// Whether `sealed` (the `s` of a capability) reads medium `id` at `now_s`: `Ok`, or why not
/// (`Err(true)`: genuine but expired; `Err(false)`: not genuine).
pub fn check_capability(
    key: &TokenKey,
    id: &str,
    expires_s: u64,
    sealed: &str,
    now_s: u64,
) -> Result<(), bool> {
    match key.unseal(sealed, 128) {
        Some(p) if p == capability_payload(id, expires_s) => {
            if now_s < expires_s {
                Ok(())
            } else {
                Err(true)
            }
        }
        _ => Err(false),
    }
}

fn capability_payload(id: &str, expires_s: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(9 + id.len());
    p.push(CAPABILITY_VERSION);
    p.extend_from_slice(&expires_s.to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_and_capabilities_verify_only_as_sealed() {
        let key = TokenKey::new(&[7; 32]);
        let other = TokenKey::new(&[8; 32]);
        let g = Grant {
            user: UserId(42),
            size: 1 << 20,
            sha256: [3; 32],
            mime: "image/png".into(),
            expires_s: 1_000,
        };
        let sealed = g.seal(&key);
        assert_eq!(Grant::open(&key, &sealed, 999), Some(g));
        assert_eq!(Grant::open(&key, &sealed, 1_000), None, "expired");
        assert_eq!(Grant::open(&other, &sealed, 1), None, "another secret");
        let cap = capability(&key, "ab", 50);
        let s = cap.split("&s=").nth(1).unwrap();
        assert_eq!(check_capability(&key, "ab", 50, s, 49), Ok(()));
        assert_eq!(check_capability(&key, "ab", 50, s, 50), Err(true));
        assert_eq!(
            check_capability(&key, "ab", 51, s, 1),
            Err(false),
            "another expiry"
        );
        assert_eq!(
            check_capability(&key, "ac", 50, s, 1),
            Err(false),
            "another medium"
        );
        assert_eq!(
            check_capability(&key, "ab", 50, &sealed, 1),
            Err(false),
            "a grant is no capability"
        );
        let d = Deletion {
            user: UserId(42),
            media: "ab".repeat(16),
            expires_s: 1_000,
        };
        let sealed_d = d.seal(&key);
        assert_eq!(Deletion::open(&key, &sealed_d, 999), Some(d));
        assert_eq!(Deletion::open(&key, &sealed_d, 1_000), None, "expired");
        assert_eq!(Deletion::open(&other, &sealed_d, 1), None, "another secret");
        assert_eq!(
            Deletion::open(&key, &sealed, 1),
            None,
            "a grant is no deletion"
        );
        assert_eq!(
            Grant::open(&key, &sealed_d, 1),
            None,
            "a deletion is no grant"
        );
        assert!(valid_media_id(&"0f".repeat(16)) && !valid_media_id("../x"));
        assert!(valid_mime("image/jpeg") && valid_mime("text/plain; charset=utf-8"));
        assert!(!valid_mime("image") && !valid_mime("a/b\r\nx: y") && !valid_mime("/x"));
    }
}

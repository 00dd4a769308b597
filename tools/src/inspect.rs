//! `inspect`: what a data dir holds, per shard — users, devices, conversations, messages and
//! their sizes — read offline (RocksDB read-only; safe beside a running server).

use std::path::Path;

use serde::Serialize;

/// Counts and bytes (key + value) of one kind of record.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ShardStats {
    pub shard: u16,
    pub users: Tally,
    pub devices: Tally,
    pub memberships: Tally,
    pub conversations: Tally,
    pub messages: Tally,
    pub dedup_keys: Tally,
    /// Group member records and pending join requests.
    pub group_members: Tally,
    pub other: Tally,
}

/// The tag byte after the slot names the record kind (see `hermod_shards::storage`).
fn tally_for<'a>(stats: &'a mut ShardStats, key: &[u8]) -> &'a mut Tally {
    match key.get(2) {
        Some(b'U') => &mut stats.users,
        Some(b'D') => &mut stats.devices,
        Some(b'C') => &mut stats.memberships,
        Some(b'M') => &mut stats.conversations,
        Some(b'R') => &mut stats.messages,
        Some(b'I') => &mut stats.dedup_keys,
        Some(b'G' | b'J') => &mut stats.group_members,
        _ => &mut stats.other,
    }
}

pub fn inspect(data: &Path) -> anyhow::Result<Vec<ShardStats>> {
    let mut stats: Vec<ShardStats> = Vec::new();
    let shards =
        hermod_store::rocks::visit_all(&hermod_store::datadir::db_path(data), |shard, k, v| {
            while stats.len() <= shard as usize {
                let shard = stats.len() as u16;
                stats.push(ShardStats {
                    shard,
                    ..ShardStats::default()
                });
            }
            let t = tally_for(&mut stats[shard as usize], k);
            t.count += 1;
            t.bytes += (k.len() + v.len()) as u64;
        })?;
    while stats.len() < shards as usize {
        let shard = stats.len() as u16;
        stats.push(ShardStats {
            shard,
            ..ShardStats::default()
        });
    }
    Ok(stats)
}

/// The media store (docs/media.md): content stored once per hash, the media records that
/// point at it, and uploads under way.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MediaStats {
    pub blobs: Tally,
    pub media: u64,
    pub uploads: Tally,
}

/// What the file-system media store under `dir` holds (zeros if there is none).
pub fn media(dir: &Path) -> anyhow::Result<MediaStats> {
    let mut out = MediaStats::default();
    let read = |sub: &str| {
        std::fs::read_dir(dir.join(sub))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
    };
    for shelf in read("blobs") {
        for blob in std::fs::read_dir(shelf.path())?.flatten() {
            out.blobs.count += 1;
            out.blobs.bytes += blob.metadata()?.len();
        }
    }
    out.media = read("media")
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count() as u64;
    for e in read("uploads") {
        let path = e.path();
        match path.extension().and_then(|x| x.to_str()) {
            Some("json") => out.uploads.count += 1,
            Some("part") => out.uploads.bytes += e.metadata()?.len(),
            _ => {}
        }
    }
    Ok(out)
}

pub fn render_media(m: &MediaStats) -> String {
    format!(
        "media: {} media over {} stored contents ({} bytes); {} uploads under way ({} bytes so far)\n",
        m.media, m.blobs.count, m.blobs.bytes, m.uploads.count, m.uploads.bytes
    )
}

pub fn render(stats: &[ShardStats]) -> String {
    let mut out = format!(
        "{:<6} {:>10} {:>10} {:>12} {:>14} {:>14} {:>12} {:>14}\n",
        "shard",
        "users",
        "devices",
        "memberships",
        "conversations",
        "group members",
        "messages",
        "message bytes"
    );
    let mut total = ShardStats::default();
    for s in stats {
        out.push_str(&format!(
            "{:<6} {:>10} {:>10} {:>12} {:>14} {:>14} {:>12} {:>14}\n",
            s.shard,
            s.users.count,
            s.devices.count,
            s.memberships.count,
            s.conversations.count,
            s.group_members.count,
            s.messages.count,
            s.messages.bytes
        ));
        for (t, x) in [
            (&mut total.users, s.users),
            (&mut total.devices, s.devices),
            (&mut total.memberships, s.memberships),
            (&mut total.conversations, s.conversations),
            (&mut total.group_members, s.group_members),
            (&mut total.messages, s.messages),
        ] {
            t.count += x.count;
            t.bytes += x.bytes;
        }
    }
    out.push_str(&format!(
        "{:<6} {:>10} {:>10} {:>12} {:>14} {:>14} {:>12} {:>14}\n",
        "total",
        total.users.count,
        total.devices.count,
        total.memberships.count,
        total.conversations.count,
        total.group_members.count,
        total.messages.count,
        total.messages.bytes
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_provisioned_accounts_per_shard() {
        let dir = tempfile::tempdir().unwrap();
        let req = crate::provision::Request {
            data: dir.path(),
            shards: 3,
            prefix: "ins",
            users: 30,
            password: "password123",
            device: "bench",
            token_ttl_s: 60,
        };
        crate::provision::provision(&req).unwrap();
        let stats = inspect(dir.path()).unwrap();
        assert_eq!(stats.len(), 3);
        assert_eq!(stats.iter().map(|s| s.users.count).sum::<u64>(), 30);
        assert_eq!(stats.iter().map(|s| s.devices.count).sum::<u64>(), 30);
        assert!(stats
            .iter()
            .all(|s| s.messages.count == 0 && s.other.count == 0));
        assert!(render(&stats).contains("total"));
    }
}

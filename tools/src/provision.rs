//! Bulk accounts for benchmarks, written offline into a data dir (the server stopped: RocksDB's
//! lock refuses a second writer), each with one device and a token signed with the data dir's
//! secret. This is the provisioning path of `docs/benchmarks.md`: thousands of users without
//! thousands of argon2 logins, and no test-only door in the server — the records are exactly
//! what `register` + `login` would have written, in each user's home shard.
//!
//! All accounts share one password, hashed once at the production argon2id cost.

use std::fs;
use std::path::Path;

use anyhow::Context;
use hermod_shards::auth::{self, HashCost, Job, JobResult, TokenClaims, TokenKey};
use hermod_shards::ids::{Placement, UserId};
use hermod_shards::storage::Durability;
use hermod_shards::storage::{keys, DeviceRecord, UserRecord, WriteOp};
use hermod_store::datadir;
use hermod_store::rocks::{self, RocksStorage};
use rand::Rng;

pub struct Request<'a> {
    pub data: &'a Path,
    pub shards: u16,
    pub prefix: &'a str,
    pub users: usize,
    pub password: &'a str,
    pub device: &'a str,
    pub token_ttl_s: u64,
}

/// Writes the accounts and returns `(username, token)` for each.
pub fn provision(r: &Request) -> anyhow::Result<Vec<(String, String)>> {
    auth::check_password(r.password).map_err(|_| anyhow::anyhow!("passwords are 8-256 bytes"))?;
    auth::check_device(r.device)
        .map_err(|_| anyhow::anyhow!("device names are 1-64 printable characters"))?;
    fs::create_dir_all(r.data).with_context(|| format!("creating {}", r.data.display()))?;
    let key = TokenKey::new(&datadir::load_or_create_secret(r.data).context("token secret")?);
    let db = rocks::open(&datadir::db_path(r.data), r.shards)?;
    let JobResult::Hashed(Some(phc)) = (Job::Hash {
        password: r.password.to_owned(),
    })
    .run(HashCost::default()) else {
        anyhow::bail!("hashing the password failed");
    };
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let placement = Placement::new(r.shards);
    let mut per_shard: Vec<Vec<WriteOp>> = vec![Vec::new(); r.shards as usize];
    let mut out = Vec::with_capacity(r.users);
    let mut rng = rand::thread_rng();
    for i in 0..r.users {
        let name = auth::normalise_username(&format!("{}-{i}", r.prefix))
            .map_err(|_| anyhow::anyhow!("{}-{i} is not a valid username", r.prefix))?;
        let user = UserId::from_username(&name);
        let nonce: u64 = rng.gen();
        let ops = &mut per_shard[placement.home(user).0 as usize];
        let record = UserRecord {
            name: name.clone(),
            phc: phc.clone(),
            created_ms: now_s * 1000,
        };
        ops.push(WriteOp::Put(keys::user(user), record.encode()));
        let device = DeviceRecord {
            nonce,
            created_ms: now_s * 1000,
        };
        ops.push(WriteOp::Put(keys::device(user, r.device), device.encode()));
        let claims = TokenClaims {
            user,
            nonce,
            issued_s: now_s,
            expires_s: now_s + r.token_ttl_s,
            device: r.device.to_owned(),
        };
        out.push((name, key.mint(&claims)));
    }
    for (shard, ops) in per_shard.into_iter().enumerate() {
        let store = RocksStorage::new(db.clone(), shard as u16);
        for chunk in ops.chunks(10_000) {
            store.write(chunk, Durability::Fsync)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermod_shards::storage::Storage;

    #[test]
    fn writes_verifiable_accounts_in_their_home_shards() {
        let dir = tempfile::tempdir().unwrap();
        let req = Request {
            data: dir.path(),
            shards: 2,
            prefix: "load",
            users: 50,
            password: "password123",
            device: "bench",
            token_ttl_s: 3600,
        };
        let accounts = provision(&req).unwrap();
        assert_eq!(accounts.len(), 50);
        let key = TokenKey::new(&datadir::load_or_create_secret(dir.path()).unwrap());
        let db = rocks::open(&datadir::db_path(dir.path()), 2).unwrap();
        for (name, token) in &accounts {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let claims = key.verify(token, now).unwrap();
            assert_eq!(claims.user, UserId::from_username(name));
            let home = RocksStorage::new(db.clone(), Placement::new(2).home(claims.user).0);
            let k = keys::device(claims.user, "bench");
            let device =
                DeviceRecord::decode(&k, &home.get(&k).unwrap().expect("device record")).unwrap();
            assert_eq!(device.nonce, claims.nonce, "the token resumes this device");
            assert!(home.get(&keys::user(claims.user)).unwrap().is_some());
        }
    }
}

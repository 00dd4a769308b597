//! The data directory's layout, shared by the server and the operator tools:
//!
//! | path | what |
//! | --- | --- |
//! | `db/` | the RocksDB database, one column family per shard |
//! | `secret.key` | 32 random bytes (mode 0600) that sign device tokens; back it up with `db/` |
//! | `node` | which node of which cluster map this data dir belongs to (`node=<id>`, `map=<hash>`), written at first start |

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;

use hermod_shards::auth::SECRET_BYTES;
use hermod_shards::cluster::MapHash;

pub fn db_path(data: &Path) -> PathBuf {
    data.join("db")
}

pub fn secret_path(data: &Path) -> PathBuf {
    data.join("secret.key")
}

/// Reads the token-signing secret, creating it (mode 0600, synced) on first use.
pub fn load_or_create_secret(data: &Path) -> std::io::Result<[u8; SECRET_BYTES]> {
    let path = secret_path(data);
    let mut secret = [0u8; SECRET_BYTES];
    match fs::File::open(&path) {
        Ok(mut f) => f.read_exact(&mut secret)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&secret)?;
            f.sync_all()?;
        }
        Err(e) => return Err(e),
    }
    Ok(secret)
}

pub fn identity_path(data: &Path) -> PathBuf {
    data.join("node")
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "data dir {path} belongs to node {stored_node:?} of cluster map {stored_map}, but this \
         start is node {node:?} of map {map}: a changed map moves slots, so lookups would miss \
         data. Start with the map and node this data dir was created with"
    )]
    Mismatch {
        path: String,
        stored_node: String,
        stored_map: String,
        node: String,
        map: MapHash,
    },
    #[error("{path} is not a node identity file (want `node=<id>` and `map=<hash>` lines)")]
    Malformed { path: String },
    #[error("node identity in {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Checks that this data dir belongs to `node` of the cluster map hashed `map`; at first start
/// (no identity file yet, including data dirs made before clusters existed) records it.
pub fn check_identity(data: &Path, node: &str, map: MapHash) -> Result<(), IdentityError> {
    let path = identity_path(data);
    let shown = path.display().to_string();
    let io = |source| IdentityError::Io {
        path: shown.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let (Some(stored_node), Some(stored_map)) = (field("node"), field("map")) else {
                return Err(IdentityError::Malformed { path: shown });
            };
            if stored_node != node || stored_map != map.to_string() {
                return Err(IdentityError::Mismatch {
                    path: data.display().to_string(),
                    stored_node,
                    stored_map,
                    node: node.to_owned(),
                    map,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut f = fs::File::create(&path).map_err(io)?;
            f.write_all(format!("node={node}\nmap={map}\n").as_bytes())
                .map_err(io)?;
            f.sync_all().map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_then_read_back() {
        let dir = std::env::temp_dir().join(format!(
            "hermod-secret-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        let first = load_or_create_secret(&dir).unwrap();
        assert_eq!(load_or_create_secret(&dir).unwrap(), first);
        let mode = fs::metadata(secret_path(&dir)).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_data_dir_keeps_its_node_and_map() {
        let dir = std::env::temp_dir().join(format!(
            "hermod-identity-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        check_identity(&dir, "a", MapHash(7)).unwrap();
        check_identity(&dir, "a", MapHash(7)).expect("the same again");
        let err = check_identity(&dir, "b", MapHash(7)).unwrap_err();
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");
        let err = check_identity(&dir, "a", MapHash(8)).unwrap_err();
        assert!(err.to_string().contains("0000000000000007"), "{err}");
        fs::write(identity_path(&dir), "garbage").unwrap();
        assert!(matches!(
            check_identity(&dir, "a", MapHash(7)),
            Err(IdentityError::Malformed { .. })
        ));
        fs::remove_dir_all(&dir).ok();
    }
}

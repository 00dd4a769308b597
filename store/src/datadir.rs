//! The data directory's layout, shared by the server and the operator tools:
//!
//! | path | what |
//! | --- | --- |
//! | `db/` | the RocksDB database, one column family per shard |
//! | `secret.key` | 32 random bytes (mode 0600) that sign device tokens; back it up with `db/` |

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;

use hermod_shards::auth::SECRET_BYTES;

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
}

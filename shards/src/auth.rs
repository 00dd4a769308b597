//! Accounts' security pieces: username and password rules, signed device tokens, and the
//! password-hashing jobs the driver runs off the reactor.
//!
//! A token is `base64url(payload) "." base64url(HMAC-SHA256(secret, payload))` with payload
//! `[version=1][user u64][nonce u64][issued_s u64][expires_s u64][device_len u8][device]`.
//! Any shard verifies signature and expiry without a lookup; the user's home shard then checks
//! `nonce` against the device record, so logging a device out revokes its tokens.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::UserId;
use crate::limits::{
    DEVICE_BYTES_MAX, PASSWORD_BYTES_MAX, PASSWORD_BYTES_MIN, USERNAME_BYTES_MAX,
    USERNAME_BYTES_MIN,
};
use crate::protocol::ErrorCode;

pub const SECRET_BYTES: usize = 32;
const TOKEN_VERSION: u8 = 1;

/// Lower-cases and validates a username: `[a-z0-9_.-]`, 3–32 bytes, starting with a letter or
/// digit. Usernames are case-insensitive; the normalised form is the identity.
pub fn normalise_username(raw: &str) -> Result<String, ErrorCode> {
    let name = raw.to_ascii_lowercase();
    let ok_len = (USERNAME_BYTES_MIN..=USERNAME_BYTES_MAX).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c));
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok_len && ok_chars && ok_first {
        Ok(name)
    } else {
        Err(ErrorCode::InvalidUsername)
    }
}

pub fn check_password(password: &str) -> Result<(), ErrorCode> {
    if (PASSWORD_BYTES_MIN..=PASSWORD_BYTES_MAX).contains(&password.len()) {
        Ok(())
    } else {
        Err(ErrorCode::WeakPassword)
    }
}

/// Device names: 1–64 bytes of printable text without control characters.
pub fn check_device(device: &str) -> Result<(), ErrorCode> {
    if !device.is_empty()
        && device.len() <= DEVICE_BYTES_MAX
        && !device.chars().any(char::is_control)
    {
        Ok(())
    } else {
        Err(ErrorCode::BadRequest)
    }
}

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub user: UserId,
    pub nonce: u64,
    pub issued_s: u64,
    pub expires_s: u64,
    pub device: String,
}

/// Signs and verifies tokens with the server secret (kept in the data dir).
#[derive(Clone)]
pub struct TokenKey {
    mac: Hmac<Sha256>,
}

impl TokenKey {
    pub fn new(secret: &[u8; SECRET_BYTES]) -> TokenKey {
        TokenKey {
            mac: Hmac::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    pub fn mint(&self, claims: &TokenClaims) -> String {
        let mut payload = Vec::with_capacity(34 + claims.device.len());
        payload.push(TOKEN_VERSION);
        payload.extend_from_slice(&claims.user.0.to_be_bytes());
        payload.extend_from_slice(&claims.nonce.to_be_bytes());
        payload.extend_from_slice(&claims.issued_s.to_be_bytes());
        payload.extend_from_slice(&claims.expires_s.to_be_bytes());
        let device = claims.device.as_bytes();
        debug_assert!(device.len() <= DEVICE_BYTES_MAX);
        payload.push(device.len() as u8);
        payload.extend_from_slice(device);
        let mut mac = self.mac.clone();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// `base64url(payload) "." base64url(HMAC(payload))`: the envelope of tokens, media
    /// grants and media capabilities (`crate::media`). Kinds never collide: each payload
    /// starts with its own version byte, checked by its parser.
    pub fn seal(&self, payload: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(payload);
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The payload of a sealed text whose signature holds (checked in constant time), if its
    /// parts are at most `payload_max` and 64 base64 characters.
    pub fn unseal(&self, sealed: &str, payload_max: usize) -> Option<Vec<u8>> {
        let (payload_b64, tag_b64) = sealed.split_once('.')?;
        if payload_b64.len() > payload_max || tag_b64.len() > 64 {
            return None;
        }
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag_b64).ok()?;
        let mut mac = self.mac.clone();
        mac.update(&payload);
        mac.verify_slice(&tag).ok()?;
        Some(payload)
    }

    /// Checks signature first (constant time), then shape, then expiry against `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<TokenClaims, ErrorCode> {
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(ErrorCode::BadToken)?;
        if payload_b64.len() > 256 || tag_b64.len() > 64 {
            return Err(ErrorCode::BadToken);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| ErrorCode::BadToken)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| ErrorCode::BadToken)?;
        let mut mac = self.mac.clone();
        mac.update(&payload);
        mac.verify_slice(&tag).map_err(|_| ErrorCode::BadToken)?;
        let claims = parse_payload(&payload).ok_or(ErrorCode::BadToken)?;
        if now_s >= claims.expires_s {
            return Err(ErrorCode::TokenExpired);
        }
        Ok(claims)
    }
}

fn parse_payload(p: &[u8]) -> Option<TokenClaims> {
    let u64_at = |at: usize| {
        p.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    if *p.first()? != TOKEN_VERSION {
        return None;
    }
    let device_len = *p.get(33)? as usize;
    let device = std::str::from_utf8(p.get(34..34 + device_len)?).ok()?;
    if p.len() != 34 + device_len {
        return None;
    }
    Some(TokenClaims {
        user: UserId(u64_at(1)?),
        nonce: u64_at(9)?,
        issued_s: u64_at(17)?,
        expires_s: u64_at(25)?,
        device: device.to_owned(),
    })
}

/// Argon2id cost. Production defaults follow OWASP's minimum (19 MiB, 2 passes); tests and
/// benchmarks may lower them through configuration.
#[derive(Clone, Copy, Debug)]
pub struct HashCost {
    pub memory_kib: u32,
    pub passes: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        HashCost {
            memory_kib: 19 * 1024,
            passes: 2,
        }
    }
}

/// CPU-heavy work the engine asks the driver to run on a blocking thread.
#[derive(Debug)]
pub enum Job {
    Hash { password: String },
    Verify { password: String, phc: String },
}

#[derive(Debug, PartialEq, Eq)]
pub enum JobResult {
    /// The PHC string of a new hash, or `None` if hashing failed (bad parameters).
    Hashed(Option<String>),
    Verified(bool),
}

impl Job {
    /// Runs the job. Seconds of CPU at production cost: never call on a reactor.
    pub fn run(self, cost: HashCost) -> JobResult {
        let params = argon2::Params::new(cost.memory_kib, cost.passes, 1, None);
        let Ok(params) = params else {
            return match self {
                Job::Hash { .. } => JobResult::Hashed(None),
                Job::Verify { .. } => JobResult::Verified(false),
            };
        };
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        match self {
            Job::Hash { password } => {
                let salt = SaltString::generate(&mut rand::rngs::OsRng);
                JobResult::Hashed(
                    argon
                        .hash_password(password.as_bytes(), &salt)
                        .ok()
                        .map(|h| h.to_string()),
                )
            }
            Job::Verify { password, phc } => {
                // The stored hash carries its own parameters; verification uses those.
                let ok = PasswordHash::new(&phc)
                    .map(|h| {
                        Argon2::default()
                            .verify_password(password.as_bytes(), &h)
                            .is_ok()
                    })
                    .unwrap_or(false);
                JobResult::Verified(ok)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            user: UserId(42),
            nonce: 7,
            issued_s: 100,
            expires_s: 200,
            device: "phone".into(),
        }
    }

    #[test]
    fn token_round_trip_and_tamper() {
        let key = TokenKey::new(&[9; SECRET_BYTES]);
        let token = key.mint(&claims());
        assert_eq!(key.verify(&token, 150), Ok(claims()));
        assert_eq!(key.verify(&token, 200), Err(ErrorCode::TokenExpired));
        let other = TokenKey::new(&[8; SECRET_BYTES]);
        assert_eq!(other.verify(&token, 150), Err(ErrorCode::BadToken));
        let mut bytes = token.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            key.verify(std::str::from_utf8(&bytes).unwrap(), 150),
            Err(ErrorCode::BadToken)
        );
        assert_eq!(key.verify("garbage", 150), Err(ErrorCode::BadToken));
        assert_eq!(key.verify("a.b", 150), Err(ErrorCode::BadToken));
    }

    #[test]
    fn usernames() {
        assert_eq!(normalise_username("Alice_1").as_deref(), Ok("alice_1"));
        assert!(normalise_username("ab").is_err());
        assert!(normalise_username("_abc").is_err());
        assert!(normalise_username("al ice").is_err());
        assert!(normalise_username("ålice").is_err());
    }

    #[test]
    fn hash_and_verify() {
        let cost = HashCost {
            memory_kib: 64,
            passes: 1,
        };
        let JobResult::Hashed(Some(phc)) = (Job::Hash {
            password: "correct horse".into(),
        })
        .run(cost) else {
            panic!("hash failed")
        };
        assert_eq!(
            Job::Verify {
                password: "correct horse".into(),
                phc: phc.clone()
            }
            .run(cost),
            JobResult::Verified(true)
        );
        assert_eq!(
            Job::Verify {
                password: "wrong".into(),
                phc
            }
            .run(cost),
            JobResult::Verified(false)
        );
    }
}

//! Password hashes: argon2id with the crate's default parameters (19 MiB, 2 passes, 1
//! lane: OWASP's recommendation), a random 16-byte salt per hash, kept as a PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`), so a later change of parameters still
//! verifies the old hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::error::{ErrorCode, RequestError};

/// The PHC string of `password` under a new random salt. Slow on purpose (tens of
/// milliseconds): call it off the async runtime ([`tokio::task::spawn_blocking`]).
pub fn hash(password: &str) -> Result<String, RequestError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("password hash: {e}")))
}

/// Whether `password` is the one `phc` was made from (false for a malformed hash).
/// Slow on purpose, as [`hash`].
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only_and_is_salted() {
        let a = hash("correct horse").unwrap();
        let b = hash("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has a salt of its own");
        assert!(!a.contains("correct horse"));
        assert!(verify("correct horse", &a) && verify("correct horse", &b));
        assert!(!verify("correct horse ", &a));
        assert!(!verify("correct horse", "not a hash"));
        crate::cluster_state::validate::password_hash("password_hash", &a).unwrap();
    }
}

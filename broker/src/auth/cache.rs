//! Successful password verifications, remembered for a while: argon2 is slow on
//! purpose, and a client sends its credentials with every gRPC request.
//!
//! An entry is keyed by an HMAC-SHA256, under a key drawn at random when the node
//! starts and never stored, of the user name, the password and the user's stored hash:
//! no password (nor anything that could be tested offline without the key) is kept, a
//! changed password or a re-created user misses (its hash differs), and a wrong
//! password misses. Bounded in entries (the oldest go first) and in age.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;
use tokio::time::Instant;

pub type Key = [u8; 32];

pub struct VerifiedCache {
    key: hmac::Key,
    entries_max: usize,
    ttl: Duration,
    entries: Mutex<HashMap<Key, Instant>>,
}

impl VerifiedCache {
    pub fn new(entries_max: usize, ttl: Duration) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // The OS's generator failed: a key from the rand crate's, still never stored.
            hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>())
        });
        Self { key, entries_max, ttl, entries: Mutex::new(HashMap::new()) }
    }

    /// The entry key of a login: the fields length-prefixed, so no two logins share one.
    pub fn key_of(&self, user: &str, password: &str, stored_hash: &str) -> Key {
        let mut ctx = hmac::Context::with_key(&self.key);
        for field in [user, password, stored_hash] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field.as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Whether this login verified within the last `ttl`.
    pub fn hit(&self, key: &Key) -> bool {
        if self.entries_max == 0 {
            return false;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(at) if at.elapsed() < self.ttl => true,
            Some(_) => {
                entries.remove(key);
                false
            }
            None => false,
        }
    }

    /// Remembers a verified login, dropping the oldest entry beyond the bound.
    pub fn insert(&self, key: Key) {
        if self.entries_max == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = self.ttl;
        if entries.len() >= self.entries_max {
            entries.retain(|_, at| at.elapsed() < ttl);
        }
        while entries.len() >= self.entries_max {
            let Some(oldest) = entries.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) else { break };
            entries.remove(&oldest);
        }
        entries.insert(key, Instant::now());
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_are_bounded_and_keep_no_password() {
        let cache = VerifiedCache::new(2, Duration::from_secs(60));
        let a = cache.key_of("alice", "pw-a", "$hash-a");
        assert_ne!(a, cache.key_of("alice", "pw-b", "$hash-a"), "another password");
        assert_ne!(a, cache.key_of("alice", "pw-a", "$hash-a2"), "another stored hash");
        assert_ne!(cache.key_of("ab", "c", "h"), cache.key_of("a", "bc", "h"), "fields do not run together");
        assert!(!a.windows(4).any(|w| w == b"pw-a"));
        assert!(!cache.hit(&a));
        cache.insert(a);
        assert!(cache.hit(&a));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!cache.hit(&a), "expired");
        let (b, c, d) = (cache.key_of("b", "1", "h"), cache.key_of("c", "1", "h"), cache.key_of("d", "1", "h"));
        cache.insert(b);
        tokio::time::advance(Duration::from_millis(1)).await;
        cache.insert(c);
        tokio::time::advance(Duration::from_millis(1)).await;
        cache.insert(d);
        assert_eq!(cache.len(), 2);
        assert!(!cache.hit(&b), "the oldest went first");
        assert!(cache.hit(&c) && cache.hit(&d));
        // Keys differ between nodes (each draws its own HMAC key).
        assert_ne!(VerifiedCache::new(1, Duration::ZERO).key_of("b", "1", "h"), b);
    }
}

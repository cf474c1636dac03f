//! Who may make node-to-node calls: the cluster credential.
//!
//! Every node serves the node-to-node service (`eventter.internal.v1.Internal`: Raft,
//! forwarded writes, gossip sync, replication) on the same port as clients. Only
//! cluster members may call it, and only they may send a request marked as forwarded
//! by another node. A member proves it with the cluster credential: a token derived
//! from the shared secret of `--cluster-secret-file`, which `peers/` puts on every call
//! and `api/` checks (in constant time) before any handler runs.
//!
//! The token, not the secret, travels: a SHA-256 of the secret under a fixed label, so
//! that the file's bytes never leave the node and any bytes may be in it. Without TLS
//! the token crosses the network in clear (as everything else then does); run TLS
//! (`--tls-cert-file`) where the network is not trusted.
//!
//! This module is a leaf: it reads nothing of the node.

use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// Metadata carrying the cluster credential on node-to-node calls.
pub const CLUSTER_CREDENTIAL_METADATA: &str = "eventter-cluster-credential";

/// Shortest cluster secret accepted, in bytes (after trailing whitespace is removed).
pub const CLUSTER_SECRET_MIN_BYTES: usize = 16;

/// Longest cluster secret file read, in bytes.
pub const CLUSTER_SECRET_FILE_MAX_BYTES: u64 = 64 * 1024;

/// Label the token is derived under, so that the token of a secret reused elsewhere
/// says nothing there.
const TOKEN_LABEL: &[u8] = b"eventtermq cluster credential v1\0";

/// Label the key of gossip datagram tags is derived under (another key than the
/// token's: the token crosses the network, the key never does).
const DATAGRAM_KEY_LABEL: &[u8] = b"eventtermq gossip datagram key v1\0";

/// Bytes of the tag (a truncated HMAC-SHA256) a gossip datagram ends with when the
/// cluster has a credential: a datagram from outside is dropped, so nobody but a
/// member can announce members (which the leader would add to Raft).
pub const DATAGRAM_TAG_BYTES: usize = 16;

/// Who this node accepts node-to-node calls from.
#[derive(Clone)]
pub enum InternalAccess {
    /// Nobody but itself: a node started without a credential and without
    /// `--insecure-trusted-network` stays a cluster of one. It still takes its own
    /// calls (those `peers/` might make to its own address), which carry a random
    /// credential drawn at start that no other process knows.
    Closed(ClusterSecret),
    /// Members presenting the cluster credential.
    Secret(ClusterSecret),
    /// Anyone who reaches the port (the seed's trusted private network), asked for
    /// with `--insecure-trusted-network`.
    TrustedNetwork,
}

impl fmt::Debug for InternalAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InternalAccess::Closed(_) => "Closed",
            InternalAccess::Secret(_) => "Secret(<redacted>)",
            InternalAccess::TrustedNetwork => "TrustedNetwork",
        })
    }
}

impl InternalAccess {
    /// Closed to every other process (see [`InternalAccess::Closed`]).
    pub fn closed() -> Self {
        let own: [u8; 32] = rand::random();
        let own: String = own.iter().map(|b| format!("{b:02x}")).collect();
        let key: [u8; 32] = rand::random();
        InternalAccess::Closed(ClusterSecret { token: own, datagram_key: hmac::Key::new(hmac::HMAC_SHA256, &key) })
    }

    /// `data` as a gossip datagram to send: with its tag when there is a credential.
    pub fn seal(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        if let Some(key) = self.datagram_key() {
            out.extend_from_slice(&hmac::sign(key, data).as_ref()[..DATAGRAM_TAG_BYTES]);
        }
        out
    }

    /// The payload of a received gossip datagram, if its tag is right (or none is
    /// needed).
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let Some(key) = self.datagram_key() else { return Some(datagram) };
        let split = datagram.len().checked_sub(DATAGRAM_TAG_BYTES)?;
        let (data, tag) = datagram.split_at(split);
        let expected = hmac::sign(key, data);
        bool::from(expected.as_ref()[..DATAGRAM_TAG_BYTES].ct_eq(tag)).then_some(data)
    }

    fn datagram_key(&self) -> Option<&hmac::Key> {
        match self {
            InternalAccess::Secret(s) | InternalAccess::Closed(s) => Some(&s.datagram_key),
            InternalAccess::TrustedNetwork => None,
        }
    }

    /// The credential this node sends on its own calls to other nodes.
    pub fn token(&self) -> Option<&str> {
        match self {
            InternalAccess::Secret(s) | InternalAccess::Closed(s) => Some(&s.token),
            InternalAccess::TrustedNetwork => None,
        }
    }

    /// Whether a call presenting `presented` (the credential metadata, if any) may go
    /// on to a node-to-node handler.
    pub fn check(&self, presented: Option<&[u8]>) -> Result<(), Refusal> {
        match (self, presented) {
            (InternalAccess::TrustedNetwork, _) => Ok(()),
            (InternalAccess::Closed(own), Some(p)) if own.matches(p) => Ok(()),
            (InternalAccess::Closed(_), _) => Err(Refusal::Closed),
            (InternalAccess::Secret(_), None) => Err(Refusal::Missing),
            (InternalAccess::Secret(s), Some(p)) if s.matches(p) => Ok(()),
            (InternalAccess::Secret(_), Some(_)) => Err(Refusal::Wrong),
        }
    }
}

/// Why a node-to-node call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This node takes no node-to-node calls at all (no credential configured).
    Closed,
    /// The call carried no credential (a client, or a node without one).
    Missing,
    /// The call carried a credential that is not this cluster's.
    Wrong,
}

impl Refusal {
    /// Label value of the refusal metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Closed => "closed",
            Refusal::Missing => "missing",
            Refusal::Wrong => "wrong",
        }
    }

    /// What the caller is told (never the credential, expected or presented).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Closed => {
                "node-to-node calls are refused: this node was started without --cluster-secret-file \
                 (nor --insecure-trusted-network), so it accepts no other node"
            }
            Refusal::Missing => {
                "node-to-node calls need the cluster credential (only cluster members may make them): none was sent"
            }
            Refusal::Wrong => {
                "node-to-node calls need the cluster credential: the one sent is not this cluster's \
                 (is --cluster-secret-file the same on every node?)"
            }
        }
    }
}

/// The cluster's shared secret, kept only as the token derived from it.
#[derive(Clone)]
pub struct ClusterSecret {
    token: String,
    datagram_key: hmac::Key,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// The secret `bytes` (trailing whitespace, such as a file's last newline, is not
    /// part of it). The error names the rule, never the bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        let secret = &bytes[..end];
        if secret.len() < CLUSTER_SECRET_MIN_BYTES {
            return Err(format!(
                "the cluster secret must be at least {CLUSTER_SECRET_MIN_BYTES} bytes (without trailing \
                 whitespace); it has {}",
                secret.len()
            ));
        }
        let derive = |label: &[u8]| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(label);
            ctx.update(secret);
            ctx.finish()
        };
        let token = derive(TOKEN_LABEL).as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let datagram_key = hmac::Key::new(hmac::HMAC_SHA256, derive(DATAGRAM_KEY_LABEL).as_ref());
        Ok(Self { token, datagram_key })
    }

    /// Reads the secret from `path` (`--cluster-secret-file`).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let flag = "--cluster-secret-file";
        let meta = std::fs::metadata(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
        if meta.len() > CLUSTER_SECRET_FILE_MAX_BYTES {
            return Err(format!(
                "{flag}: {} has {} bytes, more than the {CLUSTER_SECRET_FILE_MAX_BYTES} a secret file may have",
                path.display(),
                meta.len()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
        Self::new(&bytes).map_err(|e| format!("{flag}: {}: {e}", path.display()))
    }

    /// Whether `presented` is this secret's token; constant time in its content.
    fn matches(&self, presented: &[u8]) -> bool {
        self.token.as_bytes().ct_eq(presented).into()
    }
}

/// Lets an event that may come in floods (refused calls, failed handshakes) be logged
/// at most once per interval, with the number not logged since.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(events not logged since the last one logged)` when this event is to be
    /// logged, `None` when it is only counted.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Who a client request is handled for: what `api/` and `amqp/` decide at the door and
/// check each request against, and what travels with a request one node forwards to
/// another (in [`CALLER_METADATA`], over the node-to-node path that only cluster
/// members pass), so that the receiving node checks it too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The node itself (a group's dead letters, a forward without a client behind it).
    Node,
    /// A client let in while the cluster had no users (open access).
    Open,
    /// An authenticated user, by name.
    User(String),
}

/// Metadata of a forwarded request naming who it is handled for: `user NAME` or
/// `open`; absent: the node's own request. Taken only together with the cluster
/// credential (a request marked as forwarded is refused without it).
pub const CALLER_METADATA: &str = "eventter-caller";

impl Caller {
    /// The value of [`CALLER_METADATA`]; `None` for the node's own requests.
    pub fn to_metadata(&self) -> Option<String> {
        match self {
            Caller::Node => None,
            Caller::Open => Some("open".into()),
            Caller::User(name) => Some(format!("user {name}")),
        }
    }

    /// The caller a forwarded request names (`None`: the header is not one of ours).
    pub fn from_metadata(value: Option<&str>) -> Option<Caller> {
        match value {
            None => Some(Caller::Node),
            Some("open") => Some(Caller::Open),
            Some(v) => v.strip_prefix("user ").filter(|n| !n.is_empty()).map(|n| Caller::User(n.to_string())),
        }
    }

    /// The user's name, if it is one.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User(name) => Some(name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_caller_travels_as_metadata_and_back() {
        for c in [super::Caller::Open, super::Caller::User("alice".into()), super::Caller::Node] {
            assert_eq!(super::Caller::from_metadata(c.to_metadata().as_deref()), Some(c));
        }
        assert_eq!(super::Caller::from_metadata(Some("root")), None);
        assert_eq!(super::Caller::from_metadata(Some("user ")), None);
    }

    use super::*;

    #[test]
    fn a_secret_is_checked_as_its_token_never_as_itself() {
        let s = ClusterSecret::new(b"0123456789abcdef-secret\n").unwrap();
        let access = InternalAccess::Secret(s.clone());
        let token = access.token().unwrap().to_string();
        assert_eq!(token.len(), 64);
        assert!(!token.contains("0123456789abcdef"));
        assert_eq!(access.check(Some(token.as_bytes())), Ok(()));
        // Trailing whitespace is not part of the secret.
        let same = ClusterSecret::new(b"0123456789abcdef-secret").unwrap();
        assert_eq!(InternalAccess::Secret(same).check(Some(token.as_bytes())), Ok(()));
        assert_eq!(access.check(None), Err(Refusal::Missing));
        assert_eq!(access.check(Some(b"0123456789abcdef-secret")), Err(Refusal::Wrong));
        assert_eq!(access.check(Some(&token.as_bytes()[..63])), Err(Refusal::Wrong));
        let other = ClusterSecret::new(b"0123456789abcdef-secreT").unwrap();
        assert_eq!(InternalAccess::Secret(other).check(Some(token.as_bytes())), Err(Refusal::Wrong));
        assert!(!format!("{access:?} {s:?}").contains(&token));
    }

    #[test]
    fn datagrams_of_another_cluster_or_altered_are_dropped() {
        let ours = InternalAccess::Secret(ClusterSecret::new(b"a cluster secret of enough bytes").unwrap());
        let theirs = InternalAccess::Secret(ClusterSecret::new(b"another secret of enough bytes!!").unwrap());
        let sealed = ours.seal(b"gossip");
        assert_eq!(sealed.len(), 6 + DATAGRAM_TAG_BYTES);
        assert_eq!(ours.open(&sealed), Some(&b"gossip"[..]));
        assert_eq!(theirs.open(&sealed), None);
        let mut altered = sealed.clone();
        altered[0] ^= 1;
        assert_eq!(ours.open(&altered), None);
        assert_eq!(ours.open(b"short"), None);
        assert_eq!(ours.open(b"gossip"), None);
        let trusted = InternalAccess::TrustedNetwork;
        assert_eq!(trusted.seal(b"gossip"), b"gossip");
        assert_eq!(trusted.open(b"gossip"), Some(&b"gossip"[..]));
    }

    #[test]
    fn closed_refuses_everyone_but_itself_and_trusted_takes_everyone() {
        let closed = InternalAccess::closed();
        assert_eq!(closed.check(None), Err(Refusal::Closed));
        assert_eq!(closed.check(Some(b"x")), Err(Refusal::Closed));
        assert_eq!(closed.check(closed.token().map(str::as_bytes)), Ok(()));
        let other = InternalAccess::closed();
        assert_eq!(closed.check(other.token().map(str::as_bytes)), Err(Refusal::Closed));
        assert_eq!(InternalAccess::TrustedNetwork.check(None), Ok(()));
        assert!(InternalAccess::TrustedNetwork.token().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_logged_once_per_interval_with_the_count_of_the_rest() {
        let log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(log.admit(), Some(2));
        assert_eq!(log.admit(), None);
    }

    #[test]
    fn a_short_secret_is_refused_naming_the_rule_not_the_bytes() {
        let e = ClusterSecret::new(b"short-secret  \n").unwrap_err();
        assert!(e.contains("at least 16 bytes") && e.contains("it has 12"), "{e}");
        assert!(!e.contains("short-secret"), "{e}");
    }
}

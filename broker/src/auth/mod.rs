//! Users of the client APIs: who a client is (authentication) and what it may do
//! (authorization), for gRPC (`api/`) and AMQP (`amqp/`) alike.
//!
//! - [`password`]: argon2id hashes as PHC strings.
//! - [`cache`]: successful verifications remembered (bounded in entries and age, keyed
//!   by an HMAC so that no password is kept).
//! - [`throttle`]: the growing delay before the answer to a failed login, per source.
//!
//! Users live in the cluster state (`ClusterState::users`). While there is none, access
//! is open, as before users existed ([`Caller::Open`]); once one exists, every client
//! request must authenticate, and [`decide`] checks each against the user's
//! permissions in the state as it is now (a change applies to the next request).

pub mod cache;
pub mod password;
pub mod throttle;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::cluster_state::{ClusterState, SharedState};
use crate::error::{ErrorCode, RequestError};
use crate::metrics::Metrics;
pub use crate::security::Caller;

/// The user RabbitMQ clients log in as by default: taken with its own name as
/// password while the cluster has no users; once users exist, a user of that name may
/// log in only from a loopback address (RabbitMQ's `loopback_users`).
pub const GUEST: &str = "guest";

/// Limits of authentication; every one a node flag.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Successful verifications remembered at most (0: none; every request verifies).
    pub cache_entries_max: usize,
    /// How long a successful verification is remembered.
    pub cache_ttl_ms: u64,
    /// The delay before answering the first failed login from a source; each further
    /// failure doubles it.
    pub failure_delay_ms: u64,
    /// ... up to this.
    pub failure_delay_max_ms: u64,
    /// A source without failures this long starts again from `failure_delay_ms`.
    pub failure_forget_ms: u64,
    /// Password verifications running at once at most (each takes 19 MiB of memory
    /// and a core for tens of milliseconds); more wait.
    pub verifications_in_flight_max: usize,
    /// Set by the node when started with `--admin-user`: see [`Auth::open_access`].
    pub awaiting_bootstrap_admin: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            cache_entries_max: 10_000,
            cache_ttl_ms: 5 * 60 * 1000,
            failure_delay_ms: 100,
            failure_delay_max_ms: 5_000,
            failure_forget_ms: 60_000,
            verifications_in_flight_max: 4,
            awaiting_bootstrap_admin: false,
        }
    }
}

/// Why a login was refused: the `reason` of `eventtermq_auth_failures_total` and of
/// the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No credentials, while the cluster has users.
    Missing,
    /// Credentials that cannot be read (not Basic, not base64, no colon, a mechanism
    /// not offered).
    Malformed,
    UnknownUser,
    WrongPassword,
    /// `guest` from an address that is not a loopback one.
    GuestNotLoopback,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::UnknownUser => "unknown_user",
            Failure::WrongPassword => "wrong_password",
            Failure::GuestNotLoopback => "guest_not_loopback",
        }
    }

    /// What the client is told: never which of user and password was wrong.
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => {
                "credentials required: the cluster has users (send a user name and password, e.g. the CLI's --user \
                 and --password-file)"
            }
            Failure::Malformed => "credentials not understood (expected `authorization: Basic base64(user:password)`)",
            Failure::UnknownUser | Failure::WrongPassword => "wrong user name or password",
            Failure::GuestNotLoopback => "user \"guest\" may log in only from a loopback address",
        }
    }
}

/// What a request needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// A cluster administrator (namespaces, users, the whole state); `what` names the
    /// request for the message.
    Admin { what: &'a str },
    /// Any permission on the namespace (listing its topics and groups).
    Member { namespace: &'a str },
    /// `configure` on a topic or consumer group (`kind` names which).
    Configure { namespace: &'a str, kind: &'a str, name: &'a str },
    /// `write` on a topic.
    Write { namespace: &'a str, topic: &'a str },
    /// `read` on a consumer group.
    Read { namespace: &'a str, group: &'a str },
}

impl Need<'_> {
    /// The permission's name, as RabbitMQ names them.
    pub fn permission(&self) -> &'static str {
        match self {
            Need::Admin { .. } => "administrator",
            Need::Member { .. } => "any",
            Need::Configure { .. } => "configure",
            Need::Write { .. } => "write",
            Need::Read { .. } => "read",
        }
    }
}

/// Whether `caller` may do what `need` says in `state`; the refusal names the user,
/// the namespace and the permission. Pure: the gRPC and AMQP doors and the tests use it.
pub fn decide(state: &ClusterState, caller: &Caller, need: &Need) -> Result<(), RequestError> {
    let name = match caller {
        Caller::Node => return Ok(()),
        Caller::Open if state.users.is_empty() => return Ok(()),
        Caller::Open => return Err(RequestError::new(ErrorCode::Unauthenticated, Failure::Missing.message())),
        Caller::User(name) => name,
    };
    let Some(user) = state.users.get(name) else {
        return Err(RequestError::new(ErrorCode::Unauthenticated, format!("user {name:?} does not exist any more")));
    };
    if user.admin {
        return Ok(());
    }
    let denied = |text: String| Err(RequestError::new(ErrorCode::PermissionDenied, text));
    let (namespace, kind, object) = match need {
        Need::Admin { what } => {
            return denied(format!("user {name:?} is not a cluster administrator, which {what} needs"));
        }
        Need::Member { namespace } => {
            if user.permissions.contains_key(*namespace) {
                return Ok(());
            }
            return denied(format!("user {name:?} has no permissions on namespace {namespace:?}"));
        }
        Need::Configure { namespace, kind, name } => (*namespace, *kind, *name),
        Need::Write { namespace, topic } => (*namespace, "topic", *topic),
        Need::Read { namespace, group } => (*namespace, "consumer group", *group),
    };
    let permission = need.permission();
    let Some(p) = user.permissions.get(namespace) else {
        return denied(format!(
            "user {name:?} has no {permission} permission on namespace {namespace:?} (no permissions there at all), \
             which {kind} {object:?} needs"
        ));
    };
    let pattern = match need {
        Need::Configure { .. } => &p.configure,
        Need::Write { .. } => &p.write,
        _ => &p.read,
    };
    if pattern.matches(object) {
        return Ok(());
    }
    denied(format!(
        "user {name:?} has no {permission} permission on namespace {namespace:?} for {kind} {object:?} (its {permission} \
         pattern is {:?})",
        pattern.as_str()
    ))
}

/// The node's authentication: users from the cluster state, the verification cache,
/// the failure delay. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    state: SharedState,
    metrics: Metrics,
    cache: cache::VerifiedCache,
    delay: throttle::FailureDelay,
    verifying: Semaphore,
    /// This node was started with `--admin-user` and has not yet seen it created (or
    /// found users in the state): it lets no one in without credentials meanwhile, so
    /// that a node told to have an administrator is never open.
    awaiting_admin: std::sync::atomic::AtomicBool,
    /// Verified against for an unknown user, so that the answer takes as long as for
    /// a known one (no user names learned from timing); made on first need.
    dummy_hash: std::sync::OnceLock<String>,
}

impl Auth {
    pub fn new(state: SharedState, metrics: Metrics, settings: &AuthSettings) -> Self {
        let delay = throttle::DelaySettings {
            first: Duration::from_millis(settings.failure_delay_ms),
            max: Duration::from_millis(settings.failure_delay_max_ms.max(settings.failure_delay_ms)),
            forget_after: Duration::from_millis(settings.failure_forget_ms),
        };
        Self {
            inner: Arc::new(Inner {
                state,
                metrics,
                cache: cache::VerifiedCache::new(
                    settings.cache_entries_max,
                    Duration::from_millis(settings.cache_ttl_ms),
                ),
                delay: throttle::FailureDelay::new(delay),
                verifying: Semaphore::new(settings.verifications_in_flight_max.max(1)),
                awaiting_admin: std::sync::atomic::AtomicBool::new(settings.awaiting_bootstrap_admin),
                dummy_hash: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Whether the cluster has users (else client access is open).
    pub fn users_exist(&self) -> bool {
        !self.inner.state.read().state.users.is_empty()
    }

    /// How a client without users in the cluster is met: `Ok(true)` let in (open
    /// access), `Ok(false)` the cluster has users (credentials needed), `Err` this node
    /// waits for its `--admin-user` to be created (retry in a moment).
    pub fn open_access(&self) -> Result<bool, RequestError> {
        if self.users_exist() {
            return Ok(false);
        }
        if self.inner.awaiting_admin.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RequestError::new(
                ErrorCode::NotReady,
                "this node creates its --admin-user first and takes no client without credentials until then; retry",
            ));
        }
        Ok(true)
    }

    /// The bootstrap administrator is created, or the cluster had users, or creating
    /// it failed for good: [`Auth::open_access`] follows the state from now on.
    pub fn bootstrap_admin_settled(&self) {
        self.inner.awaiting_admin.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`decide`] on this node's state as it is now; a refusal is counted.
    pub fn authorize(&self, caller: &Caller, need: &Need) -> Result<(), RequestError> {
        let r = decide(&self.inner.state.read().state, caller, need);
        if let Err(e) = &r {
            let reason = if e.code == ErrorCode::Unauthenticated { "missing" } else { "permission_denied" };
            self.inner.metrics.auth_failed(reason);
        }
        r
    }

    /// Whether `caller` may do what `need` says (nothing counted: for filtering lists).
    pub fn permits(&self, caller: &Caller, need: &Need) -> bool {
        decide(&self.inner.state.read().state, caller, need).is_ok()
    }

    /// Checks `user`'s `password` (a client of `protocol` at `from`). A failure is
    /// answered only after [`Auth::refuse`]'s delay.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        from: Option<SocketAddr>,
        protocol: &'static str,
    ) -> Result<Caller, Failure> {
        let failure = match self.verify(user, password, from).await {
            Ok(()) => return Ok(Caller::User(user.to_string())),
            Err(f) => f,
        };
        self.refuse(failure, Some(user), from, protocol).await;
        Err(failure)
    }

    async fn verify(&self, user: &str, password: &str, from: Option<SocketAddr>) -> Result<(), Failure> {
        if user == GUEST && !from.is_some_and(|a| is_loopback(a.ip())) {
            return Err(Failure::GuestNotLoopback);
        }
        let stored = self.inner.state.read().state.users.get(user).map(|u| u.password_hash.clone());
        let key = stored.as_ref().map(|h| self.inner.cache.key_of(user, password, h));
        if key.is_some_and(|k| self.inner.cache.hit(&k)) {
            return Ok(());
        }
        let (password, known, inner) = (password.to_string(), stored.clone(), self.inner.clone());
        let ok = {
            let _slot = self.inner.verifying.acquire().await;
            tokio::task::spawn_blocking(move || {
                let phc = known.unwrap_or_else(|| {
                    inner
                        .dummy_hash
                        .get_or_init(|| password::hash("eventtermq: no such user").unwrap_or_default())
                        .clone()
                });
                password::verify(&password, &phc)
            })
            .await
            .unwrap_or(false)
        };
        match (stored, ok, key) {
            (None, _, _) => Err(Failure::UnknownUser),
            (Some(_), true, Some(k)) => {
                self.inner.cache.insert(k);
                Ok(())
            }
            _ => Err(Failure::WrongPassword),
        }
    }

    /// A refused login: counted, logged once (user, address, reason; never a
    /// password), and answered after the source's delay (none for `Missing`).
    pub async fn refuse(&self, failure: Failure, user: Option<&str>, from: Option<SocketAddr>, protocol: &'static str) {
        self.inner.metrics.auth_failed(failure.as_str());
        // No credentials at all is a client not set up, not a guess: no delay.
        let delay = match failure {
            Failure::Missing => Duration::ZERO,
            _ => self.inner.delay.failed(from.map(|a| a.ip())),
        };
        let from_text = from.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        tracing::warn!(
            protocol,
            user = user.unwrap_or("-"),
            from = %from_text,
            reason = failure.as_str(),
            delay_ms = delay.as_millis() as u64,
            "authentication failed"
        );
        tokio::time::sleep(delay).await;
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Largest password file read, in bytes.
pub const PASSWORD_FILE_MAX_BYTES: u64 = 64 * 1024;

/// The password in `path` (`--password-file`, `--admin-password-file`): the file's
/// text without trailing whitespace (a final newline). The error names the flag and
/// never shows the content.
pub fn read_password_file(flag: &str, path: &std::path::Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
    if meta.len() > PASSWORD_FILE_MAX_BYTES {
        return Err(format!("{flag}: {} is larger than {PASSWORD_FILE_MAX_BYTES} bytes", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
    let password = text.trim_end().to_string();
    crate::cluster_state::validate::password(flag, &password).map_err(|e| e.message)?;
    Ok(password)
}

/// Hashes a password for a new user, off the async runtime (argon2 is slow on purpose).
pub async fn hash_password(password: String) -> Result<String, RequestError> {
    tokio::task::spawn_blocking(move || password::hash(&password))
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("password hash task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::{validate, User};

    fn state() -> ClusterState {
        let mut st = ClusterState::new_cluster();
        st.namespaces.insert("a".into(), Default::default());
        st.namespaces.insert("b".into(), Default::default());
        let mut reader = User { password_hash: String::new(), admin: false, permissions: Default::default() };
        reader.permissions.insert("a".into(), validate::permissions("^$", "", "^orders\\.").unwrap());
        st.users.insert("reader".into(), reader);
        st.users
            .insert("root".into(), User { password_hash: String::new(), admin: true, permissions: Default::default() });
        st
    }

    fn user(n: &str) -> Caller {
        Caller::User(n.into())
    }

    #[test]
    fn permissions_follow_the_patterns_and_name_user_namespace_and_permission() {
        let st = state();
        let read = |ns, group| decide(&st, &user("reader"), &Need::Read { namespace: ns, group });
        read("a", "orders.eu").unwrap();
        let e = read("a", "payments").unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        for word in ["\"reader\"", "read", "\"a\"", "\"payments\""] {
            assert!(e.message.contains(word), "{word} in {}", e.message);
        }
        let e = read("b", "orders.eu").unwrap_err();
        assert!(e.message.contains("\"b\"") && e.message.contains("read"), "{}", e.message);
        let e = decide(&st, &user("reader"), &Need::Write { namespace: "a", topic: "orders.eu" }).unwrap_err();
        assert!(e.message.contains("write") && e.message.contains("\"a\""), "{}", e.message);
        let configure = Need::Configure { namespace: "a", kind: "topic", name: "t" };
        assert_eq!(decide(&st, &user("reader"), &configure).unwrap_err().code, ErrorCode::PermissionDenied);
        decide(&st, &user("reader"), &Need::Member { namespace: "a" }).unwrap();
        decide(&st, &user("reader"), &Need::Member { namespace: "b" }).unwrap_err();
        let e = decide(&st, &user("reader"), &Need::Admin { what: "create-user" }).unwrap_err();
        assert!(e.message.contains("administrator"), "{}", e.message);
        // The administrator may do everything, the node too.
        for c in [user("root"), Caller::Node] {
            decide(&st, &c, &Need::Admin { what: "x" }).unwrap();
            decide(&st, &c, &Need::Write { namespace: "b", topic: "t" }).unwrap();
        }
        // Open access ends with the first user; a deleted user is no one.
        assert_eq!(
            decide(&st, &Caller::Open, &Need::Member { namespace: "a" }).unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        decide(&ClusterState::new_cluster(), &Caller::Open, &Need::Admin { what: "x" }).unwrap();
        assert_eq!(
            decide(&st, &user("gone"), &Need::Member { namespace: "a" }).unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    }

    #[test]
    fn patterns_are_unanchored_regexes_and_the_empty_one_matches_nothing() {
        let p = |s: &str| crate::cluster_state::Pattern::parse("read", s).unwrap();
        assert!(p(".*").matches("anything") && p(".*").matches(""));
        assert!(p("ord").matches("my-orders"), "unanchored, as RabbitMQ's");
        assert!(!p("^ord").matches("my-orders"));
        assert!(!p("").matches("") && !p("").matches("x"));
        let e = crate::cluster_state::Pattern::parse("write", "(unclosed").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPermission);
        assert!(e.message.starts_with("write: \"(unclosed\""), "{}", e.message);
        let long = "a".repeat(crate::cluster_state::PATTERN_LEN_MAX + 1);
        assert!(crate::cluster_state::Pattern::parse("read", &long).is_err());
        assert!(crate::cluster_state::Pattern::parse("read", "a{1000}{1000}").is_err(), "compiled size bounded");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_verifies_once_then_hits_the_cache_and_a_failure_waits() {
        let shared = SharedState::detached(ClusterState::new_cluster());
        let hash = password::hash("s3cret").unwrap();
        let alice = User { password_hash: hash, admin: false, permissions: Default::default() };
        shared.change_detached(|st| {
            st.users.insert("alice".into(), alice);
        });
        let metrics = Metrics::new(10);
        let settings = AuthSettings { failure_delay_ms: 1000, ..Default::default() };
        let auth = Auth::new(shared.clone(), metrics.clone(), &settings);
        let from: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert_eq!(auth.login("alice", "s3cret", Some(from), "grpc").await, Ok(user("alice")));
        assert_eq!(auth.inner.cache.len(), 1);
        assert_eq!(auth.login("alice", "s3cret", Some(from), "grpc").await, Ok(user("alice")));
        assert_eq!(auth.inner.cache.len(), 1, "the second login was a cache hit");
        let started = tokio::time::Instant::now();
        assert_eq!(auth.login("alice", "wrong", Some(from), "grpc").await, Err(Failure::WrongPassword));
        assert!(started.elapsed() >= Duration::from_millis(1000), "a failure is answered after the delay");
        assert_eq!(auth.login("bob", "s3cret", Some(from), "grpc").await, Err(Failure::UnknownUser));
        assert!(started.elapsed() >= Duration::from_millis(3000), "the second failure waits twice as long");
        // guest only from loopback, once users exist.
        assert_eq!(auth.login(GUEST, "guest", Some(from), "amqp").await, Err(Failure::GuestNotLoopback));
        // A new password (a new hash) does not hit the old entry.
        let new_hash = password::hash("n3w").unwrap();
        shared.change_detached(|st| st.users.get_mut("alice").unwrap().password_hash = new_hash);
        assert_eq!(auth.login("alice", "s3cret", Some(from), "grpc").await, Err(Failure::WrongPassword));
        let text = metrics.encode(&Default::default(), false);
        assert!(text.contains(r#"eventtermq_auth_failures_total{reason="wrong_password"} 2"#), "{text}");
        assert!(text.contains(r#"eventtermq_auth_failures_total{reason="unknown_user"} 1"#), "{text}");
    }
}

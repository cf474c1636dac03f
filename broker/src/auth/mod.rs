//! Users of the client APIs: who a client is (authentication) and what it may do
//! (authorization), for gRPC (`api/`) and AMQP (`amqp/`) alike.
//!
//! - [`password`]: argon2id hashes as PHC strings.
//! - [`cache`]: successful verifications remembered (bounded in entries and age, keyed
//!   by an HMAC so that no password is kept).
//! - [`throttle`]: the growing delay before the answer to a failed login, per source.
//!
//! A client may also be a user by its TLS client certificate (`--tls-client-ca-file`):
//! the certificate names the user (`crate::client_cert`, `--tls-client-cert-user-from`),
//! who must exist in the cluster state; no password is checked, the user's permissions
//! apply. [`Auth::certificate`] reads what a connection's certificate says (refusing an
//! expired one), [`Auth::certificate_login`] logs in by it alone, and
//! [`Auth::password_login`] refuses a password login for another user than the
//! certificate's (never silently picking one of the two).
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

use crate::client_cert::{ClientCert, UserFrom};
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
    /// Where a client certificate names its user (`--tls-client-cert-user-from`).
    pub cert_user_from: UserFrom,
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
            cert_user_from: UserFrom::default(),
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
    /// A client certificate (verified by the CA) past its validity period.
    CertificateExpired,
    /// A client certificate naming a user the cluster does not have, and no password.
    CertificateUnknownUser,
    /// A client certificate without the name `--tls-client-cert-user-from` reads, and
    /// no password.
    CertificateNoUser,
    /// A client certificate of one user and a password login for another.
    CertificateUserMismatch,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::UnknownUser => "unknown_user",
            Failure::WrongPassword => "wrong_password",
            Failure::GuestNotLoopback => "guest_not_loopback",
            Failure::CertificateExpired => "certificate_expired",
            Failure::CertificateUnknownUser => "certificate_unknown_user",
            Failure::CertificateNoUser => "certificate_no_user",
            Failure::CertificateUserMismatch => "certificate_user_mismatch",
        }
    }

    /// Whether the answer waits for the source's failure delay: only a password may be
    /// guessed (no credentials is a client not set up; a certificate failure needs a
    /// certificate the CA signed).
    fn delayed(self) -> bool {
        matches!(self, Failure::Malformed | Failure::UnknownUser | Failure::WrongPassword | Failure::GuestNotLoopback)
    }

    /// What the client is told: never which of user and password was wrong.
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => {
                "credentials required: the cluster has users (send a user name and password, e.g. the CLI's --user \
                 and --password-file, or a client certificate that names a user)"
            }
            Failure::Malformed => "credentials not understood (expected `authorization: Basic base64(user:password)`)",
            Failure::UnknownUser | Failure::WrongPassword => "wrong user name or password",
            Failure::GuestNotLoopback => "user \"guest\" may log in only from a loopback address",
            Failure::CertificateExpired => "the client certificate has expired",
            Failure::CertificateUnknownUser => "the client certificate names no user of the cluster",
            Failure::CertificateNoUser => "the client certificate names no user",
            Failure::CertificateUserMismatch => "the client certificate is another user's than the credentials'",
        }
    }
}

/// A refused login: why (the metric's `reason`) and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub failure: Failure,
    pub message: String,
}

impl Refused {
    fn of(failure: Failure) -> Self {
        Refused { failure, message: failure.message().to_string() }
    }
}

/// What a connection's client certificate says of its caller, before any password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertUser {
    /// No client certificate, or certificates name no users
    /// (`--tls-client-cert-user-from none`).
    None,
    /// A user of the cluster.
    User(String),
    /// A name that is no user of the cluster (a node's certificate, say).
    Unknown(String),
    /// The certificate names no user: why.
    Unnamed(String),
}

impl CertUser {
    /// The user a password login must be for, if the certificate is a user's.
    fn user(&self) -> Option<&str> {
        match self {
            CertUser::User(name) => Some(name),
            _ => None,
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
    cert_user_from: UserFrom,
    /// Requests on a connection with an expired certificate are refused one by one (a
    /// node whose certificate expired calls many times a second): their log line is
    /// written at most once per [`EXPIRED_LOG_INTERVAL`].
    expired_log: crate::security::LogLimiter,
}

/// Refusals of expired client certificates are logged at most once per this interval.
pub const EXPIRED_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
                cert_user_from: settings.cert_user_from,
                expired_log: crate::security::LogLimiter::new(EXPIRED_LOG_INTERVAL),
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

    /// Where client certificates name their user (`none`: they do not).
    pub fn cert_user_from(&self) -> UserFrom {
        self.inner.cert_user_from
    }

    /// What a connection's client certificate (`None`: it has none) says of its
    /// caller. An expired one is refused (counted, logged at most once per
    /// [`EXPIRED_LOG_INTERVAL`]), whatever else the client sends.
    pub async fn certificate(
        &self,
        cert: Option<&ClientCert>,
        from: Option<SocketAddr>,
        protocol: &'static str,
    ) -> Result<CertUser, Refused> {
        let Some(cert) = cert else { return Ok(CertUser::None) };
        let named = cert.user(self.inner.cert_user_from);
        if let Some(at) = cert.expired(std::time::SystemTime::now()) {
            // Named by CN if the chosen name is missing: the message must say whose it is.
            let user = named.as_ref().ok().copied().flatten().or_else(|| cert.user(UserFrom::Cn).ok().flatten());
            let whose = user.map(|u| format!("of user {u:?} ")).unwrap_or_default();
            let message = format!(
                "the client certificate {whose}expired at {at}: present a renewed one (--tls-cert-file, \
                 --tls-key-file)"
            );
            let failure = Failure::CertificateExpired;
            self.inner.metrics.auth_failed(failure.as_str());
            if let Some(suppressed) = self.inner.expired_log.admit() {
                let from_text = from.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
                tracing::warn!(protocol, user = user.unwrap_or("-"), from = %from_text, reason = failure.as_str(),
                    expired_at = %at, suppressed, "authentication failed");
            }
            return Err(Refused { failure, message });
        }
        Ok(match named {
            Ok(None) => CertUser::None,
            Ok(Some(name)) if self.inner.state.read().state.users.contains_key(name) => CertUser::User(name.into()),
            Ok(Some(name)) => CertUser::Unknown(name.into()),
            Err(why) => CertUser::Unnamed(why),
        })
    }

    /// A login by client certificate alone (no password sent): the user it names,
    /// who must exist. Without a certificate user: `Missing`.
    pub async fn certificate_login(
        &self,
        cert: CertUser,
        from: Option<SocketAddr>,
        protocol: &'static str,
    ) -> Result<Caller, Refused> {
        let (refused, user) = match cert {
            CertUser::User(name) => return Ok(Caller::User(name)),
            CertUser::None => (Refused::of(Failure::Missing), None),
            CertUser::Unknown(name) => {
                let message = format!(
                    "the client certificate names user {name:?}, which does not exist in the cluster (an \
                     administrator creates it with create-user; or log in with a user name and password)"
                );
                (Refused { failure: Failure::CertificateUnknownUser, message }, Some(name))
            }
            CertUser::Unnamed(why) => {
                let message = format!("{why}; log in with a user name and password instead");
                (Refused { failure: Failure::CertificateNoUser, message }, None)
            }
        };
        self.refuse(refused.failure, user.as_deref(), from, protocol).await;
        Err(refused)
    }

    /// A password login on a connection whose certificate says `cert`: refused
    /// without checking the password when the certificate is another user's (both
    /// named); else [`Auth::login`] (the password is checked for the certificate's
    /// user too: presented credentials are never ignored).
    pub async fn password_login(
        &self,
        cert: &CertUser,
        user: &str,
        password: &str,
        from: Option<SocketAddr>,
        protocol: &'static str,
    ) -> Result<Caller, Refused> {
        if let Some(cert_user) = cert.user().filter(|c| *c != user) {
            let failure = Failure::CertificateUserMismatch;
            let message = format!(
                "the client certificate is user {cert_user:?} but the user name and password are for user {user:?}: \
                 send one user's credentials (the certificate alone logs in as {cert_user:?})"
            );
            let both = format!("{cert_user} (certificate), {user} (password)");
            self.refuse(failure, Some(&both), from, protocol).await;
            return Err(Refused { failure, message });
        }
        self.login(user, password, from, protocol).await.map_err(Refused::of)
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
    /// password), and answered after the source's delay (only where a password could
    /// be guessed: see `Failure::delayed`).
    pub async fn refuse(&self, failure: Failure, user: Option<&str>, from: Option<SocketAddr>, protocol: &'static str) {
        self.inner.metrics.auth_failed(failure.as_str());
        let delay = match failure.delayed() {
            true => self.inner.delay.failed(from.map(|a| a.ip())),
            false => Duration::ZERO,
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

    /// A cluster with the user `alice` (password `s3cret`), a 1 s failure delay, and a
    /// client address that is not a loopback one.
    fn with_alice() -> (SharedState, Metrics, Auth, SocketAddr) {
        let shared = SharedState::detached(ClusterState::new_cluster());
        let alice =
            User { password_hash: password::hash("s3cret").unwrap(), admin: false, permissions: Default::default() };
        shared.change_detached(|st| {
            st.users.insert("alice".into(), alice);
        });
        let metrics = Metrics::new(10);
        let settings = AuthSettings { failure_delay_ms: 1000, ..Default::default() };
        let auth = Auth::new(shared.clone(), metrics.clone(), &settings);
        (shared, metrics, auth, "10.1.2.3:5000".parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_verifies_once_then_hits_the_cache_and_a_failure_waits() {
        let (shared, metrics, auth, from) = with_alice();
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

    /// A client certificate (self-signed: the TLS layer verified the chain already)
    /// with the subject common name `cn` and the DNS name `dns`, valid until `until`.
    fn client_cert(cn: Option<&str>, dns: &str, until: (i32, u8, u8)) -> ClientCert {
        let mut params = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().unwrap();
        ClientCert::parse(params.self_signed(&key).unwrap().der())
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_is_its_user_and_refusals_name_the_users() {
        let (shared, metrics, auth, from) = with_alice();
        let settings = AuthSettings { failure_delay_ms: 1000, ..Default::default() };
        let far = (2100, 1, 1);

        // By CN (the default): a user of the cluster logs in without a password.
        let cert = auth.certificate(Some(&client_cert(Some("alice"), "svc.example", far)), Some(from), "grpc").await;
        assert_eq!(cert, Ok(CertUser::User("alice".into())));
        assert_eq!(auth.certificate_login(cert.unwrap(), Some(from), "grpc").await, Ok(user("alice")));
        assert_eq!(auth.certificate(None, Some(from), "grpc").await, Ok(CertUser::None));

        let started = tokio::time::Instant::now();
        // A name that is no user: refused naming it (with no password sent).
        let cert = auth.certificate(Some(&client_cert(Some("bob"), "svc.example", far)), Some(from), "grpc").await;
        assert_eq!(cert, Ok(CertUser::Unknown("bob".into())));
        let r = auth.certificate_login(cert.clone().unwrap(), Some(from), "grpc").await.unwrap_err();
        assert_eq!(r.failure, Failure::CertificateUnknownUser);
        assert!(r.message.contains("\"bob\"") && r.message.contains("does not exist"), "{}", r.message);
        // ... but a password login on it is one (a node's or a generic client certificate).
        assert_eq!(auth.password_login(&cert.unwrap(), "alice", "s3cret", Some(from), "grpc").await, Ok(user("alice")));

        // No CN: names no user.
        let cert = auth.certificate(Some(&client_cert(None, "svc.example", far)), Some(from), "grpc").await.unwrap();
        let r = auth.certificate_login(cert, Some(from), "grpc").await.unwrap_err();
        assert_eq!(r.failure, Failure::CertificateNoUser);
        assert!(r.message.contains("no subject common name (CN)"), "{}", r.message);

        // Another user's password on alice's certificate: refused naming both, the
        // password not even checked; the same user's must be right.
        let alices = CertUser::User("alice".into());
        let r = auth.password_login(&alices, "carol", "whatever", Some(from), "grpc").await.unwrap_err();
        assert_eq!(r.failure, Failure::CertificateUserMismatch);
        assert!(r.message.contains("\"alice\"") && r.message.contains("\"carol\""), "{}", r.message);
        assert!(!r.message.contains("whatever"));
        assert_eq!(started.elapsed(), Duration::ZERO, "certificate refusals are not delayed");
        assert_eq!(auth.password_login(&alices, "alice", "s3cret", Some(from), "grpc").await, Ok(user("alice")));
        let r = auth.password_login(&alices, "alice", "wrong", Some(from), "grpc").await.unwrap_err();
        assert_eq!(r.failure, Failure::WrongPassword);

        // Expired: refused whatever else, naming the user and when.
        let expired = client_cert(Some("alice"), "svc.example", (2021, 1, 1));
        let r = auth.certificate(Some(&expired), Some(from), "amqp").await.unwrap_err();
        assert_eq!(r.failure, Failure::CertificateExpired);
        assert!(
            r.message.contains("\"alice\"") && r.message.contains("expired at 2021-01-01T00:00:00Z"),
            "{}",
            r.message
        );

        // Certificates name no users when told so.
        let off = Auth::new(shared, metrics.clone(), &AuthSettings { cert_user_from: UserFrom::Off, ..settings });
        let cert = off.certificate(Some(&client_cert(Some("alice"), "x", far)), Some(from), "grpc").await;
        assert_eq!(cert, Ok(CertUser::None));

        let text = metrics.encode(&Default::default(), false);
        for reason in
            ["certificate_unknown_user", "certificate_no_user", "certificate_user_mismatch", "certificate_expired"]
        {
            assert!(
                text.contains(&format!("eventtermq_auth_failures_total{{reason=\"{reason}\"}} 1")),
                "{reason}: {text}"
            );
        }
    }
}

//! Errors of the reconcilers.
//!
//! A spec the broker refuses is not an error here: the reconciler records it in the
//! object's status and waits for the spec to change. Errors are what a retry can fix:
//! the API server or the broker being unreachable or answering unexpectedly.

/// Error of a reconcile; `error_policy` requeues the object with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The broker could not be reached (connection refused, timeout, no leader).
    #[error("broker at {address} is unavailable: {message}")]
    BrokerUnavailable { address: String, message: String },
    /// The broker refused the operator's credentials (Unauthenticated) or found them
    /// short of an administrator's (PermissionDenied).
    #[error("broker at {address} refused the operator's credentials: {message}")]
    BrokerUnauthenticated { address: String, message: String },
    /// The operator's credentials for the cluster are missing or unusable (its
    /// Secret); the message names the Secret and key, never a value.
    #[error("operator credentials: {0}")]
    Credentials(String),
    /// The brokers' TLS (`spec.tls`) is not usable yet: its Secret is missing or holds
    /// no usable CA; the message names the field, never a key or certificate.
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker answered with an error the operator does not expect.
    #[error("broker at {address} failed: {status}")]
    Broker { address: String, status: tonic::Status },
    /// Adding or removing a finalizer, or the reconcile it wraps, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object cannot be reconciled as it is (no namespace, a bad field the schema
    /// let through).
    #[error("invalid object: {0}")]
    InvalidObject(String),
}

impl Error {
    /// Short, bounded label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::BrokerUnavailable { .. } => "broker_unavailable",
            Self::BrokerUnauthenticated { .. } => "broker_unauthenticated",
            Self::Credentials(_) => "credentials",
            Self::Tls(_) => "tls",
            Self::Broker { .. } => "broker",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
            Self::InvalidObject(_) => "invalid_object",
        }
    }
}

/// Result of the operator's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The operator's own credential on each cluster (issue 17): an administrator the
//! brokers create at their first start (`--admin-user`, `--admin-password-file`) from
//! a Secret the operator generates once, `<cluster>-operator-credentials`, owned by
//! the EventterCluster. The operator sends it (`authorization: Basic`) on every call
//! it makes to that cluster's brokers.
//!
//! The password is generated only while the Secret does not exist and never
//! overwritten: the brokers keep the hash of the password they started with, so a
//! Secret replaced by hand, or deleted and generated again, no longer matches, and the
//! cluster's `CredentialsReady` condition says so.

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use crate::builders::{self, operator_credentials_secret};
use crate::crd::{EventterCluster, TlsSpec};
use crate::error::Result;
use crate::tls::ClusterTls;

/// The broker user the operator is on every cluster.
pub const OPERATOR_USER: &str = "eventter-operator";
/// Key of the user name in the Secret.
pub const USER_KEY: &str = "user";
/// Key of the password in the Secret (the file the brokers read).
pub const PASSWORD_KEY: &str = "password";
/// Random bytes of a generated password (hex-encoded in the Secret: 64 characters).
pub const GENERATED_PASSWORD_BYTES: usize = 32;
/// Longest password the brokers take (their `validate::password`).
pub const PASSWORD_LEN_MAX_BYTES: usize = 1024;

/// Key of the user name in a Secret the operator generates for a `User`.
pub const USER_SECRET_USERNAME_KEY: &str = "username";

/// Name of the Secret the operator generates for the `User` resource `user_resource`
/// (its metadata.name) when the User names none.
pub fn user_secret_name(user_resource: &str) -> String {
    format!("{user_resource}-eventter-credentials")
}

/// Name of the Secret holding the operator's credential on `cluster_name`.
pub fn secret_name(cluster_name: &str) -> String {
    format!("{cluster_name}-operator-credentials")
}

/// A new random password: [`GENERATED_PASSWORD_BYTES`] random bytes, hex-encoded (so
/// that it survives any file, header or shell quoting).
pub fn generate_password() -> String {
    let bytes: [u8; GENERATED_PASSWORD_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A user name and password the operator sends to brokers. Never printed: its
/// `Debug` shows the user only.
#[derive(Clone)]
pub struct BrokerCredentials {
    user: String,
    header: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    /// The cluster's CA, when its brokers serve TLS (`spec.tls`): calls go over TLS
    /// and verify the broker against it.
    tls: Option<ClusterTls>,
}

impl BrokerCredentials {
    /// Credentials of `user` with `password` (both as the brokers take them).
    pub fn new(user: &str, password: &str) -> std::result::Result<Self, String> {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Basic {encoded}").parse().map_err(|_| "cannot be sent as a header".to_string())?;
        header.set_sensitive(true);
        Ok(Self { user: user.to_string(), header, tls: None })
    }

    /// The same credentials, sent over TLS to brokers verified against `tls`.
    pub fn with_tls(mut self, tls: Option<ClusterTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The TLS to reach the brokers with (`None`: plaintext).
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }
}

impl std::fmt::Debug for BrokerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokerCredentials({:?}, tls: {}, ..)", self.user, self.tls.is_some())
    }
}

impl tonic::service::Interceptor for BrokerCredentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.header.clone());
        Ok(req)
    }
}

/// The password under `key` of `secret`, as the brokers read a password file
/// (trailing whitespace dropped), or why it cannot be one (naming the Secret and key;
/// never the value).
pub fn password_in(secret: &Secret, key: &str) -> std::result::Result<String, String> {
    let name = secret.name_any();
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.clone().into_bytes()))
        .ok_or_else(|| format!("Secret {name:?} has no key {key:?}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("Secret {name:?} key {key:?}: not UTF-8 text"))?;
    let password = text.trim_end();
    if password.is_empty() || password.len() > PASSWORD_LEN_MAX_BYTES {
        return Err(format!(
            "Secret {name:?} key {key:?}: a password must be 1-{PASSWORD_LEN_MAX_BYTES} bytes (got {})",
            password.len()
        ));
    }
    Ok(password.to_string())
}

/// The operator's credentials from its Secret, or why they are unusable.
pub fn from_operator_secret(secret: &Secret) -> std::result::Result<BrokerCredentials, String> {
    let password = password_in(secret, PASSWORD_KEY)?;
    BrokerCredentials::new(OPERATOR_USER, &password)
        .map_err(|e| format!("Secret {:?} key {PASSWORD_KEY:?}: {e}", secret.name_any()))
}

/// What the operator found of its credential on a cluster.
#[derive(Debug)]
pub enum Found {
    /// Usable; `created`: generated in this pass.
    Usable { credentials: BrokerCredentials, created: bool },
    /// The Secret is missing (and was not to be created here).
    Missing(String),
    /// The Secret exists but holds no usable password.
    Invalid(String),
}

/// The operator's credentials on `cluster` as the Topic, ConsumerGroup and User
/// reconcilers use them: the password from its Secret (never created here) and, when
/// the cluster has `spec.tls`, the CA from the Secret the brokers mount.
pub async fn load(client: &Client, cluster: &EventterCluster) -> Result<Found> {
    let credentials = match load_password(client, cluster, false).await? {
        Found::Usable { credentials, created } => (credentials, created),
        other => return Ok(other),
    };
    Ok(match cluster_tls(client, cluster).await? {
        Ok(tls) => Found::Usable { credentials: credentials.0.with_tls(tls), created: credentials.1 },
        Err(TlsProblem::Missing(message)) => Found::Missing(message),
        Err(TlsProblem::Invalid(message)) => Found::Invalid(message),
    })
}

/// Why the cluster's CA cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsProblem {
    /// Its Secret does not exist (yet), naming the field.
    Missing(String),
    /// Its Secret holds no usable `ca.crt`, naming the field.
    Invalid(String),
}

/// The field of `spec.tls` that names where the CA comes from, for messages.
pub fn tls_field(tls: &TlsSpec) -> &'static str {
    if tls.secret_name.is_some() {
        "spec.tls.secretName"
    } else {
        "spec.tls.selfSigned"
    }
}

/// The CA of `secret` (its `ca.crt`), or why not (naming `field`, never the content).
pub fn ca_in(secret: &Secret, field: &str) -> std::result::Result<ClusterTls, String> {
    let name = secret.name_any();
    let key = builders::TLS_CA_KEY;
    let pem = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()).ok_or_else(|| {
        format!("{field}: Secret {name:?} has no key {key:?} (the CA the brokers are verified against)")
    })?;
    ClusterTls::from_ca_pem(&pem).map_err(|e| format!("{field}: Secret {name:?} key {key:?}: {e}"))
}

/// The TLS client of `cluster`'s brokers: `None` without `spec.tls`, else the CA of the
/// Secret the brokers mount (the user's, or the operator's pod certificates).
pub async fn cluster_tls(
    client: &Client,
    cluster: &EventterCluster,
) -> Result<std::result::Result<Option<ClusterTls>, TlsProblem>> {
    let Some(tls) = &cluster.spec.tls else { return Ok(Ok(None)) };
    let namespace = cluster.namespace().unwrap_or_default();
    let name = builders::tls_secret_name(&cluster.name_any(), tls);
    let field = tls_field(tls);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let Some(secret) = secrets.get_opt(&name).await? else {
        return Ok(Err(TlsProblem::Missing(format!("{field}: Secret {name:?} not found in namespace {namespace:?}"))));
    };
    Ok(ca_in(&secret, field).map(Some).map_err(TlsProblem::Invalid))
}

/// Reads the operator's Secret of `cluster`; when it does not exist and `create`, makes
/// it with a new password (a create, never an overwrite: if another pass made it
/// meanwhile, that one is read). No TLS: see [`load`].
pub async fn load_password(client: &Client, cluster: &EventterCluster, create: bool) -> Result<Found> {
    let namespace = cluster.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let name = secret_name(&cluster.name_any());
    let mut created = false;
    let secret = match secrets.get_opt(&name).await? {
        Some(secret) => secret,
        None if !create => {
            return Ok(Found::Missing(format!(
                "Secret {name:?} (the operator's credentials) does not exist yet in namespace {namespace:?}"
            )))
        }
        None => {
            let secret = operator_credentials_secret(cluster, &generate_password());
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(made) => {
                    created = true;
                    // The API server answers with the object as stored.
                    if made.data.is_some() {
                        made
                    } else {
                        secret
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(match from_operator_secret(&secret) {
        Ok(credentials) => Found::Usable { credentials, created },
        Err(message) => Found::Invalid(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn operator_secret(cluster: &EventterCluster, password: &str) -> Secret {
        operator_credentials_secret(cluster, password)
    }

    fn cluster() -> EventterCluster {
        let spec = serde_json::from_value(serde_json::json!({"image": "x"})).unwrap();
        let mut cluster = EventterCluster::new("emq", spec);
        cluster.metadata.namespace = Some("mq".into());
        cluster.metadata.uid = Some("u-1".into());
        cluster
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 2 * GENERATED_PASSWORD_BYTES);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn secret_is_owned_by_the_cluster_and_reads_back() {
        let secret = operator_secret(&cluster(), "s3cret");
        assert_eq!(secret.metadata.name.as_deref(), Some("emq-operator-credentials"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("EventterCluster", "u-1", Some(true)));
        let credentials = from_operator_secret(&secret).unwrap();
        assert_eq!(credentials.user(), OPERATOR_USER);
        assert!(!format!("{credentials:?}").contains("s3cret"));
        let mut request = tonic::Request::new(());
        request = tonic::service::Interceptor::call(&mut credentials.clone(), request).unwrap();
        // base64("eventter-operator:s3cret")
        assert_eq!(request.metadata().get("authorization").unwrap(), "Basic ZXZlbnR0ZXItb3BlcmF0b3I6czNjcmV0");
    }

    #[test]
    fn bad_secrets_are_named_without_their_value() {
        let mut secret = operator_secret(&cluster(), "x");
        secret.data.as_mut().unwrap().remove(PASSWORD_KEY);
        let error = from_operator_secret(&secret).unwrap_err();
        assert_eq!(error, "Secret \"emq-operator-credentials\" has no key \"password\"");
        secret.data.as_mut().unwrap().insert(PASSWORD_KEY.into(), ByteString(b" \n".to_vec()));
        let error = from_operator_secret(&secret).unwrap_err();
        assert!(error.contains("must be 1-1024 bytes (got 0)"), "{error}");
        secret.data.as_mut().unwrap().insert(PASSWORD_KEY.into(), ByteString(vec![0xff, 0xfe]));
        assert!(from_operator_secret(&secret).unwrap_err().contains("not UTF-8"));
        // Trailing whitespace goes, as the brokers read the file.
        secret.data.as_mut().unwrap().insert(PASSWORD_KEY.into(), ByteString(b"pw\n".to_vec()));
        assert_eq!(password_in(&secret, PASSWORD_KEY).unwrap(), "pw");
    }
}

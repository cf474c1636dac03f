//! The TLS step of the EventterCluster reconcile (`spec.tls`): makes sure the Secret
//! the broker pods mount is there and usable, issuing the operator's own CA and pod
//! certificates for `selfSigned`, and gives the reconcile the client TLS for its broker
//! calls, the status's `tls` and the `TLSReady` condition.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::Context;
use crate::builders::{self, FIELD_MANAGER};
use crate::certificates::{self, Ca, PodCertificates};
use crate::crd::{EventterCluster, SelfSignedTls, TlsStatus};
use crate::credentials;
use crate::error::Result;
use crate::tls::ClusterTls;

/// What the TLS step found or did.
#[derive(Debug)]
pub struct TlsStep {
    /// How to reach the brokers: `Ok(None)` without `spec.tls`; `Err`: why the CA is not
    /// usable (naming the field).
    pub client: std::result::Result<Option<ClusterTls>, String>,
    /// The status's `tls`.
    pub status: Option<TlsStatus>,
    /// The `TLSReady` condition: status, reason, message (`None` without `spec.tls`).
    pub condition: Option<(bool, &'static str, String)>,
}

fn not_ready(reason: &'static str, message: String) -> TlsStep {
    TlsStep { client: Err(message.clone()), status: None, condition: Some((false, reason, message)) }
}

/// Runs the TLS step for `cluster`, whose StatefulSet has (or will have) `pods` pods.
pub async fn ensure(cluster: &EventterCluster, ctx: &Context, pods: i32) -> Result<TlsStep> {
    let Some(tls) = &cluster.spec.tls else {
        return Ok(TlsStep { client: Ok(None), status: None, condition: None });
    };
    let namespace = cluster.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    match (&tls.secret_name, &tls.self_signed) {
        (Some(secret_name), _) => {
            let field = "spec.tls.secretName";
            let Some(secret) = secrets.get_opt(secret_name).await? else {
                return Ok(not_ready(
                    "SecretNotFound",
                    format!("{field}: Secret {secret_name:?} not found in namespace {namespace:?}"),
                ));
            };
            let keys = [builders::TLS_CERT_KEY, builders::TLS_KEY_KEY];
            let data = secret.data.clone().unwrap_or_default();
            if let Some(key) = keys.iter().find(|k| data.get(**k).is_none_or(|v| v.0.is_empty())) {
                return Ok(not_ready("SecretInvalid", format!("{field}: Secret {secret_name:?} has no key {key:?}")));
            }
            let client = match credentials::ca_in(&secret, field) {
                Ok(client) => client,
                Err(message) => return Ok(not_ready("SecretInvalid", message)),
            };
            let message = format!(
                "the brokers serve the certificate of Secret {secret_name:?} (tls.crt, tls.key) and verify each other \
                 against its ca.crt, which clients need too"
            );
            Ok(TlsStep {
                client: Ok(Some(client)),
                status: Some(TlsStatus {
                    mode: "SecretName".into(),
                    secret_name: secret_name.clone(),
                    ..TlsStatus::default()
                }),
                condition: Some((true, "SecretReady", message)),
            })
        }
        (None, Some(self_signed)) => self_signed_step(cluster, ctx, &secrets, self_signed, pods).await,
        // The schema's rule refuses this; say so rather than guess.
        (None, None) => Ok(not_ready("Rejected", "spec.tls: set exactly one of secretName and selfSigned".into())),
    }
}

async fn self_signed_step(
    cluster: &EventterCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    spec: &SelfSignedTls,
    pods: i32,
) -> Result<TlsStep> {
    let field = "spec.tls.selfSigned";
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let now = SystemTime::now();
    let subject = certificates::ca_subject(&namespace, &name);
    let ca_name = builders::ca_secret_name(&name);
    // The CA: made once (a create, never an overwrite), then read.
    let ca = match secrets.get_opt(&ca_name).await? {
        Some(secret) => read_ca(&secret, &subject),
        None => {
            let lifetime = std::time::Duration::from_secs(u64::from(spec.ca_lifetime_hours) * 3600);
            let ca = match Ca::generate(&subject, now, lifetime) {
                Ok(ca) => ca,
                Err(message) => return Ok(not_ready("IssueFailed", format!("{field}: {message}"))),
            };
            match secrets.create(&PostParams::default(), &builders::ca_secret(cluster, &ca)).await {
                Ok(_) => {
                    let note = format!("made the cluster CA in Secret {ca_name:?}");
                    ctx.publish(cluster, EventType::Normal, "CACreated", note).await;
                    Ok(ca)
                }
                // Made meanwhile by another pass: use that one.
                Err(kube::Error::Api(e)) if e.code == 409 => read_ca(&secrets.get(&ca_name).await?, &subject),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let ca = match ca {
        Ok(ca) => ca,
        Err(message) => {
            return Ok(not_ready("SecretInvalid", format!("{field}: Secret {ca_name:?} (the cluster CA): {message}")))
        }
    };
    let certs_name = builders::pod_certificates_secret_name(&name);
    let stored = secrets
        .get_opt(&certs_name)
        .await?
        .and_then(|secret| PodCertificates::read(&secret.data.clone().unwrap_or_default(), secret.annotations()));
    let pod_names: Vec<String> = (0..pods.max(1)).map(|i| format!("{name}-{i}")).collect();
    let names_of = |pod: &str| builders::pod_dns_names(&name, &namespace, pod);
    let planned = certificates::plan(stored.as_ref(), &ca, &pod_names, names_of, now, spec.certificate_lifetime_hours);
    let current = match planned {
        Ok(Some(issued)) => {
            let secret = builders::pod_certificates_secret(cluster, &issued);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            secrets.patch(&certs_name, &params, &Patch::Apply(&secret)).await?;
            let what = if stored.is_some() { "renewed or extended" } else { "issued" };
            let note = format!(
                "{what} the pod certificates of {} in Secret {certs_name:?}, valid until {}",
                pod_names.join(", "),
                issued.not_after
            );
            ctx.publish(cluster, EventType::Normal, "CertificatesIssued", note).await;
            issued
        }
        Ok(None) => stored.unwrap_or_default(),
        Err(message) => return Ok(not_ready("IssueFailed", format!("{field}: {message}"))),
    };
    let client = ClusterTls::from_ca_pem(ca.cert_pem().as_bytes())
        .map_err(|e| format!("{field}: Secret {ca_name:?} key \"ca.crt\": {e}"));
    let message = format!(
        "pod certificates of {} in Secret {certs_name:?} signed by the cluster CA of Secret {ca_name:?}, valid until \
         {}, renewed after {}; clients verify the brokers with ca.crt of Secret {certs_name:?}",
        pod_names.join(", "),
        current.not_after,
        current.renew_after
    );
    Ok(TlsStep {
        condition: Some(match &client {
            Ok(_) => (true, "SelfSigned", message),
            Err(problem) => (false, "SecretInvalid", problem.clone()),
        }),
        client: client.map(Some),
        status: Some(TlsStatus {
            mode: "SelfSigned".into(),
            secret_name: certs_name,
            not_after: Some(current.not_after.to_string()),
            renew_after: Some(current.renew_after.to_string()),
        }),
    })
}

fn read_ca(secret: &Secret, subject: &str) -> std::result::Result<Ca, String> {
    let text = |key: &str| {
        let bytes = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
        let bytes = bytes.ok_or_else(|| format!("has no key {key:?}"))?;
        String::from_utf8(bytes).map_err(|_| format!("key {key:?} is not PEM text"))
    };
    Ca::from_pem(subject, &text(certificates::CA_CERT_KEY)?, &text(certificates::CA_KEY_KEY)?)
}

//! The operator's own cluster CA and per-pod certificates (`spec.tls.selfSigned`):
//! pure functions of their inputs and the time, so renewal is tested without waiting.
//!
//! - The CA (Secret `<cluster>-ca`: `ca.crt`, `ca.key`) is made once and never
//!   renewed (its lifetime is `caLifetimeHours`, 10 years by default). Its key never
//!   leaves that Secret: broker pods do not mount it.
//! - The pod certificates (Secret `<cluster>-tls`: `ca.crt`, `<pod>.crt`, `<pod>.key`)
//!   name the pod's DNS names, the client Service's and `localhost`, carry both the
//!   server and the client usage (a broker presents its own certificate when it calls
//!   another), and are all issued again once two thirds of their lifetime passed (the
//!   annotation `eventter.io/renew-after` records when). A pod missing from the Secret
//!   (a scale-up) gets its pair without touching the others.
//!
//! Only the CA's key signs: an [`rcgen::Issuer`] is rebuilt from the same subject and
//! the stored key, so nothing here parses a certificate.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// Key of the CA's private key in the CA Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// Key of a CA certificate (both Secrets), cert-manager's name.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Annotation of the pod certificates' Secret: when the operator issues them all again.
pub const RENEW_AFTER_ANNOTATION: &str = "eventter.io/renew-after";
/// Annotation of the pod certificates' Secret: when the oldest of them expires.
pub const NOT_AFTER_ANNOTATION: &str = "eventter.io/not-after";
/// Annotation of the pod certificates' Secret: the lifetime they were issued with, in
/// hours (a changed `certificateLifetimeHours` issues them again).
pub const LIFETIME_ANNOTATION: &str = "eventter.io/lifetime-hours";
/// A certificate is valid from this long before it is issued, for nodes whose clocks
/// run behind the operator's.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

/// The subject common name of `namespace/cluster`'s CA.
pub fn ca_subject(namespace: &str, cluster: &str) -> String {
    format!("EventterMQ cluster CA {namespace}/{cluster}")
}

fn ca_params(subject: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn serial() -> SerialNumber {
    // Positive (high bit clear) and unique enough for one cluster's certificates.
    SerialNumber::from(rand::random::<u64>() >> 1)
}

/// A cluster CA: its certificate (PEM) and the key that signs pod certificates.
pub struct Ca {
    subject: String,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({:?}, ..)", self.subject)
    }
}

impl Ca {
    /// A new CA valid from now (less [`CLOCK_SKEW_ALLOWANCE`]) for `lifetime`.
    pub fn generate(subject: &str, now: SystemTime, lifetime: Duration) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make a CA key: {e}"))?;
        let mut params = ca_params(subject);
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
        Ok(Self { subject: subject.to_string(), cert_pem: cert.pem(), key })
    }

    /// The CA of a stored certificate and key (`subject` as it was made with), or why
    /// the key is unusable (never the key itself).
    pub fn from_pem(subject: &str, cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("{CA_CERT_KEY}: not a PEM certificate"));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("{CA_KEY_KEY}: not a PEM private key: {e}"))?;
        Ok(Self { subject: subject.to_string(), cert_pem: cert_pem.to_string(), key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM (for its Secret only).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `names` (DNS names or IP addresses; the first is also the
    /// common name) valid from now for `lifetime`, and its new key, both PEM.
    pub fn issue(&self, names: &[String], now: SystemTime, lifetime: Duration) -> Result<(String, String), String> {
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| format!("cannot name {names:?} in a certificate: {e}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.distinguished_name = dn;
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let issuer_params = ca_params(&self.subject);
        let issuer = Issuer::from_params(&issuer_params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(|e| format!("cannot sign a certificate: {e}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Key of `pod`'s certificate in the pod certificates' Secret.
pub fn cert_key(pod: &str) -> String {
    format!("{pod}.crt")
}

/// Key of `pod`'s private key in the pod certificates' Secret.
pub fn key_key(pod: &str) -> String {
    format!("{pod}.key")
}

/// The pod certificates' Secret content: data and annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodCertificates {
    pub data: BTreeMap<String, ByteString>,
    /// When they are all issued again (two thirds of the oldest one's lifetime).
    pub renew_after: Timestamp,
    /// When the oldest one expires.
    pub not_after: Timestamp,
    pub lifetime_hours: u32,
}

impl PodCertificates {
    /// The annotations that record the times and lifetime.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (RENEW_AFTER_ANNOTATION.to_string(), self.renew_after.to_string()),
            (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
            (LIFETIME_ANNOTATION.to_string(), self.lifetime_hours.to_string()),
        ])
    }

    /// What a stored Secret's data and annotations say, if they say it all.
    pub fn read(data: &BTreeMap<String, ByteString>, annotations: &BTreeMap<String, String>) -> Option<Self> {
        Some(Self {
            data: data.clone(),
            renew_after: annotations.get(RENEW_AFTER_ANNOTATION)?.parse().ok()?,
            not_after: annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
            lifetime_hours: annotations.get(LIFETIME_ANNOTATION)?.parse().ok()?,
        })
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// What the pod certificates' Secret should hold for `pods` (each with the DNS names
/// `names_of` gives), signed by `ca`, given what it holds (`stored`: `None` when it does
/// not exist or its annotations are unreadable). `None`: keep it as it is. Issues every
/// pair again when the stored ones are due (`renew_after` passed), were issued with
/// another lifetime or by another CA; else adds the pairs of pods it lacks.
pub fn plan(
    stored: Option<&PodCertificates>,
    ca: &Ca,
    pods: &[String],
    names_of: impl Fn(&str) -> Vec<String>,
    now: SystemTime,
    lifetime_hours: u32,
) -> Result<Option<PodCertificates>, String> {
    let lifetime = Duration::from_secs(u64::from(lifetime_hours) * 3600);
    let renew_after = timestamp(now + lifetime * 2 / 3);
    let not_after = timestamp(now + lifetime);
    let ca_pem = ByteString(ca.cert_pem().as_bytes().to_vec());
    let due = |s: &PodCertificates| {
        timestamp(now) >= s.renew_after
            || s.lifetime_hours != lifetime_hours
            || s.data.get(CA_CERT_KEY) != Some(&ca_pem)
    };
    let (mut out, missing): (PodCertificates, Vec<&String>) = match stored {
        Some(s) if !due(s) => {
            let missing: Vec<&String> = pods
                .iter()
                .filter(|p| !s.data.contains_key(&cert_key(p)) || !s.data.contains_key(&key_key(p)))
                .collect();
            if missing.is_empty() {
                return Ok(None);
            }
            (s.clone(), missing)
        }
        _ => (
            PodCertificates {
                data: BTreeMap::from([(CA_CERT_KEY.to_string(), ca_pem)]),
                renew_after,
                not_after,
                lifetime_hours,
            },
            pods.iter().collect(),
        ),
    };
    for pod in missing {
        let (cert, key) = ca.issue(&names_of(pod), now, lifetime)?;
        out.data.insert(cert_key(pod), ByteString(cert.into_bytes()));
        out.data.insert(key_key(pod), ByteString(key.into_bytes()));
    }
    out.renew_after = out.renew_after.min(renew_after);
    out.not_after = out.not_after.min(not_after);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pod: &str) -> Vec<String> {
        vec![format!("{pod}.emq-nodes.mq.svc.cluster.local"), "emq.mq.svc.cluster.local".into(), "localhost".into()]
    }

    fn hours(n: u64) -> Duration {
        Duration::from_secs(n * 3600)
    }

    #[test]
    fn issued_certificates_verify_against_the_ca_and_name_the_pod() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let now = SystemTime::now();
        let ca = Ca::generate(&ca_subject("mq", "emq"), now, hours(24 * 365)).unwrap();
        // Stored and read back: the rebuilt issuer signs certificates the CA verifies.
        let ca = Ca::from_pem(&ca_subject("mq", "emq"), ca.cert_pem(), &ca.key_pem()).unwrap();
        let (cert, key) = ca.issue(&names("emq-0"), now, hours(24)).unwrap();
        assert!(key.contains("PRIVATE KEY") && !format!("{ca:?}").contains("PRIVATE"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let verify = |name: &str, at: SystemTime| {
            verifier.verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap()),
            )
        };
        use rustls::client::danger::ServerCertVerifier;
        verify("emq-0.emq-nodes.mq.svc.cluster.local", now).unwrap();
        verify("emq.mq.svc.cluster.local", now).unwrap();
        verify("localhost", now).unwrap();
        assert!(verify("emq-1.emq-nodes.mq.svc.cluster.local", now).is_err(), "another pod's name");
        assert!(verify("localhost", now + hours(25)).is_err(), "expired");
        // Another CA's certificate does not verify.
        let other = Ca::generate(&ca_subject("mq", "other"), now, hours(24)).unwrap();
        let (foreign, _) = other.issue(&names("emq-0"), now, hours(24)).unwrap();
        let foreign = CertificateDer::from_pem_slice(foreign.as_bytes()).unwrap();
        let name = ServerName::try_from("localhost".to_string()).unwrap();
        let at = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        assert!(verifier.verify_server_cert(&foreign, &[], &name, &[], at).is_err());
        assert!(Ca::from_pem("x", ca.cert_pem(), "not a key")
            .unwrap_err()
            .starts_with("ca.key: not a PEM private key"));
    }

    #[test]
    fn certificates_are_issued_once_extended_for_new_pods_and_renewed_at_two_thirds() {
        let t0 = SystemTime::now();
        let ca = Ca::generate("ca", t0, hours(24 * 365)).unwrap();
        let pods = |n: usize| (0..n).map(|i| format!("emq-{i}")).collect::<Vec<_>>();
        let first = plan(None, &ca, &pods(3), names, t0, 30).unwrap().unwrap();
        assert_eq!(first.data.len(), 1 + 2 * 3);
        assert_eq!(first.renew_after, timestamp(t0 + hours(20)));
        assert_eq!(first.not_after, timestamp(t0 + hours(30)));
        // Read back from the Secret's annotations.
        let stored = PodCertificates::read(&first.data, &first.annotations()).unwrap();
        assert_eq!(stored, first);
        // Nothing to do before the renewal time.
        assert_eq!(plan(Some(&stored), &ca, &pods(3), names, t0 + hours(19), 30).unwrap(), None);
        // A scale-up adds one pair and keeps the others and the renewal time.
        let later = t0 + hours(1);
        let grown = plan(Some(&stored), &ca, &pods(4), names, later, 30).unwrap().unwrap();
        assert_eq!(grown.data.len(), 1 + 2 * 4);
        assert_eq!(grown.data["emq-0.crt"], first.data["emq-0.crt"]);
        assert_eq!(grown.renew_after, first.renew_after);
        // Due: every pair again, new times.
        let t1 = t0 + hours(20);
        let renewed = plan(Some(&grown), &ca, &pods(4), names, t1, 30).unwrap().unwrap();
        assert_ne!(renewed.data["emq-0.crt"], first.data["emq-0.crt"]);
        assert_ne!(renewed.data["emq-3.key"], grown.data["emq-3.key"]);
        assert_eq!(renewed.renew_after, timestamp(t1 + hours(20)));
        // Another lifetime, or another CA: issued again too.
        assert!(plan(Some(&grown), &ca, &pods(4), names, later, 60).unwrap().is_some());
        let other = Ca::generate("other", t0, hours(24)).unwrap();
        let again = plan(Some(&grown), &other, &pods(4), names, later, 30).unwrap().unwrap();
        assert_eq!(again.data[CA_CERT_KEY].0, other.cert_pem().as_bytes());
        // Annotations missing: unreadable, so issued again.
        assert_eq!(PodCertificates::read(&first.data, &BTreeMap::new()), None);
    }
}

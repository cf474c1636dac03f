//! Which user a client certificate names (issue 17), as RabbitMQ's
//! `rabbitmq_auth_mechanism_ssl` does: by default the subject's common name (CN);
//! optionally the first DNS name or the first email address among the subject
//! alternative names (`--tls-client-cert-user-from cn|san-dns|san-email|none`).
//!
//! The certificate has been verified against `--tls-client-ca-file` by the time it is
//! read here (`transport::tls`); this module only reads names and the expiry out of
//! it. A leaf: it reads nothing of the node.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;

/// The flag that chooses where the user name comes from.
pub const USER_FROM_FLAG: &str = "--tls-client-cert-user-from";

/// Where in a client certificate the user's name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserFrom {
    /// The subject's common name (exactly one CN).
    #[default]
    Cn,
    /// The first DNS name among the subject alternative names.
    SanDns,
    /// The first email address (rfc822Name) among the subject alternative names.
    SanEmail,
    /// Certificates name no user: clients log in with a password only.
    Off,
}

impl UserFrom {
    pub const ALL: [UserFrom; 4] = [UserFrom::Cn, UserFrom::SanDns, UserFrom::SanEmail, UserFrom::Off];

    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            UserFrom::Cn => "cn",
            UserFrom::SanDns => "san-dns",
            UserFrom::SanEmail => "san-email",
            UserFrom::Off => "none",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            UserFrom::Cn => "subject common name (CN)",
            UserFrom::SanDns => "DNS name among its subject alternative names",
            UserFrom::SanEmail => "email address among its subject alternative names",
            UserFrom::Off => "user",
        }
    }
}

impl fmt::Display for UserFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        UserFrom::ALL.into_iter().find(|u| u.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = UserFrom::ALL.iter().map(|u| u.as_str()).collect();
            format!("{USER_FROM_FLAG}: {s:?} is not one of {}", all.join(", "))
        })
    }
}

/// What a verified client certificate says: its names and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    common_names: Vec<String>,
    san_dns: Vec<String>,
    san_email: Vec<String>,
    /// End of the validity period, in seconds since the Unix epoch (`None`: the
    /// certificate could not be read).
    not_after_unix_s: Option<i64>,
    /// Why the certificate could not be read, if it could not.
    unreadable: Option<String>,
}

impl ClientCert {
    /// Reads the names and expiry of a DER certificate (one the TLS layer verified;
    /// should it still not parse, it names no user and is not taken as expired).
    pub fn parse(der: &[u8]) -> Self {
        let mut out = ClientCert {
            common_names: Vec::new(),
            san_dns: Vec::new(),
            san_email: Vec::new(),
            not_after_unix_s: None,
            unreadable: None,
        };
        let cert = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => cert,
            Err(e) => {
                out.unreadable = Some(format!("the client certificate cannot be read: {e}"));
                return out;
            }
        };
        out.not_after_unix_s = Some(cert.validity().not_after.timestamp());
        out.common_names =
            cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => out.san_dns.push(n.to_string()),
                    GeneralName::RFC822Name(n) => out.san_email.push(n.to_string()),
                    _ => {}
                }
            }
        }
        out
    }

    /// The user the certificate names (`Ok(None)`: `from` is [`UserFrom::Off`]), or
    /// why it names none.
    pub fn user(&self, from: UserFrom) -> Result<Option<&str>, String> {
        if from == UserFrom::Off {
            return Ok(None);
        }
        if let Some(why) = &self.unreadable {
            return Err(why.clone());
        }
        let names = match from {
            UserFrom::Cn => {
                if self.common_names.len() > 1 {
                    return Err(format!(
                        "the client certificate has {} subject common names (CN), so it names no one user \
                         ({USER_FROM_FLAG} cn)",
                        self.common_names.len()
                    ));
                }
                &self.common_names
            }
            UserFrom::SanDns => &self.san_dns,
            UserFrom::SanEmail => &self.san_email,
            UserFrom::Off => return Ok(None),
        };
        match names.first() {
            Some(n) if !n.is_empty() => Ok(Some(n)),
            _ => Err(format!(
                "the client certificate has no {} to name a user ({USER_FROM_FLAG} {from})",
                from.describe()
            )),
        }
    }

    /// When the certificate expired, as RFC 3339 text, if it had by `now`.
    pub fn expired(&self, now: SystemTime) -> Option<String> {
        let not_after = self.not_after_unix_s?;
        let now_s = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        (now_s > not_after).then(|| expiry_text(not_after))
    }
}

/// The end of the validity period of a DER certificate, in seconds since the Unix
/// epoch (`None`: it cannot be read).
pub fn not_after_unix_s(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn expiry_text(unix_s: i64) -> String {
    match u64::try_from(unix_s) {
        Ok(s) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string(),
        Err(_) => format!("{unix_s} s since the Unix epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with `cns` as subject common names and `sans` as
    /// subject alternative names, valid until the start of the day `not_after`.
    fn cert(cns: &[&str], sans: Vec<rcgen::SanType>, not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for cn in cns {
            params.distinguished_name.push(rcgen::DnType::CommonName, *cn);
        }
        params.subject_alt_names = sans;
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn dns(n: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(n.try_into().unwrap())
    }

    fn email(n: &str) -> rcgen::SanType {
        rcgen::SanType::Rfc822Name(n.try_into().unwrap())
    }

    const FAR: (i32, u8, u8) = (2100, 1, 1);

    #[test]
    fn the_user_comes_from_the_cn_by_default_or_the_first_san_of_a_kind() {
        let c = ClientCert::parse(&cert(&["alice"], vec![dns("svc.example"), dns("b.example"), email("a@x.io")], FAR));
        assert_eq!(c.user(UserFrom::default()), Ok(Some("alice")));
        assert_eq!(c.user(UserFrom::SanDns), Ok(Some("svc.example")));
        assert_eq!(c.user(UserFrom::SanEmail), Ok(Some("a@x.io")));
        assert_eq!(c.user(UserFrom::Off), Ok(None));
        assert_eq!(c.expired(SystemTime::now()), None);
    }

    #[test]
    fn a_certificate_without_the_chosen_name_or_with_two_cns_names_no_user() {
        let c = ClientCert::parse(&cert(&[], vec![dns("svc.example")], FAR));
        let e = c.user(UserFrom::Cn).unwrap_err();
        assert!(e.contains("no subject common name (CN)") && e.contains("--tls-client-cert-user-from cn"), "{e}");
        let e = c.user(UserFrom::SanEmail).unwrap_err();
        assert!(e.contains("email address") && e.contains("san-email"), "{e}");
        // rcgen writes one attribute of a type at most: two CNs, as some CAs issue them.
        let mut c = ClientCert::parse(&cert(&["alice"], vec![], FAR));
        c.common_names.push("bob".into());
        let e = c.user(UserFrom::Cn).unwrap_err();
        assert!(e.contains("2 subject common names"), "{e}");
        let c = ClientCert::parse(b"not a certificate");
        assert!(c.user(UserFrom::Cn).unwrap_err().contains("cannot be read"));
        assert_eq!(c.expired(SystemTime::now()), None);
    }

    #[test]
    fn expiry_is_read_and_named() {
        let at = 1_699_920_000; // 2023-11-14T00:00:00Z
        let der = cert(&["alice"], vec![], (2023, 11, 14));
        assert_eq!(not_after_unix_s(&der), Some(at));
        let c = ClientCert::parse(&der);
        let before = UNIX_EPOCH + Duration::from_secs(at as u64);
        assert_eq!(c.expired(before), None, "valid through its last second");
        assert_eq!(c.expired(before + Duration::from_secs(1)).as_deref(), Some("2023-11-14T00:00:00Z"));
    }

    #[test]
    fn the_flag_takes_its_four_values_and_names_them_when_wrong() {
        for u in UserFrom::ALL {
            assert_eq!(u.as_str().parse::<UserFrom>(), Ok(u));
        }
        let e = "subject".parse::<UserFrom>().unwrap_err();
        assert!(e.contains("--tls-client-cert-user-from") && e.contains("cn, san-dns, san-email, none"), "{e}");
    }
}

//! Upstream TLS: the rustls client configuration built from an upstream's
//! files (CA, client certificate and key, ALPN), with errors that name the
//! file and say what is wrong with it, checked by `edgeferry check` and at
//! start, before any connection is tried.

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "tls")]
use rustls::RootCertStore;
#[cfg(feature = "tls")]
use rustls::pki_types::pem::PemObject;
#[cfg(feature = "tls")]
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
#[cfg(feature = "tls")]
pub use rustls::{ClientConfig, ServerConfig};

use crate::config::UpstreamConfig;

/// A build without the `tls` feature has no TLS configuration to hold.
#[cfg(not(feature = "tls"))]
#[derive(Debug)]
pub enum ClientConfig {}

/// Without the `tls` feature: every TLS setting is refused, by `check` too.
#[cfg(not(feature = "tls"))]
pub fn client_config(_: &UpstreamConfig) -> Result<Arc<ClientConfig>, TlsError> {
    Err(TlsError::NotBuilt)
}

/// Nor a server configuration.
#[cfg(not(feature = "tls"))]
#[derive(Debug)]
pub enum ServerConfig {}

#[cfg(not(feature = "tls"))]
pub fn server_config(_: &Path, _: &Path, _: Option<&Path>) -> Result<Arc<ServerConfig>, TlsError> {
    Err(TlsError::NotBuilt)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file is missing or unreadable: fix the path or its permissions.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is readable but unusable (not PEM, no certificate, expired,
    /// a key that does not match): replace it.
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
    /// No `ca_file` and no system CA certificates: install the
    /// ca-certificates package or set `ca_file`.
    #[error("no system CA certificates found ({0}); install ca-certificates or set ca_file")]
    NoRoots(String),
    /// This binary was built without TLS (the `small` build): use the
    /// standard build.
    #[error(
        "this edgeferry was built without TLS (cargo feature \"tls\", left out of the small build); use the standard build"
    )]
    NotBuilt,
}

#[cfg(feature = "tls")]
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(feature = "tls")]
fn bad(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Bad {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

#[cfg(feature = "tls")]
/// The certificates of a PEM file, each checked to be within its validity
/// period now.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            path,
            "contains no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    let now = x509_parser::time::ASN1Time::now();
    for der in &certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(path, format!("unreadable certificate: {e}")))?;
        let validity = cert.validity();
        let subject = cert.subject().to_string();
        if now > validity.not_after {
            return Err(bad(
                path,
                format!(
                    "certificate {subject:?} expired on {}",
                    validity.not_after.to_rfc2822().unwrap_or_default()
                ),
            ));
        }
        if now < validity.not_before {
            return Err(bad(
                path,
                format!(
                    "certificate {subject:?} is not valid before {} (is the clock right?)",
                    validity.not_before.to_rfc2822().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(certs)
}

#[cfg(feature = "tls")]
/// The front door's TLS listener: its certificate chain and key, and with
/// `client_ca` a client certificate signed by it required of every client.
/// Checks the files: readable, PEM, within their validity, the key
/// belonging to the chain, the client CA usable.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| {
        bad(
            key,
            format!("not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots
                    .add(c)
                    .map_err(|e| bad(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, der)
        .map_err(|e| bad(key, format!("does not go with {}: {e}", cert.display())))?;
    Ok(Arc::new(config))
}

#[cfg(feature = "tls")]
/// The common name of a (verified) client certificate: the user name of a
/// client that logs in with its certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(feature = "tls")]
/// The rustls configuration for an `mqtts://` upstream: the server's
/// certificate verified against `ca_file` or the system roots, the client
/// certificate for mutual TLS when configured, ALPN when configured.
pub fn client_config(up: &UpstreamConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &up.ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store may hold a few certificates rustls cannot
                // use; the others still count.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or("the store is empty".to_string(), |e| e.to_string());
                return Err(TlsError::NoRoots(why));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots);
    let mut config = match (&up.cert_file, &up.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates(cert_path)?;
            let key = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|e| {
                bad(
                    key_path,
                    format!("not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                bad(
                    key_path,
                    format!("does not go with {}: {e}", cert_path.display()),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = up.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// A connection error from rumqttc, with what to do about the usual TLS
/// failures appended. rustls words them as "invalid peer certificate:
/// UnknownIssuer", "... certificate not valid for name ...", "...
/// certificate expired ...", "... certificate not valid yet ...", or a
/// received alert.
pub fn explain(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    let hint = if r.contains("unknownissuer") || r.contains("unknown issuer") {
        "the server's certificate is not signed by a trusted CA: check ca_file"
    } else if r.contains("not valid for name") || r.contains("notvalidforname") {
        "the server's certificate is not for this host name: check the url's host"
    } else if r.contains("not valid yet") || r.contains("notvalidyet") {
        "the server's certificate is not valid yet: this clock is behind (a board without a real-time clock before NTP has set it? see timedatectl)"
    } else if r.contains("expired") {
        "the server's certificate has expired (or this clock is wrong)"
    } else if r.contains("certificaterequired") || r.contains("certificate required") {
        "the server requires a client certificate: set cert_file and key_file"
    } else if r.contains("badcertificate")
        || r.contains("unknownca")
        || r.contains("bad certificate")
    {
        "the server refused the client certificate: check cert_file and the server's CA"
    } else {
        return reason.to_string();
    };
    format!("{reason} ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tls")]
    #[test]
    fn alpn_is_offered_and_an_expired_ca_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, params.clone().self_signed(&key).unwrap().pem()).unwrap();
        let text = format!(
            "url = \"mqtts://h\"\nca_file = \"{}\"\nalpn = [\"x-amzn-mqtt-ca\"]",
            ca.display()
        );
        let up: UpstreamConfig = toml::from_str(&text).unwrap();
        let config = client_config(&up).unwrap();
        assert_eq!(config.alpn_protocols, [b"x-amzn-mqtt-ca".to_vec()]);

        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let e = client_config(&up).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("expired on"), "{e}");
    }

    #[test]
    fn tls_failures_get_a_hint_and_others_stay_as_they_are() {
        for (reason, hint) in [
            (
                "TLS: I/O: invalid peer certificate: UnknownIssuer",
                "trusted CA",
            ),
            (
                "TLS: I/O: invalid peer certificate: certificate not valid for name \"localhost\"",
                "host name",
            ),
            (
                "TLS: I/O: invalid peer certificate: certificate expired: verification time 1, but certificate is not valid after 0",
                "expired",
            ),
            (
                "TLS: I/O: invalid peer certificate: certificate not valid yet: verification time 0 (UNIX), but certificate is not valid before 1 (UNIX)",
                "clock is behind",
            ),
            (
                "TLS: I/O: received fatal alert: CertificateRequired",
                "client certificate",
            ),
        ] {
            assert!(explain(reason).contains(hint), "{reason}");
        }
        assert_eq!(
            explain("I/O: connection refused"),
            "I/O: connection refused"
        );
    }
}

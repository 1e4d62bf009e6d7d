//! `--web-config-file`: TLS and basic authentication for the HTTP server,
//! in the format of Prometheus' web configuration file (the one
//! node_exporter and `promtool check web-config` read), so one file and one
//! habit serve every exporter on a node.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative to this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12           # optional: TLS12 (default) or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$…         # bcrypt hash
//! ```
//!
//! Keys pymem does not implement (`cipher_suites`, `http_server_config`, …)
//! are refused, not ignored: a setting that silently does nothing is worse
//! than an agent that does not start.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// What the server enforces: TLS when configured, and the users allowed
/// (none: no authentication).
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash.
    pub users: BTreeMap<String, String>,
}

impl WebConfig {
    /// No TLS and no authentication: the server as it is without a file.
    pub fn open() -> Self {
        Self {
            tls: None,
            users: BTreeMap::new(),
        }
    }

    /// Reads and checks `path`: the certificate and key load, the hashes
    /// are bcrypt; any error names the file and the setting.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the web config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("web config file {}", path.display()))
    }

    /// `text` as a web configuration file whose relative paths are
    /// relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        // An empty file is a valid one that asks for nothing.
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?
        };
        for (user, hash) in &file.basic_auth_users {
            if user.is_empty() || user.contains(':') {
                bail!("basic_auth_users: {user:?} is not a user name (empty, or with a colon)");
            }
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                anyhow::anyhow!(
                    "basic_auth_users: the password of {user:?} is not a bcrypt hash: {e}"
                )
            })?;
        }
        let tls = match &file.tls_server_config {
            Some(tls) => Some(Arc::new(
                server_config(tls, base).context("tls_server_config")?,
            )),
            None => None,
        };
        Ok(Self {
            tls,
            users: file.basic_auth_users,
        })
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// `TLS10`…`TLS13` as exporter-toolkit spells them, as an ordinal.
fn version_rank(name: &str, key: &str) -> Result<u8> {
    match name {
        "TLS10" => Ok(10),
        "TLS11" => Ok(11),
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        other => bail!("{key}: {other:?} is not one of TLS10, TLS11, TLS12, TLS13"),
    }
}

/// The protocol versions between `min_version` and `max_version`. TLS 1.0
/// and 1.1 are not implemented by rustls (they are broken), so a minimum
/// below 1.2 means 1.2 and a maximum below it is an error.
fn protocol_versions(tls: &TlsServerConfig) -> Result<Vec<&'static SupportedProtocolVersion>> {
    // exporter-toolkit's default minimum is TLS 1.2 as well.
    let min = match &tls.min_version {
        Some(v) => version_rank(v, "min_version")?,
        None => 12,
    };
    let max = match &tls.max_version {
        Some(v) => version_rank(v, "max_version")?,
        None => 13,
    };
    if max < 12 {
        bail!("max_version: TLS 1.0 and 1.1 are not supported; the oldest version is TLS12");
    }
    if min > max {
        bail!("min_version is above max_version");
    }
    Ok([(12, &TLS12), (13, &TLS13)]
        .into_iter()
        .filter(|(rank, _)| (min..=max).contains(rank))
        .map(|(_, version)| version)
        .collect())
}

/// The certificates of the PEM file `path` (at least one); `what` names the
/// file in errors.
pub(crate) fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate", path.display());
    }
    Ok(certs)
}

fn server_config(tls: &TlsServerConfig, base: &Path) -> Result<ServerConfig> {
    let cert_file = resolve(base, &tls.cert_file);
    let key_file = resolve(base, &tls.key_file);
    let certs = pem_certificates(&cert_file, "cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| anyhow::anyhow!("key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&protocol_versions(tls)?)
        .context("protocol versions")?;
    let client_roots = || -> Result<Arc<RootCertStore>> {
        let Some(ca_file) = &tls.client_ca_file else {
            bail!("client_auth_type verifies client certificates: client_ca_file is required");
        };
        let ca_file = resolve(base, ca_file);
        let mut roots = RootCertStore::empty();
        for ca in pem_certificates(&ca_file, "client_ca_file")? {
            roots
                .add(ca)
                .map_err(|e| anyhow::anyhow!("client_ca_file {}: {e}", ca_file.display()))?;
        }
        Ok(Arc::new(roots))
    };
    let builder = match tls.client_auth_type.as_deref() {
        None | Some("" | "NoClientCert") => {
            if tls.client_ca_file.is_some() {
                bail!(
                    "client_ca_file is set but client_auth_type does not verify client certificates"
                );
            }
            builder.with_no_client_auth()
        }
        Some(kind @ ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert")) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(client_roots()?, provider.clone());
            let verifier = if kind == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().context("client_ca_file")?)
        }
        // Accepting any client certificate unverified adds nothing an
        // attacker cannot provide.
        Some(kind @ ("RequestClientCert" | "RequireAnyClientCert")) => bail!(
            "client_auth_type {kind} (unverified client certificates) is not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        ),
        Some(other) => bail!(
            "client_auth_type: {other:?} is not one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
        ),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("cert_file and key_file")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_without_tls_are_accepted_and_an_empty_file_asks_for_nothing() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let config = WebConfig::parse(
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
            Path::new("."),
        )
        .unwrap();
        assert!(config.tls.is_none());
        assert_eq!(config.users.len(), 1);
        let empty = WebConfig::parse("\n", Path::new(".")).unwrap();
        assert!(empty.tls.is_none() && empty.users.is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_them() {
        let error = |text: &str| {
            format!(
                "{:#}",
                WebConfig::parse(text, Path::new(".")).err().unwrap()
            )
        };
        assert!(error("basic_auth_user:\n  a: b\n").contains("basic_auth_user"));
        assert!(error("basic_auth_users:\n  alice: secret\n").contains("not a bcrypt hash"));
        assert!(
            error("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: []\n")
                .contains("cipher_suites")
        );
        let missing = error("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: b\n");
        assert!(missing.contains("/nonexistent.crt"), "{missing}");
    }

    #[test]
    fn protocol_versions_follow_min_and_max() {
        let tls = |min: Option<&str>, max: Option<&str>| TlsServerConfig {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_auth_type: None,
            client_ca_file: None,
            min_version: min.map(String::from),
            max_version: max.map(String::from),
        };
        assert_eq!(protocol_versions(&tls(None, None)).unwrap().len(), 2);
        let only13 = protocol_versions(&tls(Some("TLS13"), None)).unwrap();
        assert_eq!(only13.len(), 1);
        assert_eq!(only13[0].version, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(
            protocol_versions(&tls(Some("TLS10"), Some("TLS12")))
                .unwrap()
                .len(),
            1
        );
        assert!(protocol_versions(&tls(None, Some("TLS11"))).is_err());
        assert!(protocol_versions(&tls(Some("TLS13"), Some("TLS12"))).is_err());
        assert!(protocol_versions(&tls(Some("SSL3"), None)).is_err());
    }
}

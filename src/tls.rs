//! TLS configurations: TLS 1.3 only, on aws-lc-rs. The server's certificate, key and client
//! CA are read again every `tls.reload_seconds` ([`ServerTls`]).

use crate::config::{Config, ConfigError};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide rustls provider (for libraries that use the
/// default, such as tonic's client TLS). Harmless if already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn cfg_err(cfg: &Config, field: &str, problem: String) -> ConfigError {
    ConfigError {
        file: cfg.source.display().to_string(),
        field: field.to_string(),
        problem,
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in load_certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// The PEM files a server config is built from, as read.
#[derive(Clone, PartialEq, Eq)]
struct ServerPem {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

impl ServerPem {
    fn read(cfg: &Config) -> Result<ServerPem, ConfigError> {
        let read = |field: &str, p: &Path| {
            std::fs::read(p)
                .map_err(|e| cfg_err(cfg, field, format!("cannot read {}: {e}", p.display())))
        };
        Ok(ServerPem {
            cert: read("tls.cert", &cfg.tls.cert)?,
            key: read("tls.key", &cfg.tls.key)?,
            client_ca: read("tls.client_ca", &cfg.tls.client_ca)?,
        })
    }
}

fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// The server config of `pem`; `previous`'s session cache and ticketer are kept, so a
/// reload does not end the resumable sessions of unchanged certificates.
fn server_config_from(
    cfg: &Config,
    pem: &ServerPem,
    previous: Option<&rustls::ServerConfig>,
) -> Result<rustls::ServerConfig, ConfigError> {
    let t = &cfg.tls;
    let certs = certs_from_pem(&pem.cert, &t.cert).map_err(|e| cfg_err(cfg, "tls.cert", e))?;
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| {
        cfg_err(
            cfg,
            "tls.key",
            format!("cannot read a private key from {}: {e}", t.key.display()),
        )
    })?;
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(&pem.client_ca, &t.client_ca)
        .map_err(|e| cfg_err(cfg, "tls.client_ca", e))?
    {
        roots.add(c).map_err(|e| {
            cfg_err(
                cfg,
                "tls.client_ca",
                format!(
                    "{}: not a usable CA certificate: {e}",
                    t.client_ca.display()
                ),
            )
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| {
            cfg_err(
                cfg,
                "tls.client_ca",
                format!("cannot build a client verifier: {e}"),
            )
        })?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err(cfg, "tls", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            cfg_err(
                cfg,
                "tls.key",
                format!("does not match tls.cert or is unusable: {e}"),
            )
        })?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    if !t.session_resumption {
        // No tickets and no session cache: every connection proves its certificate anew.
        sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        sc.send_tls13_tickets = 0;
    } else if let Some(p) = previous {
        sc.session_storage = p.session_storage.clone();
        sc.ticketer = p.ticketer.clone();
    }
    Ok(sc)
}

/// The data-plane and management server config: TLS 1.3 only, a client certificate chaining
/// to `tls.client_ca` required, ALPN `h2`.
pub fn server_config(cfg: &Config) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    Ok(Arc::new(server_config_from(
        cfg,
        &ServerPem::read(cfg)?,
        None,
    )?))
}

/// The server config in force, shared by the listeners: each accepted connection takes the
/// one current at its accept (an `Arc` clone). [`ServerTls::reload`] swaps in a new one when
/// the files changed; established connections keep the one they were accepted with.
pub struct ServerTls {
    current: arc_swap::ArcSwap<rustls::ServerConfig>,
    /// What was last read: the files in force, or a broken version of them already refused.
    seen: std::sync::Mutex<ServerPem>,
}

/// What [`ServerTls::reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
}

impl ServerTls {
    pub fn load(cfg: &Config) -> Result<ServerTls, ConfigError> {
        let pem = ServerPem::read(cfg)?;
        let sc = server_config_from(cfg, &pem, None)?;
        Ok(ServerTls {
            current: arc_swap::ArcSwap::from_pointee(sc),
            seen: std::sync::Mutex::new(pem),
        })
    }

    /// The config for a connection accepted now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Reads `tls.cert`, `tls.key` and `tls.client_ca` again; if they changed since the last
    /// read and build a config, it is put in force. A change that does not build one (a
    /// certificate without its new key yet, a broken file) is an error once, and the config
    /// in force stays.
    pub fn reload(&self, cfg: &Config) -> Result<Reload, ConfigError> {
        let pem = ServerPem::read(cfg)?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == pem {
                return Ok(Reload::Unchanged);
            }
            *seen = pem.clone();
        }
        let sc = server_config_from(cfg, &pem, Some(&self.current.load()))?;
        self.current.store(Arc::new(sc));
        Ok(Reload::Reloaded)
    }
}

/// The client config for an `https://` upstream (TLS 1.3 only, ALPN `h2`).
pub fn upstream_client_config(
    cfg: &Config,
) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    let Some(t) = &cfg.upstream.tls else {
        return Ok(None);
    };
    let roots = roots(&t.ca).map_err(|e| cfg_err(cfg, "upstream.ca", e))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err(cfg, "upstream", e.to_string()))?
        .with_root_certificates(roots);
    let mut cc = match &t.client_cert {
        Some((c, k)) => {
            let certs = load_certs(c).map_err(|e| cfg_err(cfg, "upstream.cert", e))?;
            let key = load_key(k).map_err(|e| cfg_err(cfg, "upstream.key", e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| cfg_err(cfg, "upstream.key", e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(cc)))
}

/// A client config for tools and tests: trusts `ca_pem`, presents `cert_pem`/`key_pem`.
pub fn client_config_from_pem(
    ca_pem: &[u8],
    cert_pem: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, String> {
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("CA bundle: {e}"))?;
        store.add(c).map_err(|e| format!("CA bundle: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(store);
    let mut cc = match cert_pem {
        Some((c, k)) => {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(c).collect();
            let certs = certs.map_err(|e| format!("certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(k).map_err(|e| format!("key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cc)
}

/// The client config for fetching an IdP's keys over HTTPS: the IdP's certificate must chain
/// to `ca_file` when given, else to the system's roots (the platform's store, read once per
/// call). TLS 1.2 or 1.3 (an IdP is a third party; rustls offers no weaker version), ALPN
/// `http/1.1`.
pub fn idp_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let store = match ca_file {
        Some(p) => roots(p)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), |e| e.to_string());
                return Err(format!(
                    "no CA certificate in the system's store ({why}); set ca_file to the IdP's CA bundle"
                ));
            }
            store
        }
    };
    let mut cc = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cc))
}

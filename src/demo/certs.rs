//! Development certificates, generated with rcgen: a CA and the leaf certificates the demo
//! and the tests use. File names are fixed so scripts can rely on them.
//!
//! | file | identity |
//! |---|---|
//! | `ca.crt` / `ca.key` | the dev CA |
//! | `server.crt` / `server.key` | the sidecar (DNS `localhost`, IP `127.0.0.1`) |
//! | `acme.crt` / `acme.key` | client `spiffe://aesp.local/tenant/acme/client/alice` |
//! | `globex.crt` / `globex.key` | client `spiffe://aesp.local/tenant/globex/client/bob` |
//! | `runtime.crt` / `runtime.key` | runtime `spiffe://aesp.local/tenant/acme/runtime/acme-runtime-1` |
//! | `admin.crt` / `admin.key` | platform administrator `spiffe://aesp.local/tenant/platform/admin/root` |
//!
//! Beside them, the demo's token issuer and a token per client certificate
//! ([`super::tokens`]), and `rbac.yaml`, the RBAC seed (a copy of `policies/rbac.yaml`).

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

pub const TRUST_DOMAIN: &str = "aesp.local";

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(common_name: &str) -> anyhow::Result<Ca> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.distinguished_name
            .push(DnType::OrganizationName, "aesp-sidecar development");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(p, key)?;
        Ok(Ca { issuer, key_pem })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf for both TLS server and client use.
    pub fn issue(
        &self,
        common_name: &str,
        spiffe_id: Option<&str>,
        dns: &[&str],
        ips: &[IpAddr],
    ) -> anyhow::Result<Leaf> {
        let mut p = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        if let Some(id) = spiffe_id {
            p.subject_alt_names.push(SanType::URI(id.try_into()?));
        }
        for ip in ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a leaf made from `params` (for tests that need unusual certificates).
    pub fn sign(&self, params: CertificateParams) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client leaf with the SPIFFE ID `spiffe://aesp.local/tenant/<tenant>/<kind>/<name>`.
    pub fn workload(&self, tenant: &str, kind: &str, name: &str) -> anyhow::Result<Leaf> {
        let id = spiffe_id(tenant, kind, name);
        self.issue(name, Some(&id), &[], &[])
    }
}

pub fn spiffe_id(tenant: &str, kind: &str, name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/tenant/{tenant}/{kind}/{name}")
}

/// Where the dev files are.
#[derive(Debug, Clone)]
pub struct DevFiles {
    pub dir: PathBuf,
}

impl DevFiles {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        std::fs::read(self.path(name))
            .with_context(|| format!("cannot read {}", self.path(name).display()))
    }
}

/// The leaf certificates of the dev set: (file stem, tenant, kind, name).
pub const WORKLOADS: [(&str, &str, &str, &str); 4] = [
    ("acme", "acme", "client", "alice"),
    ("globex", "globex", "client", "bob"),
    ("runtime", "acme", "runtime", "acme-runtime-1"),
    ("admin", "platform", "admin", "root"),
];

const ALL_FILES: [&str; 12] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "acme.crt",
    "acme.key",
    "globex.crt",
    "globex.key",
    "runtime.crt",
    "runtime.key",
    "admin.crt",
    "admin.key",
];

/// Writes a file only its owner may read (keys, tokens).
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    write(path, contents, true)
}

fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

/// Generates the dev CA and certificates into `dir`, unless a complete set is already there.
/// Returns whether new certificates were written.
pub fn ensure(dir: &Path) -> anyhow::Result<(DevFiles, bool)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = DevFiles {
        dir: dir.to_path_buf(),
    };
    if ALL_FILES.iter().all(|f| files.path(f).is_file()) {
        super::tokens::ensure(dir)?;
        write_seeds(dir)?;
        return Ok((files, false));
    }
    let ca = Ca::new("aesp-sidecar dev CA")?;
    write(&files.path("ca.crt"), &ca.cert_pem(), false)?;
    write(&files.path("ca.key"), &ca.key_pem, true)?;
    let server = ca.issue(
        "localhost",
        None,
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?;
    write(&files.path("server.crt"), &server.cert_pem, false)?;
    write(&files.path("server.key"), &server.key_pem, true)?;
    for (stem, tenant, kind, name) in WORKLOADS {
        let leaf = ca.workload(tenant, kind, name)?;
        write(&files.path(&format!("{stem}.crt")), &leaf.cert_pem, false)?;
        write(&files.path(&format!("{stem}.key")), &leaf.key_pem, true)?;
    }
    super::tokens::ensure(dir)?;
    write_seeds(dir)?;
    Ok((files, true))
}

/// The RBAC seed the demo's `sidecar.yaml` names, written beside it unless already there
/// (an edited copy is kept).
pub const RBAC_SEED: &str = include_str!("../../policies/rbac.yaml");

/// The contract registry's seed the demo's `sidecar.yaml` names (a copy of
/// `policies/tool-contracts.yaml`), and the reference host's manifest it takes the
/// declarations from (also `governance.host_manifest`).
pub const CONTRACTS_SEED: &str = include_str!("../../policies/tool-contracts.yaml");
pub const HOST_MANIFEST: &str = crate::adm::EXAMPLE_MANIFEST;

fn write_seeds(dir: &Path) -> anyhow::Result<()> {
    for (name, text) in [
        ("rbac.yaml", RBAC_SEED),
        ("tool-contracts.yaml", CONTRACTS_SEED),
        ("grid-manifest.yaml", HOST_MANIFEST),
    ] {
        let p = dir.join(name);
        if !p.is_file() {
            write(&p, text, false)?;
        }
    }
    Ok(())
}

//! The audit signing key: an Ed25519 key in a PKCS#8 PEM file (a mounted Secret, say), or
//! `state_dir/audit.key`, created on first start with mode 0600.

use anyhow::Context;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The file name of a key the sidecar creates itself in `state_dir`.
pub const FILE_NAME: &str = "audit.key";

/// `ed25519:` and the first 16 hex digits of SHA-256 of the raw 32-byte public key.
pub fn key_id(k: &VerifyingKey) -> String {
    let d = Sha256::digest(k.as_bytes());
    format!("ed25519:{}", super::record::hex(&d[..8]))
}

/// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block.
pub fn public_pem(k: &VerifyingKey) -> anyhow::Result<String> {
    k.to_public_key_pem(Default::default())
        .context("cannot encode the audit public key as PEM")
}

/// Every `PUBLIC KEY` PEM block of `text` (a file may hold several: the keys of a rotation).
pub fn parse_public_pems(text: &str) -> anyhow::Result<Vec<VerifyingKey>> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let tail = &rest[start..];
        let end = tail
            .find(END)
            .context("a PUBLIC KEY block has no END line")?
            + END.len();
        let k = VerifyingKey::from_public_key_pem(&tail[..end])
            .map_err(|e| anyhow::anyhow!("not an Ed25519 public key: {e}"))?;
        keys.push(k);
        rest = &tail[end..];
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "no -----BEGIN PUBLIC KEY----- block (expected the PEM printed by `aesp audit pubkey`)"
    );
    Ok(keys)
}

/// The signing key and its id.
pub struct AuditKey {
    pub signing: SigningKey,
    /// The same key, as aws-lc signs with it (the writer's hot path).
    pub fast: aws_lc_rs::signature::Ed25519KeyPair,
    pub id: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").field("id", &self.id).finish()
    }
}

impl AuditKey {
    fn new(signing: SigningKey) -> anyhow::Result<AuditKey> {
        let id = key_id(&signing.verifying_key());
        let fast = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(
            signing.as_bytes(),
            signing.verifying_key().as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("the audit key is not a valid Ed25519 key: {e}"))?;
        Ok(AuditKey { signing, fast, id })
    }

    /// Reads a PKCS#8 PEM Ed25519 private key.
    pub fn load(path: &Path) -> anyhow::Result<AuditKey> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the audit key {}", path.display()))?;
        let k = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a PKCS#8 PEM Ed25519 private key ({e}); create one with `openssl genpkey -algorithm ed25519`",
                path.display()
            )
        })?;
        AuditKey::new(k)
    }

    /// `file` if configured, else `state_dir/audit.key`, created (0600) if missing.
    pub fn load_or_create(file: Option<&Path>, state_dir: &Path) -> anyhow::Result<AuditKey> {
        if let Some(f) = file {
            return AuditKey::load(f);
        }
        let path = state_dir.join(FILE_NAME);
        if path.exists() {
            return AuditKey::load(&path);
        }
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .context("cannot generate the audit key")?;
        crate::identity::own::write_private(&path, &kp.serialize_pem())?;
        AuditKey::load(&path)
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_private_and_loads_back_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = AuditKey::load_or_create(None, dir.path()).unwrap();
        let b = AuditKey::load_or_create(None, dir.path()).unwrap();
        assert_eq!(a.id, b.id);
        assert!(a.id.starts_with("ed25519:") && a.id.len() == 8 + 16);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FILE_NAME))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem = public_pem(&a.public()).unwrap();
        let both = format!(
            "{pem}{}",
            public_pem(&SigningKey::from_bytes(&[1; 32]).verifying_key()).unwrap()
        );
        let keys = parse_public_pems(&both).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(key_id(&keys[0]), a.id);
        assert!(parse_public_pems("nothing").is_err());
        std::fs::write(dir.path().join("bad.pem"), "garbage").unwrap();
        let e = AuditKey::load(&dir.path().join("bad.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.pem") && e.contains("PKCS#8"), "{e}");
    }
}

//! The sidecar's own token issuer, for the service accounts it creates: an Ed25519 key kept
//! in `state_dir/issuer.key` (created on first start, 0600), its public key served as a JWK
//! set on the admin port at `/.well-known/jwks.json` so other sidecars can trust it, and the
//! list of its accounts: a token of this issuer is valid only while its account exists and
//! is not revoked (an allow-list, so a lost store never revives a revoked account).

use anyhow::Context;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The audience of the sidecar's own tokens.
pub const AUDIENCE: &str = "aesp";

pub struct OwnIssuer {
    pub issuer: String,
    pub kid: String,
    key: EncodingKey,
    jwk: Jwk,
}

impl OwnIssuer {
    /// Loads `dir/issuer.key`, or creates it; `issuer` is the `iss` of its tokens.
    pub fn load_or_create(dir: &Path, issuer: &str) -> anyhow::Result<OwnIssuer> {
        let path = dir.join("issuer.key");
        let kp = match std::fs::read_to_string(&path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a private key", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .context("cannot generate the sidecar's issuer key")?;
                write_private(&path, &kp.serialize_pem())?;
                kp
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let raw = kp.public_key_raw().to_vec();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let digest = Sha256::digest(&raw);
        let kid = digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
        }))
        .context("the sidecar's public key as a JWK")?;
        let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())
            .with_context(|| format!("{} is not an Ed25519 key", path.display()))?;
        Ok(OwnIssuer {
            issuer: issuer.to_string(),
            kid,
            key,
            jwk,
        })
    }

    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// The public JWK set (`/.well-known/jwks.json`).
    pub fn jwks_json(&self) -> String {
        serde_json::json!({ "keys": [&self.jwk] }).to_string()
    }

    /// A token for service account `principal` of `tenant`, valid until `exp`.
    pub fn mint(
        &self,
        principal: &str,
        tenant: &str,
        iat: u64,
        exp: u64,
    ) -> anyhow::Result<String> {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(self.kid.clone());
        let claims = serde_json::json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": principal, "tenant": tenant,
            "iat": iat, "exp": exp, "service_account": true,
        });
        jsonwebtoken::encode(&h, &claims, &self.key).context("cannot sign a service account token")
    }
}

pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

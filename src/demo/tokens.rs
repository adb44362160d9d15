//! The demo's token issuer: an Ed25519 key generated beside the dev certificates, its public
//! JWK set (which the demo's `sidecar.yaml` trusts), and ready-to-use tokens matching the
//! client certificates of the same name, valid for a day.
//!
//! | file | what |
//! |---|---|
//! | `issuer.key` | the demo issuer's private key (PKCS#8 PEM, 0600) |
//! | `issuer.jwks.json` | its public key as a JWK set |
//! | `acme.jwt` | alice of tenant acme |
//! | `globex.jwt` | bob of tenant globex |
//! | `admin.jwt` | root of tenant platform, role `platform-admin` |
//!
//! A token that is missing or expires within the hour is minted again with the same key.

use anyhow::Context;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::Path;

/// `iss` of the demo's tokens.
pub const ISSUER: &str = "https://aesp-demo.local";
/// `aud` of the demo's tokens.
pub const AUDIENCE: &str = "aesp";
/// The key id of the demo issuer's key.
pub const KID: &str = "aesp-demo-1";

/// The demo's tokens: (file stem, principal, tenant, roles).
pub const TOKENS: [(&str, &str, &str, &[&str]); 3] = [
    ("acme", "alice", "acme", &[]),
    ("globex", "bob", "globex", &[]),
    ("admin", "root", "platform", &["platform-admin"]),
];

const LIFETIME: u64 = 24 * 3600;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The demo issuer of `dir`: its key, created on first use.
pub struct DemoIssuer {
    key: EncodingKey,
}

impl DemoIssuer {
    /// Loads `issuer.key` of `dir`, or creates it (and `issuer.jwks.json`).
    pub fn ensure(dir: &Path) -> anyhow::Result<DemoIssuer> {
        let key_path = dir.join("issuer.key");
        let jwks_path = dir.join("issuer.jwks.json");
        let kp = match std::fs::read_to_string(&key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a private key", key_path.display()))?,
            Err(_) => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .context("cannot generate the demo issuer key")?;
                super::certs::write_private(&key_path, &kp.serialize_pem())?;
                kp
            }
        };
        if !jwks_path.is_file() {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
            let jwks = serde_json::json!({"keys": [{
                "kty": "OKP", "crv": "Ed25519", "x": x, "kid": KID, "alg": "EdDSA", "use": "sig",
            }]});
            std::fs::write(&jwks_path, format!("{jwks:#}\n"))
                .with_context(|| format!("cannot write {}", jwks_path.display()))?;
        }
        let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())
            .context("the demo issuer key is not an Ed25519 key")?;
        Ok(DemoIssuer { key })
    }

    /// A token for `principal` of `tenant` with `roles`, valid for `lifetime` seconds, with
    /// `extra` claims merged in.
    pub fn mint(
        &self,
        principal: &str,
        tenant: &str,
        roles: &[&str],
        lifetime: u64,
        extra: serde_json::Value,
    ) -> anyhow::Result<String> {
        let iat = now();
        let mut claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": principal, "tenant": tenant,
            "roles": roles, "iat": iat, "exp": iat + lifetime,
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(KID.to_string());
        jsonwebtoken::encode(&h, &claims, &self.key).context("cannot sign a demo token")
    }
}

/// Makes sure `dir` has the issuer and every token of [`TOKENS`], fresh for an hour at least.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    let issuer = DemoIssuer::ensure(dir)?;
    for (stem, principal, tenant, roles) in TOKENS {
        let path = dir.join(format!("{stem}.jwt"));
        let fresh = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| expiry(t.trim()))
            .is_some_and(|exp| exp > now() + 3600);
        if !fresh {
            let t = issuer.mint(principal, tenant, roles, LIFETIME, serde_json::json!({}))?;
            super::certs::write_private(&path, &format!("{t}\n"))?;
        }
    }
    Ok(())
}

/// `exp` of a token, read without verifying it (only to decide whether to mint anew).
fn expiry(token: &str) -> Option<u64> {
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    claims.get("exp")?.as_u64()
}

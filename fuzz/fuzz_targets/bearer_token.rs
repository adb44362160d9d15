//! Bearer tokens: `identity::token::bearer` (the `authorization` header) and
//! `Verifier::verify` (JWT verification against a trusted Ed25519 issuer, claim mapping,
//! the verified-token cache).
//!
//! The first byte picks the mode:
//! - 0: the rest is an `authorization` header value, verified if it is `Bearer <token>`;
//! - 1: `[(offset hi, offset lo, xor)…]`: a valid token of the issuer with bytes flipped;
//! - 2: the rest is JSON claims signed by the issuer (a token whose signature verifies), so
//!   the claim mapping sees arbitrary claims.
//!
//! In every mode: no panic. An arbitrary header (mode 0) never verifies. A mutated token
//! (mode 1) verifies only as the same caller as the original (base64 may have several
//! spellings of the same bytes). A caller that comes out of mode 2 has a valid principal id
//! and an expiry in the future.
#![no_main]

use aesp_sidecar::identity::token::{ClaimMapping, Issuer, Verifier, VerifyKey, bearer};
use aesp_sidecar::ids::valid_segment;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const NOW: u64 = 1_800_000_000;

struct Fixture {
    verifier: Verifier,
    key: EncodingKey,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        let jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA",
        }))
        .unwrap();
        let issuer = Issuer::new(
            "https://idp.example".into(),
            vec!["aesp".into()],
            ClaimMapping {
                groups: Some("groups".into()),
                sensitive: vec!["email".into()],
                ..Default::default()
            },
            vec![VerifyKey::from_jwk(&jwk).unwrap()],
        );
        let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let token = sign(
            &key,
            &serde_json::json!({
                "iss": "https://idp.example", "aud": "aesp", "sub": "alice", "tenant": "acme",
                "exp": NOW + 3600, "roles": ["user"], "groups": ["g"],
            }),
        );
        Fixture {
            verifier: Verifier::new(vec![issuer], 30),
            key,
            token,
        }
    })
}

fn sign(key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match mode % 3 {
        0 => {
            if let Ok(t) = bearer(rest) {
                assert!(
                    f.verifier.verify(t, NOW).is_err(),
                    "an arbitrary token verified: {t:?}"
                );
            }
        }
        1 => {
            let mut t = f.token.clone().into_bytes();
            for m in rest.chunks_exact(3) {
                let at = u16::from_be_bytes([m[0], m[1]]) as usize % t.len();
                t[at] ^= m[2];
            }
            let Ok(t) = String::from_utf8(t) else {
                return;
            };
            if let Ok(c) = f.verifier.verify(&t, NOW) {
                let orig = f.verifier.verify(&f.token, NOW).unwrap();
                assert_eq!(
                    (
                        c.principal.as_str(),
                        c.tenant.as_ref().map(|t| t.as_str()),
                        c.expires_at
                    ),
                    (
                        orig.principal.as_str(),
                        orig.tenant.as_ref().map(|t| t.as_str()),
                        orig.expires_at
                    ),
                    "a mutated token {t:?} verified as another caller"
                );
            }
        }
        _ => {
            let Ok(mut claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let Some(obj) = claims.as_object_mut() else {
                return;
            };
            // Signed by the issuer, so only the claims decide.
            obj.entry("iss")
                .or_insert(serde_json::json!("https://idp.example"));
            let t = sign(&f.key, &claims);
            if let Ok(c) = f.verifier.verify(&t, NOW) {
                assert!(valid_segment(c.principal.as_str()));
                if let Some(t) = &c.tenant {
                    assert!(valid_segment(t.as_str()));
                }
                assert!(c.expires_at + 30 >= NOW, "an expired token verified");
                assert!(
                    !c.claims.contains_key("email"),
                    "a sensitive claim was kept"
                );
            }
        }
    }
});

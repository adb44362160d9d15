//! Bearer tokens on the real listener (issue: identity): clients of the demo configuration
//! must present one; a bad one is refused with its reason; the token's caller fills the
//! security context the host receives; the token itself never reaches the host.

mod common;

use aesp_sidecar::demo::tokens::DemoIssuer;
use aesp_sidecar::proto::grid;
use common::{Stack, frame};
use prost::Message;

const CREATE: &str = "/altar.grid.v1.GridHost/CreateSession";

fn create() -> Vec<Vec<u8>> {
    vec![frame(&grid::CreateSession::default().encode_to_vec())]
}

#[tokio::test]
async fn clients_need_a_valid_token_of_their_own_tenant() {
    let stack = Stack::start_with("", false).await;
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let mint = |sub: &str, tenant: &str, life: u64, extra: serde_json::Value| {
        format!(
            "Bearer {}",
            issuer.mint(sub, tenant, &[], life, extra).unwrap()
        )
    };
    let good = stack.token("acme").unwrap();
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, _sig) = rest.split_once('.').unwrap();
    let other_key_sig = {
        // Signed by another issuer key with the same kid.
        let dir = tempfile::tempdir().unwrap();
        DemoIssuer::ensure(dir.path())
            .unwrap()
            .mint("alice", "acme", &[], 600, serde_json::json!({}))
            .unwrap()
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "no token",
            String::new(),
            "AUTHENTICATION_REQUIRED",
            "no authorization",
        ),
        (
            "not bearer",
            "Basic YWxpY2U6cHc=".into(),
            "INVALID_CREDENTIALS",
            "Bearer",
        ),
        (
            "garbage",
            "Bearer not-a-jwt".into(),
            "INVALID_CREDENTIALS",
            "well-formed",
        ),
        (
            "signed by another key",
            format!("Bearer {other_key_sig}"),
            "INVALID_CREDENTIALS",
            "signature",
        ),
        (
            "payload swapped under a good signature",
            format!("Bearer {head}.{payload}.AAAA"),
            "INVALID_CREDENTIALS",
            "signature",
        ),
        (
            "expired",
            mint("alice", "acme", 600, serde_json::json!({"exp": 1_000_000})),
            "INVALID_CREDENTIALS",
            "expired",
        ),
        (
            "wrong audience",
            mint(
                "alice",
                "acme",
                600,
                serde_json::json!({"aud": "someone-else"}),
            ),
            "INVALID_CREDENTIALS",
            "audience",
        ),
        (
            "another tenant's caller through acme's certificate",
            mint("bob", "globex", 600, serde_json::json!({})),
            "IDENTITY_MISMATCH",
            "",
        ),
    ];
    let mut raw = stack.raw("acme").await;
    for (what, auth, code, reason) in cases {
        let r = raw
            .call(CREATE, &[("authorization", auth.as_str())], create())
            .await;
        let e = r
            .enterprise_error()
            .unwrap_or_else(|| panic!("{what}: {r:?}"));
        assert_eq!(e.code, code, "{what}: {e:?}");
        assert!(
            e.details
                .get("reason")
                .map_or("", String::as_str)
                .contains(reason),
            "{what}: {e:?}"
        );
        assert_eq!(
            r.grpc_status(),
            Some(if code == "IDENTITY_MISMATCH" { 7 } else { 16 }),
            "{what}"
        );
    }
    assert!(stack.host.state.security_contexts().is_empty());
    // The good token passes, and the same token again is served from the cache.
    for _ in 0..2 {
        let r = raw.call(CREATE, &[], create()).await;
        assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_caller_fills_the_security_context_and_the_token_never_reaches_the_host() {
    let stack = Stack::start_with("", false).await;
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let token = issuer
        .mint(
            "carol",
            "acme",
            &["client-user", "auditor"],
            600,
            serde_json::json!({"email": "carol@example.com", "dept": "finance"}),
        )
        .unwrap();
    let mut raw = stack.raw("acme").await;
    let auth = format!("Bearer {token}");
    let r = raw
        .call(CREATE, &[("authorization", &auth)], create())
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let sc = stack.host.state.security_contexts().pop().unwrap();
    assert_eq!(
        (sc.principal_id.as_str(), sc.tenant_id.as_str()),
        ("carol", "acme")
    );
    // Effective roles: the token's, with what they include (RBAC).
    assert_eq!(
        sc.roles,
        ["auditor", "client-user", "demo-tools", "session-user"]
    );
    assert_eq!(sc.claims["dept"], "finance");
    assert_eq!(
        sc.claims["email"], "carol@example.com",
        "the demo marks no claim sensitive"
    );
    assert_eq!(sc.policy_context["workload_principal"], "alice");
    assert_eq!(sc.policy_context["token_issuer"], "https://aesp-demo.local");
    let (_, md) = stack.host.state.request_metadata().pop().unwrap();
    assert!(md.iter().all(|(k, _)| k != "authorization"), "{md:?}");
    assert!(md.iter().all(|(_, v)| !v.contains(&token)), "{md:?}");
    assert!(
        md.iter()
            .any(|(k, v)| k == "x-aesp-principal" && v == "carol"),
        "{md:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn runtimes_connect_by_certificate_and_a_bad_token_on_them_is_still_refused() {
    // The stack's runtime connected without a token (tokens_required: [client]).
    let stack = Stack::start().await;
    assert_eq!(stack.host.state.announcements().len(), 1);
    let mut raw = stack.raw("runtime").await;
    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "rt-token".into(),
                ..Default::default()
            },
        )),
    };
    let r = raw
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[("authorization", "Bearer forged.token.here")],
            vec![frame(&announce.encode_to_vec())],
        )
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "INVALID_CREDENTIALS");
    assert_eq!(stack.host.state.announcements().len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_rotated_issuer_key_is_picked_up_without_restart() {
    use base64::Engine;
    let stack = Stack::start_with("", false).await;
    // The IdP publishes a second key (a new kid) beside the first and signs with it.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
    let path = stack.files.path("issuer.jwks.json");
    let mut jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": "rotated-2", "alg": "EdDSA",
        }));
    std::fs::write(&path, jwks.to_string()).unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("rotated-2".into());
    let now = jsonwebtoken::get_current_timestamp();
    let token = jsonwebtoken::encode(
        &h,
        &serde_json::json!({
            "iss": "https://aesp-demo.local", "aud": "aesp", "sub": "alice", "tenant": "acme",
            "iat": now, "exp": now + 600,
        }),
        &enc,
    )
    .unwrap();
    let auth = format!("Bearer {token}");
    let r = stack
        .raw("acme")
        .await
        .call(CREATE, &[("authorization", auth.as_str())], create())
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    stack.stop().await;
}

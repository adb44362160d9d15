//! Bearer tokens on the real listener (issue: identity): clients of the demo configuration
//! must present one; a bad one is refused with its reason; the token's caller fills the
//! security context the host receives; the token itself never reaches the host. Keys of an
//! IdP over HTTPS (a local IdP started by the tests): discovery → jwks_uri end to end, a new
//! kid picked up without restart, the last good keys kept through garbage, a slow IdP and an
//! outage, an IdP down at start, a discovery document naming another issuer, and http://
//! refused at load.

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

// ---------------------------------------------------------------------------------------
// Keys over HTTPS: a local IdP (rcgen certificates, a hyper HTTP/1.1 server over
// tokio-rustls on 127.0.0.1) serving a discovery document and a JWK set that each test
// changes as it goes.

use aesp_sidecar::demo::certs::Ca;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
const JWKS_PATH: &str = "/keys";

/// What the IdP answers on one path.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    delay: Duration,
}

impl Answer {
    fn json(v: serde_json::Value) -> Answer {
        Answer {
            status: 200,
            body: v.to_string(),
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct IdpState {
    discovery: Option<Answer>,
    jwks: Option<Answer>,
    discovery_hits: usize,
    jwks_hits: usize,
}

/// A signing key of the IdP and its public JWK.
struct SigningKey {
    kid: String,
    enc: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        use base64::Engine;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        SigningKey {
            kid: kid.into(),
            enc: jsonwebtoken::EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
            }),
        }
    }
}

struct Idp {
    addr: SocketAddr,
    state: Arc<Mutex<IdpState>>,
    tls: Arc<rustls::ServerConfig>,
    server: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
    next_jti: std::sync::atomic::AtomicU64,
}

impl Idp {
    /// An IdP serving `keys` (discovery document and JWK set) on a free port of 127.0.0.1.
    async fn start(keys: &[&SigningKey]) -> Idp {
        let ca = Ca::new("test IdP CA").unwrap();
        let leaf = ca
            .issue("idp", None, &["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("idp-ca.pem"), ca.cert_pem()).unwrap();
        let certs: Vec<_> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key =
            rustls_pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        sc.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut idp = Idp {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
            tls: Arc::new(sc),
            server: None,
            dir,
            next_jti: 0.into(),
        };
        idp.serve_keys(keys);
        idp.serve_discovery_of(&idp.issuer());
        idp.server = Some(idp.spawn(listener));
        idp
    }

    fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("idp-ca.pem")
    }

    fn serve_keys(&self, keys: &[&SigningKey]) {
        let jwks =
            serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
        self.state.lock().unwrap().jwks = Some(Answer::json(jwks));
    }

    /// A discovery document naming `issuer` and this IdP's JWK set.
    fn serve_discovery_of(&self, issuer: &str) {
        let doc = serde_json::json!({
            "issuer": issuer,
            "jwks_uri": format!("{}{JWKS_PATH}", self.issuer()),
            "authorization_endpoint": format!("{}/authorize", self.issuer()),
            "id_token_signing_alg_values_supported": ["EdDSA"],
        });
        self.state.lock().unwrap().discovery = Some(Answer::json(doc));
    }

    fn set_jwks(&self, answer: Answer) {
        self.state.lock().unwrap().jwks = Some(answer);
    }

    fn hits(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.discovery_hits, s.jwks_hits)
    }

    fn spawn(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let state = self.state.clone();
        tokio::spawn(async move {
            // Dropped (aborting every connection) when the server task is aborted.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let state = state.clone();
                        async move {
                            let answer = {
                                let mut s = state.lock().unwrap();
                                match req.uri().path() {
                                    DISCOVERY_PATH => {
                                        s.discovery_hits += 1;
                                        s.discovery.clone()
                                    }
                                    JWKS_PATH => {
                                        s.jwks_hits += 1;
                                        s.jwks.clone()
                                    }
                                    _ => None,
                                }
                            };
                            let answer = answer.unwrap_or(Answer {
                                status: 404,
                                body: "not found".into(),
                                delay: Duration::ZERO,
                            });
                            tokio::time::sleep(answer.delay).await;
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(answer.status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        answer.body,
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        })
    }

    /// Stops answering: the port is closed and open connections are cut.
    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }

    /// Serves again on the same port.
    async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.server = Some(self.spawn(listener));
    }

    /// A token of this IdP for alice@acme signed by `key` (a new `jti` each time, so the
    /// sidecar's token cache never answers for it).
    fn token(&self, key: &SigningKey) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = Some(key.kid.clone());
        let now = jsonwebtoken::get_current_timestamp();
        let jti = self
            .next_jti
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = jsonwebtoken::encode(
            &h,
            &serde_json::json!({
                "iss": self.issuer(), "aud": "aesp", "sub": "alice", "tenant": "acme",
                "iat": now, "exp": now + 600, "jti": jti,
            }),
            &key.enc,
        )
        .unwrap();
        format!("Bearer {t}")
    }

    /// The sidecar's config with this IdP trusted through its discovery document.
    fn config(&self, auth: &str) -> impl FnOnce(String) -> String + use<> {
        let issuer = self.issuer();
        let ca = self.ca_file().display().to_string();
        let auth = auth.to_string();
        move |t: String| {
            let t = common::in_section(&t, "auth", &auth);
            t.replacen(
                "  issuers:\n",
                &format!(
                    "  issuers:\n    - issuer: {issuer}\n      audiences: [aesp]\n      discovery_url: {issuer}{DISCOVERY_PATH}\n      ca_file: {ca}\n"
                ),
                1,
            )
        }
    }
}

/// A call through the sidecar with `auth` as the authorization header: the gRPC status and
/// the EnterpriseError's code and reason, if any.
async fn call_with(stack: &Stack, auth: &str) -> (Option<i32>, String, String) {
    let r = stack
        .raw("acme")
        .await
        .call(CREATE, &[("authorization", auth)], create())
        .await;
    let e = r.enterprise_error().unwrap_or_default();
    let reason = e.details.get("reason").cloned().unwrap_or_default();
    (r.grpc_status(), e.code, reason)
}

fn fetches(stack: &Stack, issuer: &str, outcome: &str) -> u64 {
    common::counter(
        &stack.sidecar,
        "aesp_jwks_fetches_total",
        &[("issuer", issuer), ("outcome", outcome)],
    )
}

/// Waits (up to `limit`) until `cond` holds.
async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn discovery_leads_to_the_idps_keys_and_its_tokens_are_allowed() {
    let k1 = SigningKey::new("idp-1");
    let idp = Idp::start(&[&k1]).await;
    let stack = Stack::start_edited(idp.config(""), false).await;
    // The keys were fetched before the sidecar started serving: the first call passes.
    let (status, code, reason) = call_with(&stack, &idp.token(&k1)).await;
    assert_eq!(status, Some(0), "{code} {reason}");
    assert_eq!(idp.hits(), (1, 1), "discovery document, then the JWK set");
    let iss = idp.issuer();
    assert_eq!(fetches(&stack, &iss, "ok"), 1);
    assert_eq!(
        common::counter(&stack.sidecar, "aesp_jwks_keys", &[("issuer", &iss)]),
        1
    );
    let sc = stack.host.state.security_contexts().pop().unwrap();
    assert_eq!(sc.policy_context["token_issuer"], iss);
    assert_eq!(sc.principal_id, "alice");
    // A key the IdP does not publish is refused; so is the IdP's key under another kid.
    let other = SigningKey::new("idp-1");
    let (status, code, reason) = call_with(&stack, &idp.token(&other)).await;
    assert_eq!((status, code.as_str()), (Some(16), "INVALID_CREDENTIALS"));
    assert!(reason.contains("signature"), "{reason}");
    stack.stop().await;
}

#[tokio::test]
async fn a_new_kid_is_fetched_on_first_sight_without_restart_and_rate_limited() {
    let (k1, k2) = (SigningKey::new("idp-1"), SigningKey::new("idp-2"));
    let idp = Idp::start(&[&k1]).await;
    // No periodic refresh during the test: only the unknown kid can make it fetch again.
    let stack = Stack::start_edited(idp.config("  jwks_refresh_seconds: 3600\n"), false).await;
    assert_eq!(call_with(&stack, &idp.token(&k1)).await.0, Some(0));
    // The IdP rotates: k2 is published and signs.
    idp.serve_keys(&[&k1, &k2]);
    let (_, jwks_before) = idp.hits();
    let (status, code, reason) = call_with(&stack, &idp.token(&k2)).await;
    assert_eq!((status, code.as_str()), (Some(16), "INVALID_CREDENTIALS"));
    assert!(reason.contains("no key \"idp-2\""), "{reason}");
    // Retried as a client would: accepted once the refetch (at most one per 10 s) is in.
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let (status, code, _) = call_with(&stack, &idp.token(&k2)).await;
        if status == Some(0) {
            break;
        }
        assert_eq!(code, "INVALID_CREDENTIALS");
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "k2 never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Dozens of tokens with the unknown kid made one fetch, not one each.
    assert!(refused > 5, "{refused}");
    assert_eq!(idp.hits().1, jwks_before + 1);
    // Both keys verify now, with no restart.
    assert_eq!(call_with(&stack, &idp.token(&k1)).await.0, Some(0));
    assert_eq!(call_with(&stack, &idp.token(&k2)).await.0, Some(0));
    stack.stop().await;
}

#[tokio::test]
async fn the_last_good_keys_stay_through_garbage_a_slow_idp_and_an_outage() {
    let k1 = SigningKey::new("idp-1");
    let mut idp = Idp::start(&[&k1]).await;
    let stack = Stack::start_edited(
        idp.config("  jwks_refresh_seconds: 1\n  fetch_timeout_seconds: 1\n"),
        false,
    )
    .await;
    let iss = idp.issuer();
    assert_eq!(call_with(&stack, &idp.token(&k1)).await.0, Some(0));
    let keys_in_force = || common::counter(&stack.sidecar, "aesp_jwks_keys", &[("issuer", &iss)]);
    let bad_answers = [
        ("not JSON", "<html>maintenance</html>", 200),
        (
            "no usable key",
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"idp-1"}]}"#,
            200,
        ),
        ("an empty set", r#"{"keys":[]}"#, 200),
        ("a server error", r#"{"keys":[]}"#, 503),
    ];
    for (what, body, status) in bad_answers {
        idp.set_jwks(Answer {
            status,
            body: body.into(),
            delay: Duration::ZERO,
        });
        let errors = fetches(&stack, &iss, "error");
        until(Duration::from_secs(5), what, || {
            fetches(&stack, &iss, "error") > errors
        })
        .await;
        assert_eq!(keys_in_force(), 1, "{what}");
        let (status, code, reason) = call_with(&stack, &idp.token(&k1)).await;
        assert_eq!(status, Some(0), "after {what}: {code} {reason}");
    }
    // A slow IdP (3 s, beyond the 1 s timeout): the fetch is cut, the keys stay, and the
    // sidecar answers at once meanwhile.
    idp.set_jwks(Answer {
        delay: Duration::from_secs(3),
        ..Answer::json(serde_json::json!({ "keys": [k1.jwk] }))
    });
    let (ok, errors) = (fetches(&stack, &iss, "ok"), fetches(&stack, &iss, "error"));
    until(Duration::from_secs(5), "a timed-out fetch", || {
        fetches(&stack, &iss, "error") > errors
    })
    .await;
    let t = Instant::now();
    assert_eq!(call_with(&stack, &idp.token(&k1)).await.0, Some(0));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(fetches(&stack, &iss, "ok"), ok, "no slow answer was taken");
    // The IdP goes down altogether: cached keys still verify new tokens.
    idp.stop().await;
    let errors = fetches(&stack, &iss, "error");
    until(Duration::from_secs(5), "a failed fetch", || {
        fetches(&stack, &iss, "error") >= errors + 2
    })
    .await;
    assert_eq!(keys_in_force(), 1);
    let (status, code, reason) = call_with(&stack, &idp.token(&k1)).await;
    assert_eq!(status, Some(0), "IdP down: {code} {reason}");
    stack.stop().await;
}

#[tokio::test]
async fn an_idp_down_at_start_does_not_stop_the_sidecar_and_its_keys_arrive_later() {
    let k1 = SigningKey::new("idp-1");
    let mut idp = Idp::start(&[&k1]).await;
    idp.stop().await;
    let stack = Stack::start_edited(idp.config("  fetch_timeout_seconds: 1\n"), false).await;
    let iss = idp.issuer();
    assert!(fetches(&stack, &iss, "error") >= 1);
    let (status, code, reason) = call_with(&stack, &idp.token(&k1)).await;
    assert_eq!((status, code.as_str()), (Some(16), "INVALID_CREDENTIALS"));
    assert!(reason.contains("no keys yet"), "{reason}");
    // The demo issuer's tokens are unaffected.
    let demo = format!("Bearer {}", stack.token("acme").unwrap());
    assert_eq!(call_with(&stack, &demo).await.0, Some(0));
    idp.restart().await;
    let started = Instant::now();
    loop {
        let (status, ..) = call_with(&stack, &idp.token(&k1)).await;
        if status == Some(0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "keys never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fetches(&stack, &iss, "ok"), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_refused() {
    let k1 = SigningKey::new("idp-1");
    let idp = Idp::start(&[&k1]).await;
    idp.serve_discovery_of("https://someone-else.example");
    let stack = Stack::start_edited(idp.config(""), false).await;
    let iss = idp.issuer();
    assert!(fetches(&stack, &iss, "error") >= 1);
    assert_eq!(fetches(&stack, &iss, "ok"), 0);
    let (discovery, jwks) = idp.hits();
    assert!(discovery >= 1);
    assert_eq!(
        jwks, 0,
        "the JWK set of a mismatched document is never fetched"
    );
    let (status, code, reason) = call_with(&stack, &idp.token(&k1)).await;
    assert_eq!((status, code.as_str()), (Some(16), "INVALID_CREDENTIALS"));
    assert!(reason.contains("no keys yet"), "{reason}");
    stack.stop().await;
}

#[tokio::test]
async fn plain_http_for_keys_is_refused_at_config_load() {
    let dir = tempfile::tempdir().unwrap();
    for field in ["discovery_url", "jwks_uri"] {
        let path = dir.path().join("sidecar.yaml");
        let text = common::config_text("http://127.0.0.1:1", "").replacen(
            "  issuers:\n",
            &format!(
                "  issuers:\n    - issuer: https://idp.example\n      {field}: http://idp.example/.well-known/openid-configuration\n"
            ),
            1,
        );
        std::fs::write(&path, text).unwrap();
        let e = aesp_sidecar::config::Config::load(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("auth.issuers[0].{field}")), "{msg}");
        assert!(
            msg.contains("https://") && msg.contains("plain HTTP"),
            "{msg}"
        );
    }
}

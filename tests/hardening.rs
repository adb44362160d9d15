//! What a peer holding a certificate of the CA cannot do (issue: hardening): pass as someone
//! else with a crafted certificate, keep being served after its certificate expired, hold
//! connection slots without a call, smuggle another codec or a query string into a GRID
//! method. Each case is mounted from outside against the real listener.

mod common;

use aesp_sidecar::client::{self, AespGridClient, ClientTls};
use aesp_sidecar::demo::{certs, host};
use aesp_sidecar::proto::grid;
use aesp_sidecar::proto::grid::grid_host_client::GridHostClient;
use common::{RawH2, Stack, frame};
use prost::Message;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use std::sync::Arc;
use std::time::Duration;

fn write(dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

/// A sidecar of its own CA (so the test can mint any certificate) before the reference host.
struct CaStack {
    dir: tempfile::TempDir,
    ca: certs::Ca,
    host: host::HostHandle,
    sidecar: aesp_sidecar::sidecar::Sidecar,
}

impl CaStack {
    async fn start(extra: &str) -> CaStack {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::new("hardening CA").unwrap();
        write(dir.path(), "ca.crt", &ca.cert_pem());
        common::permissive_rbac(dir.path());
        let server = ca.issue("localhost", None, &["localhost"], &[]).unwrap();
        write(dir.path(), "server.crt", &server.cert_pem);
        write(dir.path(), "server.key", &server.key_pem);
        let host = host::spawn(host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        // Certificates alone: this CA's peers have no demo tokens.
        let cfg = common::certificates_only(&common::config_text(
            &format!("http://{}", host.local_addr),
            extra,
        ));
        let p = write(dir.path(), "sidecar.yaml", &cfg);
        let sidecar =
            aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
                .await
                .unwrap();
        CaStack {
            dir,
            ca,
            host,
            sidecar,
        }
    }

    fn tls(&self, leaf: &certs::Leaf) -> ClientTls {
        ClientTls {
            ca_pem: self.ca.cert_pem().into_bytes(),
            cert_pem: leaf.cert_pem.clone().into_bytes(),
            key_pem: leaf.key_pem.clone().into_bytes(),
            domain: "localhost".into(),
        }
    }

    fn rustls(&self, leaf: &certs::Leaf) -> rustls::ClientConfig {
        aesp_sidecar::tls::client_config_from_pem(
            self.ca.cert_pem().as_bytes(),
            Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())),
        )
        .unwrap()
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.sidecar.data_addr.port())
    }

    /// CreateSession with `leaf`: the EnterpriseError code of the refusal, or `None`.
    async fn create_session(&self, leaf: &certs::Leaf) -> Option<String> {
        let ch = client::channel(&self.endpoint(), Some(&self.tls(leaf)))
            .await
            .ok()?;
        match AespGridClient::new(ch)
            .create_session(grid::CreateSession::default())
            .await
        {
            Ok(_) => None,
            Err(s) => Some(
                client::enterprise_error(&s)
                    .map(|e| e.code)
                    .unwrap_or_else(|| format!("status {:?}", s.code())),
            ),
        }
    }

    async fn stop(self) {
        self.sidecar.shutdown().await;
        self.host.shutdown().await;
        drop(self.dir);
    }
}

fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "crafted");
    for u in uris {
        p.subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

#[tokio::test]
async fn crafted_certificates_get_no_identity_and_the_peer_kind_reaches_the_host() {
    let s = CaStack::start("").await;
    let alice =
        s.ca.sign(leaf_params(&[
            "spiffe://aesp.local/tenant/acme/client/alice",
        ]))
        .unwrap();
    assert_eq!(s.create_session(&alice).await, None, "a plain SVID works");
    let md = s.host.state.request_metadata();
    let (_, headers) = md.last().unwrap();
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-aesp-peer-kind" && v == "client"),
        "{headers:?}"
    );

    for (what, uris) in [
        (
            "an upper-case SPIFFE URI beside the real one",
            vec![
                "SPIFFE://aesp.local/tenant/globex/client/bob",
                "spiffe://aesp.local/tenant/acme/client/alice",
            ],
        ),
        (
            "a SPIFFE ID beside another URI SAN",
            vec![
                "spiffe://aesp.local/tenant/acme/client/alice",
                "https://example.com/alice",
            ],
        ),
        (
            "an upper-case scheme alone",
            vec!["SPIFFE://aesp.local/tenant/acme/client/alice"],
        ),
        (
            "a dot-dot tenant",
            vec!["spiffe://aesp.local/tenant/../client/alice"],
        ),
        (
            "a dot principal",
            vec!["spiffe://aesp.local/tenant/acme/client/."],
        ),
        (
            "a peer kind that is not configured",
            vec!["spiffe://aesp.local/tenant/acme/robot/r2"],
        ),
    ] {
        let leaf = s.ca.sign(leaf_params(&uris)).unwrap();
        assert_eq!(
            s.create_session(&leaf).await.as_deref(),
            Some("AUTHENTICATION_REQUIRED"),
            "{what}"
        );
    }
    assert_eq!(
        s.host.state.security_contexts().len(),
        1,
        "only the plain SVID reached the host"
    );
    s.stop().await;
}

#[test]
fn configured_peer_kinds_are_the_ones_accepted_and_mappings_must_use_them() {
    let with = |kinds: &str, mapping_kind: &str| {
        aesp_sidecar::config::Config::parse(
            &common::config_text("http://127.0.0.1:1", "").replace(
                "  organization_id: example-org\n",
                &format!(
                    "  organization_id: example-org\n  peer_kinds: {kinds}\n  subjects:\n    - {{subject_cn: x, principal: p, tenant: t, kind: {mapping_kind}}}\n"
                ),
            ),
            std::path::Path::new("/etc/aesp/sidecar.yaml"),
        )
    };
    let c = with("[client, robot]", "robot").unwrap();
    let kinds: Vec<_> = c.identity.peer_kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["client", "robot"]);
    let e = with("[client, robot]", "runtime").unwrap_err();
    assert_eq!(e.field, "identity.subjects[0].kind");
    assert!(e.problem.contains("peer_kinds"), "{e}");
    let e = with("[client, ..]", "client").unwrap_err();
    assert_eq!(e.field, "identity.peer_kinds[1]");
    let e = with("[]", "client").unwrap_err();
    assert_eq!(e.field, "identity.peer_kinds");
}

/// A client certificate valid for a few seconds, used again after it expired: a new
/// connection is refused, and with TLS resumption on, a resumed session too.
#[tokio::test]
async fn an_expired_certificate_is_not_served_even_through_a_resumed_session() {
    let mut resumed_and_refused = false;
    for resumption in [false, true] {
        let extra = format!("tls:\n  session_resumption: {resumption}\n");
        let s = CaStack::start(&extra).await;
        let mut p = leaf_params(&["spiffe://aesp.local/tenant/acme/client/brief"]);
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::seconds(3);
        let leaf = s.ca.sign(p).unwrap();
        // One config, one session cache: the second connection resumes if it can.
        let cc = Arc::new(s.rustls(&leaf));
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(s.sidecar.data_addr)
                .await
                .unwrap();
            tokio_rustls::TlsConnector::from(cc.clone())
                .connect("localhost".try_into().unwrap(), tcp)
                .await
        };
        let first = connect().await.unwrap();
        let mut raw = RawH2::over(first).await;
        let r = raw
            .call(
                "/altar.grid.v1.GridHost/CreateSession",
                &[],
                vec![frame(&grid::CreateSession::default().encode_to_vec())],
            )
            .await;
        assert_eq!(r.grpc_status(), Some(0), "{r:?}");
        drop(raw);
        tokio::time::sleep(Duration::from_secs(5)).await;
        match connect().await {
            // TLS 1.3: the client may finish before the server has judged its certificate.
            Ok(mut tls)
                if tls.get_ref().1.handshake_kind() != Some(rustls::HandshakeKind::Resumed) =>
            {
                assert!(
                    closed_within(&mut tls, Duration::from_secs(5)).await,
                    "a full handshake with an expired certificate was not refused"
                );
            }
            Err(_) => {}
            Ok(tls) => {
                assert!(resumption, "resumed although resumption is off");
                let mut raw = RawH2::over(tls).await;
                let r = raw
                    .call(
                        "/altar.grid.v1.GridHost/CreateSession",
                        &[],
                        vec![frame(&grid::CreateSession::default().encode_to_vec())],
                    )
                    .await;
                let e = r.enterprise_error().unwrap();
                assert_eq!(e.code, "AUTHENTICATION_REQUIRED");
                assert!(e.details["reason"].contains("expired"), "{e:?}");
                resumed_and_refused = true;
            }
        }
        assert_eq!(s.host.state.security_contexts().len(), 1);
        s.stop().await;
    }
    assert!(
        resumed_and_refused,
        "with resumption on, the second connection should have resumed (and been refused)"
    );
}

#[tokio::test]
async fn grid_methods_refuse_other_codecs_and_query_strings() {
    let stack = Stack::start_with("", false).await;
    let body = || vec![frame(&grid::CreateSession::default().encode_to_vec())];
    let mut raw = stack.raw("acme").await;
    for (path, headers) in [
        (
            "/altar.grid.v1.GridHost/CreateSession",
            vec![("content-type", "application/grpc+json")],
        ),
        ("/altar.grid.v1.GridHost/CreateSession?debug=1", vec![]),
    ] {
        let r = raw.call(path, &headers, body()).await;
        let e = r
            .enterprise_error()
            .unwrap_or_else(|| panic!("{path}: {r:?}"));
        assert_eq!(e.code, "MALFORMED_MESSAGE", "{path} {headers:?}");
    }
    // The protobuf codec, spelled out, is fine.
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("content-type", "application/grpc+proto")],
            body(),
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    assert_eq!(stack.host.state.security_contexts().len(), 1);
    stack.stop().await;
}

/// Reads until the peer closes; `true` if it did within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn idle_connections_are_closed_and_silent_ones_take_no_connection_slot() {
    let stack = Stack::start_with(
        "limits:\n  idle_timeout_seconds: 1\n  max_connections: 2\n",
        false,
    )
    .await;
    let cc = Arc::new(stack.client_config(Some("acme")));
    // Ten TCP connections that never start TLS: they wait in the handshake, not in the
    // two slots of established connections.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(stack.sidecar.data_addr)
                .await
                .unwrap(),
        );
    }
    // An authenticated connection that never sends the HTTP/2 preface is closed when idle.
    let tcp = tokio::net::TcpStream::connect(stack.sidecar.data_addr)
        .await
        .unwrap();
    let mut mute = tokio_rustls::TlsConnector::from(cc.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // Meanwhile a real client is served.
    let mut c = GridHostClient::new(stack.channel("acme").await);
    c.create_session(grid::CreateSession::default())
        .await
        .unwrap();
    assert!(
        closed_within(&mut mute, Duration::from_secs(10)).await,
        "a connection without the preface stayed open past the idle timeout"
    );
    // A connection whose calls are done is closed too (GOAWAY, then close); the client
    // reconnects transparently on its next call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.create_session(grid::CreateSession::default())
        .await
        .unwrap();
    assert!(
        common::counter(&stack.sidecar, "aesp_connections_total", &[]) >= 3,
        "the idle client connection was replaced"
    );
    drop(silent);
    stack.stop().await;
}

/// The probe's attack: a runtime that never reads (HTTP/2 stream window 0) opens several
/// `Connect` streams and sends `fulfill` messages whose acknowledgements are large. What it
/// leaves unread must hold up only its own streams: other runtimes and every tenant's calls
/// go on.
#[tokio::test]
async fn a_runtime_that_never_reads_stalls_nobody_else() {
    let stack = Stack::start().await;
    let mut c = GridHostClient::new(stack.channel("acme").await);
    let session = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner()
        .session_id;

    let tcp = tokio::net::TcpStream::connect(stack.sidecar.data_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(stack.client_config(Some("runtime"))))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut h2c, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let big = "s".repeat(200 * 1024);
    let mut held = Vec::new();
    for i in 0..6 {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://localhost/altar.grid.v1.GridRuntime/Connect")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        h2c = h2c.ready().await.unwrap();
        let (resp, mut send) = h2c.send_request(req, false).unwrap();
        let announce = grid::RuntimeMessage {
            kind: Some(grid::runtime_message::Kind::Announce(
                grid::AnnounceRuntime {
                    runtime_id: format!("stalled-{i}"),
                    ..Default::default()
                },
            )),
        };
        let mut out = frame(&announce.encode_to_vec());
        for _ in 0..5 {
            let f = grid::RuntimeMessage {
                kind: Some(grid::runtime_message::Kind::Fulfill(grid::FulfillTools {
                    session_id: big.clone(),
                    tool_contract_names: vec!["echo".into()],
                })),
            };
            out.extend_from_slice(&frame(&f.encode_to_vec()));
        }
        send.reserve_capacity(out.len());
        send.send_data(bytes::Bytes::from(out), false).unwrap();
        held.push((resp, send));
    }
    // Let the host answer (and the acknowledgements pile up unread).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..5 {
        let tc = aesp_sidecar::client::tool_call(
            &session,
            "echo",
            &serde_json::json!({"text": format!("still served {i}")}),
        )
        .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), c.execute_tool(tc))
            .await
            .expect("a call while a runtime stalls its streams")
            .unwrap()
            .into_inner();
        assert!(r.error_details.is_none(), "{r:?}");
    }
    drop(held);
    stack.stop().await;
}

/// How many `CreateSession` requests reached the reference host.
fn sessions_at_host(stack: &Stack) -> usize {
    stack
        .host
        .state
        .request_metadata()
        .iter()
        .filter(|(p, _)| p == "/altar.grid.v1.GridHost/CreateSession")
        .count()
}

#[tokio::test]
async fn a_connection_over_its_request_rate_is_refused_then_closed_while_others_are_served() {
    // 1 call per second, a burst of 3: a peer calling back to back is over it at once
    // (unless each of its calls took over a second).
    let stack = Stack::start_with(
        "limits:\n  max_requests_per_second_per_connection: 1\n  request_burst_per_connection: 3\n",
        false,
    )
    .await;
    let create = frame(&grid::CreateSession::default().encode_to_vec());
    let path = "/altar.grid.v1.GridHost/CreateSession";
    let mut hammer = stack.raw("acme").await;
    let (mut allowed, mut refused) = (0usize, 0usize);
    while refused == 0 && allowed < 30 {
        let r = hammer.call(path, &[], vec![create.clone()]).await;
        match r.grpc_status() {
            Some(0) => allowed += 1,
            Some(8) => {
                let e = r.enterprise_error().expect("an EnterpriseError");
                assert_eq!(e.code, "BUDGET_EXCEEDED");
                assert_eq!(
                    e.details["limit"],
                    "limits.max_requests_per_second_per_connection"
                );
                assert_eq!(e.details["per_second"], "1");
                assert!(!e.correlation_id.is_empty());
                refused += 1;
            }
            other => panic!("unexpected status {other:?}: {r:?}"),
        }
    }
    assert_eq!(
        refused, 1,
        "back-to-back calls went over 1/s with a burst of 3"
    );
    assert!(allowed >= 3, "the burst was served: {allowed}");
    // Refused without reaching the host, recorded and counted like every refusal.
    assert_eq!(sessions_at_host(&stack), allowed);
    assert_eq!(common::denials(&stack.sidecar, "BUDGET_EXCEEDED"), 1);
    assert_eq!(
        common::counter(
            &stack.sidecar,
            "aesp_calls_total",
            &[("method", path), ("outcome", "deny")]
        ),
        1
    );

    // Another client's connection has a budget of its own: served meanwhile.
    let mut other = stack.raw("globex").await;
    let r = other.call(path, &[], vec![create.clone()]).await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    assert_eq!(sessions_at_host(&stack), allowed + 1);

    // The hammering peer keeps going: its refusals run out too (the same rate and burst),
    // and its connection is closed (GOAWAY). None of it reaches the host.
    let mut closed = None;
    for i in 0..200 {
        match hammer.try_call(path, &[], vec![create.clone()]).await {
            Ok(r) if r.grpc_status() == Some(0) => allowed += 1,
            Ok(r) => {
                assert_eq!(r.grpc_status(), Some(8), "{r:?}");
                refused += 1;
            }
            Err(e) => {
                closed = Some((i, e));
                break;
            }
        }
    }
    let (after, why) = closed.expect("the hammering connection was closed");
    assert!(
        refused > 1,
        "closed after more refusals ({refused}), {after} calls on: {why}"
    );
    assert_eq!(
        common::counter(&stack.sidecar, "aesp_rate_limit_closes_total", &[]),
        1
    );
    assert_eq!(sessions_at_host(&stack), allowed + 1);
    // And the other client is still served.
    let r = other.call(path, &[], vec![create]).await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");

    // Requests that are not gRPC count too (answered 429 over the limit, not recorded).
    let mut plain = stack.raw("acme").await;
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let Ok(r) = plain
            .try_call(path, &[("content-type", "text/plain")], vec![b"x".to_vec()])
            .await
        else {
            break; // closed: these count towards calming down too
        };
        bodies.push(String::from_utf8_lossy(&r.data).to_string());
    }
    assert!(bodies[0].contains("gRPC only"), "{bodies:?}");
    assert!(
        bodies.iter().any(|b| b.contains("too many requests")),
        "{bodies:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_management_change_the_control_store_cannot_write_fails_and_changes_nothing() {
    use aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient;
    use aesp_sidecar::proto::aesp::{
        AssignRoleRequest, CreateServiceAccountRequest, GetPrincipalPermissionsRequest,
        RevokeServiceAccountRequest,
    };
    let stack = Stack::start_with("", false).await;
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = client::channel(&ep, Some(&stack.tls("admin")))
        .await
        .unwrap();
    let mut root = EnterpriseIdentityServiceClient::new(client::with_token(ch, None).unwrap());
    let assign = || AssignRoleRequest {
        principal_id: "bob".into(),
        tenant_id: "globex".into(),
        role: "auditor".into(),
    };
    let create_sa = || CreateServiceAccountRequest {
        tenant_id: "acme".into(),
        display_name: "ci bot".into(),
        roles: vec!["client-user".into()],
        credential_ttl_seconds: 3600,
    };
    let bobs_roles = |mut c: EnterpriseIdentityServiceClient<client::GridChannel>| async move {
        c.get_principal_permissions(GetPrincipalPermissionsRequest {
            principal_id: "bob".into(),
            tenant_id: "globex".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .roles
    };
    // A service account made while the store works, and a call it makes.
    let sa = root
        .create_service_account(create_sa())
        .await
        .unwrap()
        .into_inner();
    let sa_auth = format!("Bearer {}", sa.credential);
    let create = frame(&grid::CreateSession::default().encode_to_vec());
    let mut raw = stack.raw("acme").await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &sa_auth)],
            vec![create.clone()],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let roles_before = bobs_roles(root.clone()).await;
    assert!(!roles_before.contains(&"auditor".to_string()));

    // The disk fails: every change is refused with a clear error, and nothing changes.
    stack.sidecar.control_faults.set(true);
    let unavailable = |e: tonic::Status| {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains("control store") && e.message().contains("nothing was changed"),
            "{e:?}"
        );
    };
    unavailable(root.assign_role(assign()).await.unwrap_err());
    unavailable(root.create_service_account(create_sa()).await.unwrap_err());
    unavailable(
        root.revoke_service_account(RevokeServiceAccountRequest {
            principal_id: sa.principal_id.clone(),
            reason: "drill".into(),
        })
        .await
        .unwrap_err(),
    );
    // Not in force: bob has no new role, the account is not revoked.
    assert_eq!(bobs_roles(root.clone()).await, roles_before);
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &sa_auth)],
            vec![create.clone()],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "the account still works: {r:?}");

    // The disk is back: the same change goes through.
    stack.sidecar.control_faults.set(false);
    root.assign_role(assign()).await.unwrap();
    assert!(
        bobs_roles(root.clone())
            .await
            .contains(&"auditor".to_string())
    );

    // And the file holds exactly what succeeded.
    let cfg = aesp_sidecar::config::Config::load(&stack.dir.path().join("sidecar.yaml")).unwrap();
    let dir = stack.stop().await;
    let store = aesp_sidecar::store::ControlStore::open(&cfg.state_dir).unwrap();
    let state = store.load().unwrap();
    let sessions = store.read_table(aesp_sidecar::tenancy::TABLE).unwrap();
    drop(store);
    drop(dir);
    assert_eq!(state.service_accounts.len(), 1, "{state:?}");
    assert!(!state.service_accounts[0].revoked);
    assert_eq!(
        state
            .bindings
            .iter()
            .filter(|b| b.role == "auditor")
            .count(),
        1,
        "{state:?}"
    );
    // One binding of the account's role, one of bob's: two writes, two revisions more than
    // the account's own (the sessions table is written behind: its writes count too).
    assert!(state.revision >= 3, "{state:?}");
    assert!(state.revision <= 3 + sessions.len() as u64 + 1, "{state:?}");
}

/// The certificate the sidecar presents to a new connection of `leaf` (trusting `ca_pem`),
/// or why the handshake failed.
async fn presented(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    leaf: &certs::Leaf,
) -> Result<Vec<u8>, String> {
    let cc = aesp_sidecar::tls::client_config_from_pem(
        ca_pem.as_bytes(),
        Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // A client certificate the server refuses is known after the handshake, on first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 9];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Polls `check` every 100 ms for up to 15 s (the sidecar reads its files every second).
async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    for _ in 0..150 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn certificates_rotate_without_a_restart_and_a_broken_file_keeps_the_ones_in_force() {
    let s = CaStack::start("tls:\n  reload_seconds: 1\n").await;
    let addr = s.sidecar.data_addr;
    let ca1 = s.ca.cert_pem();
    let alice = s.ca.workload("acme", "client", "alice").unwrap();
    let first = std::fs::read_to_string(s.dir.path().join("server.crt")).unwrap();
    assert_eq!(presented(addr, &ca1, &alice).await.unwrap(), der(&first));
    let mut before = RawH2::connect(addr, s.rustls(&alice)).await;
    let create = frame(&grid::CreateSession::default().encode_to_vec());
    let path = "/altar.grid.v1.GridHost/CreateSession";
    let reloads_failed = || common::counter(&s.sidecar, "aesp_config_reload_failures_total", &[]);

    // A broken certificate file: refused once, counted, and the one in force stays.
    write(
        s.dir.path(),
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    );
    assert!(eventually(|| async { reloads_failed() == 1 }).await);
    assert_eq!(presented(addr, &ca1, &alice).await.unwrap(), der(&first));
    // Counted once, not at every read while it stays broken.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(reloads_failed(), 1);

    // The rotation: a new certificate and key. New connections get them; the connection
    // made before keeps being served.
    let next = s.ca.issue("localhost", None, &["localhost"], &[]).unwrap();
    write(s.dir.path(), "server.key", &next.key_pem);
    write(s.dir.path(), "server.crt", &next.cert_pem);
    assert!(
        eventually(|| async {
            presented(addr, &ca1, &alice).await.ok() == Some(der(&next.cert_pem))
        })
        .await,
        "the new certificate was never presented"
    );
    let r = before.call(path, &[], vec![create.clone()]).await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let mut after = RawH2::connect(addr, s.rustls(&alice)).await;
    let r = after.call(path, &[], vec![create.clone()]).await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");

    // The client CA rotates too: once only the new CA is trusted, the old CA's clients are
    // refused at the handshake and the new CA's are served.
    let ca2 = certs::Ca::new("rotated CA").unwrap();
    let carol = ca2.workload("acme", "client", "carol").unwrap();
    assert!(presented(addr, &ca1, &carol).await.is_err());
    write(s.dir.path(), "ca.crt", &ca2.cert_pem());
    assert!(
        eventually(|| async { presented(addr, &ca1, &carol).await.is_ok() }).await,
        "the new client CA was never trusted"
    );
    assert!(presented(addr, &ca1, &alice).await.is_err());
    s.stop().await;
}

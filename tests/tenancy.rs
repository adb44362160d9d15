//! Tenant isolation on the real listener (issue: tenancy, cost and enterprise errors): a
//! session belongs to the principal and tenant that created it through the sidecar; using or
//! destroying another's, or one the sidecar never saw, is TENANT_ISOLATION_VIOLATION before
//! the host; sessions survive a restart; on `Connect`, a runtime never gets another tenant's
//! work (the sidecar answers the host itself).

mod common;

use aesp_sidecar::client::{self, AespGridClient};
use aesp_sidecar::demo::tokens::DemoIssuer;
use aesp_sidecar::proto::grid;
use common::Stack;

async fn session(c: &AespGridClient, id: &str) -> String {
    let ack = c
        .create_session(grid::CreateSession {
            suggested_session_id: id.into(),
            ttl_seconds: 120,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(ack.error.is_none(), "{ack:?}");
    ack.session_id
}

fn echo(session: &str) -> grid::ToolCall {
    client::tool_call(session, "echo", &serde_json::json!({"text": "x"})).unwrap()
}

/// The refusal's code and `details.reason`.
fn refusal(s: &tonic::Status) -> (String, String) {
    let e = client::enterprise_error(s).expect("an EnterpriseError");
    (
        e.code.clone(),
        e.details.get("reason").cloned().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_used_and_destroyed_only_by_its_creator() {
    let stack = Stack::start().await;
    let host_calls = || stack.host.state.request_metadata().len();
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    let bob = AespGridClient::with_token(stack.channel("globex").await);
    let s = session(&alice, "s-alice").await;
    alice.execute_tool(echo(&s)).await.unwrap();

    let before = host_calls();
    // Another tenant: neither a call nor a destroy.
    let e = bob.execute_tool(echo(&s)).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            "TENANT_ISOLATION_VIOLATION".into(),
            "another tenant's session".into()
        )
    );
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = bob
        .destroy_session(grid::DestroySession {
            session_id: s.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(&e).1, "another tenant's session");
    // A session nobody created through the sidecar.
    let e = alice.execute_tool(echo("made-up")).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            "TENANT_ISOLATION_VIOLATION".into(),
            "unknown session".into()
        )
    );
    // Another principal of the same tenant (carol@acme, a token of the demo issuer).
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let carol_token = issuer
        .mint(
            "carol",
            "acme",
            &["client-user"],
            600,
            serde_json::json!({}),
        )
        .unwrap();
    let ch = client::channel(&stack.endpoint, Some(&stack.tls("acme")))
        .await
        .unwrap();
    let carol = AespGridClient::with_token(client::with_token(ch, Some(&carol_token)).unwrap());
    let e = carol.execute_tool(echo(&s)).await.unwrap_err();
    let ee = client::enterprise_error(&e).unwrap();
    assert_eq!(ee.details["reason"], "another principal's session");
    assert_eq!(ee.details["permission"], "grid.session.any");
    assert_eq!(host_calls(), before, "no refused call reached the host");

    // The creator destroys it; then it is gone for the sidecar too.
    let d = alice
        .destroy_session(grid::DestroySession {
            session_id: s.clone(),
        })
        .await
        .unwrap();
    assert!(d.destroyed);
    assert_eq!(
        refusal(&alice.execute_tool(echo(&s)).await.unwrap_err()).1,
        "unknown session"
    );
    assert!(common::denials(&stack.sidecar, "TENANT_ISOLATION_VIOLATION") >= 5);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_sidecar_restart() {
    let stack = Stack::start_with("", false).await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    let s = session(&alice, "s-kept").await;
    let Stack {
        dir, sidecar, host, ..
    } = stack;
    sidecar.shutdown().await;
    let cfg = aesp_sidecar::config::Config::load(&dir.path().join("sidecar.yaml")).unwrap();
    let again = aesp_sidecar::sidecar::Sidecar::start(cfg).await.unwrap();
    let ep = format!("https://127.0.0.1:{}", again.data_addr.port());
    let tls = client::ClientTls::from_files(
        &dir.path().join("ca.crt"),
        &dir.path().join("acme.crt"),
        &dir.path().join("acme.key"),
        "localhost",
    )
    .unwrap();
    let token = std::fs::read_to_string(dir.path().join("acme.jwt")).unwrap();
    let ch = client::channel(&ep, Some(&tls)).await.unwrap();
    let alice = AespGridClient::with_token(client::with_token(ch, Some(token.trim())).unwrap());
    // Known after the restart: it reaches the host (no runtime is connected, so the host
    // answers NO_RUNTIME in-band; the sidecar did not refuse it).
    let r = alice.execute_tool(echo(&s)).await.unwrap();
    assert_eq!(r.error_details.unwrap().code, "NO_RUNTIME");
    let e = alice.execute_tool(echo("s-never")).await.unwrap_err();
    assert_eq!(refusal(&e).1, "unknown session");
    again.shutdown().await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_never_gets_another_tenants_work() {
    // The only runtime is acme's; the reference host routes every session's calls to
    // whichever runtime fulfils them, so it would hand bob's (globex) calls to it.
    let stack = Stack::start().await;
    let bob = AespGridClient::with_token(stack.channel("globex").await);
    let s = session(&bob, "s-bob").await;
    let r = bob.execute_tool(echo(&s)).await.unwrap();
    let e = r
        .error_details
        .expect("bob's call is not served by acme's runtime");
    // Either the runtime's fulfilment of bob's session was refused (the host has no runtime
    // for it), or the host's call to acme's runtime was stopped and answered by the sidecar.
    assert!(
        e.code == "NO_RUNTIME" || e.code == "TENANT_ISOLATION_VIOLATION",
        "{e:?}"
    );
    assert!(
        common::denials(&stack.sidecar, "TENANT_ISOLATION_VIOLATION") >= 1,
        "the sidecar refused something on Connect"
    );
    // acme's own calls are served by it as before.
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    let a = session(&alice, "s-alice-2").await;
    let r = alice.execute_tool(echo(&a)).await.unwrap();
    assert!(r.error_details.is_none(), "{r:?}");
    stack.stop().await;
}

/// A GRID host that misroutes on purpose: `CreateSession` answers session `s-bob`; on every
/// runtime `Connect` it sends an `announce_ack`, then a `call` for `s-bob` and a
/// `request_fulfillment` for it, whoever the runtime is; it reports every message it
/// receives from the runtime side.
async fn misrouting_host() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use bytes::Bytes;
    use prost::Message;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let mut body = req.into_body();
                        let ok = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(ok, false).unwrap();
                        if path.ends_with("/CreateSession") {
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                            }
                            let ack = grid::CreateSessionAck {
                                session_id: "s-bob".into(),
                                ..Default::default()
                            };
                            send.send_data(Bytes::from(common::frame(&ack.encode_to_vec())), false)
                                .unwrap();
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            send.send_trailers(t).unwrap();
                            return;
                        }
                        use grid::host_message::Kind;
                        let msgs = [
                            Kind::AnnounceAck(grid::AnnounceAck {
                                accepted: true,
                                ..Default::default()
                            }),
                            Kind::Call(
                                client::tool_call(
                                    "s-bob",
                                    "echo",
                                    &serde_json::json!({"text": "secret of globex"}),
                                )
                                .map(|mut c| {
                                    c.invocation_id = "inv-1".into();
                                    c
                                })
                                .unwrap(),
                            ),
                            Kind::RequestFulfillment(grid::RequestFulfillment {
                                session_id: "s-bob".into(),
                            }),
                        ];
                        let mut first = true;
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                            // gRPC frames of the runtime side, one message per DATA frame here.
                            let mut rest = &d[..];
                            while rest.len() >= 5 {
                                let n = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]])
                                    as usize;
                                let _ = tx.send(rest[5..5 + n].to_vec());
                                rest = &rest[5 + n..];
                            }
                            if first {
                                first = false;
                                for k in msgs.clone() {
                                    let m = grid::HostMessage { kind: Some(k) }.encode_to_vec();
                                    let _ = send.send_data(Bytes::from(common::frame(&m)), false);
                                }
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_misroutes_a_call_to_another_tenants_runtime_is_answered_by_the_sidecar() {
    use aesp_sidecar::proto::aesp;
    use prost::Message;
    let (addr, mut from_runtime_side) = misrouting_host().await;
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    let p = dir.path().join("sidecar.yaml");
    std::fs::write(&p, common::config_text(&format!("http://{addr}"), "")).unwrap();
    let sidecar =
        aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
            .await
            .unwrap();
    // bob (globex) creates s-bob through the sidecar.
    let ep = format!("https://127.0.0.1:{}", sidecar.data_addr.port());
    let tls = client::ClientTls::from_files(
        &dir.path().join("ca.crt"),
        &dir.path().join("globex.crt"),
        &dir.path().join("globex.key"),
        "localhost",
    )
    .unwrap();
    let token = std::fs::read_to_string(dir.path().join("globex.jwt")).unwrap();
    let ch = client::channel(&ep, Some(&tls)).await.unwrap();
    let bob = AespGridClient::with_token(client::with_token(ch, Some(token.trim())).unwrap());
    assert_eq!(session(&bob, "").await, "s-bob");

    // acme's runtime connects; the host sends it bob's call and a fulfilment request.
    let cc = {
        let r = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        aesp_sidecar::tls::client_config_from_pem(
            &r("ca.crt"),
            Some((&r("runtime.crt"), &r("runtime.key"))),
        )
        .unwrap()
    };
    let mut raw = common::RawH2::connect(sidecar.data_addr, cc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "acme-rt".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(
        common::frame(&announce),
    ))))
    .await
    .unwrap();
    let call = tokio::spawn(async move {
        raw.call_streaming("/altar.grid.v1.GridRuntime/Connect", &[], rx)
            .await
    });
    // The host receives: the announcement, then the sidecar's answers for the runtime.
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), from_runtime_side.recv())
            .await
            .expect("the host hears back")
            .unwrap();
        got.push(aesp::EnterpriseRuntimeMessage::decode(&m[..]).unwrap());
    }
    // The runtime now offers to fulfil bob's session itself: not forwarded, answered by the
    // sidecar with a FulfillAck carrying the refusal.
    let fulfil = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Fulfill(grid::FulfillTools {
            session_id: "s-bob".into(),
            tool_contract_names: vec!["echo".into()],
        })),
    }
    .encode_to_vec();
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(
        common::frame(&fulfil),
    ))))
    .await
    .unwrap();
    use aesp::enterprise_runtime_message::Kind;
    // A result carrying an error, runtime → host: upgraded on its way to the host.
    let result = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Result(grid::ToolResult {
            invocation_id: "inv-9".into(),
            status: grid::ResultStatus::Error as i32,
            error_details: Some(grid::Error {
                code: "TOOL_ERROR".into(),
                message: "the tool broke".into(),
            }),
            correlation_id: "trace-rt".into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(
        common::frame(&result),
    ))))
    .await
    .unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), from_runtime_side.recv())
        .await
        .expect("the result reaches the host")
        .unwrap();
    let next = aesp::EnterpriseRuntimeMessage::decode(&next[..]).unwrap();
    let Some(Kind::Result(r)) = &next.kind else {
        panic!("the host got the runtime's fulfilment of bob's session, or else: {next:?}")
    };
    let e = r.error_details.as_ref().unwrap();
    assert_eq!(
        (
            e.code.as_str(),
            e.correlation_id.as_str(),
            e.details["origin"].as_str()
        ),
        ("TOOL_ERROR", "trace-rt", "runtime")
    );
    drop(tx);
    let runtime_saw = call.await.unwrap();
    assert!(
        from_runtime_side.try_recv().is_err(),
        "the host never received the runtime's fulfilment of bob's session"
    );
    assert!(matches!(got[0].kind, Some(Kind::Announce(_))), "{got:?}");
    let result = got
        .iter()
        .find_map(|m| match &m.kind {
            Some(Kind::Result(r)) => Some(r),
            _ => None,
        })
        .expect("a ToolResult answered by the sidecar");
    assert_eq!(result.invocation_id, "inv-1");
    let e = result.error_details.as_ref().unwrap();
    assert_eq!(e.code, "TENANT_ISOLATION_VIOLATION");
    assert_eq!(e.details["reason"], "another tenant's session");
    let fulfil = got
        .iter()
        .find_map(|m| match &m.kind {
            Some(Kind::Fulfill(f)) => Some(f),
            _ => None,
        })
        .expect("a FulfillTools fulfilling nothing");
    assert_eq!(fulfil.session_id, "s-bob");
    assert!(fulfil.tool_contract_names.is_empty());
    // The runtime got the announce_ack, then the sidecar's FulfillAck, and nothing of bob's.
    let to_runtime: Vec<aesp::EnterpriseHostMessage> = runtime_saw
        .messages()
        .iter()
        .map(|m| aesp::EnterpriseHostMessage::decode(&m[..]).unwrap())
        .collect();
    use aesp::enterprise_host_message::Kind as HostKind;
    assert_eq!(to_runtime.len(), 2, "{to_runtime:?}");
    assert!(matches!(to_runtime[0].kind, Some(HostKind::AnnounceAck(_))));
    let Some(HostKind::FulfillAck(ack)) = &to_runtime[1].kind else {
        panic!("{to_runtime:?}")
    };
    assert!(ack.accepted.is_empty());
    let e = ack.error.as_ref().unwrap();
    assert_eq!(e.code, "TENANT_ISOLATION_VIOLATION");
    assert_eq!(e.details["refused_contracts"], "echo");
    assert!(common::denials(&sidecar, "TENANT_ISOLATION_VIOLATION") >= 3);
    sidecar.shutdown().await;
}

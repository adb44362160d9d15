//! The data plane end to end: the reference host, runtime and sidecar on real sockets with
//! real mTLS, driven by real gRPC clients (tonic) and a raw HTTP/2 client for the frames a
//! gRPC library would never send.

mod common;

use aesp_sidecar::client::{self, AespGridClient};
use aesp_sidecar::proto::grid::grid_host_client::GridHostClient;
use aesp_sidecar::proto::{adm, aesp, grid};
use common::{Stack, frame};
use prost::Message;
use std::time::Duration;

fn call(session: &str, tool: &str, args: serde_json::Value) -> grid::ToolCall {
    grid::ToolCall {
        session_id: session.into(),
        function_call: Some(adm::FunctionCall {
            name: tool.into(),
            args: Some(aesp_sidecar::adm::json_to_struct(&args).unwrap()),
            call_id: String::new(),
        }),
        ..Default::default()
    }
}

fn content(r: &grid::ToolResult) -> serde_json::Value {
    aesp_sidecar::adm::value_to_json(r.payload.as_ref().unwrap().content.as_ref().unwrap())
}

async fn stream_payloads(
    c: &mut GridHostClient<aesp_sidecar::client::GridChannel>,
    tc: grid::ToolCall,
) -> Vec<(u64, Vec<u8>, bool)> {
    let mut s = c.execute_tool_stream(tc).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(ch) = s.message().await.unwrap() {
        out.push((ch.chunk_id, ch.payload, ch.is_final));
    }
    out
}

#[tokio::test]
async fn base_client_gets_the_same_results_through_the_sidecar_as_directly() {
    let stack = Stack::start().await;
    // The runtime is connected through the sidecar. The baseline is a second reference host
    // with its own runtime, both without the sidecar: runtimes behind the sidecar serve only
    // sessions created through it (docs/tenancy.md), so a client that bypasses the sidecar
    // gets nothing from them.
    let plain_host = aesp_sidecar::demo::host::spawn(aesp_sidecar::demo::host::HostOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let plain_runtime =
        aesp_sidecar::demo::runtime::spawn(aesp_sidecar::demo::runtime::RuntimeOptions {
            endpoint: format!("http://{}", plain_host.local_addr),
            runtime_id: "plain-runtime".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    plain_runtime
        .wait_announced(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let mut via = GridHostClient::new(stack.channel("acme").await);
    let plain = aesp_sidecar::client::channel(&format!("http://{}", plain_host.local_addr), None)
        .await
        .unwrap();
    let mut baseline = GridHostClient::new(aesp_sidecar::client::with_token(plain, None).unwrap());
    // The stack's own host, reached directly (for what only the host can do).
    let mut direct = GridHostClient::new(stack.direct().await);

    let s_via = via
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner();
    let s_dir = baseline
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!s_via.session_id.is_empty() && s_via.error.is_none());
    assert!(!s_dir.session_id.is_empty() && s_dir.error.is_none());

    for (tool, args) in [
        ("echo", serde_json::json!({"text": "hello"})),
        ("add", serde_json::json!({"a": 1.5, "b": 2})),
        ("get_weather", serde_json::json!({"city": "Oslo"})),
    ] {
        let a = via
            .execute_tool(call(&s_via.session_id, tool, args.clone()))
            .await
            .unwrap()
            .into_inner();
        let b = baseline
            .execute_tool(call(&s_dir.session_id, tool, args))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            a.status,
            grid::ResultStatus::Success as i32,
            "{tool}: {a:?}"
        );
        assert_eq!(content(&a), content(&b), "{tool}");
    }
    let echo = via
        .execute_tool(call(
            &s_via.session_id,
            "echo",
            serde_json::json!({"text": "hello"}),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(content(&echo), serde_json::json!({"text": "hello"}));

    // Streaming.
    let a = stream_payloads(
        &mut via,
        call(&s_via.session_id, "count", serde_json::json!({"n": 5})),
    )
    .await;
    let b = stream_payloads(
        &mut baseline,
        call(&s_dir.session_id, "count", serde_json::json!({"n": 5})),
    )
    .await;
    assert_eq!(a.len(), 5);
    assert!(a.last().unwrap().2, "last chunk is final");
    assert_eq!(a, b);

    // A tool error: the base client reads it as a base Error ...
    let a = via
        .execute_tool(call(&s_via.session_id, "fail", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner();
    let b = baseline
        .execute_tool(call(&s_dir.session_id, "fail", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.status, grid::ResultStatus::Error as i32);
    assert_eq!(a.error_details, b.error_details);
    assert_eq!(a.error_details.as_ref().unwrap().code, "TOOL_ERROR");

    // ... and an AESP-aware client reads the EnterpriseError with its correlation id.
    let aware = AespGridClient::with_token(stack.channel("acme").await);
    let mut req = tonic::Request::new(call(&s_via.session_id, "fail", serde_json::json!({})));
    req.metadata_mut()
        .insert("x-aesp-correlation-id", "trace-42".parse().unwrap());
    let r = aware.execute_tool(req).await.unwrap();
    let e = r.error_details.unwrap();
    assert_eq!(
        (e.code.as_str(), e.correlation_id.as_str()),
        ("TOOL_ERROR", "trace-42")
    );
    // The tool's approved contract is named in the host's error (fail is tagged TEST).
    assert_eq!(
        (
            e.details["origin"].as_str(),
            e.details["compliance_tags"].as_str(),
            e.details["tool_revision"].as_str()
        ),
        ("grid-host", "TEST", "1")
    );
    assert_eq!(
        r.correlation_id, "trace-42",
        "the host saw the propagated correlation id"
    );

    // Without a client correlation id, one is generated and still lands in the error.
    let r = aware
        .execute_tool(call(&s_via.session_id, "fail", serde_json::json!({})))
        .await
        .unwrap();
    let cid = r.error_details.unwrap().correlation_id;
    assert!(cid.len() >= 16, "generated correlation id: {cid:?}");
    assert_eq!(r.correlation_id, cid);

    // Host-level errors get the same upgrade: a session the sidecar saw created, destroyed
    // at the host behind its back, is the host's SESSION_INVALID.
    let gone = via
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner()
        .session_id;
    direct
        .destroy_session(grid::DestroySession {
            session_id: gone.clone(),
        })
        .await
        .unwrap();
    let r = aware
        .execute_tool(call(&gone, "add", serde_json::json!({"a": 2, "b": 1})))
        .await
        .unwrap();
    let e = r.error_details.unwrap();
    assert_eq!(e.code, "SESSION_INVALID");
    assert!(!e.correlation_id.is_empty());
    // Bad arguments never reach the host: the sidecar checks them against the approved
    // contract (docs/governance.md).
    let s = aware
        .execute_tool(call(
            &s_via.session_id,
            "add",
            serde_json::json!({"a": "x", "b": 1}),
        ))
        .await
        .unwrap_err();
    let e = aesp_sidecar::client::enterprise_error(&s).unwrap();
    assert_eq!(
        (e.code.as_str(), e.details["path"].as_str()),
        ("INVALID_ARGUMENTS", "args.a")
    );

    // Streamed errors too (a tool RBAC permits, whose run fails).
    let mut s = aware
        .execute_tool_stream(call(&s_via.session_id, "fail", serde_json::json!({})))
        .await
        .unwrap();
    let chunk = s.message().await.unwrap().unwrap();
    let e = chunk.error_details.unwrap();
    assert_eq!(e.code, "TOOL_ERROR");
    assert!(!e.correlation_id.is_empty());

    // Destroy.
    let d = via
        .destroy_session(grid::DestroySession {
            session_id: s_via.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.destroyed);
    // A destroyed session is gone for the sidecar too: refused before the host.
    let s = via
        .execute_tool(call(
            &s_via.session_id,
            "echo",
            serde_json::json!({"text": "x"}),
        ))
        .await
        .unwrap_err();
    let e = aesp_sidecar::client::enterprise_error(&s).unwrap();
    assert_eq!(
        (e.code.as_str(), e.details["reason"].as_str()),
        ("TENANT_ISOLATION_VIOLATION", "unknown session")
    );
    plain_runtime.shutdown().await;
    plain_host.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn runtime_connect_works_and_the_host_receives_the_upgraded_announcement() {
    let stack = Stack::start().await;
    let anns = stack.host.state.announcements();
    let a = anns.last().expect("the host saw an announcement");
    assert_eq!(a.runtime_id, "acme-runtime-1");
    assert_eq!(a.tenant_id, "acme", "tenant from the runtime's certificate");
    assert_eq!(a.security_zone, "demo-zone", "zone from the sidecar config");
    assert_eq!(a.deployment_environment, "DEV");
    assert_eq!(a.language, "rust", "base fields kept");
    // One Connect, counted once (at its announcement, not again at its headers).
    assert_eq!(
        common::counter(
            &stack.sidecar,
            "aesp_calls_total",
            &[
                ("method", "/altar.grid.v1.GridRuntime/Connect"),
                ("outcome", "allow")
            ]
        ),
        1
    );
    // The Connect call itself carried the verified identity.
    let md = stack.host.state.request_metadata();
    let (_, connect_md) = md
        .iter()
        .find(|(p, _)| p == "/altar.grid.v1.GridRuntime/Connect")
        .expect("Connect metadata");
    assert!(
        connect_md
            .iter()
            .any(|(k, v)| k == "x-aesp-principal" && v == "acme-runtime-1")
    );
    assert!(
        connect_md
            .iter()
            .any(|(k, v)| k == "x-aesp-tenant" && v == "acme")
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_runtime_that_claims_another_tenant_is_refused() {
    let stack = Stack::start_with("", false).await;
    let mut raw = stack.raw("runtime").await;
    // An AESP-aware runtime that claims tenant globex with an acme certificate.
    let claimed = aesp::EnterpriseRuntimeMessage {
        kind: Some(aesp::enterprise_runtime_message::Kind::Announce(
            aesp::EnterpriseRuntimeAnnouncement {
                runtime_id: "x".into(),
                tenant_id: "globex".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    let r = raw
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[],
            vec![frame(&claimed)],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(7), "{r:?}");
    assert_eq!(r.enterprise_error().unwrap().code, "IDENTITY_MISMATCH");
    assert!(
        stack.host.state.announcements().is_empty(),
        "the host never saw the forged announcement"
    );
    stack.stop().await;
}

#[tokio::test]
async fn connect_messages_split_and_coalesced_are_all_intercepted() {
    let stack = Stack::start_with("", false).await;
    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "raw-rt".into(),
                language: "raw".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    let fulfill = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Fulfill(grid::FulfillTools {
            session_id: "no-such-session".into(),
            tool_contract_names: vec!["not_a_tool".into()],
        })),
    }
    .encode_to_vec();
    // Two messages in one DATA frame.
    let mut both = frame(&announce);
    both.extend(frame(&fulfill));
    let r = stack
        .connect_runtime_raw(
            "runtime",
            &[("x-aesp-correlation-id", "conn-1")],
            both,
            Duration::from_millis(200),
        )
        .await;
    let a = stack.host.state.announcements();
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].runtime_id.as_str(), a[0].tenant_id.as_str()),
        ("raw-rt", "acme")
    );
    let msgs: Vec<aesp::EnterpriseHostMessage> = r
        .messages()
        .iter()
        .map(|m| aesp::EnterpriseHostMessage::decode(&m[..]).unwrap())
        .collect();
    assert!(msgs.len() >= 2, "announce_ack and fulfill_ack: {msgs:?}");
    use aesp::enterprise_host_message::Kind;
    assert!(matches!(&msgs[0].kind, Some(Kind::AnnounceAck(a)) if a.accepted));
    let Some(Kind::FulfillAck(ack)) = &msgs[1].kind else {
        panic!("second message: {:?}", msgs[1])
    };
    let e = ack
        .error
        .as_ref()
        .expect("the host refused the unknown session/tool");
    assert_eq!(
        e.correlation_id, "conn-1",
        "host → runtime errors are upgraded on Connect"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_unary_message_split_across_many_frames_is_reassembled() {
    let stack = Stack::start().await;
    let mut raw = stack.raw("acme").await;
    let cs = grid::CreateSession {
        ttl_seconds: 30,
        ..Default::default()
    }
    .encode_to_vec();
    let f = frame(&cs);
    // One byte per DATA frame.
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            f.iter().map(|b| vec![*b]).collect(),
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let ack = aesp::EnterpriseCreateSessionAck::decode(&r.messages()[0][..]).unwrap();
    assert!(!ack.session_id.is_empty());

    // A ToolCall split at odd places.
    let tc = call(
        &ack.session_id,
        "echo",
        serde_json::json!({"text": "split me"}),
    )
    .encode_to_vec();
    let f = frame(&tc);
    let chunks = vec![f[..2].to_vec(), f[2..7].to_vec(), f[7..].to_vec()];
    let r = raw
        .call("/altar.grid.v1.GridHost/ExecuteTool", &[], chunks)
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let res = grid::ToolResult::decode(&r.messages()[0][..]).unwrap();
    assert_eq!(content(&res), serde_json::json!({"text": "split me"}));

    // Several messages in one frame on a unary method is a protocol error.
    let mut two = frame(&tc);
    two.extend(frame(&tc));
    let r = raw
        .call("/altar.grid.v1.GridHost/ExecuteTool", &[], vec![two])
        .await;
    assert_eq!(r.grpc_status(), Some(3));
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    stack.stop().await;
}

#[tokio::test]
async fn unknown_methods_are_unimplemented_with_an_enterprise_error() {
    let stack = Stack::start().await;
    let ch = stack.channel("acme").await;
    let err = client::call_raw(ch.clone(), "/altar.grid.v1.GridHost/DropAllSessions")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let e = client::enterprise_error(&err).expect("EnterpriseError in grpc-status-details-bin");
    assert_eq!(e.code, "METHOD_NOT_ALLOWED");
    assert!(!e.correlation_id.is_empty());
    assert_eq!(
        e.details["method"],
        "/altar.grid.v1.GridHost/DropAllSessions"
    );
    let err = client::call_raw(ch, "/grpc.health.v1.Health/Check")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(
        stack
            .host
            .state
            .request_metadata()
            .iter()
            .all(|(p, _)| !p.contains("DropAll") && !p.contains("Health"))
    );
    stack.stop().await;
}

#[tokio::test]
async fn malformed_frames_and_protobufs_are_refused_and_the_sidecar_keeps_serving() {
    let stack = Stack::start_with("", true).await;
    let mut raw = stack.raw("acme").await;
    let path = "/altar.grid.v1.GridHost/CreateSession";
    type Case<'a> = (&'a str, Vec<Vec<u8>>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "protobuf that does not decode",
            vec![frame(&[0x0a, 0x05, 0x01])],
            vec![],
        ),
        (
            "wrong wire type for a field",
            vec![frame(&[0x08, 0x01, 0x1a, 0x02, 0x0a])],
            vec![],
        ),
        ("bad compressed flag", vec![vec![7, 0, 0, 0, 0]], vec![]),
        ("truncated frame", vec![vec![0, 0, 0, 0, 10, 1, 2]], vec![]),
        ("no message at all", vec![], vec![]),
        (
            "compressed flag without grpc-encoding",
            vec![vec![1, 0, 0, 0, 1, 0]],
            vec![],
        ),
        (
            "garbage gzip",
            vec![vec![1, 0, 0, 0, 3, 1, 2, 3]],
            vec![("grpc-encoding", "gzip")],
        ),
        (
            "unsupported encoding",
            vec![frame(&[])],
            vec![("grpc-encoding", "snappy")],
        ),
        ("over the size limit", vec![vec![0, 0x7f, 0, 0, 0]], vec![]),
    ];
    for (what, chunks, headers) in cases {
        let r = raw.call(path, &headers, chunks).await;
        assert_eq!(r.grpc_status(), Some(3), "{what}: {r:?}");
        let e = r
            .enterprise_error()
            .unwrap_or_else(|| panic!("{what}: no EnterpriseError"));
        assert_eq!(e.code, "MALFORMED_MESSAGE", "{what}");
        assert!(!e.correlation_id.is_empty(), "{what}");
    }
    assert!(
        stack.host.state.security_contexts().is_empty(),
        "nothing malformed reached the host"
    );

    // The same connection and new ones still work.
    let r = raw
        .call(
            path,
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0));
    let mut c = GridHostClient::new(stack.channel("acme").await);
    let s = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner();
    let r = c
        .execute_tool(call(
            &s.session_id,
            "echo",
            serde_json::json!({"text": "still here"}),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(content(&r), serde_json::json!({"text": "still here"}));

    // A runtime that sends garbage on Connect gets MALFORMED_MESSAGE; the host's stream ends.
    let mut rt = stack.raw("runtime").await;
    let ann = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "bad-rt".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    let r = rt
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[],
            vec![frame(&ann), frame(&[0xff, 0xff])],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(3), "{r:?}");
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    // A first message that is not announce.
    let fulfill = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Fulfill(
            grid::FulfillTools::default(),
        )),
    }
    .encode_to_vec();
    let r = rt
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[],
            vec![frame(&fulfill)],
        )
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    stack.stop().await;
}

#[tokio::test]
async fn gzip_requests_are_inspected_and_upgraded() {
    let stack = Stack::start().await;
    let mut c = GridHostClient::new(stack.channel("acme").await)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let ack = c
        .create_session(grid::CreateSession {
            suggested_session_id: "gz-session".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.session_id, "gz-session");
    let sc = stack.host.state.security_contexts();
    let last = sc.last().unwrap();
    assert_eq!(
        (last.principal_id.as_str(), last.tenant_id.as_str()),
        ("alice", "acme")
    );
    let r = c
        .execute_tool(call(
            "gz-session",
            "echo",
            serde_json::json!({"text": "zipped"}),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(content(&r), serde_json::json!({"text": "zipped"}));
    stack.stop().await;
}

#[tokio::test]
async fn inbound_identity_headers_never_reach_the_host() {
    let stack = Stack::start().await;
    let mut c = GridHostClient::new(stack.channel("acme").await);
    let mut req = tonic::Request::new(grid::CreateSession::default());
    let forged = aesp::EnterpriseSecurityContext {
        principal_id: "mallory".into(),
        tenant_id: "globex".into(),
        ..Default::default()
    };
    let md = req.metadata_mut();
    md.insert("x-aesp-principal", "mallory".parse().unwrap());
    md.insert("x-aesp-tenant", "globex".parse().unwrap());
    md.insert_bin(
        "aesp-security-context-bin",
        tonic::metadata::MetadataValue::from_bytes(&forged.encode_to_vec()),
    );
    md.insert_bin(
        "x-aesp-principal-bin",
        tonic::metadata::MetadataValue::from_bytes(b"mallory"),
    );
    md.insert("x-custom-header", "kept".parse().unwrap());
    let mut req_timeout = req;
    req_timeout.set_timeout(Duration::from_secs(7));
    c.create_session(req_timeout).await.unwrap();

    let (_, md) = stack
        .host
        .state
        .request_metadata()
        .into_iter()
        .rev()
        .find(|(p, _)| p == "/altar.grid.v1.GridHost/CreateSession")
        .unwrap();
    let values = |k: &str| {
        md.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(values("x-aesp-principal"), vec!["alice"]);
    assert_eq!(values("x-aesp-tenant"), vec!["acme"]);
    assert!(values("x-aesp-principal-bin").is_empty());
    assert_eq!(values("x-custom-header"), vec!["kept"]);
    assert_eq!(
        values("grpc-timeout").len(),
        1,
        "grpc-timeout passes through: {md:?}"
    );
    assert!(md.iter().all(|(_, v)| !v.contains("mallory")), "{md:?}");
    let esc_b64 = values("aesp-security-context-bin");
    assert_eq!(esc_b64.len(), 1);
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&esc_b64[0])
        .unwrap();
    let esc = aesp::EnterpriseSecurityContext::decode(&raw[..]).unwrap();
    assert_eq!(
        (esc.principal_id.as_str(), esc.tenant_id.as_str()),
        ("alice", "acme")
    );
    assert_eq!(values("x-aesp-correlation-id").len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn create_session_claiming_another_identity_is_identity_mismatch() {
    let stack = Stack::start().await;
    let c = AespGridClient::with_token(stack.channel("acme").await);
    for (p, t, field) in [
        ("mallory", "", "principal_id"),
        ("", "globex", "tenant_id"),
        ("alice", "globex", "tenant_id"),
    ] {
        let before = stack.host.state.security_contexts().len();
        let err = c
            .create_session(grid::CreateSession {
                security_context: Some(grid::SecurityContext {
                    principal_id: p.into(),
                    tenant_id: t.into(),
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let e = client::enterprise_error(&err).unwrap();
        assert_eq!(e.code, "IDENTITY_MISMATCH");
        assert_eq!(e.details["field"], field);
        assert_eq!(
            stack.host.state.security_contexts().len(),
            before,
            "denied calls never reach the host"
        );
    }
    // Claims that agree, and no claims at all, are accepted and filled in.
    for sc in [
        Some(grid::SecurityContext {
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
        }),
        None,
    ] {
        let ack = c
            .create_session(grid::CreateSession {
                security_context: sc,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(ack.error.is_none());
        let got = stack.host.state.security_contexts();
        let last = got.last().unwrap();
        assert_eq!(
            (
                last.principal_id.as_str(),
                last.tenant_id.as_str(),
                last.organization_id.as_str()
            ),
            ("alice", "acme", "example-org")
        );
        assert_eq!(last.policy_context["peer_kind"], "client");
    }
    stack.stop().await;
}

#[tokio::test]
async fn tls_refuses_no_certificate_another_ca_tls12_and_plaintext() {
    let stack = Stack::start_with("", false).await;
    let addr = stack.sidecar.data_addr;
    let failures = || stack.sidecar.metrics.tls_handshake_failures.get();

    // No client certificate: the call fails.
    let before = failures();
    let cc = stack.client_config(None);
    let res = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cc))
            .connect("localhost".try_into().unwrap(), tcp)
            .await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                    tls,
                ))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = http::Request::post("https://localhost/altar.grid.v1.GridHost/CreateSession")
            .header("content-type", "application/grpc")
            .body(http_body_util::Empty::new())
            .unwrap();
        sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)
    }
    .await;
    assert!(
        res.is_err(),
        "a client without a certificate must not get a response"
    );

    // A certificate from another CA.
    let other = aesp_sidecar::demo::certs::Ca::new("rogue CA").unwrap();
    let leaf = other.workload("acme", "client", "alice").unwrap();
    let ca = std::fs::read(stack.files.path("ca.crt")).unwrap();
    let cc = aesp_sidecar::tls::client_config_from_pem(
        &ca,
        Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())),
    )
    .unwrap();
    let rogue = aesp_sidecar::client::ClientTls {
        ca_pem: ca.clone(),
        cert_pem: leaf.cert_pem.into_bytes(),
        key_pem: leaf.key_pem.into_bytes(),
        domain: "localhost".into(),
    };
    let res = async {
        let ch = client::channel(&stack.endpoint, Some(&rogue)).await?;
        let mut c = GridHostClient::new(ch);
        c.create_session(grid::CreateSession::default())
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    assert!(res.is_err(), "a certificate from another CA is refused");
    drop(cc);

    // TLS 1.2 only.
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls12 = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls12))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    assert!(res.is_err(), "TLS 1.2 is refused at the handshake");

    // Plaintext HTTP/2 (h2c).
    let res = async {
        let ch = client::channel(&format!("http://{addr}"), None).await?;
        GridHostClient::new(ch)
            .create_session(grid::CreateSession::default())
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    assert!(res.is_err(), "plaintext is refused");

    // Each refusal was a handshake failure at the sidecar.
    for _ in 0..50 {
        if failures() >= before + 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failures() >= before + 4,
        "handshake failures counted: {}",
        failures() - before
    );
    assert!(
        stack.host.state.request_metadata().is_empty(),
        "nothing reached the host"
    );
    stack.stop().await;
}

#[tokio::test]
async fn an_unreachable_host_is_upstream_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (_files, _) = aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    // A port with nothing behind it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let p = dir.path().join("sidecar.yaml");
    std::fs::write(
        &p,
        common::config_text(&format!("http://127.0.0.1:{port}"), ""),
    )
    .unwrap();
    let sidecar =
        aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
            .await
            .unwrap();
    let tls = aesp_sidecar::client::ClientTls::from_files(
        &dir.path().join("ca.crt"),
        &dir.path().join("acme.crt"),
        &dir.path().join("acme.key"),
        "localhost",
    )
    .unwrap();
    let ch = client::channel(
        &format!("https://127.0.0.1:{}", sidecar.data_addr.port()),
        Some(&tls),
    )
    .await
    .unwrap();
    let token = std::fs::read_to_string(dir.path().join("acme.jwt")).unwrap();
    let ch = client::with_token(ch, Some(&token)).unwrap();
    let err = GridHostClient::new(ch)
        .create_session(grid::CreateSession::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        client::enterprise_error(&err).unwrap().code,
        "UPSTREAM_UNAVAILABLE"
    );
    assert_eq!(common::denials(&sidecar, "UPSTREAM_UNAVAILABLE"), 1);
    // The host's address stays in the sidecar's log, not in what the client is told.
    let e = client::enterprise_error(&err).unwrap();
    let told = format!("{} {:?} {}", e.message, e.details, err.message());
    assert!(!told.contains(&port.to_string()), "{told}");
    // Readiness reports the host down, liveness stays up.
    let admin = sidecar.admin_addr.unwrap();
    assert_eq!(common::http_get(admin, "/healthz").await.0, 200);
    assert_eq!(common::http_get(admin, "/readyz").await.0, 503);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let stack = Stack::start().await;
    let c = AespGridClient::with_token(stack.channel("acme").await);
    c.create_session(grid::CreateSession::default())
        .await
        .unwrap();
    let _ = client::call_raw(stack.channel("acme").await, "/x.Y/Z").await;
    let admin = stack.sidecar.admin_addr.unwrap();
    assert_eq!(common::http_get(admin, "/readyz").await.0, 200);
    let (code, body) = common::http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains(
            "aesp_calls_total{method=\"/altar.grid.v1.GridHost/CreateSession\",outcome=\"allow\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.contains("aesp_denials_total{code=\"METHOD_NOT_ALLOWED\"} 1"),
        "{body}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish_and_stops_accepting() {
    let stack = Stack::start().await;
    let mut c = GridHostClient::new(stack.channel("acme").await);
    let s = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .into_inner();
    let mut stream = c
        .execute_tool_stream(call(&s.session_id, "count", serde_json::json!({"n": 1000})))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.chunk_id, 0);
    let token = stack.sidecar.shutdown_token();
    token.cancel();
    // The port is free at once, while the stream still drains: a replacement can start.
    let mut rebound = None;
    for _ in 0..50 {
        match std::net::TcpListener::bind(stack.sidecar.data_addr) {
            Ok(l) => {
                rebound = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        rebound.is_some(),
        "the listening port stayed bound after shutdown"
    );
    drop(rebound);
    let mut n = 1;
    let mut last_final = false;
    while let Some(ch) = stream.message().await.unwrap() {
        n += 1;
        last_final = ch.is_final;
    }
    assert_eq!(n, 1000, "the in-flight stream finished");
    assert!(last_final);
    // New connections are refused once draining started.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = tokio::net::TcpStream::connect(stack.sidecar.data_addr).await;
    if let Ok(tcp) = res {
        let cc = stack.client_config(Some("acme"));
        let hs = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(cc))
                .connect("localhost".try_into().unwrap(), tcp),
        )
        .await;
        assert!(
            !matches!(hs, Ok(Ok(_))),
            "no new TLS sessions after shutdown"
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_sidecar_reconnects_when_the_host_comes_back() {
    let mut stack = Stack::start_with("", false).await;
    let c = AespGridClient::with_token(stack.channel("acme").await);
    c.create_session(grid::CreateSession::default())
        .await
        .unwrap();
    let addr = stack.host.local_addr;
    let old = std::mem::replace(
        &mut stack.host,
        aesp_sidecar::demo::host::spawn(aesp_sidecar::demo::host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    old.shutdown().await;
    let err = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap_err();
    assert_eq!(
        client::enterprise_error(&err).unwrap().code,
        "UPSTREAM_UNAVAILABLE"
    );
    // The host is back on the same address: the pool reconnects, no sidecar restart.
    let back = aesp_sidecar::demo::host::spawn(aesp_sidecar::demo::host::HostOptions {
        listen: addr,
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap();
    assert!(!ack.session_id.is_empty());
    assert_eq!(back.state.security_contexts().len(), 1);
    back.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn connect_messages_that_do_not_decode_are_refused_even_when_superseded() {
    let stack = Stack::start_with("", false).await;
    let mut rt = stack.raw("runtime").await;
    // `result` with an invalid body, then an `announce` that supersedes it (found by the fuzzer).
    let r = rt
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[],
            vec![frame(&[0x1a, 0x01, 0x00, 0x0a, 0x00])],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(3), "{r:?}");
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    assert!(stack.host.state.announcements().is_empty());
    // A field outside the envelope's oneof.
    let r = rt
        .call(
            "/altar.grid.v1.GridRuntime/Connect",
            &[],
            vec![frame(&[0x0a, 0x00, 0x2a, 0x00])],
        )
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    stack.stop().await;
}

/// Found while fuzzing (fuzz/README.md, F2): an announcement split over two records is
/// merged by a decoder, so the host must receive both parts.
#[tokio::test]
async fn an_announcement_split_over_two_records_reaches_the_host_whole() {
    let stack = Stack::start_with("", false).await;
    // announce { runtime_id: "rt-split" } then announce { language: "py" }.
    let mut env = vec![0x0a, 0x0a, 0x0a, 0x08];
    env.extend_from_slice(b"rt-split");
    env.extend_from_slice(&[0x0a, 0x04, 0x12, 0x02, b'p', b'y']);
    let r = stack
        .connect_runtime_raw("runtime", &[], frame(&env), Duration::ZERO)
        .await;
    let a = stack
        .host
        .state
        .announcements()
        .pop()
        .unwrap_or_else(|| panic!("no announcement reached the host: {r:?}"));
    assert_eq!(
        (a.runtime_id.as_str(), a.language.as_str()),
        ("rt-split", "py")
    );
    assert_eq!(a.tenant_id, "acme");
    stack.stop().await;
}

//! The reference GRID host and runtime, end to end over loopback h2c, driven with the
//! generated `GridHostClient` (and, for the failure paths, a hand-driven runtime).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aesp_sidecar::adm::{json_to_struct, value_to_json};
use aesp_sidecar::demo::{host, runtime};
use aesp_sidecar::proto::adm as padm;
use aesp_sidecar::proto::grid::{
    self, grid_host_client::GridHostClient, grid_runtime_client::GridRuntimeClient, host_message,
    runtime_message,
};
use base64::Engine as _;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

const WAIT: Duration = Duration::from_secs(10);

async fn spawn_host(call_timeout: Duration) -> host::HostHandle {
    host::spawn(host::HostOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        call_timeout,
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn spawn_runtime(h: &host::HostHandle, id: &str) -> runtime::RuntimeHandle {
    let rt = runtime::spawn(runtime::RuntimeOptions {
        endpoint: format!("http://{}", h.local_addr),
        runtime_id: id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.wait_announced(WAIT).await.unwrap();
    assert!(rt.announced());
    rt
}

async fn channel(h: &host::HostHandle) -> Channel {
    Endpoint::from_shared(format!("http://{}", h.local_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn client(h: &host::HostHandle) -> GridHostClient<Channel> {
    GridHostClient::new(channel(h).await)
}

fn tool_call(session: &str, name: &str, args: serde_json::Value, corr: &str) -> grid::ToolCall {
    grid::ToolCall {
        invocation_id: String::new(),
        session_id: session.to_string(),
        function_call: Some(padm::FunctionCall {
            name: name.to_string(),
            args: Some(json_to_struct(&args).unwrap()),
            call_id: format!("call-{corr}"),
        }),
        correlation_id: corr.to_string(),
    }
}

async fn create_session(c: &mut GridHostClient<Channel>, suggested: &str, ttl: u64) -> String {
    let ack = c
        .create_session(grid::CreateSession {
            suggested_session_id: suggested.to_string(),
            ttl_seconds: ttl,
            security_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.error.is_none(), "{:?}", ack.error);
    assert!(!ack.session_id.is_empty());
    ack.session_id
}

async fn execute(c: &mut GridHostClient<Channel>, call: grid::ToolCall) -> grid::ToolResult {
    c.execute_tool(call).await.unwrap().into_inner()
}

async fn stream(c: &mut GridHostClient<Channel>, call: grid::ToolCall) -> Vec<grid::StreamChunk> {
    let mut s = c.execute_tool_stream(call).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        chunks.push(chunk);
    }
    chunks
}

fn content(r: &grid::ToolResult) -> serde_json::Value {
    value_to_json(r.payload.as_ref().unwrap().content.as_ref().unwrap())
}

fn error_code(r: &grid::ToolResult) -> &str {
    assert_eq!(r.status, grid::ResultStatus::Error as i32, "{r:?}");
    &r.error_details.as_ref().unwrap().code
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn base_grid_flow_over_h2c() {
    let h = spawn_host(Duration::from_secs(5)).await;
    let rt = spawn_runtime(&h, "test-runtime").await;
    let mut c = client(&h).await;

    // The announcement was recorded as received.
    let ann = h.state.announcements();
    assert_eq!(ann.len(), 1);
    assert_eq!(ann[0].runtime_id, "test-runtime");
    assert_eq!(ann[0].language, "rust");
    assert_eq!(ann[0].capabilities, ["streaming"]);
    assert_eq!(h.state.connected_runtimes(), ["test-runtime"]);

    // Session: the suggestion is honoured, ttl 0 means the default hour.
    let before = unix_now();
    let ack = c
        .create_session(grid::CreateSession {
            suggested_session_id: "s-1".into(),
            ttl_seconds: 0,
            security_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.session_id, "s-1");
    assert!(ack.error.is_none());
    assert!(
        (before + 3600..=unix_now() + 3600).contains(&ack.expires_at_unix_seconds),
        "{}",
        ack.expires_at_unix_seconds
    );
    let s = ack.session_id;

    // echo, straight after CreateSession (fulfilment was awaited).
    let r = execute(
        &mut c,
        tool_call(&s, "echo", json!({"text": "hello"}), "c-echo"),
    )
    .await;
    assert_eq!(r.status, grid::ResultStatus::Success as i32, "{r:?}");
    assert!(r.error_details.is_none());
    assert_eq!(r.correlation_id, "c-echo");
    assert!(!r.invocation_id.is_empty());
    let p = r.payload.as_ref().unwrap();
    assert_eq!(p.name, "echo");
    assert_eq!(p.status, padm::ResultStatus::Success as i32);
    assert_eq!(p.call_id, "call-c-echo");
    assert_eq!(content(&r), json!({"text": "hello"}));

    // add
    let r = execute(
        &mut c,
        tool_call(&s, "add", json!({"a": 2, "b": 3.5}), "c-add"),
    )
    .await;
    assert_eq!(r.status, grid::ResultStatus::Success as i32, "{r:?}");
    assert_eq!(content(&r), json!({"sum": 5.5}));
    assert_eq!(r.correlation_id, "c-add");

    // fail: the runtime's tool error passes through.
    let r = execute(&mut c, tool_call(&s, "fail", json!({}), "c-fail")).await;
    assert_eq!(error_code(&r), "TOOL_ERROR");
    assert_eq!(
        r.error_details.as_ref().unwrap().message,
        "the fail tool always fails"
    );
    let p = r.payload.as_ref().unwrap();
    assert_eq!(p.status, padm::ResultStatus::Error as i32);
    assert_eq!(p.error.as_ref().unwrap().r#type, "BUSINESS_RULE_VIOLATION");
    assert!(p.content.is_none());
    assert_eq!(r.correlation_id, "c-fail");

    // get_weather with the enum.
    let r = execute(
        &mut c,
        tool_call(
            &s,
            "get_weather",
            json!({"city": "Oslo", "units": "imperial"}),
            "c-w",
        ),
    )
    .await;
    assert_eq!(r.status, grid::ResultStatus::Success as i32, "{r:?}");
    assert_eq!(content(&r)["temperature_unit"], "F");
    assert_eq!(content(&r)["city"], "Oslo");

    // count, streamed: n chunks {"i": k}, chunk ids from 0, only the last one final.
    let chunks = stream(&mut c, tool_call(&s, "count", json!({"n": 5}), "c-count")).await;
    assert_eq!(chunks.len(), 5, "{chunks:?}");
    let first_id = chunks[0].invocation_id.clone();
    assert!(!first_id.is_empty());
    for (k, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.chunk_id, k as u64);
        assert_eq!(chunk.invocation_id, first_id);
        assert_eq!(chunk.is_final, k == 4, "chunk {k}");
        assert!(chunk.error_details.is_none());
        let v: serde_json::Value = serde_json::from_slice(&chunk.payload).unwrap();
        assert_eq!(v, json!({"i": k}));
    }

    // Schema violation, with the argument's path.
    let r = execute(
        &mut c,
        tool_call(&s, "add", json!({"a": 1, "b": "two"}), "c-sv"),
    )
    .await;
    assert_eq!(error_code(&r), "SCHEMA_VIOLATION");
    let msg = &r.error_details.as_ref().unwrap().message;
    assert!(msg.contains("args.b"), "{msg}");
    assert_eq!(r.correlation_id, "c-sv");
    let r = execute(&mut c, tool_call(&s, "echo", json!({}), "c-sv2")).await;
    assert_eq!(error_code(&r), "SCHEMA_VIOLATION");
    assert!(
        r.error_details
            .as_ref()
            .unwrap()
            .message
            .contains("args.text")
    );

    // Unknown tool, unknown session.
    let r = execute(&mut c, tool_call(&s, "nope", json!({}), "c-nf")).await;
    assert_eq!(error_code(&r), "TOOL_NOT_FOUND");
    assert_eq!(r.correlation_id, "c-nf");
    let r = execute(
        &mut c,
        tool_call("no-such-session", "echo", json!({"text": "x"}), "c-ns"),
    )
    .await;
    assert_eq!(error_code(&r), "SESSION_INVALID");
    assert_eq!(r.correlation_id, "c-ns");

    // Destroy, then the session is gone.
    let d = c
        .destroy_session(grid::DestroySession {
            session_id: s.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.destroyed);
    assert!(d.error.is_none());
    let r = execute(
        &mut c,
        tool_call(&s, "echo", json!({"text": "x"}), "c-gone"),
    )
    .await;
    assert_eq!(error_code(&r), "SESSION_INVALID");
    let d = c
        .destroy_session(grid::DestroySession { session_id: s })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.destroyed);
    assert_eq!(d.error.unwrap().code, "SESSION_INVALID");

    rt.shutdown().await;
    h.shutdown().await;
}

#[tokio::test]
async fn streams_of_unary_tools_and_unary_calls_of_streaming_tools() {
    let h = spawn_host(Duration::from_secs(5)).await;
    let rt = spawn_runtime(&h, "rt").await;
    let mut c = client(&h).await;
    let s = create_session(&mut c, "", 60).await;

    // A non-streaming tool through ExecuteToolStream: one final chunk with the JSON content.
    let chunks = stream(&mut c, tool_call(&s, "echo", json!({"text": "hi"}), "x")).await;
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert!(chunks[0].is_final);
    assert!(chunks[0].error_details.is_none());
    let v: serde_json::Value = serde_json::from_slice(&chunks[0].payload).unwrap();
    assert_eq!(v, json!({"text": "hi"}));

    // A tool error through ExecuteToolStream: one final chunk with error_details.
    let chunks = stream(&mut c, tool_call(&s, "fail", json!({}), "x")).await;
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert!(chunks[0].is_final);
    assert_eq!(chunks[0].error_details.as_ref().unwrap().code, "TOOL_ERROR");

    // Errors before dispatch: one final chunk with error_details.
    let chunks = stream(&mut c, tool_call("nope", "count", json!({"n": 2}), "x")).await;
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].is_final);
    assert_eq!(
        chunks[0].error_details.as_ref().unwrap().code,
        "SESSION_INVALID"
    );
    let chunks = stream(&mut c, tool_call(&s, "count", json!({"n": 2.5}), "x")).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        chunks[0].error_details.as_ref().unwrap().code,
        "SCHEMA_VIOLATION"
    );

    // The streaming tool through ExecuteTool: the chunks gathered into one array.
    let r = execute(&mut c, tool_call(&s, "count", json!({"n": 3}), "c3")).await;
    assert_eq!(r.status, grid::ResultStatus::Success as i32, "{r:?}");
    assert_eq!(content(&r), json!([{"i": 0}, {"i": 1}, {"i": 2}]));
    assert_eq!(r.correlation_id, "c3");

    // count caps n at 1000.
    let chunks = stream(&mut c, tool_call(&s, "count", json!({"n": 5000}), "big")).await;
    assert_eq!(chunks.len(), 1000);
    assert!(chunks[999].is_final);

    rt.shutdown().await;
    h.shutdown().await;
}

#[tokio::test]
async fn records_security_context_and_metadata_as_received() {
    use aesp_sidecar::proto::aesp;
    use prost::Message as _;

    let h = spawn_host(Duration::from_secs(5)).await;
    let ch = channel(&h).await;

    // An upgraded CreateSession, as the sidecar would forward it: the enterprise fields
    // travel in the same bytes, so send the enterprise view through a raw gRPC client.
    let esc = aesp::EnterpriseSecurityContext {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        organization_id: "acme-org".into(),
        roles: vec!["analyst".into()],
        security_clearance: "SECRET".into(),
        ..Default::default()
    };
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(aesp::EnterpriseCreateSession {
        suggested_session_id: String::new(),
        ttl_seconds: 30,
        security_context: Some(esc.clone()),
    });
    req.metadata_mut()
        .insert("x-aesp-principal", "alice".parse().unwrap());
    req.metadata_mut().insert_bin(
        "aesp-security-context-bin",
        tonic::metadata::MetadataValue::from_bytes(&esc.encode_to_vec()),
    );
    let codec =
        tonic_prost::ProstCodec::<aesp::EnterpriseCreateSession, grid::CreateSessionAck>::default();
    let ack = grpc
        .unary(
            req,
            "/altar.grid.v1.GridHost/CreateSession".parse().unwrap(),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.session_id.is_empty());

    assert_eq!(h.state.security_contexts(), vec![esc.clone()]);
    let md = h.state.request_metadata();
    let (path, entries) = md.last().unwrap();
    assert_eq!(path, "/altar.grid.v1.GridHost/CreateSession");
    let get = |k: &str| {
        entries
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("x-aesp-principal").as_deref(), Some("alice"));
    let bin = get("aesp-security-context-bin").unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(bin)
        .unwrap();
    assert_eq!(
        aesp::EnterpriseSecurityContext::decode(bytes.as_slice()).unwrap(),
        esc
    );

    // A base CreateSession without a context records none.
    let mut c = GridHostClient::new(ch);
    create_session(&mut c, "", 0).await;
    assert_eq!(h.state.security_contexts().len(), 1);
    assert_eq!(h.state.request_metadata().len(), 2);

    h.shutdown().await;
}

#[tokio::test]
async fn sessions_ids_ttl_and_no_runtime() {
    let h = host::spawn(host::HostOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_ttl_seconds: 60,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = client(&h).await;

    // No runtime connected: CreateSession does not wait, calls get NO_RUNTIME.
    let started = std::time::Instant::now();
    let s = create_session(&mut c, "mine", 1).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(s, "mine");
    let r = execute(&mut c, tool_call(&s, "echo", json!({"text": "x"}), "c")).await;
    assert_eq!(error_code(&r), "NO_RUNTIME");

    // A taken suggestion is overridden.
    let other = create_session(&mut c, "mine", 0).await;
    assert_ne!(other, "mine");

    // TTL is capped at the maximum.
    let ack = c
        .create_session(grid::CreateSession {
            suggested_session_id: String::new(),
            ttl_seconds: 10_000,
            security_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.expires_at_unix_seconds <= unix_now() + 60);
    assert!(ack.expires_at_unix_seconds + 5 >= unix_now() + 60);

    // An expired session is invalid.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = execute(&mut c, tool_call(&s, "echo", json!({"text": "x"}), "c")).await;
    assert_eq!(error_code(&r), "SESSION_INVALID");

    h.shutdown().await;
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let h = spawn_host(Duration::from_secs(5)).await;
    let mut grpc = tonic::client::Grpc::new(channel(&h).await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<grid::DestroySession, grid::DestroySessionAck>::default();
    let status = grpc
        .unary(
            tonic::Request::new(grid::DestroySession::default()),
            "/altar.grid.v1.GridHost/Nope".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    h.shutdown().await;
}

/// A runtime driven by hand: announces, answers fulfilment, and hands calls to the test.
struct RawRuntime {
    tx: mpsc::Sender<grid::RuntimeMessage>,
    inbound: tonic::Streaming<grid::HostMessage>,
}

impl RawRuntime {
    async fn connect(h: &host::HostHandle, first: runtime_message::Kind) -> Self {
        let mut rc = GridRuntimeClient::new(channel(h).await);
        let (tx, rx) = mpsc::channel(16);
        tx.send(grid::RuntimeMessage { kind: Some(first) })
            .await
            .unwrap();
        let inbound = rc
            .connect(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawRuntime { tx, inbound }
    }

    async fn next(&mut self) -> host_message::Kind {
        tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .kind
            .unwrap()
    }

    async fn send(&self, kind: runtime_message::Kind) {
        self.tx
            .send(grid::RuntimeMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn announce(id: &str) -> runtime_message::Kind {
    runtime_message::Kind::Announce(grid::AnnounceRuntime {
        runtime_id: id.into(),
        language: "test".into(),
        version: "0".into(),
        capabilities: vec![],
    })
}

#[tokio::test]
async fn runtime_timeout_disconnect_and_fulfil_checks() {
    let h = spawn_host(Duration::from_millis(500)).await;
    let mut raw = RawRuntime::connect(&h, announce("raw")).await;
    let host_message::Kind::AnnounceAck(ack) = raw.next().await else {
        panic!("expected AnnounceAck first");
    };
    assert!(ack.accepted);
    assert_eq!(
        ack.available_contracts,
        ["echo", "add", "count", "fail", "get_weather"]
    );

    // CreateSession waits for this runtime's answer; answer from a task.
    let mut c = client(&h).await;
    let creating = tokio::spawn(async move {
        let s = create_session(&mut c, "raw-s", 0).await;
        (c, s)
    });
    let host_message::Kind::RequestFulfillment(req) = raw.next().await else {
        panic!("expected RequestFulfillment");
    };
    assert_eq!(req.session_id, "raw-s");
    raw.send(runtime_message::Kind::Fulfill(grid::FulfillTools {
        session_id: "raw-s".into(),
        tool_contract_names: vec!["echo".into(), "count".into(), "bogus".into()],
    }))
    .await;
    let host_message::Kind::FulfillAck(fack) = raw.next().await else {
        panic!("expected FulfillAck");
    };
    assert_eq!(fack.session_id, "raw-s");
    assert_eq!(fack.accepted, ["echo", "count"]);
    let err = fack.error.unwrap();
    assert_eq!(err.code, "TOOL_NOT_FOUND");
    assert!(err.message.contains("bogus"), "{}", err.message);
    let (mut c, s) = creating.await.unwrap();

    // A tool the runtime did not take: NO_RUNTIME.
    let r = execute(&mut c, tool_call(&s, "add", json!({"a": 1, "b": 2}), "c")).await;
    assert_eq!(error_code(&r), "NO_RUNTIME");

    // The runtime answers; the client gets the result with its own correlation id, whatever
    // the runtime put there.
    let mut c1 = c.clone();
    let s1 = s.clone();
    let pending = tokio::spawn(async move {
        execute(
            &mut c1,
            tool_call(&s1, "echo", json!({"text": "ok"}), "c-ok"),
        )
        .await
    });
    let host_message::Kind::Call(call) = raw.next().await else {
        panic!("expected Call");
    };
    let fc = call.function_call.clone().unwrap();
    assert_eq!(fc.call_id, "call-c-ok");
    assert_eq!(
        value_to_json(&prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(
                fc.args.clone().unwrap()
            )),
        }),
        json!({"text": "ok"})
    );
    raw.send(runtime_message::Kind::Result(grid::ToolResult {
        invocation_id: call.invocation_id.clone(),
        status: grid::ResultStatus::Success as i32,
        payload: Some(padm::ToolResult {
            name: "echo".into(),
            content: Some(aesp_sidecar::adm::json_to_value(&json!("raw says ok")).unwrap()),
            ..Default::default()
        }),
        error_details: None,
        correlation_id: "the-runtime-got-it-wrong".into(),
    }))
    .await;
    let r = pending.await.unwrap();
    assert_eq!(r.status, grid::ResultStatus::Success as i32, "{r:?}");
    assert_eq!(r.correlation_id, "c-ok");
    assert_eq!(r.invocation_id, call.invocation_id);
    assert_eq!(content(&r), json!("raw says ok"));

    // The runtime gets the call as sent, but never answers: RUNTIME_TIMEOUT.
    let mut c2 = c.clone();
    let s2 = s.clone();
    let pending = tokio::spawn(async move {
        execute(
            &mut c2,
            tool_call(&s2, "echo", json!({"text": "t"}), "c-to"),
        )
        .await
    });
    let host_message::Kind::Call(call) = raw.next().await else {
        panic!("expected Call");
    };
    assert_eq!(call.session_id, s);
    assert_eq!(call.correlation_id, "c-to");
    assert!(!call.invocation_id.is_empty());
    assert_eq!(call.function_call.as_ref().unwrap().name, "echo");
    let r = pending.await.unwrap();
    assert_eq!(error_code(&r), "RUNTIME_TIMEOUT");
    assert_eq!(r.correlation_id, "c-to");

    // A late answer (the invocation has timed out) is dropped quietly.
    raw.send(runtime_message::Kind::Result(grid::ToolResult {
        invocation_id: call.invocation_id.clone(),
        ..Default::default()
    }))
    .await;

    // The runtime disconnects while a call waits: RUNTIME_DISCONNECTED.
    let mut c3 = c.clone();
    let s3 = s.clone();
    let pending = tokio::spawn(async move {
        execute(
            &mut c3,
            tool_call(&s3, "echo", json!({"text": "d"}), "c-dc"),
        )
        .await
    });
    let host_message::Kind::Call(_) = raw.next().await else {
        panic!("expected Call");
    };
    drop(raw);
    let r = pending.await.unwrap();
    assert_eq!(error_code(&r), "RUNTIME_DISCONNECTED");
    assert_eq!(r.correlation_id, "c-dc");

    // Its fulfilment is gone with it.
    let r = execute(&mut c, tool_call(&s, "echo", json!({"text": "x"}), "c")).await;
    assert_eq!(error_code(&r), "NO_RUNTIME");

    // A runtime that connects later is asked about the live sessions and serves them.
    let rt = spawn_runtime(&h, "late").await;
    let mut served = None;
    for _ in 0..50 {
        let r = execute(&mut c, tool_call(&s, "echo", json!({"text": "late"}), "c")).await;
        if r.status == grid::ResultStatus::Success as i32 {
            served = Some(r);
            break;
        }
        assert_eq!(error_code(&r), "NO_RUNTIME");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(content(&served.unwrap()), json!({"text": "late"}));

    rt.shutdown().await;
    h.shutdown().await;
}

#[tokio::test]
async fn first_message_must_be_announce() {
    let h = spawn_host(Duration::from_secs(5)).await;
    let mut raw = RawRuntime::connect(
        &h,
        runtime_message::Kind::Fulfill(grid::FulfillTools::default()),
    )
    .await;
    let status = tokio::time::timeout(WAIT, raw.inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(h.state.announcements().is_empty());
    assert!(h.state.connected_runtimes().is_empty());

    // An announce without a runtime_id is refused in band.
    let mut raw = RawRuntime::connect(&h, announce("")).await;
    let host_message::Kind::AnnounceAck(ack) = raw.next().await else {
        panic!("expected AnnounceAck");
    };
    assert!(!ack.accepted);
    assert_eq!(ack.error.unwrap().code, "INVALID_ANNOUNCE");
    assert!(ack.available_contracts.is_empty());
    assert!(h.state.connected_runtimes().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn runtime_reconnects_after_the_host_restarts() {
    let h = spawn_host(Duration::from_secs(5)).await;
    let addr = h.local_addr;
    let rt = spawn_runtime(&h, "phoenix").await;
    h.shutdown().await;

    // The runtime notices, and comes back once a host listens on the same address again.
    let h = host::spawn(host::HostOptions {
        listen: addr,
        ..Default::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    while h.state.connected_runtimes().is_empty() {
        assert!(started.elapsed() < WAIT, "the runtime did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rt.wait_announced(WAIT).await.unwrap();
    assert_eq!(h.state.announcements().len(), 1);
    let mut c = client(&h).await;
    let s = create_session(&mut c, "", 0).await;
    let r = execute(&mut c, tool_call(&s, "echo", json!({"text": "again"}), "c")).await;
    assert_eq!(content(&r), json!({"text": "again"}));
    assert_eq!(h.state.connected_runtimes(), ["phoenix"]);

    rt.shutdown().await;
    h.shutdown().await;
}

#[tokio::test]
async fn upgraded_runtime_announcements_are_decoded_with_enterprise_fields() {
    use aesp_sidecar::proto::aesp::{
        self, EnterpriseRuntimeAnnouncement, EnterpriseRuntimeMessage, enterprise_runtime_message,
    };

    let h = spawn_host(Duration::from_secs(5)).await;
    let mut grpc = tonic::client::Grpc::new(channel(&h).await);
    grpc.ready().await.unwrap();
    let era = EnterpriseRuntimeAnnouncement {
        runtime_id: "zoned".into(),
        language: "python".into(),
        version: "1.2.3".into(),
        capabilities: vec!["streaming".into()],
        tenant_id: "acme".into(),
        security_zone: "dmz".into(),
        deployment_environment: "PROD".into(),
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(EnterpriseRuntimeMessage {
        kind: Some(enterprise_runtime_message::Kind::Announce(era.clone())),
    })
    .await
    .unwrap();
    let codec =
        tonic_prost::ProstCodec::<EnterpriseRuntimeMessage, aesp::EnterpriseHostMessage>::default();
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            "/altar.grid.v1.GridRuntime/Connect".parse().unwrap(),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(aesp::enterprise_host_message::Kind::AnnounceAck(ack)) = first.kind else {
        panic!("expected AnnounceAck, got {first:?}");
    };
    assert!(ack.accepted);
    assert_eq!(h.state.announcements(), vec![era]);
    assert_eq!(h.state.connected_runtimes(), ["zoned"]);
    let md = h.state.request_metadata();
    assert_eq!(md.last().unwrap().0, "/altar.grid.v1.GridRuntime/Connect");

    drop(tx);
    drop(inbound);
    h.shutdown().await;
}

/// A throwaway PKI: CA, a server certificate for "localhost", a client certificate.
struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn test_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "reference-host test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |san: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, san);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &*ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf("runtime.test", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

#[tokio::test]
async fn runtime_connects_over_mtls() {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};

    let pki = test_pki();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca_pem));
    let h = host::spawn_tls(
        host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        tls,
    )
    .await
    .unwrap();

    let rt = runtime::spawn(runtime::RuntimeOptions {
        endpoint: format!("https://127.0.0.1:{}", h.local_addr.port()),
        tls: Some(runtime::RuntimeTls {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            cert_pem: pki.client.0.clone().into_bytes(),
            key_pem: pki.client.1.clone().into_bytes(),
            domain: "localhost".into(),
        }),
        runtime_id: "tls-runtime".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.wait_announced(WAIT).await.unwrap();
    assert_eq!(h.state.connected_runtimes(), ["tls-runtime"]);

    // A runtime without a client certificate is refused by the TLS handshake.
    let wrong = runtime::spawn(runtime::RuntimeOptions {
        endpoint: format!("https://127.0.0.1:{}", h.local_addr.port()),
        tls: Some(runtime::RuntimeTls {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            domain: "localhost".into(),
        }),
        runtime_id: "not-a-client".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        wrong
            .wait_announced(Duration::from_millis(800))
            .await
            .is_err()
    );
    assert!(!wrong.announced());
    assert_eq!(h.state.connected_runtimes(), ["tls-runtime"]);
    wrong.shutdown().await;

    rt.shutdown().await;
    h.shutdown().await;
}

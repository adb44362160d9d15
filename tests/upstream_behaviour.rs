//! How the sidecar passes on what a host does at the HTTP/2 level: stream resets, trailers,
//! pass-through methods, and a client's cancellation. The host here is a real HTTP/2 server
//! (the h2 crate) on a real socket that does exactly what each test needs.

mod common;

use aesp_sidecar::proto::{aesp, grid};
use bytes::Bytes;
use common::frame;
use prost::Message;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug)]
enum Seen {
    Headers(String, http::HeaderMap),
    Trailers(String, http::HeaderMap),
    Reset(String),
}

/// Metadata a host might send that belongs to the sidecar.
fn forged(h: &mut http::HeaderMap) {
    h.insert("x-aesp-principal", "host-forged".parse().unwrap());
    h.insert("x_aesp_tenant", "host-forged".parse().unwrap());
    h.insert("aesp-security-context-bin", "AAAA".parse().unwrap());
}

/// A host that resets `ExecuteToolStream` after one chunk, echoes `/test.Echo/Trailers` with
/// trailers, and reports what it sees.
async fn odd_host() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
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
                        let _ = tx.send(Seen::Headers(path.clone(), req.headers().clone()));
                        let mut body = req.into_body();
                        let ok = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        match path.as_str() {
                            "/altar.grid.v1.GridHost/ExecuteToolStream" => {
                                while let Some(Ok(_)) = body.data().await {}
                                let mut send = respond.send_response(ok, false).unwrap();
                                let chunk = grid::StreamChunk {
                                    invocation_id: "i".into(),
                                    payload: b"{}".to_vec(),
                                    ..Default::default()
                                };
                                send.send_data(Bytes::from(frame(&chunk.encode_to_vec())), false)
                                    .unwrap();
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                send.send_reset(h2::Reason::INTERNAL_ERROR);
                            }
                            "/test.Echo/Trailers" | "/altar.grid.v1.GridHost/CreateSession" => {
                                let mut data = Vec::new();
                                while let Some(Ok(d)) = body.data().await {
                                    let _ = body.flow_control().release_capacity(d.len());
                                    data.extend_from_slice(&d);
                                }
                                if let Ok(Some(t)) = body.trailers().await {
                                    let _ = tx.send(Seen::Trailers(path.clone(), t));
                                }
                                let mut ok = ok;
                                forged(ok.headers_mut());
                                if path.ends_with("CreateSession") {
                                    let ack = grid::CreateSessionAck {
                                        session_id: "s-odd".into(),
                                        ..Default::default()
                                    };
                                    data = frame(&ack.encode_to_vec());
                                }
                                let mut send = respond.send_response(ok, false).unwrap();
                                send.send_data(Bytes::from(data), false).unwrap();
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                t.insert("x-test-trailer", "yes".parse().unwrap());
                                forged(&mut t);
                                send.send_trailers(t).unwrap();
                            }
                            _ => {
                                // Connect and anything else: answer headers, then wait for the
                                // peer to go away and report how.
                                let mut send = respond.send_response(ok, false).unwrap();
                                let _ = send.send_data(Bytes::new(), false);
                                loop {
                                    match body.data().await {
                                        Some(Ok(d)) => {
                                            let _ = body.flow_control().release_capacity(d.len());
                                        }
                                        Some(Err(e)) => {
                                            let _ = tx.send(Seen::Reset(format!("{path}: {e}")));
                                            break;
                                        }
                                        None => {
                                            if let Ok(Some(t)) = body.trailers().await {
                                                let _ = tx.send(Seen::Trailers(path.clone(), t));
                                            }
                                            // Request side ended; wait for the response side to be reset.
                                            let r = std::future::poll_fn(|cx| send.poll_reset(cx))
                                                .await;
                                            let _ = tx.send(Seen::Reset(format!("{path}: {r:?}")));
                                            break;
                                        }
                                    }
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

/// `CreateSession` through the sidecar: the session id the host answered.
async fn create_session(raw: &mut common::RawH2) -> String {
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    grid::CreateSessionAck::decode(&r.messages()[0][..])
        .unwrap()
        .session_id
}

/// An `echo` call in `session` (a tool the demo's contracts approve).
fn echo_call(session: &str) -> Vec<u8> {
    aesp_sidecar::client::tool_call(session, "echo", &serde_json::json!({"text": "x"}))
        .unwrap()
        .encode_to_vec()
}

async fn sidecar_for(
    addr: std::net::SocketAddr,
    extra: &str,
) -> (tempfile::TempDir, aesp_sidecar::sidecar::Sidecar) {
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    common::permissive_rbac(dir.path());
    let p = dir.path().join("sidecar.yaml");
    std::fs::write(
        &p,
        // Certificates alone: these tests are about HTTP/2, not tokens.
        common::certificates_only(&common::config_text(&format!("http://{addr}"), extra))
            .replace("passthrough: []\n", ""),
    )
    .unwrap();
    let s = aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
        .await
        .unwrap();
    (dir, s)
}

fn client_config(dir: &std::path::Path, stem: &str) -> rustls::ClientConfig {
    let r = |f: &str| std::fs::read(dir.join(f)).unwrap();
    aesp_sidecar::tls::client_config_from_pem(
        &r("ca.crt"),
        Some((&r(&format!("{stem}.crt")), &r(&format!("{stem}.key")))),
    )
    .unwrap()
}

#[tokio::test]
async fn a_stream_reset_by_the_host_ends_the_call_with_upstream_unavailable() {
    let (addr, _seen) = odd_host().await;
    let (dir, sidecar) = sidecar_for(addr, "").await;
    let mut raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "acme")).await;
    // A session created through the sidecar (the host names it s-odd), then a call in it.
    let session = create_session(&mut raw).await;
    assert_eq!(session, "s-odd");
    let tc = echo_call(&session);
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/ExecuteToolStream",
            &[],
            vec![frame(&tc)],
        )
        .await;
    assert_eq!(
        r.messages().len(),
        1,
        "the chunk sent before the reset is delivered"
    );
    assert_eq!(r.grpc_status(), Some(14), "{r:?}");
    let e = r.enterprise_error().unwrap();
    assert_eq!(e.code, "UPSTREAM_UNAVAILABLE");
    assert!(e.message.contains("reset"), "{}", e.message);
    // Recorded as a refusal on the way back, not as a second decision about the call.
    assert_eq!(common::denials(&sidecar, "UPSTREAM_UNAVAILABLE"), 1);
    let calls = |o| {
        common::counter(
            &sidecar,
            "aesp_calls_total",
            &[
                ("method", "/altar.grid.v1.GridHost/ExecuteToolStream"),
                ("outcome", o),
            ],
        )
    };
    assert_eq!((calls("allow"), calls("deny")), (1, 0));
    sidecar.shutdown().await;
}

#[tokio::test]
async fn pass_through_methods_are_forwarded_untouched_with_trailers_and_identity() {
    let (addr, mut seen) = odd_host().await;
    let (dir, sidecar) = sidecar_for(addr, "passthrough: [\"/test.Echo/Trailers\"]\n").await;
    let mut raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "acme")).await;
    // Not protobuf, and compressed with an encoding the sidecar cannot read: pass-through
    // does not inspect.
    let body = vec![1u8, 0, 0, 0, 3, 0xde, 0xad, 0xbf];
    let r = raw
        .call(
            "/test.Echo/Trailers",
            &[("grpc-encoding", "snappy"), ("x-aesp-tenant", "globex")],
            vec![body.clone()],
        )
        .await;
    assert_eq!(r.data, body);
    let t = r.trailers.as_ref().expect("trailers");
    assert_eq!(t["x-test-trailer"], "yes");
    assert_eq!(r.grpc_status(), Some(0));
    let Some(Seen::Headers(path, h)) = seen.recv().await else {
        panic!("host saw nothing")
    };
    assert_eq!(path, "/test.Echo/Trailers");
    assert_eq!(h["x-aesp-principal"], "alice");
    assert_eq!(
        h.get_all("x-aesp-tenant").iter().collect::<Vec<_>>(),
        vec!["acme"]
    );
    assert_eq!(
        h["grpc-encoding"], "snappy",
        "pass-through keeps the encoding"
    );
    // A method not listed is still refused.
    let r = raw.call("/test.Echo/Other", &[], vec![frame(b"")]).await;
    assert_eq!(r.enterprise_error().unwrap().code, "METHOD_NOT_ALLOWED");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_client_that_cancels_a_stream_cancels_it_at_the_host() {
    let (addr, mut seen) = odd_host().await;
    let (dir, sidecar) = sidecar_for(addr, "").await;
    let cc = client_config(dir.path(), "runtime");
    let tcp = tokio::net::TcpStream::connect(sidecar.data_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cc))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut h2c = h2c.ready().await.unwrap();
    let req = http::Request::post("https://localhost/altar.grid.v1.GridRuntime/Connect")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = h2c.send_request(req, false).unwrap();
    let ann = aesp::EnterpriseRuntimeMessage {
        kind: Some(aesp::enterprise_runtime_message::Kind::Announce(
            Default::default(),
        )),
    }
    .encode_to_vec();
    send.send_data(Bytes::from(frame(&ann)), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let Some(Seen::Headers(p, _)) = seen.recv().await else {
        panic!()
    };
    assert_eq!(p, "/altar.grid.v1.GridRuntime/Connect");
    // The runtime goes away mid-stream.
    send.send_reset(h2::Reason::CANCEL);
    drop(resp);
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("the host saw the cancellation");
    match got {
        Some(Seen::Reset(how)) => assert!(
            how.starts_with("/altar.grid.v1.GridRuntime/Connect"),
            "{how}"
        ),
        other => panic!("expected a reset, got {other:?}"),
    }
    sidecar.shutdown().await;
}

/// The names of `h` the sidecar owns (any spelling), and the credentials it consumes.
fn sidecar_owned(h: &http::HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| {
            let k = k.replace('_', "-");
            (k.starts_with("x-aesp-") && k != "x-aesp-correlation-id")
                || k.starts_with("aesp-")
                || k == "authorization"
                || k == "x-forwarded-client-cert"
        })
        .collect()
}

/// Request trailers as an attacker sends them.
fn hostile_trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("x-aesp-tenant", "globex".parse().unwrap());
    t.insert("x_aesp_principal", "mallory".parse().unwrap());
    t.insert("aesp-security-context-bin", "AAAA".parse().unwrap());
    t.insert("authorization", "Bearer stolen".parse().unwrap());
    t.insert("x-forwarded-client-cert", "Hash=forged".parse().unwrap());
    t.insert("x-app-trailer", "kept".parse().unwrap());
    t
}

/// Sends `messages` then `trailers` on `path` and returns the response.
async fn call_with_trailers(
    raw: &mut common::RawH2,
    path: &str,
    messages: Vec<Vec<u8>>,
    trailers: http::HeaderMap,
) -> common::RawResponse {
    let (tx, rx) = mpsc::channel(messages.len() + 1);
    for m in messages {
        tx.send(Ok(http_body::Frame::data(Bytes::from(m))))
            .await
            .unwrap();
    }
    tx.send(Ok(http_body::Frame::trailers(trailers)))
        .await
        .unwrap();
    drop(tx);
    raw.call_streaming(path, &[], rx).await
}

async fn trailers_seen(seen: &mut mpsc::UnboundedReceiver<Seen>, path: &str) -> http::HeaderMap {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), seen.recv()).await {
            Ok(Some(Seen::Trailers(p, t))) if p == path => return t,
            Ok(Some(_)) => continue,
            other => panic!("the host saw no trailers on {path}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn reserved_metadata_and_credentials_never_cross_the_sidecar_in_trailers_or_headers() {
    let (addr, mut seen) = odd_host().await;
    let (dir, sidecar) = sidecar_for(addr, "passthrough: [\"/test.Echo/Trailers\"]\n").await;
    let mut raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "acme")).await;

    // Pass-through: request trailers lose what the sidecar owns; the host's reserved
    // response headers and trailers never reach the client.
    let r = call_with_trailers(
        &mut raw,
        "/test.Echo/Trailers",
        vec![frame(b"x")],
        hostile_trailers(),
    )
    .await;
    let t = trailers_seen(&mut seen, "/test.Echo/Trailers").await;
    assert_eq!(sidecar_owned(&t), Vec::<String>::new(), "{t:?}");
    assert_eq!(t["x-app-trailer"], "kept");
    assert_eq!(sidecar_owned(&r.headers), Vec::<String>::new(), "{r:?}");
    let rt = r.trailers.as_ref().unwrap();
    assert_eq!(sidecar_owned(rt), Vec::<String>::new(), "{rt:?}");
    assert_eq!(rt["x-test-trailer"], "yes");

    // An inspected call: the same on the way back.
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    assert_eq!(sidecar_owned(&r.headers), Vec::<String>::new(), "{r:?}");
    assert_eq!(
        sidecar_owned(r.trailers.as_ref().unwrap()),
        Vec::<String>::new()
    );

    // Connect: a runtime's trailers lose them too.
    let mut rt_raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "runtime")).await;
    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "rt-trailers".into(),
                ..Default::default()
            },
        )),
    };
    let connect = "/altar.grid.v1.GridRuntime/Connect";
    let call = tokio::spawn(async move {
        call_with_trailers(
            &mut rt_raw,
            connect,
            vec![frame(&announce.encode_to_vec())],
            hostile_trailers(),
        )
        .await
    });
    let t = trailers_seen(&mut seen, connect).await;
    assert_eq!(sidecar_owned(&t), Vec::<String>::new(), "{t:?}");
    assert_eq!(t["x-app-trailer"], "kept");
    call.abort();
    sidecar.shutdown().await;
}

/// A host that takes every stream and answers only `CreateSession`. `ExecuteTool`,
/// `ExecuteToolStream` and a `Connect` carrying `x-test-mute` get no response headers, ever;
/// another `Connect` gets its headers and then silence. Reports each stream's headers, and
/// how each unanswered or silent stream ended (`Reset("<path>[ mute]: ...")`).
async fn mute_host() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
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
                        let mute = req.headers().contains_key("x-test-mute");
                        let _ = tx.send(Seen::Headers(path.clone(), req.headers().clone()));
                        let mut body = req.into_body();
                        let ok = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let label = format!("{path}{}", if mute { " mute" } else { "" });
                        if path.ends_with("/CreateSession") {
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                            }
                            let ack = grid::CreateSessionAck {
                                session_id: "s-mute".into(),
                                ..Default::default()
                            };
                            let mut send = respond.send_response(ok, false).unwrap();
                            send.send_data(Bytes::from(frame(&ack.encode_to_vec())), false)
                                .unwrap();
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            send.send_trailers(t).unwrap();
                        } else if path.ends_with("/Connect") && !mute {
                            let mut send = respond.send_response(ok, false).unwrap();
                            let r = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
                            let _ = tx.send(Seen::Reset(format!("{label}: {r:?}")));
                        } else {
                            // Never a response header: wait for the sidecar to give up.
                            let r = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                            let _ = tx.send(Seen::Reset(format!("{label}: {r:?}")));
                        }
                    });
                }
            });
        }
    });
    (addr, rx)
}

/// Waits (up to 10 s) for the host to report a reset whose label starts with `label`;
/// other reports are kept in `other`.
async fn reset_seen(seen: &mut mpsc::UnboundedReceiver<Seen>, label: &str, other: &mut Vec<Seen>) {
    if let Some(i) = other
        .iter()
        .position(|s| matches!(s, Seen::Reset(l) if l.starts_with(&format!("{label}:"))))
    {
        other.remove(i);
        return;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
            Ok(Some(Seen::Reset(l))) if l.starts_with(&format!("{label}:")) => return,
            Ok(Some(s)) => other.push(s),
            r => panic!("the host saw no reset of {label}: {r:?}; also seen: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_host_that_never_answers_ends_calls_in_upstream_unavailable_and_others_are_served() {
    const TIMEOUT_MS: u64 = 3000;
    let (addr, mut seen) = mute_host().await;
    let (dir, sidecar) = sidecar_for(
        addr,
        &format!("limits:\n  upstream_response_timeout_ms: {TIMEOUT_MS}\n"),
    )
    .await;
    let acme = client_config(dir.path(), "acme");
    let session = {
        let mut raw = common::RawH2::connect(sidecar.data_addr, acme.clone()).await;
        create_session(&mut raw).await
    };
    assert_eq!(session, "s-mute");
    let tc = echo_call(&session);
    let mut calls = Vec::new();
    for method in ["ExecuteTool", "ExecuteToolStream"] {
        let mut raw = common::RawH2::connect(sidecar.data_addr, acme.clone()).await;
        let tc = tc.clone();
        calls.push(tokio::spawn(async move {
            raw.call(
                &format!("/altar.grid.v1.GridHost/{method}"),
                &[],
                vec![frame(&tc)],
            )
            .await
        }));
    }
    // A runtime whose Connect the host never answers, and one it answers and then ignores.
    let announce = frame(
        &grid::RuntimeMessage {
            kind: Some(grid::runtime_message::Kind::Announce(
                grid::AnnounceRuntime {
                    runtime_id: "rt-mute".into(),
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
    );
    let mut runtimes = Vec::new();
    let mut keep_open = Vec::new();
    for mute in [true, false] {
        let mut raw =
            common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "runtime")).await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from(announce.clone()))))
            .await
            .unwrap();
        keep_open.push(tx);
        runtimes.push(tokio::spawn(async move {
            let headers: &[(&str, &str)] = if mute { &[("x-test-mute", "1")] } else { &[] };
            raw.call_streaming("/altar.grid.v1.GridRuntime/Connect", headers, rx)
                .await
        }));
    }
    // Every stream reached the host.
    let mut other = Vec::new();
    let mut heads = 0;
    while heads < 4 {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
            Ok(Some(Seen::Headers(..))) => heads += 1,
            Ok(Some(s)) => other.push(s),
            r => panic!("the host saw {heads} streams of 4: {r:?}"),
        }
    }

    // Meanwhile another client is served, on a connection of its own.
    let mut globex =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "globex")).await;
    let r = globex
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "the unanswered calls are still waiting for the host"
    );

    // Then each unanswered call ends in UPSTREAM_UNAVAILABLE, and its stream to the host
    // is reset: nothing is left waiting on either side.
    for c in calls.into_iter().chain(runtimes.drain(..1)) {
        let r = c.await.unwrap();
        assert_eq!(r.grpc_status(), Some(14), "{r:?}");
        let e = r.enterprise_error().expect("an EnterpriseError");
        assert_eq!(e.code, "UPSTREAM_UNAVAILABLE");
        assert_eq!(e.details["reason"], "the host did not answer in time");
        assert!(
            !format!("{e:?}").contains(&addr.port().to_string()),
            "the host's address stays in the logs: {e:?}"
        );
    }
    for label in [
        "/altar.grid.v1.GridHost/ExecuteTool",
        "/altar.grid.v1.GridHost/ExecuteToolStream",
        "/altar.grid.v1.GridRuntime/Connect mute",
    ] {
        reset_seen(&mut seen, label, &mut other).await;
    }
    // Recorded and counted as refusals, like every other upstream failure.
    assert_eq!(common::denials(&sidecar, "UPSTREAM_UNAVAILABLE"), 3);
    assert_eq!(
        common::counter(&sidecar, "aesp_upstream_errors_total", &[]),
        3
    );

    // The Connect that got its headers has no such deadline: it is open well past it.
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS)).await;
    let open = runtimes.pop().unwrap();
    assert!(!open.is_finished(), "a Connect with its headers stays open");
    while let Ok(s) = seen.try_recv() {
        other.push(s);
    }
    assert!(
        !other.iter().any(|s| matches!(s, Seen::Reset(_))),
        "nothing else was reset: {other:?}"
    );
    drop(keep_open);
    open.abort();
    sidecar.shutdown().await;
}

/// A host that answers `CreateSession` (session `s-big`) and answers every `ExecuteTool`
/// with one `ToolResult` of `size` bytes, or, with `status`, with that gRPC status and
/// message alone (no message, no details).
async fn big_answer_host(size: usize, status: Option<(u32, &'static str)>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let mut body = req.into_body();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        let msg = if path.ends_with("/CreateSession") {
                            grid::CreateSessionAck {
                                session_id: "s-big".into(),
                                ..Default::default()
                            }
                            .encode_to_vec()
                        } else {
                            grid::ToolResult {
                                invocation_id: "x".repeat(size),
                                ..Default::default()
                            }
                            .encode_to_vec()
                        };
                        let ok = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(ok, false).unwrap();
                        let mut t = http::HeaderMap::new();
                        match status {
                            Some((code, message)) if !path.ends_with("/CreateSession") => {
                                t.insert("grpc-status", code.into());
                                t.insert("grpc-message", message.parse().unwrap());
                            }
                            _ => {
                                let _ = send.send_data(Bytes::from(frame(&msg)), false);
                                t.insert("grpc-status", "0".parse().unwrap());
                            }
                        }
                        let _ = send.send_trailers(t);
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_host_result_over_the_message_limit_is_reported_as_a_response_too_large() {
    let addr = big_answer_host(8000, None).await;
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    common::permissive_rbac(dir.path());
    let p = dir.path().join("sidecar.yaml");
    let text = common::certificates_only(&common::config_text(&format!("http://{addr}"), ""))
        .replace("max_message_bytes: 4194304", "max_message_bytes: 4096");
    std::fs::write(&p, text).unwrap();
    let sidecar =
        aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
            .await
            .unwrap();
    let mut raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "acme")).await;
    let session = create_session(&mut raw).await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/ExecuteTool",
            &[],
            vec![frame(&echo_call(&session))],
        )
        .await;
    let e = r.enterprise_error().expect("a refusal in the trailers");
    assert_eq!(e.code, "MALFORMED_MESSAGE");
    assert_eq!(e.details["direction"], "response");
    assert_eq!(e.details["reason"], "response too large");
    assert_eq!(e.details["max_message_bytes"], "4096");
    assert!(e.message.contains("the request was fine"), "{}", e.message);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_host_status_without_details_reaches_the_client_with_an_enterprise_error() {
    let addr = big_answer_host(0, Some((13, "disk%20on%20fire"))).await;
    let (dir, sidecar) = sidecar_for(addr, "").await;
    let mut raw =
        common::RawH2::connect(sidecar.data_addr, client_config(dir.path(), "acme")).await;
    let session = create_session(&mut raw).await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/ExecuteTool",
            &[("x-aesp-correlation-id", "trace-13")],
            vec![frame(&echo_call(&session))],
        )
        .await;
    assert_eq!(
        r.grpc_status(),
        Some(13),
        "the host's status is kept: {r:?}"
    );
    let e = r.enterprise_error().expect("details added by the sidecar");
    assert_eq!(
        (
            e.code.as_str(),
            e.message.as_str(),
            e.correlation_id.as_str()
        ),
        ("INTERNAL", "disk on fire", "trace-13")
    );
    assert_eq!(e.details["origin"], "grid-host");
    assert_eq!(e.details["grpc_status"], "13");
    sidecar.shutdown().await;
}

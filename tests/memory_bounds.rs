//! What a peer can make the sidecar hold (issue: hardening, memory): unfinished messages on
//! many streams of one connection, unary and `Connect` alike. Bytes held for inspection stay
//! within `limits.max_buffered_bytes_per_connection` (the HTTP/2 flow-control window holds
//! the peer back, not a buffer), a message that stalls times out and releases what it held,
//! and another client is served meanwhile.
//!
//! One test per binary run at a time (a lock): the resident set size of this process (the
//! sidecar runs in it) is part of what is checked.

mod common;

use aesp_sidecar::proto::grid;
use aesp_sidecar::proto::grid::grid_host_client::GridHostClient;
use common::{Stack, counter};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1024 * 1024;
const PER_CONNECTION: usize = 8 * MIB;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Opens `streams` streams of `path` on one connection as `stem`; each sends `first` (whole
/// messages) then the start of a message declaring `declared` bytes, and keeps sending its
/// body as fast as flow control allows, never finishing it.
async fn hold_unfinished(
    stack: &Stack,
    stem: &str,
    path: &'static str,
    streams: usize,
    first: Vec<u8>,
    declared: usize,
) -> Vec<tokio::task::JoinHandle<Option<http::HeaderMap>>> {
    let tcp = tokio::net::TcpStream::connect(stack.sidecar.data_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(stack.client_config(Some(stem))))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        h2c = h2c.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = h2c.send_request(req, false).unwrap();
        let mut head = first.clone();
        head.push(0);
        head.extend_from_slice(&(declared as u32).to_be_bytes());
        let sender = tokio::spawn(async move {
            let _ = send.send_data(bytes::Bytes::from(head), false);
            let mut left = declared - 1;
            while left > 0 {
                send.reserve_capacity(left.min(64 * 1024));
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(n)) if n > 0 => {
                        let n = n.min(left);
                        if send
                            .send_data(bytes::Bytes::from(vec![0u8; n]), false)
                            .is_err()
                        {
                            break;
                        }
                        left -= n;
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            send
        });
        // The response is read as it comes, as a client would: the trailers that ended the
        // call (or `None` if it never ended).
        tasks.push(tokio::spawn(async move {
            let resp = tokio::time::timeout(Duration::from_secs(30), resp)
                .await
                .ok()?
                .ok()?;
            let only = resp.headers().contains_key("grpc-status");
            let head = resp.headers().clone();
            let mut body = resp.into_body();
            while let Some(Ok(d)) = body.data().await {
                let _ = body.flow_control().release_capacity(d.len());
            }
            let trailers = body.trailers().await.ok().flatten();
            sender.abort();
            if only { Some(head) } else { trailers }
        }));
    }
    tasks
}

/// Watches `aesp_buffered_bytes` for `d`; returns its peak.
async fn peak_buffered(stack: &Stack, d: Duration) -> u64 {
    let mut peak = 0;
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        peak = peak.max(counter(&stack.sidecar, "aesp_buffered_bytes", &[]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak
}

async fn served_meanwhile(stack: &Stack) {
    let mut c = GridHostClient::new(stack.channel("globex").await);
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        c.create_session(grid::CreateSession::default()),
    )
    .await
    .expect("another client is served while the attack goes on")
    .unwrap();
    assert!(!s.into_inner().session_id.is_empty());
}

fn limits() -> String {
    format!(
        "limits:\n  max_buffered_bytes_per_connection: {PER_CONNECTION}\n  message_timeout_ms: 3000\n  request_read_timeout_ms: 3000\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_unary_messages_are_held_within_budget_and_time_out() {
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start_with(&limits(), false).await;
    let before = rss_bytes();
    let calls = hold_unfinished(
        &stack,
        "acme",
        "/altar.grid.v1.GridHost/ExecuteTool",
        250,
        Vec::new(),
        4 * MIB,
    )
    .await;
    let peak = peak_buffered(&stack, Duration::from_secs(2)).await;
    served_meanwhile(&stack).await;
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "peak aesp_buffered_bytes {peak}, RSS grew by {} MiB",
        grown / MIB
    );
    assert!(peak > 0, "the attack reached the budget");
    assert!(
        peak as usize <= PER_CONNECTION,
        "held {peak} bytes on one connection"
    );
    // Without the budget this attack took 1 GiB; with it: the budget, the HTTP/2 windows
    // (4 MiB per connection), and allocator slack.
    assert!(grown < 160 * MIB, "RSS grew by {} MiB", grown / MIB);
    // Every stalled call ends (request_read_timeout) and gives its budget back.
    for c in calls {
        let t = c
            .await
            .unwrap()
            .expect("the stalled call was ended by the sidecar");
        assert_eq!(t["grpc-status"], "3", "{t:?}");
    }
    assert_eq!(counter(&stack.sidecar, "aesp_buffered_bytes", &[]), 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_connect_messages_are_held_within_budget_and_time_out() {
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start_with(&limits(), false).await;
    let before = rss_bytes();
    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "holder".into(),
                ..Default::default()
            },
        )),
    };
    let streams = hold_unfinished(
        &stack,
        "runtime",
        "/altar.grid.v1.GridRuntime/Connect",
        100,
        common::frame(&announce.encode_to_vec()),
        4 * MIB,
    )
    .await;
    let peak = peak_buffered(&stack, Duration::from_secs(2)).await;
    served_meanwhile(&stack).await;
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "peak aesp_buffered_bytes {peak}, RSS grew by {} MiB",
        grown / MIB
    );
    assert!(peak > 0 && peak as usize <= PER_CONNECTION, "held {peak}");
    assert!(grown < 160 * MIB, "RSS grew by {} MiB", grown / MIB);
    // A Connect message that stalls mid-way times out too (message_timeout_ms).
    for s in streams {
        let t = s
            .await
            .unwrap()
            .expect("the stalled stream was ended by the sidecar");
        assert_eq!(t["grpc-status"], "3", "{t:?}");
        let e = aesp_sidecar::grpc::status::decode_enterprise_error(
            t["grpc-status-details-bin"].as_bytes(),
        )
        .unwrap();
        assert!(e.message.contains("did not arrive whole"), "{e:?}");
    }
    assert_eq!(counter(&stack.sidecar, "aesp_buffered_bytes", &[]), 0);
    stack.stop().await;
}

//! The reference GRID runtime: a tonic client that connects to a host (or to the sidecar in
//! front of one) on `altar.grid.v1.GridRuntime/Connect` and fulfils the demo tools.
//!
//! On every connection it sends `announce`, answers each `request_fulfillment` with the tools
//! it offers (its own tools, narrowed to the host's `available_contracts` when the ack lists
//! them), and runs every `call` concurrently, answering with a `result` or, for `count`, a
//! series of `chunk`s. When the stream ends it reconnects with backoff (200 ms doubling to
//! 5 s) until shut down.
//!
//! Tools: `echo {text}` → `{"text": text}`; `add {a, b}` → `{"sum": a + b}`; `count {n}` →
//! `n` chunks `{"i": 0}` … `{"i": n-1}` (n capped at 1000, chunk_id from 0, the last one
//! `is_final`; n = 0 sends one empty final chunk); `fail {}` → always a tool error;
//! `get_weather {city, units?}` → deterministic fake weather.

use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use crate::adm;
use crate::proto::adm as padm;
use crate::proto::grid::{
    self, grid_runtime_client::GridRuntimeClient, host_message, runtime_message,
};

/// The tools this runtime implements, in the order it offers them.
pub const TOOLS: [&str; 5] = ["echo", "add", "count", "fail", "get_weather"];

/// Most chunks `count` streams.
pub const MAX_COUNT: u64 = 1000;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const OUTBOUND_QUEUE: usize = 256;

/// Client certificate and trust for an mTLS connection (to the sidecar).
#[derive(Debug, Clone)]
pub struct RuntimeTls {
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: Vec<u8>,
    /// PEM of this runtime's certificate (chain).
    pub cert_pem: Vec<u8>,
    /// PEM of this runtime's private key.
    pub key_pem: Vec<u8>,
    /// The name the server's certificate must carry, e.g. "localhost".
    pub domain: String,
}

/// How to run the reference runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `https://127.0.0.1:8443` (with `tls`) or `http://127.0.0.1:50051` (h2c).
    pub endpoint: String,
    pub tls: Option<RuntimeTls>,
    pub runtime_id: String,
    /// "rust".
    pub language: String,
    pub version: String,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            endpoint: "http://127.0.0.1:50051".to_string(),
            tls: None,
            runtime_id: "demo-runtime".to_string(),
            language: "rust".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AnnounceState {
    /// Not connected, or waiting for the AnnounceAck.
    Waiting,
    Accepted,
    /// The last AnnounceAck refused the runtime (its error text).
    Rejected(String),
}

/// A running runtime.
pub struct RuntimeHandle {
    announce: watch::Receiver<AnnounceState>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RuntimeHandle {
    /// Whether the current connection's announce was accepted.
    pub fn announced(&self) -> bool {
        *self.announce.borrow() == AnnounceState::Accepted
    }

    /// Waits until an AnnounceAck with `accepted = true` arrives. Fails on timeout, or at once
    /// when the host (or sidecar) refuses the announce.
    pub async fn wait_announced(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.announce.clone();
        let outcome = tokio::time::timeout(timeout, async move {
            match rx
                .wait_for(|s| !matches!(s, AnnounceState::Waiting))
                .await
                .map(|s| s.clone())
            {
                Ok(AnnounceState::Accepted) => Ok(()),
                Ok(AnnounceState::Rejected(why)) => {
                    Err(anyhow::anyhow!("the runtime's announce was refused: {why}"))
                }
                Ok(AnnounceState::Waiting) | Err(_) => Err(anyhow::anyhow!(
                    "the runtime stopped before being announced"
                )),
            }
        })
        .await;
        match outcome {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "no accepted AnnounceAck within {timeout:?}"
            )),
        }
    }

    /// Closes the connection and stops reconnecting.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RuntimeHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Starts the runtime in a background task; it connects (and reconnects) on its own.
pub async fn spawn(opts: RuntimeOptions) -> anyhow::Result<RuntimeHandle> {
    // Fail early on what can never work; connection errors are retried instead.
    let _ = endpoint(&opts)?;
    if opts.runtime_id.trim().is_empty() {
        anyhow::bail!("runtime_id must not be empty");
    }
    let (announce_tx, announce_rx) = watch::channel(AnnounceState::Waiting);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(opts, announce_tx, stop_rx));
    Ok(RuntimeHandle {
        announce: announce_rx,
        stop: stop_tx,
        task: Some(task),
    })
}

fn endpoint(opts: &RuntimeOptions) -> anyhow::Result<Endpoint> {
    let mut ep = Endpoint::from_shared(opts.endpoint.clone())
        .map_err(|e| anyhow::anyhow!("invalid endpoint {:?}: {e}", opts.endpoint))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(tls) = &opts.tls {
        let cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(tls.domain.clone());
        ep = ep
            .tls_config(cfg)
            .map_err(|e| anyhow::anyhow!("invalid TLS settings: {e}"))?;
    }
    Ok(ep)
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn run(
    opts: RuntimeOptions,
    announce: watch::Sender<AnnounceState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let outcome = tokio::select! {
            r = connect_once(&opts, &announce, &mut backoff) => r,
            _ = wait_true(&mut stop) => break,
        };
        announce.send_if_modified(|s| {
            let was_accepted = *s == AnnounceState::Accepted;
            if was_accepted {
                *s = AnnounceState::Waiting;
            }
            was_accepted
        });
        match outcome {
            Ok(()) => info!(runtime_id = %opts.runtime_id, "Connect stream ended; reconnecting"),
            Err(e) => {
                warn!(runtime_id = %opts.runtime_id, error = %e, retry_in = ?backoff, "runtime connection failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_true(&mut stop) => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    announce.send_replace(AnnounceState::Waiting);
    info!(runtime_id = %opts.runtime_id, "runtime stopped");
}

fn runtime_msg(kind: runtime_message::Kind) -> grid::RuntimeMessage {
    grid::RuntimeMessage { kind: Some(kind) }
}

/// One connection: announce, then serve until the stream ends.
async fn connect_once(
    opts: &RuntimeOptions,
    announce: &watch::Sender<AnnounceState>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let channel: Channel = endpoint(opts)?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", opts.endpoint))?;
    let mut client = GridRuntimeClient::new(channel);
    let (tx, rx) = mpsc::channel::<grid::RuntimeMessage>(OUTBOUND_QUEUE);
    tx.send(runtime_msg(runtime_message::Kind::Announce(
        grid::AnnounceRuntime {
            runtime_id: opts.runtime_id.clone(),
            language: opts.language.clone(),
            version: opts.version.clone(),
            capabilities: vec!["streaming".to_string()],
        },
    )))
    .await
    .map_err(|_| anyhow::anyhow!("outbound queue closed"))?;
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("GridRuntime/Connect refused: {s}"))?
        .into_inner();

    let mut offered: Vec<String> = TOOLS.iter().map(|t| t.to_string()).collect();
    let mut calls = JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
        };
        let Some(msg) = msg.map_err(|s| anyhow::anyhow!("Connect stream failed: {s}"))? else {
            return Ok(());
        };
        match msg.kind {
            Some(host_message::Kind::AnnounceAck(ack)) => {
                if ack.accepted {
                    if !ack.available_contracts.is_empty() {
                        offered.retain(|t| ack.available_contracts.contains(t));
                    }
                    info!(runtime_id = %opts.runtime_id, offered = ?offered, "announce accepted");
                    *backoff = BACKOFF_START;
                    announce.send_replace(AnnounceState::Accepted);
                } else {
                    let why = ack
                        .error
                        .map(|e| format!("{}: {}", e.code, e.message))
                        .unwrap_or_else(|| "no reason given".to_string());
                    announce.send_replace(AnnounceState::Rejected(why.clone()));
                    anyhow::bail!("announce refused: {why}");
                }
            }
            Some(host_message::Kind::RequestFulfillment(req)) => {
                debug!(session_id = %req.session_id, "fulfilment requested");
                let fulfill = grid::FulfillTools {
                    session_id: req.session_id,
                    tool_contract_names: offered.clone(),
                };
                if tx
                    .send(runtime_msg(runtime_message::Kind::Fulfill(fulfill)))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Some(host_message::Kind::FulfillAck(ack)) => match ack.error {
                Some(e) => {
                    warn!(session_id = %ack.session_id, code = %e.code, message = %e.message, accepted = ?ack.accepted, "fulfilment partly refused")
                }
                None => {
                    debug!(session_id = %ack.session_id, accepted = ?ack.accepted, "fulfilment accepted")
                }
            },
            Some(host_message::Kind::Call(call)) => {
                calls.spawn(run_call(call, tx.clone()));
            }
            None => debug!("ignoring an empty HostMessage"),
        }
    }
}

// ------------------------------------------------------------------------------------ tools

/// A tool failure: `code` goes to `error_details.code`, `adm_type` to the ADM ErrorObject.
struct ToolError {
    code: &'static str,
    adm_type: &'static str,
    message: String,
}

fn bad_args(message: impl Into<String>) -> ToolError {
    ToolError {
        code: "PARAMETER_VALIDATION_FAILED",
        adm_type: "PARAMETER_VALIDATION_FAILED",
        message: message.into(),
    }
}

async fn run_call(call: grid::ToolCall, tx: mpsc::Sender<grid::RuntimeMessage>) {
    let fc = call.function_call.clone().unwrap_or_default();
    let args = fc
        .args
        .as_ref()
        .map(adm::struct_to_json)
        .unwrap_or_else(|| json!({}));
    debug!(invocation_id = %call.invocation_id, tool = %fc.name, "call received");
    if fc.name == "count" {
        stream_count(&call, &args, &tx).await;
        return;
    }
    let outcome = run_tool(&fc.name, &args);
    let _ = tx
        .send(runtime_msg(runtime_message::Kind::Result(tool_result(
            &call, &fc, outcome,
        ))))
        .await;
}

fn run_tool(name: &str, args: &serde_json::Value) -> Result<serde_json::Value, ToolError> {
    match name {
        "echo" => {
            let text = args
                .get("text")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad_args("echo needs a string `text`"))?;
            Ok(json!({ "text": text }))
        }
        "add" => {
            let a = args.get("a").and_then(|v| v.as_f64());
            let b = args.get("b").and_then(|v| v.as_f64());
            match (a, b) {
                (Some(a), Some(b)) => Ok(json!({ "sum": a + b })),
                _ => Err(bad_args("add needs numbers `a` and `b`")),
            }
        }
        "fail" => Err(ToolError {
            code: "TOOL_ERROR",
            adm_type: "BUSINESS_RULE_VIOLATION",
            message: "the fail tool always fails".to_string(),
        }),
        "get_weather" => {
            let city = args
                .get("city")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad_args("get_weather needs a string `city`"))?;
            let units = match args.get("units") {
                None => "metric",
                Some(v) => match v.as_str() {
                    Some(u @ ("metric" | "imperial")) => u,
                    _ => return Err(bad_args("units must be \"metric\" or \"imperial\"")),
                },
            };
            Ok(fake_weather(city, units))
        }
        other => Err(ToolError {
            code: "TOOL_NOT_FOUND",
            adm_type: "RESOURCE_NOT_FOUND",
            message: format!("this runtime has no tool named {other:?}"),
        }),
    }
}

/// Deterministic fake weather: the same city always gets the same report.
fn fake_weather(city: &str, units: &str) -> serde_json::Value {
    // FNV-1a over the lower-cased name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in city.trim().to_lowercase().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const CONDITIONS: [&str; 6] = ["sunny", "partly cloudy", "cloudy", "rain", "snow", "fog"];
    let celsius = (h % 45) as f64 - 10.0; // -10 .. 34
    let conditions = CONDITIONS[((h / 45) % CONDITIONS.len() as u64) as usize];
    let humidity = 30 + (h / 270) % 61; // 30 .. 90
    let wind_kmh = (h / 16_470) % 40;
    let (temperature, unit, wind, wind_unit) = if units == "imperial" {
        (
            (celsius * 9.0 / 5.0 + 32.0).round(),
            "F",
            (wind_kmh as f64 * 0.621_371).round(),
            "mph",
        )
    } else {
        (celsius, "C", wind_kmh as f64, "km/h")
    };
    json!({
        "city": city,
        "units": units,
        "temperature": temperature,
        "temperature_unit": unit,
        "conditions": conditions,
        "humidity_percent": humidity,
        "wind": wind,
        "wind_unit": wind_unit,
        "source": "fake",
    })
}

fn tool_result(
    call: &grid::ToolCall,
    fc: &padm::FunctionCall,
    outcome: Result<serde_json::Value, ToolError>,
) -> grid::ToolResult {
    match outcome {
        Ok(content) => match adm::json_to_value(&content) {
            Ok(content) => grid::ToolResult {
                invocation_id: call.invocation_id.clone(),
                status: grid::ResultStatus::Success as i32,
                payload: Some(padm::ToolResult {
                    name: fc.name.clone(),
                    status: padm::ResultStatus::Success as i32,
                    content: Some(content),
                    error: None,
                    call_id: fc.call_id.clone(),
                }),
                error_details: None,
                correlation_id: call.correlation_id.clone(),
            },
            Err(e) => tool_result(
                call,
                fc,
                Err(ToolError {
                    code: "TOOL_ERROR",
                    adm_type: "INVALID_STATE",
                    message: format!("the result cannot be encoded: {e}"),
                }),
            ),
        },
        Err(e) => grid::ToolResult {
            invocation_id: call.invocation_id.clone(),
            status: grid::ResultStatus::Error as i32,
            payload: Some(padm::ToolResult {
                name: fc.name.clone(),
                status: padm::ResultStatus::Error as i32,
                content: None,
                error: Some(padm::ErrorObject {
                    message: e.message.clone(),
                    r#type: e.adm_type.to_string(),
                }),
                call_id: fc.call_id.clone(),
            }),
            error_details: Some(grid::Error {
                code: e.code.to_string(),
                message: e.message,
            }),
            correlation_id: call.correlation_id.clone(),
        },
    }
}

async fn stream_count(
    call: &grid::ToolCall,
    args: &serde_json::Value,
    tx: &mpsc::Sender<grid::RuntimeMessage>,
) {
    let chunk = |chunk_id: u64, payload: Vec<u8>, is_final: bool, error: Option<grid::Error>| {
        runtime_msg(runtime_message::Kind::Chunk(grid::StreamChunk {
            invocation_id: call.invocation_id.clone(),
            chunk_id,
            payload,
            is_final,
            error_details: error,
        }))
    };
    let n = match args.get("n").and_then(|v| v.as_f64()) {
        Some(n) if n.is_finite() && n.fract() == 0.0 && n >= 0.0 => (n as u64).min(MAX_COUNT),
        _ => {
            let error = grid::Error {
                code: "PARAMETER_VALIDATION_FAILED".to_string(),
                message: "count needs a non-negative integer `n`".to_string(),
            };
            let _ = tx.send(chunk(0, Vec::new(), true, Some(error))).await;
            return;
        }
    };
    if n == 0 {
        let _ = tx.send(chunk(0, Vec::new(), true, None)).await;
        return;
    }
    for i in 0..n {
        let payload = json!({ "i": i }).to_string().into_bytes();
        if tx.send(chunk(i, payload, i + 1 == n, None)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_compute_what_they_promise() {
        assert_eq!(
            run_tool("echo", &json!({"text": "hi"})).ok(),
            Some(json!({"text": "hi"}))
        );
        assert_eq!(
            run_tool("add", &json!({"a": 2, "b": 0.5})).ok(),
            Some(json!({"sum": 2.5}))
        );
        let e = run_tool("fail", &json!({})).err().unwrap();
        assert_eq!(
            (e.code, e.adm_type),
            ("TOOL_ERROR", "BUSINESS_RULE_VIOLATION")
        );
        assert!(run_tool("echo", &json!({})).is_err());
        assert!(run_tool("nope", &json!({})).is_err());
    }

    #[test]
    fn weather_is_deterministic_and_honours_units() {
        let a = run_tool("get_weather", &json!({"city": "Oslo"}))
            .ok()
            .unwrap();
        let b = run_tool("get_weather", &json!({"city": "Oslo"}))
            .ok()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a["units"], "metric");
        assert_eq!(a["temperature_unit"], "C");
        let f = run_tool("get_weather", &json!({"city": "Oslo", "units": "imperial"}))
            .ok()
            .unwrap();
        assert_eq!(f["temperature_unit"], "F");
        let c = a["temperature"].as_f64().unwrap();
        assert_eq!(
            f["temperature"].as_f64().unwrap(),
            (c * 9.0 / 5.0 + 32.0).round()
        );
        assert!(run_tool("get_weather", &json!({"city": "Oslo", "units": "kelvin"})).is_err());
        // Different cities get different weather (not one constant report).
        let temps: std::collections::HashSet<i64> = ["Oslo", "Lima", "Cairo", "Quito", "Perth"]
            .iter()
            .map(|c| {
                let w = run_tool("get_weather", &json!({"city": c})).ok().unwrap();
                w["temperature"].as_f64().unwrap() as i64
            })
            .collect();
        assert!(temps.len() > 1, "{temps:?}");
    }
}

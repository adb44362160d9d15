//! The reference GRID host: a plain base GRID (ALTAR) host, served with tonic.
//!
//! It implements `altar.grid.v1.GridHost/{CreateSession, DestroySession, ExecuteTool,
//! ExecuteToolStream}` and `altar.grid.v1.GridRuntime/Connect`, listens on loopback h2c by
//! default, keeps a manifest of trusted contracts (ADM declarations), sessions with a TTL, and
//! the runtimes connected to it. Host-level failures are answered in band (gRPC OK, a
//! `ToolResult` with status ERROR and `error_details.code`): `SESSION_INVALID`,
//! `TOOL_NOT_FOUND`, `SCHEMA_VIOLATION`, `NO_RUNTIME`, `RUNTIME_TIMEOUT`,
//! `RUNTIME_DISCONNECTED`, `INVALID_REQUEST`, `RESULT_TOO_LARGE`.
//!
//! The services are written by hand rather than with the generated `*Server` types so that
//! requests decode as the AESP views (`EnterpriseCreateSession`, `EnterpriseRuntimeMessage`):
//! a sidecar in front upgrades messages in place, and this host records what it received
//! ([`HostState::announcements`], [`HostState::security_contexts`],
//! [`HostState::request_metadata`]). Responses are the base GRID messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::adm;
use crate::proto::adm::FunctionDeclaration;
use crate::proto::aesp::{self, enterprise_runtime_message};
use crate::proto::grid::{self, host_message};

/// How long CreateSession waits for the connected runtimes' FulfillTools answers.
const FULFILMENT_WAIT: Duration = Duration::from_secs(2);
/// How long a new Connect stream may take to send its `announce`.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many entries of each observation log are kept.
const OBSERVATIONS_KEPT: usize = 256;
/// Queue towards one runtime (HostMessages) and towards one waiting invocation.
const RUNTIME_QUEUE: usize = 256;
const INVOCATION_QUEUE: usize = 64;
/// Bound on what ExecuteTool gathers when a runtime streams chunks for a unary call.
const MAX_GATHERED_BYTES: usize = 4 * 1024 * 1024;
/// How long `shutdown` waits for the server to drain before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Error codes this host puts in `error_details.code`.
pub mod codes {
    pub const SESSION_INVALID: &str = "SESSION_INVALID";
    pub const TOOL_NOT_FOUND: &str = "TOOL_NOT_FOUND";
    pub const SCHEMA_VIOLATION: &str = "SCHEMA_VIOLATION";
    pub const NO_RUNTIME: &str = "NO_RUNTIME";
    pub const RUNTIME_TIMEOUT: &str = "RUNTIME_TIMEOUT";
    pub const RUNTIME_DISCONNECTED: &str = "RUNTIME_DISCONNECTED";
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const RESULT_TOO_LARGE: &str = "RESULT_TOO_LARGE";
    pub const INVALID_ANNOUNCE: &str = "INVALID_ANNOUNCE";
}

// ------------------------------------------------------------------------------------ options

/// How to run the reference host.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Where to listen (h2c, no TLS). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The trusted contracts.
    pub manifest: Vec<FunctionDeclaration>,
    /// TTL of a session created with `ttl_seconds = 0`.
    pub default_ttl_seconds: u64,
    /// Upper bound of a session's TTL; larger requests are capped.
    pub max_ttl_seconds: u64,
    /// How long a tool call may wait for its runtime (for streams: between two chunks).
    pub call_timeout: Duration,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            manifest: adm::example_manifest(),
            default_ttl_seconds: 3600,
            max_ttl_seconds: 86_400,
            call_timeout: Duration::from_secs(30),
        }
    }
}

// ------------------------------------------------------------------------------------ state

/// What a waiting invocation receives from its runtime (already read as base messages).
enum Event {
    Result(grid::ToolResult),
    Chunk(grid::StreamChunk),
}

struct Session {
    deadline: Instant,
    /// tool name → connections that fulfil it for this session, in order of answer.
    fulfillers: HashMap<String, Vec<u64>>,
    /// Connections asked for fulfilment that have not answered yet.
    awaiting: HashSet<u64>,
    answered: Arc<Notify>,
}

struct RuntimeConn {
    runtime_id: String,
    tx: mpsc::Sender<Result<grid::HostMessage, Status>>,
}

struct Pending {
    conn: u64,
    sink: mpsc::Sender<Event>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    runtimes: HashMap<u64, RuntimeConn>,
    pending: HashMap<String, Pending>,
}

#[derive(Default)]
struct Observations {
    announcements: VecDeque<aesp::EnterpriseRuntimeAnnouncement>,
    security_contexts: VecDeque<aesp::EnterpriseSecurityContext>,
    metadata: VecDeque<(String, Vec<(String, String)>)>,
}

fn push_capped<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= OBSERVATIONS_KEPT {
        q.pop_front();
    }
    q.push_back(item);
}

/// The host's shared state; tests read what the host received through it.
pub struct HostState {
    manifest: Vec<FunctionDeclaration>,
    contracts: HashMap<String, FunctionDeclaration>,
    default_ttl_seconds: u64,
    max_ttl_seconds: u64,
    call_timeout: Duration,
    inner: Mutex<Inner>,
    observations: Mutex<Observations>,
    next_conn: AtomicU64,
    shutdown: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl HostState {
    fn new(opts: &HostOptions) -> Self {
        let contracts = opts
            .manifest
            .iter()
            .map(|d| (d.name.clone(), d.clone()))
            .collect();
        HostState {
            manifest: opts.manifest.clone(),
            contracts,
            default_ttl_seconds: opts.default_ttl_seconds.max(1),
            max_ttl_seconds: opts.max_ttl_seconds.max(1),
            call_timeout: opts.call_timeout,
            inner: Mutex::new(Inner::default()),
            observations: Mutex::new(Observations::default()),
            next_conn: AtomicU64::new(1),
            shutdown: watch::Sender::new(false),
        }
    }

    /// Every runtime announcement received on Connect, as decoded (newest last, last 256).
    pub fn announcements(&self) -> Vec<aesp::EnterpriseRuntimeAnnouncement> {
        lock(&self.observations)
            .announcements
            .iter()
            .cloned()
            .collect()
    }

    /// The `security_context` of every CreateSession that carried one, as decoded (newest
    /// last, last 256).
    pub fn security_contexts(&self) -> Vec<aesp::EnterpriseSecurityContext> {
        lock(&self.observations)
            .security_contexts
            .iter()
            .cloned()
            .collect()
    }

    /// Every call's gRPC method path and all its metadata (HTTP/2 headers) as received,
    /// `-bin` values as standard padded base64 (newest last, last 256 calls).
    pub fn request_metadata(&self) -> Vec<(String, Vec<(String, String)>)> {
        lock(&self.observations).metadata.iter().cloned().collect()
    }

    /// The trusted contracts.
    pub fn contracts(&self) -> &[FunctionDeclaration] {
        &self.manifest
    }

    /// The `runtime_id`s of the runtimes connected and announced right now.
    pub fn connected_runtimes(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.inner)
            .runtimes
            .values()
            .map(|r| r.runtime_id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The number of live (unexpired) sessions.
    pub fn session_count(&self) -> usize {
        let now = Instant::now();
        lock(&self.inner)
            .sessions
            .values()
            .filter(|s| s.deadline > now)
            .count()
    }

    fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn record_metadata(&self, path: &str, headers: &http::HeaderMap) {
        let entries = metadata_entries(headers);
        push_capped(
            &mut lock(&self.observations).metadata,
            (path.to_string(), entries),
        );
    }

    // -------------------------------------------------------------------- sessions

    async fn create_session(&self, req: aesp::EnterpriseCreateSession) -> grid::CreateSessionAck {
        let ttl = match req.ttl_seconds {
            0 => self.default_ttl_seconds,
            t => t.min(self.max_ttl_seconds),
        };
        let now = Instant::now();
        let deadline = now
            .checked_add(Duration::from_secs(ttl))
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        let expires_at_unix = unix_now().saturating_add(ttl);
        let answered = Arc::new(Notify::new());

        let (session_id, targets) = {
            let mut inner = lock(&self.inner);
            inner.sessions.retain(|_, s| s.deadline > now);
            let suggested = req.suggested_session_id.as_str();
            let session_id =
                if is_acceptable_session_id(suggested) && !inner.sessions.contains_key(suggested) {
                    suggested.to_string()
                } else {
                    uuid::Uuid::new_v4().to_string()
                };
            let targets: Vec<(u64, mpsc::Sender<Result<grid::HostMessage, Status>>)> = inner
                .runtimes
                .iter()
                .map(|(id, rt)| (*id, rt.tx.clone()))
                .collect();
            inner.sessions.insert(
                session_id.clone(),
                Session {
                    deadline,
                    fulfillers: HashMap::new(),
                    awaiting: targets.iter().map(|(id, _)| *id).collect(),
                    answered: answered.clone(),
                },
            );
            (session_id, targets)
        };

        let had_context = req.security_context.is_some();
        let ctx = req.security_context.unwrap_or_default();
        info!(
            session_id = %session_id,
            ttl_seconds = ttl,
            principal_id = %ctx.principal_id,
            tenant_id = %ctx.tenant_id,
            organization_id = %ctx.organization_id,
            roles = ?ctx.roles,
            security_clearance = %ctx.security_clearance,
            claims = ?ctx.claims,
            policy_context = ?ctx.policy_context,
            "session created"
        );
        if had_context {
            push_capped(&mut lock(&self.observations).security_contexts, ctx);
        }

        let deadline_wait = tokio::time::Instant::now() + FULFILMENT_WAIT;
        for (conn, tx) in targets {
            let msg = host_msg(host_message::Kind::RequestFulfillment(
                grid::RequestFulfillment {
                    session_id: session_id.clone(),
                },
            ));
            let sent = tokio::time::timeout_at(deadline_wait, tx.send(Ok(msg))).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.mark_answered(&session_id, conn);
            }
        }
        loop {
            let notified = answered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending = lock(&self.inner)
                .sessions
                .get(&session_id)
                .map(|s| s.awaiting.len())
                .unwrap_or(0);
            if pending == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline_wait, notified)
                .await
                .is_err()
            {
                warn!(session_id = %session_id, pending, "runtimes did not answer RequestFulfillment in time");
                break;
            }
        }

        grid::CreateSessionAck {
            session_id,
            expires_at_unix_seconds: expires_at_unix,
            error: None,
        }
    }

    fn mark_answered(&self, session_id: &str, conn: u64) {
        let mut inner = lock(&self.inner);
        if let Some(s) = inner.sessions.get_mut(session_id) {
            s.awaiting.remove(&conn);
            if s.awaiting.is_empty() {
                s.answered.notify_waiters();
            }
        }
    }

    fn destroy_session(&self, req: grid::DestroySession) -> grid::DestroySessionAck {
        let now = Instant::now();
        let removed = lock(&self.inner).sessions.remove(&req.session_id);
        match removed {
            Some(s) if s.deadline > now => {
                info!(session_id = %req.session_id, "session destroyed");
                grid::DestroySessionAck {
                    destroyed: true,
                    error: None,
                }
            }
            _ => grid::DestroySessionAck {
                destroyed: false,
                error: Some(grid_error(
                    codes::SESSION_INVALID,
                    format!("no live session {:?}", req.session_id),
                )),
            },
        }
    }

    // -------------------------------------------------------------------- invocations

    /// Steps 1–5 of a call: session, contract, args, runtime, registration. On success the
    /// call has been sent to the runtime and the returned receiver gets its answers.
    async fn dispatch(&self, call: &grid::ToolCall) -> Result<Dispatched<'_>, grid::Error> {
        let Some(fc) = call.function_call.as_ref() else {
            return Err(grid_error(
                codes::INVALID_REQUEST,
                "function_call is required",
            ));
        };
        let now = Instant::now();
        {
            let mut inner = lock(&self.inner);
            match inner.sessions.get(&call.session_id) {
                Some(s) if s.deadline > now => {}
                Some(_) => {
                    inner.sessions.remove(&call.session_id);
                    return Err(session_invalid(&call.session_id, "has expired"));
                }
                None => return Err(session_invalid(&call.session_id, "does not exist")),
            }
        }
        let Some(decl) = self.contracts.get(&fc.name) else {
            return Err(grid_error(
                codes::TOOL_NOT_FOUND,
                format!("no contract named {:?} in the host's manifest", fc.name),
            ));
        };
        if let Err(e) = adm::validate_args(decl, fc.args.as_ref()) {
            return Err(grid_error(
                codes::SCHEMA_VIOLATION,
                format!("arguments of {:?} do not match its contract: {e}", fc.name),
            ));
        }

        let invocation_id = uuid::Uuid::new_v4().to_string();
        let (sink, events) = mpsc::channel(INVOCATION_QUEUE);
        let (conn, tx) = {
            let mut inner = lock(&self.inner);
            let chosen = inner
                .sessions
                .get(&call.session_id)
                .and_then(|s| s.fulfillers.get(&fc.name))
                .and_then(|conns| {
                    conns
                        .iter()
                        .find_map(|c| inner.runtimes.get(c).map(|rt| (*c, rt.tx.clone())))
                });
            let Some((conn, tx)) = chosen else {
                return Err(grid_error(
                    codes::NO_RUNTIME,
                    format!(
                        "no connected runtime fulfils {:?} for session {:?}",
                        fc.name, call.session_id
                    ),
                ));
            };
            inner
                .pending
                .insert(invocation_id.clone(), Pending { conn, sink });
            (conn, tx)
        };
        let guard = PendingGuard {
            state: self,
            invocation_id: invocation_id.clone(),
        };
        let msg = host_msg(host_message::Kind::Call(grid::ToolCall {
            invocation_id: invocation_id.clone(),
            session_id: call.session_id.clone(),
            function_call: Some(fc.clone()),
            correlation_id: call.correlation_id.clone(),
        }));
        match tokio::time::timeout(self.call_timeout, tx.send(Ok(msg))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(grid_error(
                    codes::RUNTIME_DISCONNECTED,
                    "the runtime disconnected before the call could be sent",
                ));
            }
            Err(_) => {
                return Err(grid_error(
                    codes::RUNTIME_TIMEOUT,
                    "the runtime did not accept the call in time",
                ));
            }
        }
        debug!(invocation_id = %invocation_id, conn, tool = %fc.name, session_id = %call.session_id, "call dispatched");
        Ok(Dispatched {
            invocation_id,
            events,
            _guard: guard,
        })
    }

    async fn execute_tool(&self, call: grid::ToolCall) -> grid::ToolResult {
        let tool = call
            .function_call
            .as_ref()
            .map(|f| f.name.clone())
            .unwrap_or_default();
        let mut d = match self.dispatch(&call).await {
            Ok(d) => d,
            Err(e) => {
                info!(tool = %tool, code = %e.code, message = %e.message, "call refused");
                return error_result(String::new(), e, call.correlation_id);
            }
        };
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut gathered: Vec<prost_types::Value> = Vec::new();
        let mut gathered_bytes = 0usize;
        loop {
            let event = match tokio::time::timeout_at(deadline, d.events.recv()).await {
                Err(_) => {
                    return error_result(
                        d.invocation_id,
                        grid_error(
                            codes::RUNTIME_TIMEOUT,
                            format!("the runtime did not answer within {:?}", self.call_timeout),
                        ),
                        call.correlation_id,
                    );
                }
                Ok(None) => {
                    return error_result(
                        d.invocation_id,
                        grid_error(
                            codes::RUNTIME_DISCONNECTED,
                            "the runtime disconnected before answering",
                        ),
                        call.correlation_id,
                    );
                }
                Ok(Some(event)) => event,
            };
            match event {
                Event::Result(mut result) => {
                    result.correlation_id = call.correlation_id;
                    return result;
                }
                // A streaming tool called through the unary RPC: gather the chunks into one
                // JSON array.
                Event::Chunk(chunk) => {
                    if let Some(err) = chunk.error_details {
                        return error_result(d.invocation_id, err, call.correlation_id);
                    }
                    gathered_bytes += chunk.payload.len();
                    if gathered_bytes > MAX_GATHERED_BYTES {
                        return error_result(
                            d.invocation_id,
                            grid_error(
                                codes::RESULT_TOO_LARGE,
                                "the streamed result is too large for ExecuteTool; use ExecuteToolStream",
                            ),
                            call.correlation_id,
                        );
                    }
                    if !chunk.payload.is_empty() {
                        gathered.push(payload_to_value(&chunk.payload));
                    }
                    if chunk.is_final {
                        let call_id = call
                            .function_call
                            .as_ref()
                            .map(|f| f.call_id.clone())
                            .unwrap_or_default();
                        return grid::ToolResult {
                            invocation_id: d.invocation_id,
                            status: grid::ResultStatus::Success as i32,
                            payload: Some(crate::proto::adm::ToolResult {
                                name: tool,
                                status: crate::proto::adm::ResultStatus::Success as i32,
                                content: Some(prost_types::Value {
                                    kind: Some(prost_types::value::Kind::ListValue(
                                        prost_types::ListValue { values: gathered },
                                    )),
                                }),
                                error: None,
                                call_id,
                            }),
                            error_details: None,
                            correlation_id: call.correlation_id,
                        };
                    }
                }
            }
        }
    }

    // -------------------------------------------------------------------- runtimes

    async fn run_runtime(
        self: Arc<Self>,
        mut inbound: Streaming<aesp::EnterpriseRuntimeMessage>,
        tx: mpsc::Sender<Result<grid::HostMessage, Status>>,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let first = tokio::select! {
            r = tokio::time::timeout(ANNOUNCE_TIMEOUT, inbound.message()) => r,
            _ = wait_true(&mut shutdown) => return,
        };
        let announcement = match first {
            Ok(Ok(Some(aesp::EnterpriseRuntimeMessage {
                kind: Some(enterprise_runtime_message::Kind::Announce(a)),
            }))) => a,
            Ok(Ok(Some(_))) => {
                let _ = tx
                    .send(Err(Status::failed_precondition(
                        "the first message on GridRuntime/Connect must be `announce`",
                    )))
                    .await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                debug!(%status, "Connect stream failed before announce");
                return;
            }
            Err(_) => {
                let _ = tx
                    .send(Err(Status::deadline_exceeded(
                        "no `announce` within 30 s of opening GridRuntime/Connect",
                    )))
                    .await;
                return;
            }
        };

        info!(
            runtime_id = %announcement.runtime_id,
            language = %announcement.language,
            version = %announcement.version,
            capabilities = ?announcement.capabilities,
            tenant_id = %announcement.tenant_id,
            security_zone = %announcement.security_zone,
            deployment_environment = %announcement.deployment_environment,
            "runtime announced"
        );
        push_capped(
            &mut lock(&self.observations).announcements,
            announcement.clone(),
        );
        if announcement.runtime_id.trim().is_empty() {
            let ack = grid::AnnounceAck {
                accepted: false,
                available_contracts: Vec::new(),
                error: Some(grid_error(
                    codes::INVALID_ANNOUNCE,
                    "runtime_id must not be empty",
                )),
            };
            let _ = tx
                .send(Ok(host_msg(host_message::Kind::AnnounceAck(ack))))
                .await;
            return;
        }

        // The ack goes into the queue before the runtime is registered, so nothing (a
        // RequestFulfillment from a concurrent CreateSession) can overtake it.
        let ack = grid::AnnounceAck {
            accepted: true,
            available_contracts: self.manifest.iter().map(|d| d.name.clone()).collect(),
            error: None,
        };
        if tx
            .send(Ok(host_msg(host_message::Kind::AnnounceAck(ack))))
            .await
            .is_err()
        {
            return;
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // Registering and listing the sessions under one lock: every session is either in
        // this list or sees this runtime in its own CreateSession, never neither.
        let live_sessions: Vec<String> = {
            let mut inner = lock(&self.inner);
            inner.runtimes.insert(
                conn,
                RuntimeConn {
                    runtime_id: announcement.runtime_id.clone(),
                    tx: tx.clone(),
                },
            );
            let now = Instant::now();
            inner
                .sessions
                .iter()
                .filter(|(_, s)| s.deadline > now)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut alive = true;
        // A runtime that (re)connects while sessions exist is asked about them too.
        for session_id in live_sessions {
            if !alive {
                break;
            }
            alive = tx
                .send(Ok(host_msg(host_message::Kind::RequestFulfillment(
                    grid::RequestFulfillment { session_id },
                ))))
                .await
                .is_ok();
        }

        if alive {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = wait_true(&mut shutdown) => break,
                };
                match next {
                    Ok(Some(msg)) => {
                        if !self.on_runtime_message(conn, &tx, msg).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(conn, %status, "Connect stream failed");
                        break;
                    }
                }
            }
        }
        self.drop_runtime(conn);
        info!(runtime_id = %announcement.runtime_id, conn, "runtime disconnected");
    }

    /// Handles one runtime message; false when the runtime's stream should be closed.
    async fn on_runtime_message(
        &self,
        conn: u64,
        tx: &mpsc::Sender<Result<grid::HostMessage, Status>>,
        msg: aesp::EnterpriseRuntimeMessage,
    ) -> bool {
        match msg.kind {
            Some(enterprise_runtime_message::Kind::Announce(a)) => {
                warn!(conn, runtime_id = %a.runtime_id, "ignoring a second announce on the same stream");
                true
            }
            Some(enterprise_runtime_message::Kind::Fulfill(f)) => {
                let ack = self.fulfill(conn, f);
                tx.send(Ok(host_msg(host_message::Kind::FulfillAck(ack))))
                    .await
                    .is_ok()
            }
            Some(enterprise_runtime_message::Kind::Result(r)) => {
                let id = r.invocation_id.clone();
                self.deliver(conn, &id, true, Event::Result(base_result(r)))
                    .await;
                true
            }
            Some(enterprise_runtime_message::Kind::Chunk(c)) => {
                let id = c.invocation_id.clone();
                let last = c.is_final;
                self.deliver(conn, &id, last, Event::Chunk(base_chunk(c)))
                    .await;
                true
            }
            None => {
                debug!(conn, "ignoring an empty RuntimeMessage");
                true
            }
        }
    }

    fn fulfill(&self, conn: u64, f: grid::FulfillTools) -> grid::FulfillAck {
        let mut accepted: Vec<String> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        for name in f.tool_contract_names {
            if self.contracts.contains_key(&name) {
                if !accepted.contains(&name) {
                    accepted.push(name);
                }
            } else if !unknown.contains(&name) {
                unknown.push(name);
            }
        }
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let runtime_id = inner
            .runtimes
            .get(&conn)
            .map(|r| r.runtime_id.clone())
            .unwrap_or_default();
        let Some(session) = inner
            .sessions
            .get_mut(&f.session_id)
            .filter(|s| s.deadline > now)
        else {
            return grid::FulfillAck {
                session_id: f.session_id.clone(),
                accepted: Vec::new(),
                error: Some(session_invalid(
                    &f.session_id,
                    "does not exist or has expired",
                )),
            };
        };
        for name in &accepted {
            let conns = session.fulfillers.entry(name.clone()).or_default();
            if !conns.contains(&conn) {
                conns.push(conn);
            }
        }
        session.awaiting.remove(&conn);
        if session.awaiting.is_empty() {
            session.answered.notify_waiters();
        }
        info!(session_id = %f.session_id, runtime_id = %runtime_id, accepted = ?accepted, unknown = ?unknown, "tools fulfilled");
        grid::FulfillAck {
            session_id: f.session_id,
            error: (!unknown.is_empty()).then(|| {
                grid_error(
                    codes::TOOL_NOT_FOUND,
                    format!("not in the host's manifest: {}", unknown.join(", ")),
                )
            }),
            accepted,
        }
    }

    async fn deliver(&self, conn: u64, invocation_id: &str, last: bool, event: Event) {
        let sink = {
            let mut inner = lock(&self.inner);
            match inner.pending.get(invocation_id) {
                Some(p) if p.conn == conn => {
                    let sink = p.sink.clone();
                    if last {
                        inner.pending.remove(invocation_id);
                    }
                    Some(sink)
                }
                Some(_) => {
                    warn!(
                        conn,
                        invocation_id,
                        "a runtime answered an invocation sent to another runtime; dropped"
                    );
                    None
                }
                None => {
                    debug!(
                        conn,
                        invocation_id, "answer for an unknown or finished invocation; dropped"
                    );
                    None
                }
            }
        };
        if let Some(sink) = sink {
            match tokio::time::timeout(self.call_timeout, sink.send(event)).await {
                Ok(Ok(())) => {}
                // The caller has gone away or stopped reading: forget the invocation.
                _ => {
                    lock(&self.inner).pending.remove(invocation_id);
                }
            }
        }
    }

    fn drop_runtime(&self, conn: u64) {
        let mut inner = lock(&self.inner);
        inner.runtimes.remove(&conn);
        // Dropping the senders ends each waiting invocation with RUNTIME_DISCONNECTED.
        inner.pending.retain(|_, p| p.conn != conn);
        for session in inner.sessions.values_mut() {
            for conns in session.fulfillers.values_mut() {
                conns.retain(|c| *c != conn);
            }
            session.fulfillers.retain(|_, conns| !conns.is_empty());
            if session.awaiting.remove(&conn) && session.awaiting.is_empty() {
                session.answered.notify_waiters();
            }
        }
    }
}

/// A dispatched invocation; dropping it forgets the invocation (late answers are dropped).
struct Dispatched<'a> {
    invocation_id: String,
    events: mpsc::Receiver<Event>,
    _guard: PendingGuard<'a>,
}

struct PendingGuard<'a> {
    state: &'a HostState,
    invocation_id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.state.inner).pending.remove(&self.invocation_id);
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    // Err: the sender is gone, which also means shutting down.
    let _ = rx.wait_for(|v| *v).await;
}

fn is_acceptable_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn host_msg(kind: host_message::Kind) -> grid::HostMessage {
    grid::HostMessage { kind: Some(kind) }
}

fn grid_error(code: &str, message: impl Into<String>) -> grid::Error {
    grid::Error {
        code: code.to_string(),
        message: message.into(),
    }
}

fn session_invalid(session_id: &str, why: &str) -> grid::Error {
    grid_error(
        codes::SESSION_INVALID,
        format!("session {session_id:?} {why}"),
    )
}

fn error_result(
    invocation_id: String,
    error: grid::Error,
    correlation_id: String,
) -> grid::ToolResult {
    grid::ToolResult {
        invocation_id,
        status: grid::ResultStatus::Error as i32,
        payload: None,
        error_details: Some(error),
        correlation_id,
    }
}

fn base_error(e: aesp::EnterpriseError) -> grid::Error {
    grid::Error {
        code: e.code,
        message: e.message,
    }
}

fn base_result(r: aesp::EnterpriseToolResult) -> grid::ToolResult {
    grid::ToolResult {
        invocation_id: r.invocation_id,
        status: r.status,
        payload: r.payload,
        error_details: r.error_details.map(base_error),
        correlation_id: r.correlation_id,
    }
}

fn base_chunk(c: aesp::EnterpriseStreamChunk) -> grid::StreamChunk {
    grid::StreamChunk {
        invocation_id: c.invocation_id,
        chunk_id: c.chunk_id,
        payload: c.payload,
        is_final: c.is_final,
        error_details: c.error_details.map(base_error),
    }
}

/// A chunk payload as an ADM value: its JSON if it is JSON, else the text.
fn payload_to_value(payload: &[u8]) -> prost_types::Value {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| adm::json_to_value(&v).ok())
        .unwrap_or_else(|| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                String::from_utf8_lossy(payload).into_owned(),
            )),
        })
}

/// The one final chunk that stands for a whole (non-streamed) ToolResult.
fn result_to_chunk(r: grid::ToolResult, chunk_id: u64) -> grid::StreamChunk {
    let failed = r.status != grid::ResultStatus::Success as i32;
    if failed {
        let error = r.error_details.unwrap_or_else(|| {
            let (code, message) = r
                .payload
                .and_then(|p| p.error)
                .map(|e| {
                    let code = if e.r#type.is_empty() {
                        "TOOL_ERROR".to_string()
                    } else {
                        e.r#type
                    };
                    (code, e.message)
                })
                .unwrap_or_else(|| ("TOOL_ERROR".to_string(), "the tool failed".to_string()));
            grid::Error { code, message }
        });
        grid::StreamChunk {
            invocation_id: r.invocation_id,
            chunk_id,
            payload: Vec::new(),
            is_final: true,
            error_details: Some(error),
        }
    } else {
        let content = r
            .payload
            .and_then(|p| p.content)
            .map(|v| adm::value_to_json(&v))
            .unwrap_or(serde_json::Value::Null);
        grid::StreamChunk {
            invocation_id: r.invocation_id,
            chunk_id,
            payload: serde_json::to_vec(&content).unwrap_or_default(),
            is_final: true,
            error_details: None,
        }
    }
}

fn error_chunk(invocation_id: String, chunk_id: u64, error: grid::Error) -> grid::StreamChunk {
    grid::StreamChunk {
        invocation_id,
        chunk_id,
        payload: Vec::new(),
        is_final: true,
        error_details: Some(error),
    }
}

type ChunkStream = ReceiverStream<Result<grid::StreamChunk, Status>>;

async fn execute_tool_stream(state: Arc<HostState>, call: grid::ToolCall) -> ChunkStream {
    let (out, rx) = mpsc::channel(INVOCATION_QUEUE);
    tokio::spawn(async move {
        let mut d = match state.dispatch(&call).await {
            Ok(d) => d,
            Err(e) => {
                info!(code = %e.code, message = %e.message, "stream call refused");
                let _ = out.send(Ok(error_chunk(String::new(), 0, e))).await;
                return;
            }
        };
        let mut next_chunk_id = 0u64;
        loop {
            let event = match tokio::time::timeout(state.call_timeout, d.events.recv()).await {
                Err(_) => {
                    let e = grid_error(
                        codes::RUNTIME_TIMEOUT,
                        format!("the runtime sent nothing for {:?}", state.call_timeout),
                    );
                    let _ = out
                        .send(Ok(error_chunk(d.invocation_id.clone(), next_chunk_id, e)))
                        .await;
                    return;
                }
                Ok(None) => {
                    let e = grid_error(
                        codes::RUNTIME_DISCONNECTED,
                        "the runtime disconnected before the stream ended",
                    );
                    let _ = out
                        .send(Ok(error_chunk(d.invocation_id.clone(), next_chunk_id, e)))
                        .await;
                    return;
                }
                Ok(Some(event)) => event,
            };
            match event {
                Event::Chunk(chunk) => {
                    let last = chunk.is_final;
                    next_chunk_id = chunk.chunk_id.saturating_add(1);
                    if out.send(Ok(chunk)).await.is_err() || last {
                        return;
                    }
                }
                Event::Result(result) => {
                    let _ = out.send(Ok(result_to_chunk(result, next_chunk_id))).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

// ------------------------------------------------------------------------------------ metadata

/// Decodes base64 with or without padding (gRPC allows both for `-bin` values).
const LENIENT_B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn metadata_entries(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().to_string();
            let raw = value.as_bytes();
            let text = if name.ends_with("-bin") {
                match LENIENT_B64.decode(raw) {
                    Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
                    Err(_) => String::from_utf8_lossy(raw).into_owned(),
                }
            } else {
                String::from_utf8_lossy(raw).into_owned()
            };
            (name, text)
        })
        .collect()
}

// ------------------------------------------------------------------------------------ services

/// `altar.grid.v1.GridHost`, decoding CreateSession as `EnterpriseCreateSession`.
#[derive(Clone)]
pub struct GridHostService {
    state: Arc<HostState>,
}

/// `altar.grid.v1.GridRuntime`, decoding the runtime stream as `EnterpriseRuntimeMessage`.
#[derive(Clone)]
pub struct GridRuntimeService {
    state: Arc<HostState>,
}

impl GridHostService {
    pub fn new(state: Arc<HostState>) -> Self {
        GridHostService { state }
    }
}

impl GridRuntimeService {
    pub fn new(state: Arc<HostState>) -> Self {
        GridRuntimeService { state }
    }
}

impl NamedService for GridHostService {
    const NAME: &'static str = "altar.grid.v1.GridHost";
}

impl NamedService for GridRuntimeService {
    const NAME: &'static str = "altar.grid.v1.GridRuntime";
}

struct CreateSessionSvc(Arc<HostState>);
struct DestroySessionSvc(Arc<HostState>);
struct ExecuteToolSvc(Arc<HostState>);
struct ExecuteToolStreamSvc(Arc<HostState>);
struct ConnectSvc(Arc<HostState>);

impl tonic::server::UnaryService<aesp::EnterpriseCreateSession> for CreateSessionSvc {
    type Response = grid::CreateSessionAck;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<aesp::EnterpriseCreateSession>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            Ok(Response::new(
                state.create_session(request.into_inner()).await,
            ))
        })
    }
}

impl tonic::server::UnaryService<grid::DestroySession> for DestroySessionSvc {
    type Response = grid::DestroySessionAck;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<grid::DestroySession>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { Ok(Response::new(state.destroy_session(request.into_inner()))) })
    }
}

impl tonic::server::UnaryService<grid::ToolCall> for ExecuteToolSvc {
    type Response = grid::ToolResult;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<grid::ToolCall>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            Ok(Response::new(
                state.execute_tool(request.into_inner()).await,
            ))
        })
    }
}

impl tonic::server::ServerStreamingService<grid::ToolCall> for ExecuteToolStreamSvc {
    type Response = grid::StreamChunk;
    type ResponseStream = ChunkStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, request: Request<grid::ToolCall>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            Ok(Response::new(
                execute_tool_stream(state, request.into_inner()).await,
            ))
        })
    }
}

impl tonic::server::StreamingService<aesp::EnterpriseRuntimeMessage> for ConnectSvc {
    type Response = grid::HostMessage;
    type ResponseStream = ReceiverStream<Result<grid::HostMessage, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(
        &mut self,
        request: Request<Streaming<aesp::EnterpriseRuntimeMessage>>,
    ) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(RUNTIME_QUEUE);
            tokio::spawn(state.run_runtime(request.into_inner(), tx));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

fn unimplemented_response() -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::default());
    let headers = response.headers_mut();
    headers.insert(
        tonic::Status::GRPC_STATUS,
        (tonic::Code::Unimplemented as i32).into(),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

fn codec<E, D>() -> tonic::server::Grpc<tonic_prost::ProstCodec<E, D>>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
}

impl<B> Service<http::Request<B>> for GridHostService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        state.record_metadata(req.uri().path(), req.headers());
        match req.uri().path() {
            "/altar.grid.v1.GridHost/CreateSession" => Box::pin(async move {
                let mut grpc = codec::<grid::CreateSessionAck, aesp::EnterpriseCreateSession>();
                Ok(grpc.unary(CreateSessionSvc(state), req).await)
            }),
            "/altar.grid.v1.GridHost/DestroySession" => Box::pin(async move {
                let mut grpc = codec::<grid::DestroySessionAck, grid::DestroySession>();
                Ok(grpc.unary(DestroySessionSvc(state), req).await)
            }),
            "/altar.grid.v1.GridHost/ExecuteTool" => Box::pin(async move {
                let mut grpc = codec::<grid::ToolResult, grid::ToolCall>();
                Ok(grpc.unary(ExecuteToolSvc(state), req).await)
            }),
            "/altar.grid.v1.GridHost/ExecuteToolStream" => Box::pin(async move {
                let mut grpc = codec::<grid::StreamChunk, grid::ToolCall>();
                Ok(grpc
                    .server_streaming(ExecuteToolStreamSvc(state), req)
                    .await)
            }),
            _ => Box::pin(async move { Ok(unimplemented_response()) }),
        }
    }
}

impl<B> Service<http::Request<B>> for GridRuntimeService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        state.record_metadata(req.uri().path(), req.headers());
        match req.uri().path() {
            "/altar.grid.v1.GridRuntime/Connect" => Box::pin(async move {
                let mut grpc = codec::<grid::HostMessage, aesp::EnterpriseRuntimeMessage>();
                Ok(grpc.streaming(ConnectSvc(state), req).await)
            }),
            _ => Box::pin(async move { Ok(unimplemented_response()) }),
        }
    }
}

// ------------------------------------------------------------------------------------ serving

/// A running host. Dropping it stops the host too (gracefully, in the background).
pub struct HostHandle {
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    /// What the host has seen.
    pub state: Arc<HostState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl HostHandle {
    /// Stops accepting, ends the runtimes' Connect streams, lets in-flight calls finish (up
    /// to 5 s), then returns.
    pub async fn shutdown(mut self) {
        self.state.begin_shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            warn!("the reference host did not drain in time; aborting it");
            task.abort();
        }
        info!(addr = %self.local_addr, "reference GRID host stopped");
    }

    /// Runs until the server stops on its own (an I/O error) — it does not stop otherwise.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("reference GRID host failed")),
            Err(e) => Err(anyhow::Error::new(e).context("reference GRID host task failed")),
        }
    }
}

impl Drop for HostHandle {
    fn drop(&mut self) {
        // Ends the Connect streams; dropping `stop` (if still held) stops the server.
        self.state.begin_shutdown();
    }
}

/// Binds `opts.listen` (h2c) and serves the host in a background task.
pub async fn spawn(opts: HostOptions) -> anyhow::Result<HostHandle> {
    spawn_inner(opts, None).await
}

/// Like [`spawn`], but serves TLS (or mTLS, when `tls` names client CA roots) instead of h2c:
/// for tests of a sidecar that reaches its host over TLS, or of a runtime's TLS settings.
pub async fn spawn_tls(
    opts: HostOptions,
    tls: tonic::transport::ServerTlsConfig,
) -> anyhow::Result<HostHandle> {
    spawn_inner(opts, Some(tls)).await
}

async fn spawn_inner(
    opts: HostOptions,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<HostHandle> {
    adm::validate_declarations(&opts.manifest)
        .map_err(|e| anyhow::anyhow!("invalid host manifest: {e}"))?;
    let mut builder = tonic::transport::Server::builder();
    let scheme = if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("invalid TLS settings for the host: {e}"))?;
        "TLS"
    } else {
        "h2c"
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
    let local_addr = listener.local_addr()?;
    let state = Arc::new(HostState::new(&opts));
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let router = builder
        .add_service(GridHostService::new(state.clone()))
        .add_service(GridRuntimeService::new(state.clone()));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
    });
    info!(
        addr = %local_addr,
        scheme,
        contracts = ?opts.manifest.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        "reference GRID host listening"
    );
    Ok(HostHandle {
        local_addr,
        state,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

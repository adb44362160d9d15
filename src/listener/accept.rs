//! The acceptor: TCP accept, the TLS 1.3 handshake with a required client certificate (in
//! the task of each connection, under a timeout, so a silent client holds up nobody), the
//! peer identity (once per connection), then HTTP/2 with the configured limits.
//!
//! Limits of a connection's life:
//! - connections in their TLS handshake count against `limits.max_handshakes`, established
//!   ones against `limits.max_connections`: silent TCP connections cannot take the slots of
//!   real clients;
//! - a connection with no call in flight for `limits.idle_timeout_seconds` is closed
//!   (GOAWAY), whether or not it ever sent the HTTP/2 preface;
//! - a connection is closed when its client certificate expires (a resumed TLS session
//!   included);
//! - a connection whose calls keep coming at over twice its request rate limit is closed
//!   (GOAWAY; hyper's server sends it with NO_ERROR, it has no way to say ENHANCE_YOUR_CALM),
//!   see [`crate::proxy::rate`].
//!
//! On shutdown: stop listening at once (the port is free for a replacement), send GOAWAY,
//! let in-flight calls finish up to the grace period, then close what is left.

use super::identity::{self, IdentityError};
use crate::proxy::{ConnInfo, Proxy};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn builder(proxy: &Proxy) -> http2::Builder<TokioExecutor> {
    let l = &proxy.cfg.limits;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .max_pending_accept_reset_streams(l.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(l.max_local_error_reset_streams)
        .max_header_list_size(l.max_header_list_size)
        .initial_stream_window_size(l.initial_stream_window_size)
        .initial_connection_window_size(l.initial_connection_window_size)
        .max_send_buf_size(l.max_send_buf_size)
        .keep_alive_interval(l.keep_alive_interval)
        .keep_alive_timeout(l.keep_alive_timeout);
    b
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Calls in flight on one connection, and when the last one ended.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when the connection last went idle.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// Resolves once the connection has had no call in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            let idle = self.start.elapsed().saturating_sub(since);
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// Held by a call's response body: the call is in flight until the body is done or dropped.
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its call counted as in flight.
struct Tracked<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection closed for idleness or an expired certificate may take to go.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long from now until `not_after` (Unix seconds); far away when unknown.
fn until(not_after: Option<i64>) -> Duration {
    match not_after {
        Some(t) => Duration::from_secs(u64::try_from(t.saturating_sub(unix_now())).unwrap_or(0)),
        None => Duration::from_secs(86_400 * 365),
    }
}

/// Serves `listener` until `shutdown` is cancelled, then drains for `grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<crate::tls::ServerTls>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let builder = Arc::new(builder(&proxy));
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over: every connection still open is closed.
    let hard_stop = CancellationToken::new();
    let limits = &proxy.cfg.limits;
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let established = Arc::new(Semaphore::new(limits.max_connections));
    let handshake_timeout = proxy.cfg.tls.handshake_timeout;
    let idle_timeout = limits.idle_timeout;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = %local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            proxy.metrics.connections_refused.inc();
            tracing::warn!(%remote, "handshake limit reached (limits.max_handshakes); closing new connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // The TLS configuration in force now (tls.reload_seconds may have swapped it).
        let acceptor = TlsAcceptor::from(tls.current());
        let proxy = proxy.clone();
        let builder = builder.clone();
        let established = established.clone();
        let shutdown = shutdown.clone();
        let hard_stop = hard_stop.clone();
        tracker.spawn(async move {
            let tls = tokio::select! {
                r = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => r,
                _ = hard_stop.cancelled() => return,
            };
            drop(handshake);
            let tls = match tls {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    proxy.metrics.tls_handshake_failures.inc();
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    proxy.metrics.tls_handshake_failures.inc();
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let Ok(_permit) = established.try_acquire_owned() else {
                proxy.metrics.connections_refused.inc();
                tracing::warn!(%remote, "connection limit reached (limits.max_connections); closing new connection");
                return;
            };
            let (_, session) = tls.get_ref();
            let identity = match session.peer_certificates().and_then(|c| c.first()) {
                Some(leaf) => {
                    identity::identify(leaf.as_ref(), proxy.cfg.identity.rules(), unix_now())
                }
                None => Err(IdentityError::NoCertificate),
            };
            match &identity {
                Ok(id) => {
                    tracing::debug!(%remote, principal = %id.principal_id, tenant = %id.tenant_id, kind = %id.kind, "connection")
                }
                Err(why) => {
                    tracing::info!(%remote, reason = %why, "connection without a usable identity; its calls will be refused")
                }
            }
            let expires = until(identity.as_ref().ok().and_then(|i| i.not_after));
            let conn = Arc::new(ConnInfo::new(
                identity,
                remote,
                &proxy.cfg,
                &proxy.buffered_total,
            ));
            let calm = conn.calm.clone();
            proxy.metrics.connections_total.inc();
            proxy.metrics.connections_active.inc();
            let activity = Activity::new();
            let p = proxy.clone();
            let a = activity.clone();
            let svc = service_fn(move |req| {
                let p = p.clone();
                let c = conn.clone();
                let guard = a.begin();
                // Boxed: the call's future is large, and hyper moves it into a task.
                async move {
                    let resp = Box::pin(p.handle(c, req)).await;
                    Ok::<_, Infallible>(resp.map(|inner| Tracked {
                        inner,
                        _guard: guard,
                    }))
                }
            });
            let served = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(served);
            let mut closing = false;
            // After an idle or expiry GOAWAY, a peer that does not close (one that never sent
            // the preface, say) is cut off after this long.
            let cut_off = tokio::time::sleep(Duration::MAX);
            tokio::pin!(cut_off);
            loop {
                let why = tokio::select! {
                    r = served.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%remote, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = hard_stop.cancelled() => break,
                    _ = &mut cut_off, if closing => {
                        tracing::debug!(%remote, "peer did not close after GOAWAY; closing");
                        break;
                    }
                    _ = shutdown.cancelled(), if !closing => "shutdown",
                    _ = activity.idle_for(idle_timeout), if !closing => "idle",
                    _ = tokio::time::sleep(expires), if !closing => "certificate expired",
                    _ = calm.cancelled(), if !closing => "calls over the request rate limit",
                };
                tracing::debug!(%remote, reason = why, "closing connection (GOAWAY)");
                served.as_mut().graceful_shutdown();
                closing = true;
                if why != "shutdown" {
                    // Shutdown has its own grace period; these have a short one.
                    cut_off
                        .as_mut()
                        .reset(tokio::time::Instant::now() + CLOSE_GRACE);
                }
            }
            proxy.metrics.connections_active.dec();
        });
    }

    // Stop listening at once: a replacement can bind the port while calls drain.
    drop(listener);
    tracker.close();
    tracing::info!(listener = %local, grace = ?grace, "draining connections");
    tokio::select! {
        _ = tracker.wait() => tracing::info!(listener = %local, "all connections closed"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = %local, "grace period over; closing remaining connections");
            hard_stop.cancel();
            tracker.wait().await;
        }
    }
}

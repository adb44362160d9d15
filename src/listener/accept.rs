//! The acceptor: TCP accept, the TLS 1.3 handshake with a required client certificate (in
//! the task of each connection, under a timeout, so a silent client holds up nobody), the
//! peer identity (once per connection), then HTTP/2 with the configured limits.
//! On shutdown: stop accepting, send GOAWAY, let in-flight calls finish up to the grace
//! period, then close what is left.

use super::identity::{self, IdentityError};
use crate::proxy::{ConnInfo, Proxy};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

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

/// Serves `listener` until `shutdown` is cancelled, then drains for `grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let builder = Arc::new(builder(&proxy));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(proxy.cfg.limits.max_connections));
    let handshake_timeout = proxy.cfg.tls.handshake_timeout;
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; closing new connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
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
            let (_, session) = tls.get_ref();
            let rules = &proxy.cfg.identity;
            let identity = match session.peer_certificates().and_then(|c| c.first()) {
                Some(leaf) => {
                    identity::identify(leaf.as_ref(), &rules.trust_domain, &rules.subjects)
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
            let conn = Arc::new(ConnInfo::new(identity, remote, &proxy.cfg));
            proxy.metrics.connections_total.inc();
            proxy.metrics.connections_active.inc();
            let p = proxy.clone();
            let svc = service_fn(move |req| {
                let p = p.clone();
                let c = conn.clone();
                // Boxed: the call's future is large, and hyper moves it into a task.
                async move { Ok::<_, Infallible>(Box::pin(p.handle(c, req)).await) }
            });
            let served = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(served).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            proxy.metrics.connections_active.dec();
        });
    }

    tracing::info!(listener = %local, grace = ?grace, "draining connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(listener = %local, "all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(listener = %local, "grace period over; closing remaining connections"),
    }
}

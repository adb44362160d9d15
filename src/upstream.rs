//! The HTTP/2 client to the GRID host: h2c on loopback by default, or TLS 1.3.
//!
//! Each client connection has an upstream connection of its own for its calls
//! ([`Affinity`], [`Class::Call`]), and each runtime's `Connect` stream one of its own
//! ([`Class::RuntimeStream`]): what one peer leaves unread fills only its own connection's
//! flow-control windows. A connection that closed is replaced on next use; a request the
//! closing connection never took is sent once more on a fresh one. A small pool
//! (`upstream.connections`) serves the readiness probe. Taking a connection is a short std
//! mutex section that clones a handle; connecting happens outside it, under a per-slot async
//! lock so a burst of calls opens one connection, not one each.

use crate::config::{Config, ConfigError};
use crate::proxy::body::ProxyBody;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the GRID host at {addr}: {reason}")]
    Connect {
        addr: String,
        reason: ConnectFailure,
    },
    #[error("the GRID host connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The host took the request but sent no response headers in time
    /// (`limits.upstream_response_timeout_ms`); the stream to it was reset.
    #[error("the GRID host at {addr} sent no response headers within {after:?}; stream reset")]
    ResponseTimeout { addr: String, after: Duration },
}

impl UpstreamError {
    /// What a client may be told: the kind of failure, never the host's address.
    pub fn public_reason(&self) -> &'static str {
        match self {
            UpstreamError::Connect { reason, .. } => match reason {
                ConnectFailure::Timeout(_) => "connecting to the host timed out",
                ConnectFailure::Tcp(_) => "the host refused or dropped the connection",
                ConnectFailure::TlsTimeout | ConnectFailure::Tls(_) => {
                    "the TLS handshake with the host failed"
                }
            },
            UpstreamError::Http(_) => "the HTTP/2 connection to the host failed",
            UpstreamError::ResponseTimeout { .. } => "the host did not answer in time",
        }
    }
}

/// Why a connection to the host could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Which connection a request uses.
#[derive(Clone, Copy)]
pub enum Class<'a> {
    /// Calls of one client connection: the upstream connection of that client connection
    /// (opened on its first call, replaced when it closes, closed with it). What one client
    /// leaves unread then holds up, or breaks, only its own upstream connection: never the
    /// flow-control window or the connection other clients' calls use.
    Call(&'a Affinity),
    /// A runtime's `Connect` stream: a connection of its own, opened for it and closed with
    /// it, for the same reason.
    RuntimeStream,
}

/// The upstream connection of one client connection.
#[derive(Default)]
pub struct Affinity(Slot);

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Affinity")
    }
}

#[derive(Default)]
struct Slot {
    /// The connection's handle and its generation (bumped on every new connection).
    sender: std::sync::Mutex<Option<(u64, SendRequest<ProxyBody>)>>,
    connecting: tokio::sync::Mutex<()>,
}

/// A pooled connection handed to one request.
struct Lease {
    generation: u64,
    sender: SendRequest<ProxyBody>,
}

pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    addr: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    slots: Vec<Slot>,
    next: AtomicUsize,
    connect_timeout: Duration,
    builder: Builder<TokioExecutor>,
}

impl Upstream {
    pub fn new(
        cfg: &Config,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Upstream, ConfigError> {
        let u = &cfg.upstream;
        let tls = match (tls, &u.tls) {
            (Some(cc), Some(t)) => {
                let name =
                    ServerName::try_from(t.server_name.clone()).map_err(|e| ConfigError {
                        file: cfg.source.display().to_string(),
                        field: "upstream.server_name".into(),
                        problem: format!("expected a DNS name or IP address: {e}"),
                    })?;
                Some((tokio_rustls::TlsConnector::from(cc), name))
            }
            _ => None,
        };
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(cfg.limits.initial_stream_window_size)
            .initial_connection_window_size(cfg.limits.initial_connection_window_size)
            .max_send_buf_size(cfg.limits.max_send_buf_size)
            .keep_alive_interval(cfg.limits.keep_alive_interval)
            .keep_alive_timeout(cfg.limits.keep_alive_timeout)
            .keep_alive_while_idle(true);
        Ok(Upstream {
            scheme: u.uri_scheme.clone(),
            authority: u.authority.clone(),
            addr: u.authority.as_str().to_string(),
            tls,
            slots: (0..u.connections).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            connect_timeout: u.connect_timeout,
            builder,
        })
    }

    /// The upstream URI for a request path.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            pq.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }

    fn cached(slot: &Slot, not: Option<u64>) -> Option<Lease> {
        let guard = slot.sender.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|(g, s)| !s.is_closed() && Some(*g) != not)
            .map(|(g, s)| Lease {
                generation: *g,
                sender: s.clone(),
            })
    }

    fn pooled(&self) -> &Slot {
        &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()]
    }

    /// The connection of `slot`; never the one of generation `not` (known to be dead).
    async fn lease(&self, slot: &Slot, not: Option<u64>) -> Result<Lease, UpstreamError> {
        if let Some(l) = Self::cached(slot, not) {
            return Ok(l);
        }
        let _g = slot.connecting.lock().await;
        if let Some(l) = Self::cached(slot, not) {
            return Ok(l);
        }
        let sender = self.connect().await?;
        let mut guard = slot.sender.lock().unwrap_or_else(|p| p.into_inner());
        let generation = guard.as_ref().map_or(0, |(g, _)| g + 1);
        *guard = Some((generation, sender.clone()));
        Ok(Lease { generation, sender })
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let err = |reason: ConnectFailure| UpstreamError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| err(ConnectFailure::Timeout(self.connect_timeout)))?
            .map_err(|e| err(ConnectFailure::Tcp(e)))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp).await,
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), tcp),
                )
                .await
                .map_err(|_| err(ConnectFailure::TlsTimeout))?
                .map_err(|e| err(ConnectFailure::Tls(e)))?;
                self.handshake(tls).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<SendRequest<ProxyBody>, UpstreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = self.builder.handshake(TokioIo::new(io)).await?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection closed");
            }
        });
        tracing::debug!(upstream = %self.addr, "upstream connection established");
        Ok(sender)
    }

    /// Sends one request and waits for its response headers, for at most `timeout`
    /// (connecting included). When the time is up the request is dropped, and hyper resets
    /// the stream to the host (`RST_STREAM(CANCEL)`): nothing is left waiting on either side.
    /// After its headers, a response (a `Connect` stream, a tool's chunks) has no deadline
    /// of this kind.
    pub async fn send_within(
        &self,
        req: Request<ProxyBody>,
        class: Class<'_>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(timeout, self.send(req, class)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::ResponseTimeout {
                addr: self.addr.clone(),
                after: timeout,
            }),
        }
    }

    /// Sends one request on a pooled connection. A request the connection never took (it
    /// was closing: the host restarted, or sent GOAWAY) is sent once more on a fresh one, so
    /// a graceful host restart loses no call.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        class: Class<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let slot = match class {
            Class::RuntimeStream => {
                // Dropped once the request is sent: the connection lives as long as the stream.
                let mut sender = self.connect().await?;
                sender.ready().await?;
                return Ok(sender.send_request(req).await?);
            }
            Class::Call(a) => &a.0,
        };
        let mut lease = self.lease(slot, None).await?;
        let req = match lease.sender.ready().await {
            Ok(()) => match lease.sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(e.into_error().into()),
                },
            },
            Err(_) => req,
        };
        tracing::debug!(upstream = %self.addr, "upstream connection closed under a request; retrying on a new one");
        let mut lease = self.lease(slot, Some(lease.generation)).await?;
        lease.sender.ready().await?;
        Ok(lease.sender.send_request(req).await?)
    }

    /// Whether a connection to the host can be had (readiness).
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        let mut l = self.lease(self.pooled(), None).await?;
        l.sender.ready().await?;
        Ok(())
    }
}

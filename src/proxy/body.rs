//! The frame interceptor: an HTTP/2 body that parses gRPC messages as they pass, hands each
//! to a hook, and forwards the original bytes (or the hook's replacement) without ever
//! buffering more than the message being inspected.
//!
//! One `InterceptBody` feeds each side of a call: the upstream request (client or runtime →
//! host) and the downstream response (host → client or runtime). A refusal on the request
//! side is sent to the response side over a oneshot, which answers the peer with the error
//! trailers while the upstream stream is reset; a refusal on the response side ends the
//! response with error trailers.

use crate::grpc::frame::{Encoding, FrameDecoder, GrpcMessage, encode_frame, message_payload};
use crate::grpc::{Denial, ErrorCode};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one body type of the data plane, both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|n| match n {})
        .boxed_unsync()
}

pub fn full(b: Bytes) -> ProxyBody {
    http_body_util::Full::new(b)
        .map_err(|n| match n {})
        .boxed_unsync()
}

/// What to do with one message.
#[derive(Debug)]
pub enum Verdict {
    /// Forward the bytes as received (compressed or not).
    Forward,
    /// Forward this uncompressed payload instead.
    Replace(Bytes),
}

/// Inspects the messages of one direction of one call.
pub trait MessageHook: Send + Unpin + 'static {
    /// `payload` is the uncompressed protobuf message.
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial>;
}

/// The refusal that ends a call, passed from the request side to the response side.
#[derive(Debug)]
pub struct Aborted(pub Denial);

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "call refused by the sidecar: {}", self.0.message)
    }
}

impl std::error::Error for Aborted {}

pub enum Side {
    /// Feeds the upstream request; a refusal is handed to the response side.
    Request {
        abort: Option<oneshot::Sender<Denial>>,
    },
    /// Feeds the downstream response; a refusal (its own or the request side's) ends it
    /// with error trailers carrying `correlation_id`.
    Response {
        abort: Option<oneshot::Receiver<Denial>>,
        correlation_id: Arc<str>,
    },
}

pub struct InterceptBody<B, H> {
    inner: B,
    decoder: FrameDecoder,
    encoding: Encoding,
    max: usize,
    hook: H,
    side: Side,
    ready: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    done: bool,
    scratch: Vec<GrpcMessage>,
}

impl<B, H> InterceptBody<B, H>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    H: MessageHook,
{
    pub fn new(
        inner: B,
        hook: H,
        side: Side,
        encoding: Encoding,
        max_message_bytes: usize,
    ) -> Self {
        InterceptBody {
            inner,
            decoder: FrameDecoder::new(max_message_bytes),
            encoding,
            max: max_message_bytes,
            hook,
            side,
            ready: VecDeque::new(),
            trailers: None,
            done: false,
            scratch: Vec::new(),
        }
    }

    /// Ends this direction because of `denial`. Returns the error to yield, if any.
    fn refuse(&mut self, denial: Denial) -> Option<BoxError> {
        self.done = true;
        match &mut self.side {
            Side::Request { abort } => {
                if let Some(tx) = abort.take() {
                    let _ = tx.send(denial.clone());
                }
                self.ready.clear();
                Some(Box::new(Aborted(denial)))
            }
            Side::Response { correlation_id, .. } => {
                // Messages that passed before the bad one are still delivered.
                self.trailers = Some(denial.status_headers(correlation_id));
                None
            }
        }
    }

    fn on_data(&mut self, data: Bytes) -> Result<(), Denial> {
        let mut msgs = std::mem::take(&mut self.scratch);
        let pushed = self.decoder.push(data, &mut msgs);
        let mut result = pushed.map_err(malformed);
        for msg in msgs.drain(..) {
            if result.is_err() {
                break;
            }
            result = self.on_message(msg);
        }
        self.scratch = msgs;
        result
    }

    fn on_message(&mut self, msg: GrpcMessage) -> Result<(), Denial> {
        let payload = message_payload(&msg, self.encoding, self.max).map_err(malformed)?;
        match self.hook.on_message(&payload)? {
            // Towards the host, messages travel uncompressed: the sidecar cannot know which
            // encodings the host accepts, and every gRPC peer accepts identity.
            Verdict::Forward if msg.compressed && matches!(self.side, Side::Request { .. }) => {
                self.ready.push_back(encode_frame(&payload))
            }
            Verdict::Forward => self.ready.push_back(msg.frame),
            Verdict::Replace(p) => {
                if p.len() > self.max {
                    return Err(malformed(crate::grpc::FrameError::TooLarge {
                        len: p.len(),
                        max: self.max,
                    }));
                }
                self.ready.push_back(encode_frame(&p))
            }
        }
        Ok(())
    }
}

fn malformed(e: impl std::fmt::Display) -> Denial {
    Denial::new(
        ErrorCode::MalformedMessage,
        format!("malformed gRPC message: {e}"),
    )
}

/// Describes an upstream failure mid-call.
pub fn upstream_failure(e: &BoxError) -> Denial {
    let mut reason = e.to_string();
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if let Some(r) = h2e.reason() {
                reason = format!("stream reset by the host ({r:?})");
            }
            break;
        }
        src = s.source();
    }
    Denial::new(
        ErrorCode::UpstreamUnavailable,
        format!("the GRID host failed the call: {reason}"),
    )
    .detail("reason", reason)
}

impl<B, H> Body for InterceptBody<B, H>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    H: MessageHook,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if let Some(t) = this.trailers.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            // A refusal on the request side ends the response first.
            if let Side::Response {
                abort: abort @ Some(_),
                ..
            } = &mut this.side
                && let Some(rx) = abort
            {
                match Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(denial)) => {
                        *abort = None;
                        this.refuse(denial);
                        continue;
                    }
                    Poll::Ready(Err(_)) => *abort = None,
                    Poll::Pending => {}
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if let Err(e) = this.decoder.finish() {
                        if let Some(err) = this.refuse(malformed(e)) {
                            return Poll::Ready(Some(Err(err)));
                        }
                        continue;
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    match &this.side {
                        // The peer went away or reset: pass the reset on upstream.
                        Side::Request { .. } => {
                            this.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                        Side::Response { .. } => {
                            this.refuse(upstream_failure(&e));
                            continue;
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(denial) = this.on_data(data)
                            && let Some(err) = this.refuse(denial)
                        {
                            return Poll::Ready(Some(Err(err)));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            if let Err(e) = this.decoder.finish() {
                                if let Some(err) = this.refuse(malformed(e)) {
                                    return Poll::Ready(Some(Err(err)));
                                }
                                continue;
                            }
                            this.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

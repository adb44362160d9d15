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
use bytes::{Bytes, BytesMut};
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
    /// Forward nothing: the hook answered the sender itself (through the other direction's
    /// [`Injector`]).
    Drop,
}

/// Messages a hook of one direction sends on the other direction's body (the sidecar
/// answering for the peer it does not forward to). Bounded: a hook that finds it full
/// refuses the stream instead of buffering.
pub type Injector = tokio::sync::mpsc::Sender<Bytes>;

/// How many injected messages may wait to be sent.
pub const INJECT_QUEUE: usize = 64;

/// Inspects the messages of one direction of one call.
pub trait MessageHook: Send + Unpin + 'static {
    /// `payload` is the uncompressed protobuf message.
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial>;

    /// This direction was refused with `denial` (by `on_message`, by the framing, or by a
    /// failing peer): the hook records it. Not called for a refusal handed over from the
    /// request side, which its own hook recorded.
    fn refused(&mut self, _denial: &Denial) {}
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
    /// Small messages produced from one incoming DATA frame are sent as one outgoing frame:
    /// a peer that sees thousands of tiny frames may (rightly) call it a flood.
    pending: Option<Bytes>,
    coalesced: Option<BytesMut>,
    trailers: Option<HeaderMap>,
    done: bool,
    scratch: Vec<GrpcMessage>,
    limits: Option<Box<Limits>>,
    /// Messages the other direction's hook sends on this body (uncompressed payloads).
    injected: Option<tokio::sync::mpsc::Receiver<Bytes>>,
}

/// The bounds on what one direction of a call may hold while a message is assembled.
struct Limits {
    reserver: super::budget::Reserver,
    timeout: std::time::Duration,
    /// Armed while a message is incomplete.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Outgoing messages below this size are coalesced into one DATA frame.
const COALESCE_LIMIT: usize = 16 * 1024;

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
            pending: None,
            coalesced: None,
            trailers: None,
            done: false,
            scratch: Vec::new(),
            limits: None,
            injected: None,
        }
    }

    /// This body also carries the messages sent on `rx` by the other direction's hook.
    pub(crate) fn with_injected(mut self, rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        self.injected = Some(rx);
        self
    }

    /// Bounds this direction: a message spanning frames reserves its size from `budget`
    /// before its bytes are read, and must be whole within `message_timeout`.
    pub(crate) fn with_limits(
        mut self,
        budget: &super::budget::Budget,
        message_timeout: std::time::Duration,
    ) -> Self {
        self.limits = Some(Box::new(Limits {
            reserver: super::budget::Reserver::new(budget),
            timeout: message_timeout,
            stall: None,
        }));
        self
    }

    /// Ready when the next frame may be read: the incomplete message (if any) has its bytes
    /// reserved. `Err` when it has waited (for bytes or budget) past its timeout.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Denial>> {
        let Some(l) = self.limits.as_deref_mut() else {
            return Poll::Ready(Ok(()));
        };
        let need = self.decoder.pending_len();
        if need == 0 {
            l.stall = None;
        } else {
            let timeout = l.timeout;
            let stall = l
                .stall
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if stall.as_mut().poll(cx).is_ready() {
                l.stall = None;
                return Poll::Ready(Err(Denial::malformed(format!(
                    "a message did not arrive whole within {} ms",
                    timeout.as_millis()
                ))));
            }
        }
        l.reserver.poll_hold(cx, need).map(Ok)
    }

    /// Ends this direction because of `denial`, which the hook records. Returns the error to
    /// yield, if any.
    fn refuse(&mut self, denial: Denial) -> Option<BoxError> {
        self.hook.refused(&denial);
        self.end(denial)
    }

    /// Ends this direction because of `denial`, already recorded.
    fn end(&mut self, denial: Denial) -> Option<BoxError> {
        self.done = true;
        match &mut self.side {
            Side::Request { abort } => {
                if let Some(tx) = abort.take() {
                    let _ = tx.send(denial.clone());
                }
                self.ready.clear();
                self.pending = None;
                self.coalesced = None;
                Some(Box::new(Aborted(denial)))
            }
            Side::Response { correlation_id, .. } => {
                // Messages that passed before the bad one are still delivered.
                self.trailers = Some(denial.status_headers(correlation_id));
                None
            }
        }
    }

    /// Decodes one incoming DATA frame and queues what it yields as few outgoing frames.
    fn on_data(&mut self, data: Bytes) -> Result<(), Denial> {
        let mut msgs = std::mem::take(&mut self.scratch);
        // Messages completed before a framing error are still handled, in order.
        let pushed = self.decoder.push(data, &mut msgs);
        let mut result = Ok(());
        for msg in msgs.drain(..) {
            result = self.on_message(msg);
            if result.is_err() {
                break;
            }
        }
        self.scratch = msgs;
        self.flush();
        result.and(pushed.map_err(|e| self.framing(e)))
    }

    /// The refusal for a framing error: on the response side it says that it is the host's
    /// response, and a message over the limit is named as that, not as a malformed request.
    fn framing(&self, e: crate::grpc::FrameError) -> Denial {
        match (&self.side, &e) {
            (Side::Request { .. }, _) => Denial::malformed(e),
            (Side::Response { .. }, crate::grpc::FrameError::TooLarge { len, max }) => {
                Denial::new(
                    ErrorCode::MalformedMessage,
                    format!(
                        "the GRID host's response message of {len} bytes is over limits.max_message_bytes ({max} bytes); the request was fine"
                    ),
                )
                .detail("direction", "response")
                .detail("reason", "response too large")
                .detail("max_message_bytes", max.to_string())
            }
            (Side::Response { .. }, _) => Denial::new(
                ErrorCode::MalformedMessage,
                format!("the GRID host sent a malformed response: {e}"),
            )
            .detail("direction", "response"),
        }
    }

    /// Queues one outgoing message frame, coalescing small ones.
    fn emit(&mut self, b: Bytes) {
        if b.len() >= COALESCE_LIMIT {
            self.flush();
            self.ready.push_back(b);
            return;
        }
        if let Some(acc) = &mut self.coalesced {
            acc.extend_from_slice(&b);
            if acc.len() >= COALESCE_LIMIT {
                self.flush();
            }
        } else if let Some(first) = self.pending.take() {
            let mut acc = BytesMut::with_capacity((first.len() + b.len()) * 2);
            acc.extend_from_slice(&first);
            acc.extend_from_slice(&b);
            self.coalesced = Some(acc);
        } else {
            // A lone message goes out as it came, without a copy.
            self.pending = Some(b);
        }
    }

    fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            self.ready.push_back(p);
        }
        if let Some(acc) = self.coalesced.take() {
            self.ready.push_back(acc.freeze());
        }
    }

    fn on_message(&mut self, msg: GrpcMessage) -> Result<(), Denial> {
        let payload =
            message_payload(&msg, self.encoding, self.max).map_err(|e| self.framing(e))?;
        match self.hook.on_message(&payload)? {
            // Towards the host, messages travel uncompressed: the sidecar cannot know which
            // encodings the host accepts, and every gRPC peer accepts identity.
            Verdict::Forward if msg.compressed && matches!(self.side, Side::Request { .. }) => {
                self.emit(encode_frame(&payload))
            }
            Verdict::Forward => self.emit(msg.frame),
            Verdict::Drop => {}
            Verdict::Replace(p) => {
                if p.len() > self.max {
                    return Err(self.framing(crate::grpc::FrameError::TooLarge {
                        len: p.len(),
                        max: self.max,
                    }));
                }
                self.emit(encode_frame(&p))
            }
        }
        Ok(())
    }
}

/// Describes an upstream failure mid-call (the full error goes to the log only).
pub fn upstream_failure(e: &BoxError) -> Denial {
    tracing::info!(error = %e, "the GRID host failed a call mid-stream");
    let mut reason = "the connection to the GRID host failed".to_string();
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
                        this.end(denial);
                        continue;
                    }
                    Poll::Ready(Err(_)) => *abort = None,
                    Poll::Pending => {}
                }
            }
            if let Some(rx) = &mut this.injected {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => {
                        this.ready.push_back(encode_frame(&p));
                        continue;
                    }
                    Poll::Ready(None) => this.injected = None,
                    Poll::Pending => {}
                }
            }
            match this.poll_limits(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(denial)) => {
                    if let Some(err) = this.refuse(denial) {
                        return Poll::Ready(Some(Err(err)));
                    }
                    continue;
                }
                Poll::Ready(Ok(())) => {}
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if let Err(e) = this.decoder.finish() {
                        if let Some(err) = this.refuse(Denial::malformed(e)) {
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
                        if let Ok(mut t) = frame.into_trailers() {
                            match &this.side {
                                Side::Request { .. } => {
                                    super::headers::filter_request_trailers(&mut t)
                                }
                                Side::Response { correlation_id, .. } => {
                                    super::headers::filter_response_trailers(&mut t);
                                    crate::grpc::status::add_host_status_details(
                                        &mut t,
                                        correlation_id,
                                    );
                                }
                            }
                            if let Err(e) = this.decoder.finish() {
                                if let Some(err) = this.refuse(Denial::malformed(e)) {
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

/// A body passed on uninspected (pass-through methods) whose trailers still lose what the
/// sidecar owns: `filter` is [`super::headers::filter_request_trailers`] or
/// [`super::headers::filter_response_trailers`].
pub(crate) struct FilterTrailers<B> {
    inner: B,
    filter: fn(&mut HeaderMap),
}

impl<B> FilterTrailers<B> {
    pub(crate) fn new(inner: B, filter: fn(&mut HeaderMap)) -> Self {
        FilterTrailers { inner, filter }
    }
}

impl<B> Body for FilterTrailers<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let filter = self.filter;
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut t) => {
                    filter(&mut t);
                    Frame::trailers(t)
                }
                Err(frame) => frame,
            }))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::frame::encode_frame;
    use http_body_util::StreamBody;

    type Src = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn source(frames: Vec<Frame<Bytes>>) -> Src {
        StreamBody::new(tokio_stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    /// Forwards everything; refuses a message equal to `b"bad"`.
    struct Picky;
    impl MessageHook for Picky {
        fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
            if &payload[..] == b"bad" {
                Err(Denial::new(ErrorCode::PolicyDenied, "bad message"))
            } else {
                Ok(Verdict::Forward)
            }
        }
    }

    async fn collect<B: Body<Data = Bytes, Error = BoxError> + Unpin>(
        mut b: B,
    ) -> (Vec<Bytes>, Option<HeaderMap>, Option<String>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = b.frame().await {
            match f {
                Ok(f) => match f.into_data() {
                    Ok(d) => data.push(d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Err(e) => return (data, trailers, Some(e.to_string())),
            }
        }
        (data, trailers, None)
    }

    fn response_side() -> Side {
        Side::Response {
            abort: None,
            correlation_id: Arc::from("cid"),
        }
    }

    #[tokio::test]
    async fn small_messages_of_one_frame_leave_as_one_frame() {
        let mut one = Vec::new();
        for i in 0..100u8 {
            one.extend_from_slice(&encode_frame(&[i; 7]));
        }
        let b = InterceptBody::new(
            source(vec![Frame::data(Bytes::from(one.clone()))]),
            Picky,
            response_side(),
            Encoding::Identity,
            1024,
        );
        let (data, trailers, err) = collect(b).await;
        assert_eq!(data.len(), 1, "coalesced into one DATA frame");
        assert_eq!(&data[0][..], &one[..]);
        assert!(trailers.is_none() && err.is_none());
    }

    #[tokio::test]
    async fn a_refused_response_message_ends_the_stream_with_error_trailers() {
        let mut f = encode_frame(b"good").to_vec();
        f.extend_from_slice(&encode_frame(b"bad"));
        f.extend_from_slice(&encode_frame(b"never"));
        let b = InterceptBody::new(
            source(vec![Frame::data(Bytes::from(f))]),
            Picky,
            response_side(),
            Encoding::Identity,
            1024,
        );
        let (data, trailers, err) = collect(b).await;
        assert_eq!(
            data.concat(),
            encode_frame(b"good").to_vec(),
            "only what passed before the refusal"
        );
        let t = trailers.expect("error trailers");
        assert_eq!(t["grpc-status"], "7");
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn a_refused_request_message_aborts_and_tells_the_response_side() {
        let (tx, rx) = oneshot::channel();
        let frames = vec![
            Frame::data(encode_frame(b"ok")),
            Frame::data(encode_frame(b"bad")),
        ];
        let b = InterceptBody::new(
            source(frames),
            Picky,
            Side::Request { abort: Some(tx) },
            Encoding::Identity,
            1024,
        );
        let (data, _, err) = collect(b).await;
        assert_eq!(data.len(), 1);
        assert!(err.unwrap().contains("bad message"));
        assert_eq!(rx.await.unwrap().code, ErrorCode::PolicyDenied);
    }

    /// Counts the refusals it is told of.
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);
    impl MessageHook for Counting {
        fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
            Picky.on_message(payload)
        }
        fn refused(&mut self, _denial: &Denial) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn the_hook_hears_of_each_refusal_once_but_not_of_one_handed_over() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // (DATA frames, refusals the hook must hear of)
        let cases = vec![
            (vec![encode_frame(b"ok")], 0),
            (vec![encode_frame(b"bad")], 1),
            (vec![Bytes::from_static(&[0, 0, 0, 0, 9, 1])], 1),
            (vec![encode_frame(b"bad"), encode_frame(b"bad")], 1),
        ];
        for (frames, want) in cases {
            for side in [Side::Request { abort: None }, response_side()] {
                let n = Arc::new(AtomicUsize::new(0));
                let b = InterceptBody::new(
                    source(frames.iter().cloned().map(Frame::data).collect()),
                    Counting(n.clone()),
                    side,
                    Encoding::Identity,
                    1024,
                );
                let _ = collect(b).await;
                assert_eq!(n.load(Ordering::SeqCst), want);
            }
        }
        // A refusal handed over from the request side was recorded there.
        let (tx, rx) = oneshot::channel();
        tx.send(Denial::new(ErrorCode::PolicyDenied, "x")).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let b = InterceptBody::new(
            source(vec![Frame::data(encode_frame(b"ok"))]),
            Counting(n.clone()),
            Side::Response {
                abort: Some(rx),
                correlation_id: Arc::from("c"),
            },
            Encoding::Identity,
            1024,
        );
        let (_, trailers, _) = collect(b).await;
        assert_eq!(trailers.unwrap()["grpc-status"], "7");
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn trailers_pass_and_a_truncated_stream_is_refused() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let b = InterceptBody::new(
            source(vec![Frame::data(encode_frame(b"x")), Frame::trailers(t)]),
            Picky,
            response_side(),
            Encoding::Identity,
            1024,
        );
        let (data, trailers, _) = collect(b).await;
        assert_eq!(data.len(), 1);
        assert_eq!(trailers.unwrap()["grpc-status"], "0");

        let b = InterceptBody::new(
            source(vec![Frame::data(Bytes::from_static(&[0, 0, 0, 0, 9, 1]))]),
            Picky,
            response_side(),
            Encoding::Identity,
            1024,
        );
        let (_, trailers, _) = collect(b).await;
        assert_eq!(trailers.unwrap()["grpc-status"], "3");
    }
}

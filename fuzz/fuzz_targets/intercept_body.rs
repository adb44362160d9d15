//! `InterceptBody` driven over a body of input-chosen DATA frames and an optional trailers
//! frame, on a current-thread tokio runtime, with a hook that forwards, replaces or refuses
//! according to the payload.
//!
//! Input layout: `[flags][limit selector][cut count k][k cut lengths][stream ...]`.
//!
//! flags: bit 0 side (0 request, 1 response); bits 1-2 encoding (identity, gzip, deflate);
//! bit 3 hook (0 forward-only, 1 payload-driven); bit 4 a trailers frame at the end;
//! bits 5-6 the abort channel (0 none, 1 kept open, 2 sender dropped, 3 a refusal sent by the
//! other side before the first poll: response side only).
//!
//! Checks, against an independent model of the stream (one-shot parse, decompression,
//! the same hook):
//! - no panic, no hang, a bounded number of polls;
//! - no empty DATA frame is emitted;
//! - with well-formed framing and no refusal, the output bytes are exactly the expected
//!   messages (forward-only on the response side: the input bytes, unchanged) and the input
//!   trailers pass; on the request side compressed messages go upstream uncompressed;
//! - on a refusal: the request side yields an error after a prefix of the expected bytes and
//!   tells the response side; the response side delivers every message before the bad one
//!   and ends with error trailers (grpc-status not 0).
#![no_main]

use aesp_sidecar::grpc::frame::{Encoding, PREFIX_LEN, encode_frame};
use aesp_sidecar::grpc::{Denial, ErrorCode};
use aesp_sidecar::proxy::body::{InterceptBody, MessageHook, Side, Verdict};
use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use std::io::Read;
use std::sync::{Arc, OnceLock};
use tokio::sync::oneshot;

const LIMITS: [usize; 8] = [0, 1, 8, 64, 255, 1024, 20_000, 4 * 1024 * 1024];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ForwardOnly,
    PayloadDriven,
}

/// The hook's decision, a pure function of the payload (shared by hook and model).
fn decide(mode: Mode, payload: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    match mode {
        Mode::ForwardOnly => Ok(None),
        Mode::PayloadDriven => match payload.first() {
            None => Ok(None),
            Some(&0xff) => Err(()),
            Some(b) => match b % 4 {
                0 | 3 => Ok(None),
                1 => Ok(Some(payload.iter().rev().copied().collect())),
                // Twice the payload: may exceed the limit (the body must refuse it).
                _ => Ok(Some([payload, payload].concat())),
            },
        },
    }
}

struct Hook {
    mode: Mode,
    calls: usize,
}

impl MessageHook for Hook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        self.calls += 1;
        match decide(self.mode, payload) {
            Ok(None) => Ok(Verdict::Forward),
            Ok(Some(p)) => Ok(Verdict::Replace(Bytes::from(p))),
            Err(()) => Err(Denial::new(ErrorCode::PolicyDenied, "fuzz hook refusal")),
        }
    }
}

/// What the body must produce: the expected bytes of each message in order, and whether the
/// stream is refused somewhere (after those messages).
fn model(
    stream: &[u8],
    max: usize,
    enc: Encoding,
    mode: Mode,
    request: bool,
) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    while stream.len() - pos >= PREFIX_LEN {
        let flag = stream[pos];
        let len = u32::from_be_bytes(stream[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if flag > 1 || len > max || stream.len() - pos - PREFIX_LEN < len {
            return (out, true);
        }
        let frame = &stream[pos..pos + PREFIX_LEN + len];
        let body = &frame[PREFIX_LEN..];
        pos += PREFIX_LEN + len;
        let payload: Vec<u8> = if flag == 0 {
            body.to_vec()
        } else {
            let mut v = Vec::new();
            let r = match enc {
                Encoding::Identity => return (out, true),
                Encoding::Gzip => flate2::read::GzDecoder::new(body)
                    .take(max as u64 + 1)
                    .read_to_end(&mut v),
                Encoding::Deflate => flate2::read::ZlibDecoder::new(body)
                    .take(max as u64 + 1)
                    .read_to_end(&mut v),
            };
            if r.is_err() || v.len() > max {
                return (out, true);
            }
            v
        };
        match decide(mode, &payload) {
            Err(()) => return (out, true),
            Ok(None) if flag == 1 && request => out.push(encode_frame(&payload).to_vec()),
            Ok(None) => out.push(frame.to_vec()),
            Ok(Some(p)) if p.len() > max => return (out, true),
            Ok(Some(p)) => out.push(encode_frame(&p).to_vec()),
        }
    }
    (out, pos != stream.len())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let max = LIMITS[data[1] as usize % LIMITS.len()];
    let k = (data[2] % 8) as usize;
    if data.len() < 3 + k {
        return;
    }
    let cuts = &data[3..3 + k];
    let stream = Bytes::copy_from_slice(&data[3 + k..]);

    let request = flags & 1 == 0;
    let enc = match (flags >> 1) & 3 {
        0 | 3 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Deflate,
    };
    let mode = if flags & 8 == 0 {
        Mode::ForwardOnly
    } else {
        Mode::PayloadDriven
    };
    let with_trailers = flags & 16 != 0;
    let abort_mode = (flags >> 5) & 3;

    // DATA frames: cut lengths used cyclically (0 = an empty frame), the last takes the rest.
    let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < stream.len() {
        let n = if cuts.is_empty() {
            stream.len() - pos
        } else {
            let c = cuts[i % cuts.len()] as usize;
            i += 1;
            c.min(stream.len() - pos)
        };
        frames.push(Ok(Frame::data(stream.slice(pos..pos + n))));
        pos += n;
        if frames.len() > 4 * 4096 {
            frames.push(Ok(Frame::data(stream.slice(pos..))));
            break;
        }
    }
    let mut input_trailers = HeaderMap::new();
    input_trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    input_trailers.insert("x-fuzz", http::HeaderValue::from_static("t"));
    if with_trailers {
        frames.push(Ok(Frame::trailers(input_trailers.clone())));
    }
    let n_frames = frames.len();
    let src = StreamBody::new(tokio_stream::iter(frames));

    // The abort channel between the two sides of a call.
    let (tx, rx) = oneshot::channel::<Denial>();
    let mut keep_tx = None;
    let mut keep_rx = None;
    let mut pre_refused = false;
    let side = if request {
        match abort_mode {
            0 => {
                drop(rx);
                Side::Request { abort: None }
            }
            2 => {
                drop(rx);
                Side::Request { abort: Some(tx) }
            }
            _ => {
                keep_rx = Some(rx);
                Side::Request { abort: Some(tx) }
            }
        }
    } else {
        let abort = match abort_mode {
            0 => None,
            1 => {
                keep_tx = Some(tx);
                Some(rx)
            }
            2 => {
                drop(tx);
                Some(rx)
            }
            _ => {
                tx.send(Denial::new(ErrorCode::PolicyDenied, "request side refused"))
                    .unwrap();
                pre_refused = true;
                Some(rx)
            }
        };
        Side::Response {
            abort,
            correlation_id: Arc::from("cid-fuzz"),
        }
    };

    let hook = Hook { mode, calls: 0 };
    let mut body = InterceptBody::new(src, hook, side, enc, max);

    let mut out: Vec<Bytes> = Vec::new();
    let mut trailers: Option<HeaderMap> = None;
    let mut error: Option<String> = None;
    runtime().block_on(async {
        let mut polls = 0usize;
        while let Some(f) = body.frame().await {
            polls += 1;
            assert!(
                polls <= 2 * n_frames + 2 * stream.len() + 8,
                "runaway: {polls} frames out of {n_frames} in"
            );
            assert!(error.is_none(), "a frame after an error");
            assert!(trailers.is_none(), "a frame after the trailers");
            match f {
                Ok(f) => match f.into_data() {
                    Ok(d) => {
                        assert!(!d.is_empty(), "empty DATA frame emitted");
                        out.push(d)
                    }
                    Err(f) => trailers = Some(f.into_trailers().expect("data or trailers")),
                },
                Err(e) => error = Some(e.to_string()),
            }
        }
    });
    drop(keep_tx);

    let got: Vec<u8> = out.concat();
    if pre_refused {
        assert!(got.is_empty(), "output after the request side refused");
        let t = trailers.expect("error trailers");
        assert_eq!(t["grpc-status"], "7");
        assert!(error.is_none());
        return;
    }
    let (expected, refused) = model(&stream, max, enc, mode, request);
    let expected_bytes: Vec<u8> = expected.concat();
    if !refused {
        assert!(error.is_none(), "error on a good stream: {error:?}");
        assert_eq!(
            got, expected_bytes,
            "output differs from the expected messages"
        );
        if mode == Mode::ForwardOnly && (!request || enc == Encoding::Identity) {
            // Nothing to re-encode: the bytes leave exactly as they came.
            assert_eq!(
                &got[..],
                &stream[..],
                "forward-only must pass the input bytes unchanged"
            );
        }
        if with_trailers {
            assert_eq!(
                trailers.as_ref(),
                Some(&input_trailers),
                "trailers pass unchanged"
            );
        } else {
            assert!(trailers.is_none());
        }
        if let Some(rx) = keep_rx.as_mut() {
            assert!(rx.try_recv().is_err(), "a refusal sent for a good stream");
        }
        return;
    }
    if request {
        assert!(error.is_some(), "request side refused without an error");
        assert!(
            trailers.is_none(),
            "request side emitted trailers on a refusal"
        );
        assert!(
            expected_bytes.starts_with(&got),
            "request output is not a prefix of the expected bytes"
        );
        if let Some(rx) = keep_rx.as_mut() {
            let d = rx.try_recv().expect("the response side is told");
            assert!(matches!(
                d.code,
                ErrorCode::PolicyDenied | ErrorCode::MalformedMessage
            ));
        }
    } else {
        assert!(
            error.is_none(),
            "response side yields trailers, not errors: {error:?}"
        );
        assert_eq!(
            got, expected_bytes,
            "response side: messages before the refusal"
        );
        let t = trailers.expect("error trailers");
        assert_ne!(t["grpc-status"], "0");
    }
});

//! `FrameDecoder` fed with input-chosen DATA-frame cuts, then `message_payload` with every
//! encoding on each message it yields.
//!
//! Input layout: `[limit selector][cut count k][k cut lengths][stream ...]`.
//!
//! Checks:
//! - no panic, no hang, no allocation beyond the limits (run with `-malloc_limit_mb`);
//! - every message's declared length is within the limit and its frame is exactly
//!   `prefix + payload`; the compressed flag is the first byte of the frame;
//! - how the stream is cut does not matter: the messages are the ones an independent
//!   one-shot parser finds, in order, and an error is reported iff that parser fails;
//! - `finish()` succeeds iff every byte of the stream went into a message;
//! - `message_payload` with Identity/Gzip/Deflate never returns more than the limit, and an
//!   uncompressed message's payload comes back unchanged.
#![no_main]

use aesp_sidecar::grpc::frame::{
    Encoding, FrameDecoder, FrameError, GrpcMessage, PREFIX_LEN, message_payload,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// Small limits mostly; the production default and the config maximum too, to prove a peer's
/// declared length costs nothing until its bytes arrive.
const LIMITS: [usize; 12] = [
    0,
    1,
    5,
    16,
    64,
    255,
    1024,
    4096,
    65_536,
    1 << 20,
    4 * 1024 * 1024,
    0x7fff_ffff,
];

/// Independent reference: the messages of the whole stream and whether it is well framed.
fn reference(stream: &[u8], max: usize) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    while stream.len() - pos >= PREFIX_LEN {
        let flag = stream[pos];
        let len = u32::from_be_bytes(stream[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if flag > 1 || len > max {
            return (out, false);
        }
        if stream.len() - pos - PREFIX_LEN < len {
            return (out, false);
        }
        out.push(&stream[pos..pos + PREFIX_LEN + len]);
        pos += PREFIX_LEN + len;
    }
    (out, pos == stream.len())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = LIMITS[data[0] as usize % LIMITS.len()];
    let k = (data[1] % 16) as usize;
    if data.len() < 2 + k {
        return;
    }
    let cuts = &data[2..2 + k];
    let stream = &data[2 + k..];
    let whole = Bytes::copy_from_slice(stream);

    // Cut the stream: cut lengths are used cyclically (0 means an empty DATA frame), the last
    // frame takes the rest.
    let mut chunks = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < whole.len() {
        let n = if cuts.is_empty() {
            whole.len() - pos
        } else {
            let c = cuts[i % cuts.len()] as usize;
            i += 1;
            c.min(whole.len() - pos)
        };
        chunks.push(whole.slice(pos..pos + n));
        pos += n;
        if chunks.len() > 8 * 4096 {
            break;
        }
    }
    if pos < whole.len() {
        chunks.push(whole.slice(pos..));
    }

    let mut dec = FrameDecoder::new(max);
    let mut msgs: Vec<GrpcMessage> = Vec::new();
    let mut err: Option<FrameError> = None;
    for c in chunks {
        if let Err(e) = dec.push(c, &mut msgs) {
            err = Some(e);
            break; // poisoned: the call ends
        }
    }
    let finished = if err.is_none() { dec.finish() } else { Ok(()) };

    let (ref_msgs, ref_ok) = reference(stream, max);
    let mut consumed = 0;
    for (n, m) in msgs.iter().enumerate() {
        assert!(m.frame.len() >= PREFIX_LEN);
        let declared = u32::from_be_bytes(m.frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(
            m.frame.len(),
            PREFIX_LEN + declared,
            "frame is prefix + payload"
        );
        assert!(
            declared <= max,
            "message of {declared} bytes over the limit {max}"
        );
        assert_eq!(m.compressed, m.frame[0] == 1);
        assert!(m.frame[0] <= 1);
        assert_eq!(m.payload().len(), declared);
        assert_eq!(
            Some(&m.frame[..]),
            ref_msgs.get(n).copied(),
            "message {n} differs from the one-shot parse"
        );
        consumed += m.frame.len();
    }
    if err.is_none() {
        // Every message the reference found was yielded (framing is cut-independent).
        assert_eq!(msgs.len(), ref_msgs.len(), "messages lost or invented");
        assert_eq!(
            finished.is_ok(),
            consumed == stream.len(),
            "finish() must fail iff bytes are left over"
        );
        assert_eq!(ref_ok, finished.is_ok(), "decoder and reference disagree");
    } else {
        assert!(!ref_ok, "error {err:?} on a well-framed stream");
        assert!(msgs.len() <= ref_msgs.len());
    }

    for m in &msgs {
        for enc in [Encoding::Identity, Encoding::Gzip, Encoding::Deflate] {
            match message_payload(m, enc, max) {
                Ok(p) => {
                    assert!(
                        p.len() <= max,
                        "{enc:?} payload {} over limit {max}",
                        p.len()
                    );
                    if !m.compressed {
                        assert_eq!(p, m.payload());
                    }
                }
                Err(FrameError::CompressedWithoutEncoding) => {
                    assert!(m.compressed && enc == Encoding::Identity)
                }
                Err(FrameError::TooLarge { len, max: lim }) => {
                    assert!(m.compressed);
                    assert_eq!(lim, max);
                    assert!(len > max);
                }
                Err(FrameError::Decompress { .. }) => assert!(m.compressed),
                Err(e) => panic!("unexpected error from message_payload: {e:?}"),
            }
        }
    }
});

//! gRPC length-prefixed message framing over HTTP/2 DATA frames, parsed incrementally.
//!
//! A gRPC message is a 5-byte prefix (compressed flag, big-endian u32 length) followed by the
//! payload. HTTP/2 DATA frames cut this stream anywhere: one message may span many frames and
//! one frame may hold many messages. [`FrameDecoder`] takes the DATA frames as they come and
//! yields whole messages; the bytes of a message are held only until it is complete, and a
//! length over the configured limit is refused as soon as the prefix is read, before any of
//! the payload is buffered.
//!
//! When a whole message sits inside one DATA frame (the common case) it is sliced out of that
//! frame without a copy, and [`GrpcMessage::frame`] forwards the original bytes unchanged.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io::Read;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 5;

/// The most buffer reserved ahead of a partial message's bytes.
const RESERVE_CAP: usize = 64 * 1024;

/// One complete gRPC message as it arrived.
#[derive(Debug, Clone)]
pub struct GrpcMessage {
    /// The compressed flag of the prefix.
    pub compressed: bool,
    /// The whole frame as received: prefix and payload, ready to forward unchanged.
    pub frame: Bytes,
}

impl GrpcMessage {
    /// The payload without its prefix (still compressed if `compressed`).
    pub fn payload(&self) -> Bytes {
        self.frame.slice(PREFIX_LEN..)
    }
}

/// Why a byte stream is not valid gRPC framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid compressed flag {0} in the gRPC message prefix (expected 0 or 1)")]
    BadFlag(u8),
    #[error("stream ended inside a gRPC message ({0} bytes of an incomplete message)")]
    Truncated(usize),
    #[error("compressed message but the call declared no grpc-encoding")]
    CompressedWithoutEncoding,
    #[error("message could not be decompressed with {encoding}: {reason}")]
    Decompress {
        encoding: &'static str,
        reason: String,
    },
}

/// Incremental decoder for one direction of one call.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max_message_bytes: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max: max_message_bytes,
        }
    }

    /// Feeds one DATA frame and appends every message it completes to `out`.
    ///
    /// On error the decoder is poisoned: the call must be ended.
    pub fn push(&mut self, mut data: Bytes, out: &mut Vec<GrpcMessage>) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            // Fast path: slice whole messages out of the frame without copying.
            while data.len() >= PREFIX_LEN {
                let len = self.check_prefix(&data)?;
                if data.len() < PREFIX_LEN + len {
                    break;
                }
                let frame = data.split_to(PREFIX_LEN + len);
                out.push(GrpcMessage {
                    compressed: frame[0] == 1,
                    frame,
                });
            }
            if data.is_empty() {
                return Ok(());
            }
            if data.len() >= PREFIX_LEN {
                // The prefix was checked in the loop; reserve for the message, but never more
                // up front than a modest chunk: a peer's declared length costs nothing until
                // its bytes arrive.
                let len = self.check_prefix(&data)?;
                self.buf.reserve((PREFIX_LEN + len).min(RESERVE_CAP));
            }
            self.buf.put(data);
            return Ok(());
        }
        self.buf.put(data);
        while self.buf.len() >= PREFIX_LEN {
            let len = self.check_prefix(&self.buf)?;
            if self.buf.len() < PREFIX_LEN + len {
                self.buf
                    .reserve((PREFIX_LEN + len - self.buf.len()).min(RESERVE_CAP));
                break;
            }
            let frame = self.buf.split_to(PREFIX_LEN + len).freeze();
            out.push(GrpcMessage {
                compressed: frame[0] == 1,
                frame,
            });
        }
        Ok(())
    }

    /// The size (prefix included) of the message being assembled, once its prefix is in;
    /// the prefix's size while only part of it is; 0 between messages.
    pub fn pending_len(&self) -> usize {
        match self.buf.len() {
            0 => 0,
            n if n < PREFIX_LEN => PREFIX_LEN,
            _ => PREFIX_LEN + (&self.buf[1..PREFIX_LEN]).get_u32() as usize,
        }
    }

    /// Called at the end of the stream: fails if a message was left incomplete.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }

    fn check_prefix(&self, b: &[u8]) -> Result<usize, FrameError> {
        let flag = b[0];
        if flag > 1 {
            return Err(FrameError::BadFlag(flag));
        }
        let len = (&b[1..PREFIX_LEN]).get_u32() as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(len)
    }
}

/// Frames an uncompressed payload.
pub fn encode_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// The message encodings the sidecar can inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

impl Encoding {
    /// Parses a `grpc-encoding` value; `None` for an encoding the sidecar cannot read.
    pub fn parse(v: &str) -> Option<Encoding> {
        match v.trim() {
            "" | "identity" => Some(Encoding::Identity),
            "gzip" => Some(Encoding::Gzip),
            "deflate" => Some(Encoding::Deflate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The value of `grpc-accept-encoding` the sidecar advertises: what it can decompress.
pub const ACCEPT_ENCODING: &str = "identity,gzip,deflate";

/// Returns the uncompressed payload of `msg`, refusing output over `max` bytes (a
/// decompression bomb is cut off at the limit, not inflated).
pub fn message_payload(
    msg: &GrpcMessage,
    encoding: Encoding,
    max: usize,
) -> Result<Bytes, FrameError> {
    let payload = msg.payload();
    if !msg.compressed {
        return Ok(payload);
    }
    let mut out = Vec::with_capacity(payload.len().saturating_mul(2).min(max));
    let res = match encoding {
        Encoding::Identity => return Err(FrameError::CompressedWithoutEncoding),
        Encoding::Gzip => flate2::read::GzDecoder::new(&payload[..])
            .take(max as u64 + 1)
            .read_to_end(&mut out),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(&payload[..])
            .take(max as u64 + 1)
            .read_to_end(&mut out),
    };
    res.map_err(|e| FrameError::Decompress {
        encoding: encoding.name(),
        reason: e.to_string(),
    })?;
    if out.len() > max {
        return Err(FrameError::TooLarge {
            len: out.len(),
            max,
        });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn frames(decoder: &mut FrameDecoder, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut out = Vec::new();
        for c in chunks {
            decoder.push(Bytes::copy_from_slice(c), &mut out)?;
        }
        Ok(out.iter().map(|m| m.payload().to_vec()).collect())
    }

    #[test]
    fn many_messages_in_one_frame_and_empty_messages() {
        let mut all = Vec::new();
        all.extend_from_slice(&encode_frame(b"one"));
        all.extend_from_slice(&encode_frame(b""));
        all.extend_from_slice(&encode_frame(b"three"));
        let mut d = FrameDecoder::new(100);
        let got = frames(&mut d, &[&all]).unwrap();
        assert_eq!(got, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        d.finish().unwrap();
    }

    #[test]
    fn one_message_split_byte_by_byte() {
        let f = encode_frame(b"hello world");
        let mut d = FrameDecoder::new(100);
        let mut out = Vec::new();
        for b in f.iter() {
            d.push(Bytes::copy_from_slice(&[*b]), &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].payload()[..], b"hello world");
        assert_eq!(out[0].frame, f);
        d.finish().unwrap();
    }

    #[test]
    fn split_across_frames_with_a_second_message_behind() {
        let mut all = Vec::new();
        all.extend_from_slice(&encode_frame(b"abcdef"));
        all.extend_from_slice(&encode_frame(b"xyz"));
        let mut d = FrameDecoder::new(100);
        let got = frames(&mut d, &[&all[..3], &all[3..9], &all[9..]]).unwrap();
        assert_eq!(got, vec![b"abcdef".to_vec(), b"xyz".to_vec()]);
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(10);
        let mut out = Vec::new();
        let err = d
            .push(Bytes::from_static(&[0, 0, 0, 0, 11]), &mut out)
            .unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: 11, max: 10 });
    }

    #[test]
    fn bad_flag_and_truncation() {
        let mut d = FrameDecoder::new(10);
        let mut out = Vec::new();
        assert_eq!(
            d.push(Bytes::from_static(&[7, 0, 0, 0, 1, 0]), &mut out),
            Err(FrameError::BadFlag(7))
        );
        let mut d = FrameDecoder::new(10);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1]), &mut out)
            .unwrap();
        assert_eq!(d.finish(), Err(FrameError::Truncated(6)));
    }

    #[test]
    fn gzip_is_inflated_and_bombs_are_cut_off() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&[b'a'; 1000]).unwrap();
        let body = gz.finish().unwrap();
        let mut frame = vec![1u8];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let msg = GrpcMessage {
            compressed: true,
            frame: Bytes::from(frame),
        };
        assert_eq!(
            message_payload(&msg, Encoding::Gzip, 1000).unwrap().len(),
            1000
        );
        assert!(matches!(
            message_payload(&msg, Encoding::Gzip, 999),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            message_payload(&msg, Encoding::Identity, 1000).unwrap_err(),
            FrameError::CompressedWithoutEncoding
        );
        assert!(matches!(
            message_payload(&msg, Encoding::Deflate, 1000),
            Err(FrameError::Decompress { .. })
        ));
    }
}

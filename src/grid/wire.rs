//! Just enough of the protobuf wire format to upgrade messages in place without losing
//! anything: walk the top-level fields of a message, find one, drop some, append others.
//!
//! Protobuf merges repeated occurrences of a message field and lets the last occurrence of a
//! scalar win, so appending `field { correlation_id }` to a message that already has `field`
//! sets that one sub-field and keeps everything else, unknown fields included, byte for byte.

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid protobuf at byte {offset}: {what}")]
pub struct WireError {
    pub offset: usize,
    pub what: &'static str,
}

/// One top-level field record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub number: u32,
    pub wire_type: u8,
    /// Offset of the tag; the record is `buf[start..end]`.
    pub start: usize,
    pub end: usize,
    /// For length-delimited fields, the content; for others, the raw value bytes.
    pub value: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(WireError {
            offset: *pos,
            what: "truncated varint",
        })?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(WireError {
        offset: *pos,
        what: "varint longer than 10 bytes",
    })
}

/// Iterates the top-level fields of `buf`, validating the framing as it goes.
pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf, pos: 0 }
}

pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let r = self.read();
        if r.is_err() {
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

impl<'a> Fields<'a> {
    fn read(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.pos;
        let tag = varint(self.buf, &mut self.pos)?;
        let number = (tag >> 3) as u32;
        let wire_type = (tag & 7) as u8;
        if number == 0 || tag >> 3 > 0x1fff_ffff {
            return Err(WireError {
                offset: start,
                what: "invalid field number",
            });
        }
        let vstart = self.pos;
        let (vstart, vend) = match wire_type {
            0 => {
                varint(self.buf, &mut self.pos)?;
                (vstart, self.pos)
            }
            1 => (vstart, vstart + 8),
            5 => (vstart, vstart + 4),
            2 => {
                let len = varint(self.buf, &mut self.pos)?;
                let s = self.pos;
                let e = s
                    .checked_add(usize::try_from(len).unwrap_or(usize::MAX))
                    .ok_or(WireError {
                        offset: s,
                        what: "length overflows",
                    })?;
                (s, e)
            }
            _ => {
                return Err(WireError {
                    offset: start,
                    what: "unsupported wire type (groups are not used by GRID)",
                });
            }
        };
        if vend > self.buf.len() {
            return Err(WireError {
                offset: vstart,
                what: "field runs past the end of the message",
            });
        }
        self.pos = vend;
        Ok(Field {
            number,
            wire_type,
            start,
            end: vend,
            value: &self.buf[vstart..vend],
        })
    }
}

/// Whether length-delimited field `number` occurs at the top level of `buf`.
pub fn has_len_field(buf: &[u8], number: u32) -> Result<bool, WireError> {
    for f in fields(buf) {
        let f = f?;
        if f.number == number && f.wire_type == 2 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The first top-level field's number (the set member of a oneof envelope) and its content.
pub fn first_field(buf: &[u8]) -> Result<Option<Field<'_>>, WireError> {
    fields(buf).next().transpose()
}

/// The member of a oneof that is set, as a decoder sees it: the last of `members` to occur
/// (a different member resets the oneof), and the records of that member since it was last
/// set (which a decoder merges). Fields that are not members leave the oneof alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneofMember<'a> {
    pub number: u32,
    pub records: Vec<&'a [u8]>,
}

impl OneofMember<'_> {
    /// Whether the merged member has length-delimited field `number`.
    pub fn has_len_field(&self, number: u32) -> Result<bool, WireError> {
        for r in &self.records {
            if has_len_field(r, number)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The merged member's bytes (protobuf merges a message by concatenation).
    pub fn merged(&self) -> Vec<u8> {
        self.records.concat()
    }
}

/// See [`OneofMember`]. Members must be length-delimited (message) fields.
pub fn oneof_member<'a>(
    buf: &'a [u8],
    members: &[u32],
) -> Result<Option<OneofMember<'a>>, WireError> {
    let mut current: Option<OneofMember<'a>> = None;
    for f in fields(buf) {
        let f = f?;
        if !members.contains(&f.number) {
            continue;
        }
        if f.wire_type != 2 {
            return Err(WireError {
                offset: f.start,
                what: "a oneof message member with a wire type other than length-delimited",
            });
        }
        match &mut current {
            Some(m) if m.number == f.number => m.records.push(f.value),
            _ => {
                current = Some(OneofMember {
                    number: f.number,
                    records: vec![f.value],
                })
            }
        }
    }
    Ok(current)
}

/// Appends a length-delimited field record.
pub fn put_len_field(out: &mut BytesMut, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.put_slice(value);
}

pub fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// `buf` with every top-level occurrence of the fields in `drop` removed and `append` (already
/// encoded records) added at the end. Fields not named are kept byte for byte.
pub fn rewrite(buf: &[u8], drop: &[u32], append: &[u8]) -> Result<Bytes, WireError> {
    let mut out = BytesMut::with_capacity(buf.len() + append.len());
    for f in fields(buf) {
        let f = f?;
        if !drop.contains(&f.number) {
            out.put_slice(&buf[f.start..f.end]);
        }
    }
    out.put_slice(append);
    Ok(out.freeze())
}

/// `buf` followed by `patch`: the protobuf merge of the two.
pub fn merge(buf: &[u8], patch: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(buf.len() + patch.len());
    out.put_slice(buf);
    out.put_slice(patch);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{aesp, grid};
    use prost::Message;

    #[test]
    fn merge_patch_sets_one_subfield_and_keeps_the_rest() {
        let tr = grid::ToolResult {
            invocation_id: "inv".into(),
            status: grid::ResultStatus::Error as i32,
            error_details: Some(grid::Error {
                code: "TOOL_ERROR".into(),
                message: "boom".into(),
            }),
            ..Default::default()
        };
        let raw = tr.encode_to_vec();
        assert!(has_len_field(&raw, 4).unwrap());
        let patch_body = aesp::EnterpriseError {
            correlation_id: "cid".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut patch = BytesMut::new();
        put_len_field(&mut patch, 4, &patch_body);
        let merged = merge(&raw, &patch);
        let up = aesp::EnterpriseToolResult::decode(merged.clone()).unwrap();
        let e = up.error_details.unwrap();
        assert_eq!(
            (
                e.code.as_str(),
                e.message.as_str(),
                e.correlation_id.as_str()
            ),
            ("TOOL_ERROR", "boom", "cid")
        );
        // A base peer still reads the base fields.
        let base = grid::ToolResult::decode(merged).unwrap();
        assert_eq!(base.error_details.unwrap().code, "TOOL_ERROR");
        assert_eq!(base.invocation_id, "inv");
    }

    #[test]
    fn rewrite_replaces_a_field_and_keeps_unknown_ones() {
        let mut raw = grid::CreateSession {
            suggested_session_id: "s1".into(),
            ttl_seconds: 60,
            security_context: Some(grid::SecurityContext {
                principal_id: "mallory".into(),
                tenant_id: "x".into(),
            }),
        }
        .encode_to_vec();
        // An unknown field 99 (string "keep").
        raw.extend_from_slice(&[0x9a, 0x06, 4, b'k', b'e', b'e', b'p']);
        let mut app = BytesMut::new();
        put_len_field(
            &mut app,
            3,
            &aesp::EnterpriseSecurityContext {
                principal_id: "alice".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let out = rewrite(&raw, &[3], &app).unwrap();
        let cs = aesp::EnterpriseCreateSession::decode(out.clone()).unwrap();
        assert_eq!(cs.security_context.unwrap().principal_id, "alice");
        assert_eq!(cs.ttl_seconds, 60);
        assert!(out.windows(4).any(|w| w == b"keep"));
    }

    #[test]
    fn oneof_member_follows_decoder_semantics() {
        use crate::proto::grid::{FulfillAck, HostMessage, host_message::Kind};
        // fulfill_ack with an error, then announce_ack, then fulfill_ack without: the error is gone.
        let bytes = [
            &[0x1a, 0x02, 0x1a, 0x00][..], // 3 { 3 {} }
            &[0x0a, 0x00],                 // 1 {}
            &[0x1a, 0x00],                 // 3 {}
            &[0x3a, 0x00],                 // 7 {} (not a member)
        ]
        .concat();
        let m = oneof_member(&bytes, &[1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(m.number, 3);
        assert!(!m.has_len_field(3).unwrap());
        let decoded = HostMessage::decode(&bytes[..]).unwrap();
        assert_eq!(decoded.kind, Some(Kind::FulfillAck(FulfillAck::default())));
        // Consecutive records of one member merge.
        let bytes = [&[0x1a, 0x02, 0x1a, 0x00][..], &[0x1a, 0x00]].concat();
        let m = oneof_member(&bytes, &[1, 2, 3, 4]).unwrap().unwrap();
        assert!(m.has_len_field(3).unwrap());
        assert_eq!(m.merged(), vec![0x1a, 0x00]);
        assert!(
            oneof_member(&[0x3a, 0x00], &[1, 2, 3, 4])
                .unwrap()
                .is_none()
        );
        assert!(oneof_member(&[0x08, 0x01], &[1]).is_err());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &[0x0a, 0x05, 1][..],
            &[0xff; 11][..],
            &[0x00][..],
            &[0x0b][..],
            &[0x09, 1, 2][..],
        ] {
            assert!(fields(bad).any(|f| f.is_err()), "{bad:?}");
        }
    }
}

//! JSON lines: one object per record (`"type": "record"`), and each checkpoint
//! (`"type": "checkpoint"`) right after the record it signs. Every record line carries all
//! it needs to be verified on its own (docs/audit-format.md).

use super::record::{hex, unhex};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use serde_json::{Value, json};

pub fn record_line(e: &AuditEvent) -> String {
    json!({
        "type": "record",
        "sequence": e.sequence,
        "timestamp_unix_nanos": e.timestamp_unix_nanos,
        "event_type": e.event_type,
        "decision": e.decision,
        "principal_id": e.principal_id,
        "tenant_id": e.tenant_id,
        "method": e.method,
        "tool_name": e.tool_name,
        "session_id": e.session_id,
        "correlation_id": e.correlation_id,
        "invocation_id": e.invocation_id,
        "reason_code": e.reason_code,
        "matched_policies": e.matched_policies,
        "attributes": e.attributes,
        "prev_hash": hex(&e.prev_hash),
        "hash": hex(&e.hash),
        "signature": hex(&e.signature),
        "key_id": e.key_id,
    })
    .to_string()
}

pub fn checkpoint_line(c: &AuditCheckpoint) -> String {
    json!({
        "type": "checkpoint",
        "sequence": c.sequence,
        "head_hash": hex(&c.head_hash),
        "timestamp_unix_nanos": c.timestamp_unix_nanos,
        "key_id": c.key_id,
        "signature": hex(&c.signature),
    })
    .to_string()
}

/// One parsed line.
pub enum Line {
    Record(Box<AuditEvent>),
    Checkpoint(AuditCheckpoint),
}

/// Parses a line written by [`record_line`] or [`checkpoint_line`].
pub fn parse_line(line: &str) -> Result<Line, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let s = |k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("{k}: expected a string"))
    };
    let n = |k: &str| -> Result<u64, String> {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{k}: expected an unsigned integer"))
    };
    let h = |k: &str| -> Result<Vec<u8>, String> {
        unhex(&s(k)?).ok_or_else(|| format!("{k}: expected hex"))
    };
    match v.get("type").and_then(Value::as_str) {
        Some("record") => Ok(Line::Record(Box::new(AuditEvent {
            sequence: n("sequence")?,
            timestamp_unix_nanos: n("timestamp_unix_nanos")?,
            event_type: s("event_type")?,
            decision: s("decision")?,
            principal_id: s("principal_id")?,
            tenant_id: s("tenant_id")?,
            method: s("method")?,
            tool_name: s("tool_name")?,
            session_id: s("session_id")?,
            correlation_id: s("correlation_id")?,
            invocation_id: s("invocation_id")?,
            reason_code: s("reason_code")?,
            matched_policies: serde_json::from_value(
                v.get("matched_policies").cloned().unwrap_or(Value::Null),
            )
            .map_err(|e| format!("matched_policies: {e}"))?,
            attributes: serde_json::from_value(v.get("attributes").cloned().unwrap_or(Value::Null))
                .map_err(|e| format!("attributes: {e}"))?,
            prev_hash: h("prev_hash")?,
            hash: h("hash")?,
            signature: h("signature")?,
            key_id: s("key_id")?,
        }))),
        Some("checkpoint") => Ok(Line::Checkpoint(AuditCheckpoint {
            sequence: n("sequence")?,
            head_hash: h("head_hash")?,
            timestamp_unix_nanos: n("timestamp_unix_nanos")?,
            key_id: s("key_id")?,
            signature: h("signature")?,
        })),
        _ => Err("type: expected \"record\" or \"checkpoint\"".into()),
    }
}

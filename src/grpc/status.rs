//! gRPC status and the rich error model: how a denial made by the sidecar reaches the peer.
//!
//! Every denial is an [`EnterpriseError`] carried as an `Any` in the `details` of a
//! `google.rpc.Status`, which travels base64-encoded in the `grpc-status-details-bin` trailer
//! next to `grpc-status` and `grpc-message`. Before any response byte was sent the denial is a
//! trailers-only response (the status sits in the response headers); mid-stream it is the
//! trailers that end the stream.

use crate::proto::aesp::EnterpriseError;
use crate::proto::rpc;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use prost::Message;
use std::collections::HashMap;

/// Type URL of the `EnterpriseError` detail.
pub const ENTERPRISE_ERROR_TYPE_URL: &str = "type.googleapis.com/altar.aesp.v1.EnterpriseError";

/// gRPC status codes used by the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// The `EnterpriseError.code` vocabulary of the wire contract, each with its gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AuthenticationRequired,
    InvalidCredentials,
    IdentityMismatch,
    AuthorizationDenied,
    PolicyDenied,
    ToolNotApproved,
    TenantIsolationViolation,
    InvalidArguments,
    BudgetExceeded,
    MethodNotAllowed,
    MalformedMessage,
    AuditUnavailable,
    UpstreamUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::AuthenticationRequired,
        ErrorCode::InvalidCredentials,
        ErrorCode::IdentityMismatch,
        ErrorCode::AuthorizationDenied,
        ErrorCode::PolicyDenied,
        ErrorCode::ToolNotApproved,
        ErrorCode::TenantIsolationViolation,
        ErrorCode::InvalidArguments,
        ErrorCode::BudgetExceeded,
        ErrorCode::MethodNotAllowed,
        ErrorCode::MalformedMessage,
        ErrorCode::AuditUnavailable,
        ErrorCode::UpstreamUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthenticationRequired => "AUTHENTICATION_REQUIRED",
            ErrorCode::InvalidCredentials => "INVALID_CREDENTIALS",
            ErrorCode::IdentityMismatch => "IDENTITY_MISMATCH",
            ErrorCode::AuthorizationDenied => "AUTHORIZATION_DENIED",
            ErrorCode::PolicyDenied => "POLICY_DENIED",
            ErrorCode::ToolNotApproved => "TOOL_NOT_APPROVED",
            ErrorCode::TenantIsolationViolation => "TENANT_ISOLATION_VIOLATION",
            ErrorCode::InvalidArguments => "INVALID_ARGUMENTS",
            ErrorCode::BudgetExceeded => "BUDGET_EXCEEDED",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::MalformedMessage => "MALFORMED_MESSAGE",
            ErrorCode::AuditUnavailable => "AUDIT_UNAVAILABLE",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
        }
    }

    pub fn grpc(self) -> GrpcCode {
        match self {
            ErrorCode::AuthenticationRequired | ErrorCode::InvalidCredentials => {
                GrpcCode::Unauthenticated
            }
            ErrorCode::IdentityMismatch
            | ErrorCode::AuthorizationDenied
            | ErrorCode::PolicyDenied
            | ErrorCode::ToolNotApproved
            | ErrorCode::TenantIsolationViolation => GrpcCode::PermissionDenied,
            ErrorCode::InvalidArguments | ErrorCode::MalformedMessage => GrpcCode::InvalidArgument,
            ErrorCode::BudgetExceeded => GrpcCode::ResourceExhausted,
            ErrorCode::MethodNotAllowed => GrpcCode::Unimplemented,
            ErrorCode::AuditUnavailable | ErrorCode::UpstreamUnavailable => GrpcCode::Unavailable,
        }
    }

    /// What a caller can do about it, when the rule that decided has no text of its own.
    fn default_remediation(self) -> &'static str {
        match self {
            ErrorCode::AuthenticationRequired => {
                "Present a client certificate with a SPIFFE ID or a mapped subject, and a token where one is required."
            }
            ErrorCode::InvalidCredentials => "Obtain a fresh, valid credential and retry.",
            ErrorCode::IdentityMismatch => {
                "Leave principal_id and tenant_id empty or set them to the identity of your certificate; the sidecar fills them in."
            }
            ErrorCode::AuthorizationDenied => {
                "Ask an administrator for a role that grants this permission."
            }
            ErrorCode::PolicyDenied => "Review the policy named in details and adjust the call.",
            ErrorCode::ToolNotApproved => {
                "Submit the tool contract for approval through the governance service."
            }
            ErrorCode::TenantIsolationViolation => {
                "Use sessions, runtimes and tools of your own tenant."
            }
            ErrorCode::InvalidArguments => "Fix the argument at the schema path given in details.",
            ErrorCode::BudgetExceeded => "Wait for the budget window to reset or raise the budget.",
            ErrorCode::MethodNotAllowed => {
                "Call a GRID method, or ask the operator to list this method under passthrough."
            }
            ErrorCode::MalformedMessage => {
                "Send well-formed gRPC frames and protobuf messages within the size limit."
            }
            ErrorCode::AuditUnavailable => {
                "Retry later; the operator must restore the audit store."
            }
            ErrorCode::UpstreamUnavailable => "Retry later; the operator must check the GRID host.",
        }
    }

    fn default_security_implication(self) -> &'static str {
        match self {
            ErrorCode::IdentityMismatch => {
                "A message claimed an identity other than the verified one (possible impersonation)."
            }
            ErrorCode::TenantIsolationViolation => "Cross-tenant access was attempted.",
            ErrorCode::MalformedMessage => {
                "Malformed input was refused before it reached the host."
            }
            ErrorCode::AuthenticationRequired | ErrorCode::InvalidCredentials => {
                "The caller could not be authenticated."
            }
            _ => "",
        }
    }
}

/// A refusal decided by the sidecar: everything needed to answer the peer and audit it.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub code: ErrorCode,
    pub message: String,
    /// Which rule decided: policy id, missing permission, schema path, ...
    pub details: HashMap<String, String>,
    pub compliance_impact: String,
    pub security_implication: String,
    pub remediation_steps: String,
}

impl Denial {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Denial {
            code,
            message: message.into(),
            details: HashMap::new(),
            compliance_impact: String::new(),
            security_implication: code.default_security_implication().to_string(),
            remediation_steps: code.default_remediation().to_string(),
        }
    }

    /// `MALFORMED_MESSAGE`: a frame, an encoding or a protobuf the sidecar cannot read.
    pub fn malformed(e: impl std::fmt::Display) -> Self {
        Denial::new(
            ErrorCode::MalformedMessage,
            format!("malformed gRPC message: {e}"),
        )
    }

    pub fn detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }

    pub fn to_enterprise_error(&self, correlation_id: &str) -> EnterpriseError {
        EnterpriseError {
            code: self.code.as_str().to_string(),
            message: self.message.clone(),
            details: self.details.clone(),
            correlation_id: correlation_id.to_string(),
            compliance_impact: self.compliance_impact.clone(),
            security_implication: self.security_implication.clone(),
            remediation_steps: self.remediation_steps.clone(),
        }
    }

    /// The `grpc-status`, `grpc-message` and `grpc-status-details-bin` entries of this denial.
    pub fn status_headers(&self, correlation_id: &str) -> HeaderMap {
        let ee = self.to_enterprise_error(correlation_id);
        let status = rpc::Status {
            code: self.code.grpc() as i32,
            message: self.message.clone(),
            details: vec![prost_types::Any {
                type_url: ENTERPRISE_ERROR_TYPE_URL.to_string(),
                value: ee.encode_to_vec(),
            }],
        };
        let mut h = HeaderMap::with_capacity(4);
        h.insert("grpc-status", HeaderValue::from(self.code.grpc() as i32));
        h.insert("grpc-message", encode_grpc_message(&self.message));
        let details =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.encode_to_vec());
        if let Ok(v) = HeaderValue::from_str(&details) {
            h.insert("grpc-status-details-bin", v);
        }
        h
    }
}

/// The canonical name of a gRPC status code.
fn grpc_code_name(code: i32) -> &'static str {
    match code {
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// A non-OK `grpc-status` of the host without a `grpc-status-details-bin` gets one: a
/// `google.rpc.Status` with an `EnterpriseError` (code = the status's name, the host's
/// message, `details.origin = grid-host`, `details.grpc_status`, the call's correlation id),
/// so every error a client sees carries the rich model. Headers already carrying details
/// (the host's own) are left alone.
pub fn add_host_status_details(h: &mut HeaderMap, correlation_id: &str) {
    let Some(code) = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    if code == 0 || h.contains_key("grpc-status-details-bin") {
        return;
    }
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let mut details = HashMap::with_capacity(2);
    details.insert("origin".to_string(), "grid-host".to_string());
    details.insert("grpc_status".to_string(), code.to_string());
    let ee = EnterpriseError {
        code: grpc_code_name(code).to_string(),
        message: message.clone(),
        details,
        correlation_id: correlation_id.to_string(),
        ..Default::default()
    };
    let status = rpc::Status {
        code,
        message,
        details: vec![prost_types::Any {
            type_url: ENTERPRISE_ERROR_TYPE_URL.to_string(),
            value: ee.encode_to_vec(),
        }],
    };
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.encode_to_vec());
    if let Ok(v) = HeaderValue::from_str(&b64) {
        h.insert("grpc-status-details-bin", v);
    }
}

/// Characters of `grpc-message` that must be percent-encoded (the gRPC spec allows printable
/// ASCII except `%`; everything else, non-ASCII included, is encoded).
const GRPC_MESSAGE_SET: &AsciiSet = &CONTROLS.add(b'%');

pub fn encode_grpc_message(msg: &str) -> HeaderValue {
    let enc = utf8_percent_encode(msg, GRPC_MESSAGE_SET).to_string();
    HeaderValue::from_str(&enc).unwrap_or_else(|_| HeaderValue::from_static("denied"))
}

/// Decodes the `EnterpriseError` from a `grpc-status-details-bin` value, if it carries one.
pub fn decode_enterprise_error(details_bin: &[u8]) -> Option<EnterpriseError> {
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(
            details_bin
                .strip_suffix(b"==")
                .or(details_bin.strip_suffix(b"="))
                .unwrap_or(details_bin),
        )
        .ok()?;
    let status = rpc::Status::decode(Bytes::from(raw)).ok()?;
    status
        .details
        .iter()
        .find(|a| a.type_url == ENTERPRISE_ERROR_TYPE_URL)
        .and_then(|a| EnterpriseError::decode(&a.value[..]).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_headers_round_trip() {
        let d = Denial::new(
            ErrorCode::MethodNotAllowed,
            "method /x/Y is not allowed 100%",
        )
        .detail("method", "/x/Y");
        let h = d.status_headers("cid-1");
        assert_eq!(h["grpc-status"], "12");
        assert_eq!(h["grpc-message"], "method /x/Y is not allowed 100%25");
        let ee = decode_enterprise_error(h["grpc-status-details-bin"].as_bytes()).unwrap();
        assert_eq!(ee.code, "METHOD_NOT_ALLOWED");
        assert_eq!(ee.correlation_id, "cid-1");
        assert_eq!(ee.details["method"], "/x/Y");
        assert!(!ee.remediation_steps.is_empty());
    }

    #[test]
    fn every_code_maps_as_the_contract_says() {
        let table = [
            ("AUTHENTICATION_REQUIRED", 16),
            ("INVALID_CREDENTIALS", 16),
            ("IDENTITY_MISMATCH", 7),
            ("AUTHORIZATION_DENIED", 7),
            ("POLICY_DENIED", 7),
            ("TOOL_NOT_APPROVED", 7),
            ("TENANT_ISOLATION_VIOLATION", 7),
            ("INVALID_ARGUMENTS", 3),
            ("BUDGET_EXCEEDED", 8),
            ("METHOD_NOT_ALLOWED", 12),
            ("MALFORMED_MESSAGE", 3),
            ("AUDIT_UNAVAILABLE", 14),
            ("UPSTREAM_UNAVAILABLE", 14),
        ];
        for (code, (name, grpc)) in ErrorCode::ALL.iter().zip(table) {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.grpc() as i32, grpc, "{name}");
        }
    }

    #[test]
    fn non_ascii_message_is_percent_encoded() {
        assert_eq!(encode_grpc_message("é\n"), "%C3%A9%0A");
    }
}

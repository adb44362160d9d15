//! The one place a decision is recorded: logged, counted, and written to the audit trail.
//! Every allow and every refusal of the data plane comes here, whichever part of the proxy
//! made it.
//!
//! [`Recorder::record`] queues the audit record without waiting (refusals mid-stream, the
//! management API's own refusals); [`Recorder::durable`] waits, in audit mode `sync`, until
//! the record is durable: the proxy calls it before a call is forwarded or answered, and an
//! `Err` refuses the call with `AUDIT_UNAVAILABLE` (fail closed).

use super::{Decision, Stage};
use crate::audit::{Audit, AuditError};
use crate::grid::{GridMethod, Route};
use crate::grpc::Denial;
use crate::metrics::{self, Metrics};
use crate::proto::aesp::AuditEvent;
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Recorder {
    metrics: Arc<Metrics>,
    audit: Option<Audit>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>, audit: Option<Audit>) -> Recorder {
        Recorder { metrics, audit }
    }

    pub fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()
    }

    /// Logs and counts `d`, and queues its audit record.
    pub fn record<'d>(&self, d: impl Into<Decision<'d>>) {
        let d = d.into();
        self.local(d);
        if let Some(a) = &self.audit {
            a.log(audit_event(d));
        }
    }

    /// Logs and counts `d`, and writes its audit record: in mode `sync` it returns once the
    /// record is durable. `Err`: it could not be written; the call must be refused.
    pub async fn durable<'d>(&self, d: impl Into<Decision<'d>>) -> Result<(), AuditError> {
        let d = d.into();
        self.local(d);
        match &self.audit {
            Some(a) => a.commit(audit_event(d)).await,
            None => Ok(()),
        }
    }

    /// Logs and counts `d` only (its audit record is kept by the writer already).
    pub fn local(&self, d: Decision<'_>) {
        let (facts, denial) = match d {
            Decision::Allow(f) => (f, None),
            Decision::Deny(f, den) => (f, Some(den)),
        };
        let principal = facts.principal_id.as_ref().map_or("", |p| p.as_str());
        let tenant = facts.tenant_id.as_ref().map_or("", |t| t.as_str());
        let tool = facts.tool_name.as_deref().unwrap_or("");
        let kind = facts.peer_kind.as_ref().map_or("", |k| k.as_str());
        match denial {
            None => tracing::debug!(
                method = %facts.method, principal, tenant, kind, tool,
                correlation_id = %facts.correlation_id, matched = ?facts.matched_policies,
                overwrote_identity = facts.overwrote_identity, "allow"
            ),
            Some(den) => tracing::info!(
                method = %facts.method, principal, tenant, kind, tool,
                correlation_id = %facts.correlation_id, stage = ?facts.stage,
                matched = ?facts.matched_policies,
                code = den.code.as_str(), reason = %den.message, "deny"
            ),
        }
        // Each call is counted once: a refusal on the way back, or of a later message of an
        // allowed stream, is not a second decision about it; an allowed `Connect` counts
        // when its announcement is decided.
        let slot = match (facts.stage, facts.route, denial) {
            (Stage::Response | Stage::Message, _, _) => None,
            (Stage::Call, Route::Grid(GridMethod::Connect), None) => None,
            (Stage::Call | Stage::Announce, _, _) => Some(slot(facts.route)),
        };
        self.metrics.record(slot, denial.map(|d| d.code));
        if !facts.dry_run_denied.is_empty() {
            tracing::info!(
                method = %facts.method, principal, tenant, tool,
                correlation_id = %facts.correlation_id, policies = ?facts.dry_run_denied,
                "dry-run policy would deny (not enforced)"
            );
            self.metrics
                .policy_dry_run_denials
                .inc_by(facts.dry_run_denied.len() as u64);
        }
    }

    /// Queues a record that is not a decision (a session created, a runtime gone, a change
    /// made through the management API, ...).
    pub fn event(&self, e: AuditEvent) {
        if let Some(a) = &self.audit {
            a.log(e);
        }
    }
}

/// The audit event type of a decision.
fn event_type(stage: Stage, route: Route, allowed: bool) -> &'static str {
    match (stage, route) {
        (Stage::Response, _) => "RESPONSE_REFUSED",
        (Stage::Announce | Stage::Message, _) if allowed => "RUNTIME_ANNOUNCE",
        (Stage::Announce | Stage::Message, _) => "RUNTIME_MESSAGE",
        (Stage::Call, Route::Grid(m)) => match m {
            GridMethod::CreateSession => "SESSION_CREATE",
            GridMethod::DestroySession => "SESSION_DESTROY",
            GridMethod::ExecuteTool | GridMethod::ExecuteToolStream => "TOOL_INVOCATION",
            GridMethod::Connect => "RUNTIME_CONNECT",
        },
        (Stage::Call, Route::Passthrough) => "PASSTHROUGH_CALL",
        (Stage::Call, Route::Management) => "MANAGEMENT_CALL",
        (Stage::Call, Route::Unknown) => "CALL",
    }
}

/// The audit record of a decision: what the pipeline saw, and the refusal's code, message
/// and details. Never a credential: facts hold identities, not tokens.
fn audit_event(d: Decision<'_>) -> AuditEvent {
    let (facts, denial): (_, Option<&Denial>) = match d {
        Decision::Allow(f) => (f, None),
        Decision::Deny(f, den) => (f, Some(den)),
    };
    let mut e = crate::audit::event(
        event_type(facts.stage, facts.route, denial.is_none()),
        if denial.is_some() { "DENY" } else { "ALLOW" },
    );
    e.principal_id = facts
        .principal_id
        .as_ref()
        .map_or_else(String::new, |p| p.to_string());
    e.tenant_id = facts
        .tenant_id
        .as_ref()
        .map_or_else(String::new, |t| t.to_string());
    e.method.clone_from(&facts.method);
    e.tool_name = facts.tool_name.clone().unwrap_or_default();
    e.session_id = facts.session_id.clone().unwrap_or_default();
    e.correlation_id.clone_from(&facts.correlation_id);
    e.matched_policies.clone_from(&facts.matched_policies);
    let a = &mut e.attributes;
    if let Some(k) = &facts.peer_kind {
        a.insert("peer_kind".into(), k.as_str().to_string());
    }
    if let Some(w) = &facts.workload {
        a.insert("workload".into(), w.to_string());
    }
    if facts.overwrote_identity {
        a.insert("overwrote_identity".into(), "true".into());
    }
    if !facts.dry_run_denied.is_empty() {
        a.insert("dry_run_would_deny".into(), facts.dry_run_denied.join(","));
    }
    if let Some(c) = &facts.contract {
        a.insert("tool_revision".into(), c.revision.to_string());
        a.insert("risk_assessment".into(), c.risk_assessment.clone());
        if !c.compliance_tags.is_empty() {
            a.insert("compliance_tags".into(), c.compliance_tags.join(","));
        }
    }
    if let Some(den) = denial {
        e.reason_code = den.code.as_str().to_string();
        a.insert("reason".into(), den.message.clone());
        for (k, v) in &den.details {
            a.insert(format!("detail.{k}"), v.clone());
        }
    }
    e
}

fn slot(route: Route) -> usize {
    match route {
        Route::Grid(m) => m.index(),
        Route::Passthrough => metrics::PASSTHROUGH,
        Route::Unknown | Route::Management => metrics::OTHER,
    }
}

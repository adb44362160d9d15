//! The one place a decision is recorded: logged, counted, and (with the audit release)
//! written to the audit trail. Every allow and every refusal of the data plane comes here,
//! whichever part of the proxy made it.

use super::{Decision, Stage};
use crate::grid::Route;
use crate::metrics::{self, Metrics};
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Recorder {
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Recorder {
        Recorder { metrics }
    }

    pub fn record<'d>(&self, d: impl Into<Decision<'d>>) {
        let d = d.into();
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
        // A refusal on the way back is not a second decision about the call.
        let slot = match facts.stage {
            Stage::Response => None,
            Stage::Call | Stage::Message => Some(slot(facts.route)),
        };
        self.metrics.record(slot, denial.map(|d| d.code));
    }
}

fn slot(route: Route) -> usize {
    match route {
        Route::Grid(m) => m.index(),
        Route::Passthrough => metrics::PASSTHROUGH,
        Route::Unknown | Route::Management => metrics::OTHER,
    }
}

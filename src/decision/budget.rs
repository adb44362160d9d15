//! The budget stage of a tool invocation (docs/cost.md), the last check: the call's cost
//! (one invocation and the tool's cost units) is reserved in the caller's principal and
//! tenant accounts, atomically against both budgets, before anything reaches the host. The
//! reservation travels with the allowed call (`Facts::reservation`) and is settled when the
//! call ends (`proxy/hooks.rs`, `Outcome`); dropped unsettled (a refusal after this stage,
//! a host that cannot be reached), it is released.
//!
//! A call that would exceed a budget is `BUDGET_EXCEEDED` (`RESOURCE_EXHAUSTED`) with, in
//! `details`: `budget` (`tenant` or `principal`), `tenant`, `principal`, `limit` (the one
//! broken: `max_invocations` or `max_cost_units`), both limits, what is used and remains of
//! each, `call_cost_units`, `window_seconds`, `window_started_at`, `window_resets_at` (Unix
//! seconds and RFC 3339) and `retry_after_seconds`.

use crate::cost::{Exceeded, Meter, Reservation};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::{PrincipalId, TenantId};
use crate::proto::aesp::EnterpriseToolContract;
use std::sync::Arc;

/// Reserves the call's cost, or refuses it. `None` without a meter.
pub(crate) fn reserve(
    meter: Option<&Meter>,
    tenant: &TenantId,
    principal: &PrincipalId,
    tool: &str,
    contract: Option<&EnterpriseToolContract>,
    now: u64,
) -> Result<Option<Arc<Reservation>>, Denial> {
    let Some(m) = meter else { return Ok(None) };
    m.reserve(tenant, principal, tool, now)
        .map(|r| Some(Arc::new(r)))
        .map_err(|e| exceeded(&e, tool, contract, now))
}

fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(String::new, |d| {
            d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
}

/// The refusal of a call that would exceed `e`'s budget.
pub(crate) fn exceeded(
    e: &Exceeded,
    tool: &str,
    contract: Option<&EnterpriseToolContract>,
    now: u64,
) -> Denial {
    let whose = match &e.principal {
        Some(p) => format!("principal {p} of tenant {}", e.tenant),
        None => format!("tenant {}", e.tenant),
    };
    let (used, max) = match e.limit {
        crate::cost::Limit::Invocations => (e.used_invocations, e.limits.max_invocations),
        crate::cost::Limit::CostUnits => (e.used_cost_units, e.limits.max_cost_units),
    };
    let resets = rfc3339(e.window_resets_at);
    let left = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    let mut d = Denial::new(
        ErrorCode::BudgetExceeded,
        format!(
            "the budget of {whose} is spent: {} {used} of {max} used in the window of {} s (this call of {tool} costs {} unit(s)); it resets at {resets}",
            e.limit.as_str(),
            e.limits.window_seconds,
            e.call_cost_units,
        ),
    )
    .detail(
        "budget",
        if e.principal.is_some() {
            "principal"
        } else {
            "tenant"
        },
    )
    .detail("tenant", e.tenant.as_str())
    .detail(
        "principal",
        e.principal.as_ref().map_or("", |p| p.as_str()),
    )
    .detail("tool", tool)
    .detail("limit", e.limit.as_str())
    .detail("max_invocations", e.limits.max_invocations.to_string())
    .detail("max_cost_units", e.limits.max_cost_units.to_string())
    .detail("used_invocations", e.used_invocations.to_string())
    .detail("used_cost_units", e.used_cost_units.to_string())
    .detail("remaining_invocations", left(e.remaining_invocations()))
    .detail("remaining_cost_units", left(e.remaining_cost_units()))
    .detail("call_cost_units", e.call_cost_units.to_string())
    .detail("window_seconds", e.limits.window_seconds.to_string())
    .detail("window_started_at", e.window_started_at.to_string())
    .detail("window_resets_at", e.window_resets_at.to_string())
    .detail("window_resets_at_rfc3339", resets.clone())
    .detail(
        "retry_after_seconds",
        e.window_resets_at.saturating_sub(now).to_string(),
    );
    if let Some(c) = contract {
        d = d
            .detail("tool_revision", c.revision.to_string())
            .detail("risk_assessment", c.risk_assessment.clone())
            .detail("compliance_tags", c.compliance_tags.join(","));
    }
    d.remediation_steps = format!(
        "Retry after {resets}, when the window resets, or ask an administrator of tenant {} (aesp.cost.admin) to raise the budget (aesp cost set-budget).",
        e.tenant
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostConfig, Limits};

    #[test]
    fn an_exceeded_budget_is_refused_with_what_remains_and_when_it_resets() {
        let tenant = TenantId::new("acme").unwrap();
        let alice = PrincipalId::new("alice").unwrap();
        let cfg = CostConfig {
            budgets: vec![(
                tenant.clone(),
                None,
                Limits {
                    max_invocations: 1,
                    max_cost_units: 0,
                    window_seconds: 3600,
                },
            )],
            ..Default::default()
        };
        let m = Meter::new(cfg, crate::metrics::CostMetrics::unregistered().unwrap());
        let now = 1_736_159_400; // 2025-01-06T10:30:00Z
        assert!(
            reserve(None, &tenant, &alice, "echo", None, now)
                .unwrap()
                .is_none()
        );
        let held = reserve(Some(&m), &tenant, &alice, "echo", None, now).unwrap();
        assert!(held.is_some());
        let c = EnterpriseToolContract {
            revision: 3,
            risk_assessment: "LOW".into(),
            ..Default::default()
        };
        let d = reserve(Some(&m), &tenant, &alice, "echo", Some(&c), now).unwrap_err();
        assert_eq!(d.code, ErrorCode::BudgetExceeded);
        let get = |k: &str| d.details.get(k).map(String::as_str);
        assert_eq!(get("budget"), Some("tenant"));
        assert_eq!(get("limit"), Some("max_invocations"));
        assert_eq!(get("remaining_invocations"), Some("0"));
        assert_eq!(get("remaining_cost_units"), Some("unlimited"));
        assert_eq!(get("window_resets_at"), Some("1736161200"));
        assert_eq!(
            get("window_resets_at_rfc3339"),
            Some("2025-01-06T11:00:00Z")
        );
        assert_eq!(get("retry_after_seconds"), Some("1800"));
        assert_eq!(get("tool_revision"), Some("3"));
        assert!(
            d.remediation_steps.contains("2025-01-06T11:00:00Z"),
            "{}",
            d.remediation_steps
        );
        // Releasing the held call frees the budget.
        drop(held);
        assert!(reserve(Some(&m), &tenant, &alice, "echo", None, now).is_ok());
    }
}

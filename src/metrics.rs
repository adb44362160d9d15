//! Prometheus metrics. Every series the hot path touches is resolved once at start, so
//! recording is an atomic increment, never a label lookup.

use crate::grid::GridMethod;
use crate::grpc::ErrorCode;
use prometheus::{
    CounterVec, Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// `[method][0 = allow, 1 = deny]`; index 5 = pass-through, 6 = other.
    calls: Vec<[IntCounter; 2]>,
    denials: Vec<IntCounter>,
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub tls_handshake_failures: IntCounter,
    pub connections_refused: IntCounter,
    pub buffered_bytes: IntGauge,
    pub config_reload_failures: IntCounter,
    pub audit_records: IntCounter,
    pub policy_dry_run_denials: IntCounter,
    pub audit_write_failures: IntCounter,
    pub upstream_errors: IntCounter,
    /// Connections closed because their calls kept coming at over twice the request rate.
    pub rate_limit_closes: IntCounter,
    /// Fetches of an issuer's keys over HTTPS, by issuer and outcome (`ok`, `error`).
    pub jwks_fetches: IntCounterVec,
    /// Keys in force per issuer fetched over HTTPS (0 until a first fetch succeeds).
    pub jwks_keys: IntGaugeVec,
    /// Metering of tool calls by tenant and tool (docs/cost.md).
    pub cost: CostMetrics,
}

/// The metering series (docs/cost.md), by tenant and tool, never by principal (per-principal
/// figures are in `EnterpriseCostService.GetUsage`). The cost module resolves a series once
/// per (tenant, tool) and keeps it, so a call's metering is atomic increments.
#[derive(Clone, Debug)]
pub struct CostMetrics {
    /// `aesp_tool_invocations_total{tenant,tool,outcome}`: `charged` or `released`.
    pub invocations: IntCounterVec,
    /// `aesp_cost_units_total{tenant,tool}`: cost units charged.
    pub cost_units: IntCounterVec,
    /// `aesp_tool_request_bytes_total{tenant,tool}` of charged calls.
    pub request_bytes: IntCounterVec,
    /// `aesp_tool_response_bytes_total{tenant,tool}` of charged calls.
    pub response_bytes: IntCounterVec,
    /// `aesp_tool_duration_seconds_total{tenant,tool}` of charged calls.
    pub duration_seconds: CounterVec,
    /// `aesp_budget_exceeded_total{tenant,scope}`: `tenant` or `principal` budget.
    pub budget_exceeded: IntCounterVec,
    /// `aesp_cost_persist_failures_total`: usage that could not be written to the control
    /// store (kept in memory and retried at the next interval).
    pub persist_failures: IntCounter,
}

impl CostMetrics {
    /// The series, not registered anywhere (unit tests, benches).
    pub fn unregistered() -> Result<CostMetrics, prometheus::Error> {
        let tt = &["tenant", "tool"];
        Ok(CostMetrics {
            invocations: IntCounterVec::new(
                Opts::new(
                    "aesp_tool_invocations_total",
                    "Tool calls that passed the budget stage, by tenant, tool and what became of their reservation: charged (the host answered) or released (refused later, or the host failed)",
                ),
                &["tenant", "tool", "outcome"],
            )?,
            cost_units: IntCounterVec::new(
                Opts::new(
                    "aesp_cost_units_total",
                    "Cost units charged (cost.tools, else cost.default_units per call)",
                ),
                tt,
            )?,
            request_bytes: IntCounterVec::new(
                Opts::new(
                    "aesp_tool_request_bytes_total",
                    "Request bytes of charged tool calls",
                ),
                tt,
            )?,
            response_bytes: IntCounterVec::new(
                Opts::new(
                    "aesp_tool_response_bytes_total",
                    "Response bytes of charged tool calls",
                ),
                tt,
            )?,
            duration_seconds: CounterVec::new(
                Opts::new(
                    "aesp_tool_duration_seconds_total",
                    "Time from forwarding to the end of the response, of charged tool calls",
                ),
                tt,
            )?,
            budget_exceeded: IntCounterVec::new(
                Opts::new(
                    "aesp_budget_exceeded_total",
                    "Tool calls refused with BUDGET_EXCEEDED, by tenant and by the budget (tenant or principal) they would have exceeded",
                ),
                &["tenant", "scope"],
            )?,
            persist_failures: IntCounter::new(
                "aesp_cost_persist_failures_total",
                "Writes of metered usage to the control store that failed (retried at the next interval)",
            )?,
        })
    }

    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.invocations.clone()))?;
        registry.register(Box::new(self.cost_units.clone()))?;
        registry.register(Box::new(self.request_bytes.clone()))?;
        registry.register(Box::new(self.response_bytes.clone()))?;
        registry.register(Box::new(self.duration_seconds.clone()))?;
        registry.register(Box::new(self.budget_exceeded.clone()))?;
        registry.register(Box::new(self.persist_failures.clone()))?;
        Ok(())
    }
}

pub const PASSTHROUGH: usize = 5;
pub const OTHER: usize = 6;

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let calls_vec = IntCounterVec::new(
            Opts::new(
                "aesp_calls_total",
                "Decisions of the sidecar, by method and outcome (a call, or a runtime announcement on Connect)",
            ),
            &["method", "outcome"],
        )?;
        let denials_vec = IntCounterVec::new(
            Opts::new(
                "aesp_denials_total",
                "Calls and messages refused, by EnterpriseError code",
            ),
            &["code"],
        )?;
        let connections_total =
            IntCounter::new("aesp_connections_total", "Accepted TLS connections")?;
        let connections_active =
            IntGauge::new("aesp_connections_active", "Open data-plane connections")?;
        let tls_handshake_failures = IntCounter::new(
            "aesp_tls_handshake_failures_total",
            "TLS handshakes refused or failed",
        )?;
        let connections_refused = IntCounter::new(
            "aesp_connections_refused_total",
            "Connections closed at once because limits.max_handshakes or limits.max_connections was reached",
        )?;
        let upstream_errors = IntCounter::new(
            "aesp_upstream_errors_total",
            "Calls the GRID host could not serve",
        )?;
        registry.register(Box::new(calls_vec.clone()))?;
        registry.register(Box::new(denials_vec.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        let rate_limit_closes = IntCounter::new(
            "aesp_rate_limit_closes_total",
            "Connections closed (GOAWAY) because their calls kept coming at over twice limits.max_requests_per_second_per_connection",
        )?;
        registry.register(Box::new(rate_limit_closes.clone()))?;
        let buffered_bytes = IntGauge::new(
            "aesp_buffered_bytes",
            "Bytes reserved for messages being assembled for inspection (bounded by limits.max_buffered_bytes)",
        )?;
        registry.register(Box::new(buffered_bytes.clone()))?;
        let config_reload_failures = IntCounter::new(
            "aesp_config_reload_failures_total",
            "Reloads of a changed file (rbac.file, policies, tls.cert/key/client_ca) refused; the previous state stayed in force",
        )?;
        registry.register(Box::new(config_reload_failures.clone()))?;
        let audit_records = IntCounter::new(
            "aesp_audit_records_total",
            "Audit records committed durably to audit.redb",
        )?;
        registry.register(Box::new(audit_records.clone()))?;
        let policy_dry_run_denials = IntCounter::new(
            "aesp_policy_dry_run_denials_total",
            "Would-be denials of policies in dry_run mode (recorded, not enforced)",
        )?;
        registry.register(Box::new(policy_dry_run_denials.clone()))?;
        let audit_write_failures = IntCounter::new(
            "aesp_audit_write_failures_total",
            "Audit commits that failed (traffic is refused with AUDIT_UNAVAILABLE until a write succeeds)",
        )?;
        registry.register(Box::new(audit_write_failures.clone()))?;
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "aesp_jwks_fetches_total",
                "Fetches of a token issuer's keys over HTTPS (discovery document and JWK set), by outcome; after an error the keys in force stay",
            ),
            &["issuer", "outcome"],
        )?;
        registry.register(Box::new(jwks_fetches.clone()))?;
        let jwks_keys = IntGaugeVec::new(
            Opts::new(
                "aesp_jwks_keys",
                "Keys in force of a token issuer whose keys are fetched over HTTPS",
            ),
            &["issuer"],
        )?;
        registry.register(Box::new(jwks_keys.clone()))?;
        let cost = CostMetrics::unregistered()?;
        cost.register(&registry)?;
        let names: Vec<&str> = GridMethod::ALL
            .iter()
            .map(|m| m.path())
            .chain(["passthrough", "other"])
            .collect();
        let calls = names
            .iter()
            .map(|n| {
                [
                    calls_vec.with_label_values(&[n, "allow"]),
                    calls_vec.with_label_values(&[n, "deny"]),
                ]
            })
            .collect();
        let denials = ErrorCode::ALL
            .iter()
            .map(|c| denials_vec.with_label_values(&[c.as_str()]))
            .collect();
        Ok(Metrics {
            registry,
            calls,
            denials,
            connections_total,
            connections_active,
            tls_handshake_failures,
            connections_refused,
            buffered_bytes,
            config_reload_failures,
            audit_records,
            policy_dry_run_denials,
            audit_write_failures,
            upstream_errors,
            rate_limit_closes,
            jwks_fetches,
            jwks_keys,
            cost,
        })
    }

    /// Records one decision about a call or message of `slot` (a [`GridMethod`] index,
    /// [`PASSTHROUGH`] or [`OTHER`]), or, with `slot` `None`, a refusal on the way back of a
    /// call already counted.
    pub fn record(&self, slot: Option<usize>, denial: Option<ErrorCode>) {
        if let Some(slot) = slot {
            self.calls[slot.min(OTHER)][usize::from(denial.is_some())].inc();
        }
        if let Some(code) = denial
            && let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code)
        {
            self.denials[i].inc();
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

//! Prometheus metrics. Every series the hot path touches is resolved once at start, so
//! recording is an atomic increment, never a label lookup.

use crate::grid::GridMethod;
use crate::grpc::ErrorCode;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
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

//! What the CEL policy engine costs per tool invocation: ten policies evaluated for one call
//! (median and p99 of single evaluations), beside baselines measured in the same run: the
//! engine with no policy (the per-call scope and variables alone), the RBAC checks of a tool
//! call, and building a fresh CEL standard-library context (what a per-call
//! `Context::default()` would cost); and, for scale, loading the shipped set. Nothing is asserted; `cargo bench --bench policy` prints
//! the figures. Run without `--bench` (as `cargo test --benches` does) it is a short smoke run
//! whose numbers mean nothing.

use aesp_sidecar::authz::rbac::{Rbac, Subject};
use aesp_sidecar::ids::{PeerKind, PrincipalId, TenantId};
use aesp_sidecar::policy::{self, Input, PolicySet, RequestInfo, Verdict};
use aesp_sidecar::proto::aesp::{
    EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
};
use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

/// The secrets check in plain CEL (a comprehension over the top-level arguments), for
/// comparison with `anyStringMatches` (p05).
const SECRETS_PLAIN_CEL: &str = r#"
policies:
  - id: p05-secrets-plain-cel
    effect: DENY
    condition: >-
      args.exists(k, type(args[k]) == string &&
        args[k].matches('AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[A-Za-z0-9]{36}|(?i)(password|secret|api[_-]?key)\\s*[:=]\\s*\\S+'))
"#;

/// Ten enforced policies that all apply to the benchmarked call (every tool, every tenant),
/// each reading a different part of the context: the worst case of a set of ten.
const ALL_APPLY: &str = r#"
policies:
  - id: p01-high-risk-prod-only
    effect: DENY
    condition: tool.risk_assessment == 'HIGH' && runtime.deployment_environment != 'PROD'
  - id: p02-pci-zone
    effect: DENY
    condition: "'PCI' in tool.compliance_tags && runtime.security_zone != 'pci-zone'"
  - id: p03-hipaa-clearance
    effect: DENY
    condition: "'HIPAA' in tool.compliance_tags && !(principal.security_clearance in ['CONFIDENTIAL', 'RESTRICTED'])"
  - id: p04-amount-limit
    effect: DENY
    condition: has(args.amount) && args.amount > 500 && !('billing-supervisor' in principal.roles)
  - id: p05-secrets
    effect: DENY
    condition: >-
      args.anyStringMatches('AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[A-Za-z0-9]{36}|(?i)(password|secret|api[_-]?key)\\s*[:=]\\s*\\S+')
  - id: p06-business-hours
    effect: DENY
    condition: request.time.getHours('Europe/Berlin') < 6
  - id: p07-tenant-match
    effect: DENY
    condition: runtime.tenant_id != '' && runtime.tenant_id != principal.tenant_id
  - id: p08-required-roles
    effect: DENY
    condition: "!tool.required_roles.all(r, r in principal.roles)"
  - id: p09-claims
    effect: DENY
    condition: has(principal.claims.blocked) && principal.claims.blocked == 'true'
  - id: p10-usage
    effect: DENY
    condition: has(usage.calls_today) && usage.calls_today > 10000
"#;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per call of `f`, median of `rounds` rounds of `n` calls.
fn ns_per_call(rounds: usize, n: usize, mut f: impl FnMut()) -> f64 {
    let mut per = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        per.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    median(&mut per)
}

/// Median and p99 (µs) of `n` single timed calls of `f`, after `n / 10` warm-up calls.
fn distribution(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 10 {
        f();
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
    (
        us(samples[samples.len() / 2]),
        us(samples[(samples.len() * 99 / 100).min(samples.len() - 1)]),
    )
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, n, samples) = if full {
        (7, 100_000, 200_000)
    } else {
        (1, 100, 200)
    };

    // One invocation: alice@acme calls `refund_lookup` on a PROD runtime with four arguments.
    let principal = EnterpriseSecurityContext {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        claims: HashMap::from([("dept".to_string(), "finance".to_string())]),
        organization_id: "acme-corp".into(),
        roles: vec!["client-user".into(), "billing-operator".into()],
        security_clearance: "CONFIDENTIAL".into(),
        policy_context: HashMap::new(),
    };
    let contract = EnterpriseToolContract {
        risk_assessment: "HIGH".into(),
        compliance_tags: vec!["PCI".into(), "SOX".into()],
        required_roles: vec!["billing-operator".into()],
        tenant_id: "acme".into(),
        approval_status: "APPROVED".into(),
        revision: 3,
        ..Default::default()
    };
    let runtime = EnterpriseRuntimeAnnouncement {
        runtime_id: "acme-runtime-1".into(),
        tenant_id: "acme".into(),
        security_zone: "pci-zone".into(),
        deployment_environment: "PROD".into(),
        ..Default::default()
    };
    let args = aesp_sidecar::adm::json_to_struct(&serde_json::json!({
        "order_id": "A-10023", "amount": 120.5, "currency": "EUR",
        "note": "customer called about a duplicate charge on the last invoice",
    }))
    .map_err(anyhow::Error::msg)?;
    let usage = HashMap::from([("calls_today".to_string(), 42.0)]);
    let input = Input {
        principal: &principal,
        tool_name: "refund_lookup",
        tool: Some(&contract),
        args: Some(&args),
        runtime: Some(&runtime),
        session_id: "session-1",
        request: RequestInfo {
            method: policy::EXECUTE_TOOL,
            time: SystemTime::now(),
            source_address: "127.0.0.1:50000",
            correlation_id: "corr-1",
        },
        usage: Some(&usage),
    };

    let ten = PolicySet::new(policy::parse(ALL_APPLY, "bench")?)?;
    let out = ten.evaluate(&input);
    anyhow::ensure!(
        out.verdict == Verdict::NoOpinion && out.errors.is_empty(),
        "the benchmarked call must pass all ten policies: {}",
        out.explanation()
    );
    let shipped = policy::load(std::path::Path::new("policies/cel"))?;
    // Loading (reading, parsing, checking, compiling) the shipped set: once per change.
    let mut loads = Vec::new();
    for _ in 0..if full { 21 } else { 1 } {
        let t = Instant::now();
        black_box(policy::load(std::path::Path::new("policies/cel"))?);
        loads.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    let load_us = median(&mut loads);
    let empty = PolicySet::empty();

    let (ten_med, ten_p99) = distribution(samples, || {
        black_box(ten.evaluate(black_box(&input)).verdict);
    });
    let (shipped_med, shipped_p99) = distribution(samples, || {
        black_box(shipped.evaluate(black_box(&input)).verdict);
    });
    let (empty_med, empty_p99) = distribution(samples, || {
        black_box(empty.evaluate(black_box(&input)).verdict);
    });
    let ten_mean = ns_per_call(rounds, n, || {
        black_box(ten.evaluate(black_box(&input)).verdict);
    }) / 1000.0;

    // Baseline: the RBAC checks of a tool call with the shipped roles.
    let rbac = Rbac::parse(
        include_str!("../policies/rbac.yaml"),
        std::path::Path::new("policies/rbac.yaml"),
    )?;
    let acme = TenantId::new("acme").ok_or_else(|| anyhow::anyhow!("tenant id"))?;
    let alice = PrincipalId::new("alice").ok_or_else(|| anyhow::anyhow!("principal id"))?;
    let kind = PeerKind::Client;
    let grants = rbac.grants(&Subject {
        tenant: &acme,
        principal: &alice,
        kind: &kind,
        groups: &[],
        roles: &[],
    });
    let rbac_ns = ns_per_call(rounds, n, || {
        black_box(grants.allows(black_box("grid.tool.execute"), &acme, &acme));
        black_box(grants.allows(black_box("tool:echo:execute"), &acme, &acme));
    });
    // For scale: a fresh standard-library context, as `Context::default()` per call would be.
    let stdlib_us = ns_per_call(rounds, (n / 100).max(1), || {
        black_box(cel::Context::default());
    }) / 1000.0;

    println!("## CEL policies per tool invocation (µs; {samples} single evaluations)");
    println!();
    println!("| what | median | p99 | × RBAC checks |");
    println!("|---|---:|---:|---:|");
    println!(
        "| **10 policies, all applying** (`benches/policy.rs` ALL_APPLY) | **{ten_med:.2}** | **{ten_p99:.2}** | {:.0}× |",
        ten_med * 1000.0 / rbac_ns
    );
    println!(
        "| the shipped set (`policies/cel`, 10 policies: 6 apply to this call) | {shipped_med:.2} | {shipped_p99:.2} | {:.0}× |",
        shipped_med * 1000.0 / rbac_ns
    );
    println!(
        "| no policy (the per-call scope and variables) | {empty_med:.2} | {empty_p99:.2} | {:.0}× |",
        empty_med * 1000.0 / rbac_ns
    );
    println!(
        "| baseline: RBAC checks of a tool call (2 lookups) | {:.2} | | 1× |",
        rbac_ns / 1000.0
    );
    println!(
        "| for scale: `cel::Context::default()` (stdlib rebuilt), per call | {stdlib_us:.2} | | {:.0}× |",
        stdlib_us * 1000.0 / rbac_ns
    );
    println!(
        "| for scale: loading `policies/cel` (4 files, 10 conditions compiled), once per change | {load_us:.0} | | |"
    );
    println!();
    println!("Each of the ten alone (median µs, the per-call scope included):");
    println!();
    println!("| policy | median |");
    println!("|---|---:|");
    for p in ten.policies() {
        let Some(one) = ten.only(p.id()) else {
            continue;
        };
        let (med, _) = distribution(samples / 10, || {
            black_box(one.evaluate(black_box(&input)).verdict);
        });
        println!("| {} | {med:.2} |", p.id());
    }
    let plain = PolicySet::new(policy::parse(SECRETS_PLAIN_CEL, "bench")?)?;
    let (med, _) = distribution(samples / 10, || {
        black_box(plain.evaluate(black_box(&input)).verdict);
    });
    println!("| for comparison: p05 in plain CEL (`args.exists(k, ... matches ...)`) | {med:.2} |");
    println!();
    println!(
        "10 policies, mean of {rounds} rounds of {n} back-to-back evaluations: {ten_mean:.2} µs"
    );
    Ok(())
}

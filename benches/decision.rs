//! What authentication and authorization cost per call on the hot path, in isolation: a warm
//! bearer token (SHA-256 of the token, cache lookup, the live-account check) and the RBAC
//! checks of a tool call (two permission lookups), beside a cold token verification and a
//! cold grants resolution for scale; the budget stage (docs/cost.md): a reservation and
//! its settlement, alone and with two threads on the same tenant; then the whole decision of a
//! tool invocation as the sidecar makes it (RBAC + governance + strict argument schema + the
//! shipped CEL policies of `policies/cel/`), median and p99 of single calls. Nothing is
//! asserted; `cargo bench --bench decision`
//! prints medians of 7 rounds. Run without `--bench` (as `cargo test --benches` does) it is a
//! short smoke run whose numbers mean nothing.

use aesp_sidecar::authz::rbac::{Rbac, Subject};
use aesp_sidecar::identity::token::{ClaimMapping, Issuer, Verifier, VerifyKey, bearer};
use aesp_sidecar::ids::{PeerKind, PrincipalId, TenantId};
use base64::Engine;
use std::hint::black_box;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
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
    median(per)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, n) = if full { (7, 200_000) } else { (1, 200) };

    // An Ed25519 issuer like the demo's, and a token of alice@acme.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
    let jwk = serde_json::from_value(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA",
    }))?;
    let key = VerifyKey::from_jwk(&jwk).map_err(anyhow::Error::msg)?;
    let issuer = Issuer::new(
        "https://idp.example".into(),
        vec!["aesp".into()],
        ClaimMapping::default(),
        vec![key],
    );
    let verifier = Verifier::new(vec![issuer], 30);
    let enc = jsonwebtoken::EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())?;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("k1".into());
    let now = jsonwebtoken::get_current_timestamp();
    let mint = |i: u64| {
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({
                "iss": "https://idp.example", "aud": "aesp", "sub": "alice", "tenant": "acme",
                "roles": [], "iat": now, "exp": now + 3600, "jti": i,
            }),
            &enc,
        )
    };
    let token = mint(0)?;
    let header = format!("Bearer {token}");
    verifier
        .verify(&token, now)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let warm = ns_per_call(rounds, n, || {
        let t = bearer(black_box(header.as_bytes())).ok();
        black_box(t.map(|t| verifier.verify(t, now).is_ok()));
    });
    let cold_tokens: Vec<String> = (1..=(if full { 2000 } else { 20 }))
        .map(mint)
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for tok in &cold_tokens {
        black_box(verifier.verify(tok, now).is_ok());
    }
    let cold = t.elapsed().as_nanos() as f64 / cold_tokens.len() as f64;

    // RBAC with the shipped policy: alice's grants, then the two checks of a tool call.
    let rbac = Rbac::parse(
        include_str!("../policies/rbac.yaml"),
        std::path::Path::new("policies/rbac.yaml"),
    )?;
    let acme = TenantId::new("acme").ok_or_else(|| anyhow::anyhow!("tenant id"))?;
    let alice = PrincipalId::new("alice").ok_or_else(|| anyhow::anyhow!("principal id"))?;
    let kind = PeerKind::Client;
    let who = Subject {
        tenant: &acme,
        principal: &alice,
        kind: &kind,
        groups: &[],
        roles: &[],
    };
    let grants = rbac.grants(&who);
    let checks = ns_per_call(rounds, n, || {
        black_box(grants.allows(black_box("grid.tool.execute"), &acme, &acme));
        black_box(grants.allows(black_box("tool:echo:execute"), &acme, &acme));
    });
    let resolve = ns_per_call(rounds, n / 10, || {
        black_box(rbac.grants(&who));
    });

    // The budget stage: reserve (both accounts, against both budgets) + settle (charged).
    use aesp_sidecar::cost::{CostConfig, Limits, Meter, Settlement};
    let budgets = vec![
        (
            acme.clone(),
            None,
            Limits {
                max_invocations: u64::MAX / 2,
                max_cost_units: 0,
                window_seconds: 86_400,
            },
        ),
        (
            acme.clone(),
            Some(alice.clone()),
            Limits {
                max_invocations: u64::MAX / 2,
                max_cost_units: u64::MAX / 2,
                window_seconds: 3600,
            },
        ),
    ];
    let meter = std::sync::Arc::new(Meter::new(
        CostConfig {
            budgets,
            ..Default::default()
        },
        aesp_sidecar::metrics::CostMetrics::unregistered()?,
    ));
    let settled = Settlement {
        charged: true,
        request_bytes: 64,
        response_bytes: 128,
        duration: std::time::Duration::from_micros(300),
    };
    let reserve_settle = ns_per_call(rounds, n, || {
        if let Ok(r) = meter.reserve(&acme, &alice, black_box("echo"), now) {
            r.settle(settled);
        }
    });
    let released = ns_per_call(rounds, n, || {
        black_box(meter.reserve(&acme, &alice, black_box("echo"), now).is_ok());
    });
    let usage = ns_per_call(rounds, n, || {
        black_box(meter.policy_usage(&acme, &alice, black_box("echo"), now));
    });
    // Two threads, two principals of one tenant: the tenant's account is shared.
    let bob = PrincipalId::new("bob").ok_or_else(|| anyhow::anyhow!("principal id"))?;
    let contended = {
        let (m, a, t) = (meter.clone(), bob.clone(), acme.clone());
        let other = std::thread::spawn(move || {
            ns_per_call(rounds, n, || {
                if let Ok(r) = m.reserve(&t, &a, "echo", now) {
                    r.settle(settled);
                }
            })
        });
        let mine = ns_per_call(rounds, n, || {
            if let Ok(r) = meter.reserve(&acme, &alice, black_box("echo"), now) {
                r.settle(settled);
            }
        });
        let theirs = other.join().map_err(|_| anyhow::anyhow!("bench thread"))?;
        (mine + theirs) / 2.0
    };

    println!("## Authentication and RBAC per call (ns; median of {rounds} rounds)");
    println!();
    println!("| step | ns/call |");
    println!("|---|---:|");
    println!("| warm token: Bearer parse + SHA-256 + cache hit + live check | {warm:.0} |");
    println!("| RBAC of a tool call: grid.tool.execute + tool:echo:execute | {checks:.0} |");
    println!(
        "| **hot path total (warm token + RBAC)** | **{:.0}** |",
        warm + checks
    );
    println!("| for scale: a cold token (EdDSA verify + claim mapping) | {cold:.0} |");
    println!(
        "| for scale: resolving a subject's grants (once per connection or token) | {resolve:.0} |"
    );
    println!();
    println!("## The budget stage per tool call (ns; median of {rounds} rounds)");
    println!();
    println!("| step | ns/call |");
    println!("|---|---:|");
    println!(
        "| **reserve (principal + tenant, both budgets) + settle charged** | **{reserve_settle:.0}** |"
    );
    println!("| reserve + release (a refused or failed call) | {released:.0} |");
    println!(
        "| the same, 2 threads, 2 principals of one tenant (per call, each thread) | {contended:.0} |"
    );
    println!(
        "| the `usage` map of the CEL policies (only when policies are in force) | {usage:.0} |"
    );
    whole_decision(full)
}

/// Median and p99 (ns) of `n` single calls of `f`, each timed on its own.
fn percentiles(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// The whole decision of an `ExecuteTool`: the pipeline the sidecar builds from the shipped
/// `rbac.yaml`, `tool-contracts.yaml` (plus a HIGH-risk billing contract) and `policies/cel/`.
fn whole_decision(full: bool) -> anyhow::Result<()> {
    let n = if full { 200_000 } else { 200 };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let seed = dir.path().join("tool-contracts.yaml");
    std::fs::write(
        &seed,
        std::fs::read_to_string(root.join("policies/tool-contracts.yaml"))?
            + "
  - tool: billing_refund
    risk_assessment: HIGH
    compliance_tags: [SOX, PCI]
    declaration:
      name: billing_refund
      description: Refunds an amount to a customer.
      parameters:
        type: OBJECT
        properties:
          amount: { type: NUMBER }
          currency: { type: STRING, enum: [EUR, USD] }
          reason: { type: STRING }
        required: [amount, currency]
",
    )?;
    let rbac = format!(
        "{}  - principal: alice\n    tenant: acme\n    roles: [billing-operator]\n",
        include_str!("../policies/rbac.yaml")
    );
    let policies = root.join("policies/cel");
    let bare = aesp_sidecar::WholeDecision::new(&rbac, &seed, None, "alice", "acme")?;
    let with = aesp_sidecar::WholeDecision::new(&rbac, &seed, Some(&policies), "alice", "acme")?;
    let args =
        |v: serde_json::Value| aesp_sidecar::adm::json_to_struct(&v).map_err(anyhow::Error::msg);
    let echo = args(serde_json::json!({"text": "hello"}))?;
    let refund =
        args(serde_json::json!({"amount": 120.0, "currency": "EUR", "reason": "damaged"}))?;
    let cases: [(
        &str,
        &aesp_sidecar::WholeDecision,
        &str,
        &prost_types::Struct,
    ); 3] = [
        (
            "echo: RBAC + governance + schema, no policies",
            &bare,
            "echo",
            &echo,
        ),
        (
            "echo: the same + the 10 shipped policies",
            &with,
            "echo",
            &echo,
        ),
        (
            "billing_refund (HIGH, SOX/PCI): the same + the 10 shipped policies",
            &with,
            "billing_refund",
            &refund,
        ),
    ];
    println!();
    println!("## The whole decision of a tool invocation (ns; {n} single calls)");
    println!();
    println!("| case | outcome | median | p99 |");
    println!("|---|---|---:|---:|");
    for (name, d, tool, a) in cases {
        let outcome = match d.decide(tool, a) {
            Ok(matched) => format!("allowed, {matched} policies matched"),
            Err(code) => code.to_string(),
        };
        for _ in 0..n / 10 {
            black_box(d.decide(tool, a).is_ok());
        }
        let (p50, p99) = percentiles(n, || {
            black_box(d.decide(black_box(tool), a).is_ok());
        });
        println!("| {name} | {outcome} | {p50:.0} | {p99:.0} |");
    }
    Ok(())
}

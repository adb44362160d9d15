//! The audit writer's throughput: signed, durable records per second through the real
//! writer (`audit.redb` on this machine's disk, mode `sync`: every record is awaited until
//! its group is committed with an fsync), with C callers in flight, beside the two limits it
//! is made of, measured in the same run: Ed25519 signatures per second on one core (aws-lc,
//! which the writer uses; ed25519-dalek for scale), and one durable commit per record (no
//! grouping). Nothing is asserted. `cargo bench --bench audit`
//! (~30 s); without `--bench` (as `cargo test --benches` does) a smoke run whose numbers mean
//! nothing.

use aesp_sidecar::audit::{self, Audit, AuditConfig};
use aesp_sidecar::store::audit::FaultSwitch;
use ed25519_dalek::Signer;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn record(i: u64) -> aesp_sidecar::proto::aesp::AuditEvent {
    let mut e = audit::event("TOOL_INVOCATION", "ALLOW");
    e.principal_id = "alice".into();
    e.tenant_id = "acme".into();
    e.method = "/altar.grid.v1.GridHost/ExecuteTool".into();
    e.tool_name = "echo".into();
    e.session_id = "s-1".into();
    e.correlation_id = format!("c-{i}");
    e.attributes.insert("peer_kind".into(), "client".into());
    e
}

/// Records per second through the writer with `callers` tasks committing for `secs`.
async fn writer_rate(cfg: &AuditConfig, callers: usize, secs: Duration) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let a = Audit::start(cfg, dir.path(), FaultSwitch::default(), None)?;
    let stop = Instant::now() + secs;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                a.commit(record(c as u64 * 1_000_000 + n))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                n += 1;
            }
            Ok::<u64, anyhow::Error>(n)
        }));
    }
    let t = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let rate = total as f64 / t.elapsed().as_secs_f64();
    a.stop(audit::event("SIDECAR_STOPPED", "INFO")).await;
    let summary = aesp_sidecar::audit::offline::verify_db(&dir.path().join("audit.redb"), None)?
        .map_err(|f| anyhow::anyhow!("the chain the bench wrote does not verify: {f}"))?;
    anyhow::ensure!(summary.count >= total, "records lost");
    Ok(rate)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let secs = Duration::from_millis(if full { 5000 } else { 200 });

    // One core's signatures per second (the same 32-byte message the writer signs).
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let n = if full { 100_000 } else { 1000 };
    let t = Instant::now();
    for i in 0..n {
        black_box(key.sign(&[i as u8; 32]));
    }
    let dalek_rate = n as f64 / t.elapsed().as_secs_f64();
    let aws = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    for i in 0..n {
        black_box(aws.sign(&[i as u8; 32]));
    }
    // The writer signs with aws-lc; ed25519-dalek for scale.
    let sign_rate = n as f64 / t.elapsed().as_secs_f64();

    let grouped = AuditConfig::default();
    let ungrouped = AuditConfig {
        batch_max_records: 1,
        ..Default::default()
    };
    println!(
        "audit writer, mode sync, records/s (durable and signed; 2 cores shared with the callers)"
    );
    println!(
        "  Ed25519 signatures/s, one core, aws-lc (the writer's; the ceiling): {sign_rate:>10.0}"
    );
    println!(
        "  Ed25519 signatures/s, one core, ed25519-dalek (for scale):         {dalek_rate:>10.0}"
    );
    let one1 = writer_rate(&ungrouped, 1, secs).await?;
    println!("  one commit per record, 1 caller:               {one1:>10.0}");
    let one = writer_rate(&ungrouped, 64, secs).await?;
    println!(
        "  one commit per record, 64 callers:             {one:>10.0}   ({:.2}x of the ceiling)",
        one / sign_rate
    );
    for callers in [1, 64, 512] {
        let r = writer_rate(&grouped, callers, secs).await?;
        println!(
            "  group commit (<= 256 per commit), {callers:>3} callers: {r:>10.0}   ({:.2}x of the ceiling, {:.1}x of one commit per record)",
            r / sign_rate,
            r / one
        );
    }
    Ok(())
}

//! The demo: the reference GRID host, the reference runtime, dev certificates, and a
//! scripted scenario that shows allowed and denied calls through the sidecar.

pub mod certs;
pub mod host;
pub mod runtime;
pub mod scenario;

use crate::client::ClientTls;
use crate::config::Config;
use crate::sidecar::Sidecar;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The sidecar configuration the demo runs, written as `sidecar.yaml` beside the
/// certificates. Copy it and point `upstream.address` at your own host.
pub const DEMO_CONFIG: &str = "\
# aesp sidecar configuration written by `aesp demo`.
# To put your own GRID host behind the sidecar: copy this file and its certificates,
# set upstream.address to your host, and run `aesp serve --config sidecar.yaml`.
listen: 127.0.0.1:8443            # data plane: mTLS 1.3, HTTP/2, gRPC
admin_listen: 127.0.0.1:9901      # /healthz /readyz /metrics
management_listen: 127.0.0.1:9443 # Enterprise*Service gRPC (mTLS)
tls:
  cert: server.crt                # relative paths are relative to this file
  key: server.key
  client_ca: ca.crt               # client and runtime certificates must chain to this CA
upstream:
  address: http://127.0.0.1:50051 # the GRID host: http:// = h2c, https:// = TLS
identity:
  trust_domain: aesp.local        # spiffe://aesp.local/tenant/<tenant>/<kind>/<name>
  organization_id: example-org
runtime:
  security_zone: demo-zone
  deployment_environment: DEV
limits:
  max_message_bytes: 4194304
passthrough: []
shutdown_grace_seconds: 5
";

pub struct DemoOptions {
    pub dir: PathBuf,
    /// Run the scenario and exit instead of serving until Ctrl-C.
    pub once: bool,
}

fn client_tls(files: &certs::DevFiles, stem: &str) -> anyhow::Result<ClientTls> {
    ClientTls::from_files(
        &files.path("ca.crt"),
        &files.path(&format!("{stem}.crt")),
        &files.path(&format!("{stem}.key")),
        "localhost",
    )
}

/// Runs the demo: certificates, host, sidecar, runtime, scenario; then serves until Ctrl-C
/// (or returns, with `once`).
pub async fn run(opts: DemoOptions) -> anyhow::Result<Vec<scenario::Step>> {
    let (files, fresh) = certs::ensure(&opts.dir)?;
    let dir = std::fs::canonicalize(&files.dir).unwrap_or_else(|_| files.dir.clone());
    println!("aesp demo");
    println!(
        "  certificates: {} ({})",
        dir.display(),
        if fresh { "generated" } else { "reused" }
    );
    let config_path = dir.join("sidecar.yaml");
    std::fs::write(&config_path, DEMO_CONFIG)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let cfg = Config::load(&config_path)?;

    let host = host::spawn(host::HostOptions::default()).await.context(
        "cannot start the reference GRID host on 127.0.0.1:50051 (is another demo running?)",
    )?;
    println!("  GRID host:    {} (h2c, loopback only)", host.local_addr);

    let sidecar = Sidecar::start(cfg)
        .await
        .context("cannot start the sidecar")?;
    println!("  sidecar:      {} (mTLS 1.3)", sidecar.data_addr);
    if let Some(a) = sidecar.admin_addr {
        println!("  admin HTTP:   http://{a}/healthz  /readyz  /metrics");
    }
    if let Some(a) = sidecar.management_addr {
        println!("  management:   {a} (mTLS)");
    }
    let endpoint = format!("https://127.0.0.1:{}", sidecar.data_addr.port());

    let rt_tls = client_tls(&files, "runtime")?;
    let runtime = runtime::spawn(runtime::RuntimeOptions {
        endpoint: endpoint.clone(),
        tls: Some(runtime::RuntimeTls {
            ca_pem: rt_tls.ca_pem.clone(),
            cert_pem: rt_tls.cert_pem.clone(),
            key_pem: rt_tls.key_pem.clone(),
            domain: rt_tls.domain.clone(),
        }),
        runtime_id: "acme-runtime-1".into(),
        ..Default::default()
    })
    .await?;
    runtime
        .wait_announced(Duration::from_secs(10))
        .await
        .context("the reference runtime did not get through the sidecar")?;
    if let Some(a) = host.state.announcements().last() {
        println!(
            "  runtime:      {} connected through the sidecar; the host received EnterpriseRuntimeAnnouncement{{tenant_id: {:?}, security_zone: {:?}, deployment_environment: {:?}}}",
            a.runtime_id, a.tenant_id, a.security_zone, a.deployment_environment
        );
    }

    println!("\nScenario (client certificates acme.crt = alice@acme, globex.crt = bob@globex):");
    let steps = scenario::run(
        &endpoint,
        &client_tls(&files, "acme")?,
        &client_tls(&files, "globex")?,
    )
    .await?;
    if let Some(sc) = host.state.security_contexts().first() {
        println!(
            "\n  The host received CreateSession with EnterpriseSecurityContext{{principal_id: {:?}, tenant_id: {:?}, organization_id: {:?}}}",
            sc.principal_id, sc.tenant_id, sc.organization_id
        );
    }

    print_usage(&dir, &config_path);
    if !opts.once {
        println!("\nServing until Ctrl-C.");
        crate::sidecar::wait_for_signal().await;
        println!(
            "Shutting down: draining calls, then stopping the runtime, the sidecar and the host."
        );
    }
    runtime.shutdown().await;
    sidecar.shutdown().await;
    host.shutdown().await;
    Ok(steps)
}

fn print_usage(dir: &Path, config: &Path) {
    let d = dir.display();
    println!(
        "
Try it yourself:
  aesp call --ca {d}/ca.crt --cert {d}/acme.crt --key {d}/acme.key execute --tool echo --args '{{\"text\":\"hi\"}}'
  aesp call --ca {d}/ca.crt --cert {d}/acme.crt --key {d}/acme.key stream --tool count --args '{{\"n\":5}}'
  aesp call --ca {d}/ca.crt --cert {d}/globex.crt --key {d}/globex.key create-session --tenant acme   # IDENTITY_MISMATCH
  grpcurl -cacert {d}/ca.crt -cert {d}/acme.crt -key {d}/acme.key -import-path proto -proto altar/grid/v1/grid.proto \\
      -d '{{}}' localhost:8443 altar.grid.v1.GridHost/CreateSession
  curl -s http://127.0.0.1:9901/metrics | grep aesp_

Put your own GRID host behind the sidecar:
  cp -r {d} ./my-sidecar && edit ./my-sidecar/sidecar.yaml (upstream.address: http://127.0.0.1:<your port>)
  aesp serve --config ./my-sidecar/sidecar.yaml
  (the config the demo runs: {})",
        config.display()
    );
}

//! The demo: the reference GRID host, the reference runtime, dev certificates, and a
//! scripted scenario that shows allowed and denied calls through the sidecar.

pub mod certs;
pub mod host;
pub mod runtime;
pub mod scenario;
pub mod tokens;

use crate::client::ClientTls;
use crate::config::Config;
use crate::sidecar::Sidecar;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The sidecar configuration the demo runs, written as `sidecar.yaml` beside the
/// certificates. Copy it and point `upstream.address` at your own host.
pub const DEMO_CONFIG: &str = "\
# aesp sidecar configuration written by `aesp demo`.
# To put your own GRID host behind the sidecar: copy this directory outside any repository
# (it holds private keys), set upstream.address to your host, and run
# `aesp serve --config sidecar.yaml`; tool calls need a runtime connected (`aesp grid-runtime`).
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
auth:
  tokens_required: [client]       # clients present `authorization: Bearer <JWT>`; runtimes: certificate alone
  issuers:
    - issuer: https://aesp-demo.local  # the demo's own issuer (issuer.key); tokens: acme.jwt, globex.jwt, admin.jwt
      audiences: [aesp]
      jwks_file: issuer.jwks.json
state_dir: state                  # control.redb (roles, service accounts), audit.redb and audit.key; created 0700
rbac:
  file: rbac.yaml                 # roles, permissions and who holds them (docs/rbac.md); deny unless a binding allows
audit:
  mode: sync                      # a call goes on once its signed decision record is durable (docs/audit-format.md)
governance:
  contracts: tool-contracts.yaml  # approved tool contracts (docs/governance.md); any other tool is TOOL_NOT_APPROVED
  host_manifest: grid-manifest.yaml # the host's declarations: one that drifts from its approved digest is refused
runtime:
  security_zone: demo-zone
  deployment_environment: DEV
limits:
  max_message_bytes: 4194304
passthrough: []
shutdown_grace_seconds: 5
";

/// The four addresses the demo listens on. Port 0 picks a free port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoAddrs {
    /// The sidecar's data plane (`aesp demo --listen`).
    pub listen: SocketAddr,
    /// The sidecar's admin HTTP (`--admin-listen`).
    pub admin_listen: SocketAddr,
    /// The sidecar's management gRPC (`--management-listen`).
    pub management_listen: SocketAddr,
    /// The reference GRID host, the sidecar's upstream (`--host-listen`).
    pub host_listen: SocketAddr,
}

impl Default for DemoAddrs {
    fn default() -> Self {
        let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
        DemoAddrs {
            listen: lo(8443),
            admin_listen: lo(9901),
            management_listen: lo(9443),
            host_listen: lo(50051),
        }
    }
}

impl DemoAddrs {
    /// Each address with its flag and what listens there.
    fn named(&self) -> [(SocketAddr, &'static str, &'static str); 4] {
        [
            (self.listen, "--listen", "the sidecar's data plane"),
            (
                self.admin_listen,
                "--admin-listen",
                "the sidecar's admin HTTP",
            ),
            (
                self.management_listen,
                "--management-listen",
                "the sidecar's management gRPC",
            ),
            (self.host_listen, "--host-listen", "the reference GRID host"),
        ]
    }
}

/// [`DEMO_CONFIG`] with its addresses replaced by `addrs` (`upstream.address` is
/// `http://{host_listen}`); comments keep their column.
pub fn demo_config(addrs: &DemoAddrs) -> String {
    let values = [
        ("listen: ", addrs.listen.to_string()),
        ("admin_listen: ", addrs.admin_listen.to_string()),
        ("management_listen: ", addrs.management_listen.to_string()),
        ("  address: ", format!("http://{}", addrs.host_listen)),
    ];
    let mut out = String::with_capacity(DEMO_CONFIG.len() + 64);
    for line in DEMO_CONFIG.lines() {
        let replaced = values.iter().find_map(|(key, value)| {
            let rest = line.strip_prefix(key)?;
            let hash = rest.find('#')?;
            let head = format!("{key}{value}");
            let pad = (key.len() + hash).saturating_sub(head.len()).max(1);
            Some(format!("{head}{}{}", " ".repeat(pad), &rest[hash..]))
        });
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

pub struct DemoOptions {
    pub dir: PathBuf,
    /// Run the scenario and exit instead of serving until Ctrl-C.
    pub once: bool,
    /// Where the sidecar and the reference host listen.
    pub addrs: DemoAddrs,
}

fn client_tls(files: &certs::DevFiles, stem: &str) -> anyhow::Result<ClientTls> {
    ClientTls::from_files(
        &files.path("ca.crt"),
        &files.path(&format!("{stem}.crt")),
        &files.path(&format!("{stem}.key")),
        "localhost",
    )
}

/// Fails, naming every address of `addrs` that something else listens on and the flag that
/// moves it, before anything starts.
async fn check_ports_free(addrs: &DemoAddrs) -> anyhow::Result<()> {
    let mut busy = Vec::new();
    let mut first_flag = None;
    for (addr, flag, what) in addrs.named() {
        if addr.port() == 0 {
            continue;
        }
        // tokio binds with SO_REUSEADDR, as the demo's listeners do: a port in TIME_WAIT
        // after an earlier demo is not "in use".
        match tokio::net::TcpListener::bind(addr).await {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                first_flag.get_or_insert(flag);
                busy.push(format!(
                    "  port {} ({addr}, {what}) is in use: pick another with `{flag} {}:PORT`",
                    addr.port(),
                    addr.ip()
                ));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot listen on {addr} ({what}, {flag})"));
            }
        }
    }
    match first_flag {
        None => Ok(()),
        Some(flag) => anyhow::bail!(
            "the demo cannot listen where it should (is another `aesp demo` running?)\n{}\n  \
             (port 0 picks a free port, e.g. `aesp demo {flag} 127.0.0.1:0`)",
            busy.join("\n")
        ),
    }
}

/// `a` as a client dials it: an unspecified IP (`0.0.0.0`, `::`) becomes loopback.
fn dialable(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::new(
            if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            a.port(),
        )
    } else {
        a
    }
}

/// Runs the demo: certificates, host, sidecar, runtime, scenario; then serves until Ctrl-C
/// (or returns, with `once`).
pub async fn run(opts: DemoOptions) -> anyhow::Result<Vec<scenario::Step>> {
    check_ports_free(&opts.addrs).await?;
    let (files, fresh) = certs::ensure(&opts.dir)?;
    let dir = std::fs::canonicalize(&files.dir).unwrap_or_else(|_| files.dir.clone());
    println!("aesp demo");
    println!(
        "  certificates: {} ({})",
        dir.display(),
        if fresh { "generated" } else { "reused" }
    );

    let host_listen = opts.addrs.host_listen;
    let host = host::spawn(host::HostOptions {
        listen: host_listen,
        ..Default::default()
    })
    .await
    .with_context(|| {
        format!(
            "cannot start the reference GRID host on {host_listen} (is another demo running? \
             --host-listen picks another address)"
        )
    })?;
    println!(
        "  GRID host:    {} (h2c{})",
        host.local_addr,
        if host.local_addr.ip().is_loopback() {
            ", loopback only"
        } else {
            ""
        }
    );

    // The sidecar runs this text; once it listens, sidecar.yaml gets the ports it got.
    let config_path = dir.join("sidecar.yaml");
    let asked = DemoAddrs {
        host_listen: dialable(host.local_addr),
        ..opts.addrs
    };
    let cfg = Config::parse(&demo_config(&asked), &config_path)?;
    let sidecar = Sidecar::start(cfg).await.with_context(|| {
        format!(
            "cannot start the sidecar (--listen {}, --admin-listen {}, --management-listen {} \
             pick other addresses)",
            asked.listen, asked.admin_listen, asked.management_listen
        )
    })?;
    let actual = DemoAddrs {
        listen: sidecar.data_addr,
        admin_listen: sidecar.admin_addr.unwrap_or(asked.admin_listen),
        management_listen: sidecar.management_addr.unwrap_or(asked.management_listen),
        ..asked
    };
    std::fs::write(&config_path, demo_config(&actual))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    println!("  sidecar:      {} (mTLS 1.3)", actual.listen);
    println!(
        "  admin HTTP:   http://{}/healthz  /readyz  /metrics",
        dialable(actual.admin_listen)
    );
    println!("  management:   {} (mTLS)", actual.management_listen);
    let endpoint = format!("https://{}", dialable(actual.listen));

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
    let token = |stem: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(files.read(&format!("{stem}.jwt"))?)
            .context("a token file is not text")?
            .trim()
            .to_string())
    };
    let (acme_tls, globex_tls) = (client_tls(&files, "acme")?, client_tls(&files, "globex")?);
    let (acme_token, globex_token) = (token("acme")?, token("globex")?);
    let steps = scenario::run(
        &endpoint,
        scenario::Party {
            tls: &acme_tls,
            token: &acme_token,
        },
        scenario::Party {
            tls: &globex_tls,
            token: &globex_token,
        },
    )
    .await?;
    if let Some(sc) = host.state.security_contexts().first() {
        println!(
            "\n  The host received CreateSession with EnterpriseSecurityContext{{principal_id: {:?}, tenant_id: {:?}, organization_id: {:?}}}",
            sc.principal_id, sc.tenant_id, sc.organization_id
        );
    }

    if let Some(a) = &sidecar.audit {
        a.flush().await;
    }
    if let Some(head) = sidecar
        .audit
        .as_ref()
        .and_then(|a| a.store())
        .and_then(|s| s.head().ok().flatten())
    {
        let db = dir.join("state").join(crate::store::audit::FILE_NAME);
        println!(
            "\n  Audit trail: every decision above is a signed, hash-chained record in {}\n    head: sequence {}, hash {}, key {}\n    verify it: {} audit verify --db {}",
            db.display(),
            head.sequence,
            crate::audit::record::hex(&head.hash),
            head.key_id,
            program(),
            shell_word(&db.display().to_string()),
        );
    }

    print!("{}", usage(&program(), &dir, &config_path, &actual));
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

/// `s` as one shell word: unchanged when it is safe, else single-quoted.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@,%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How to run this binary in a printed command, so that the command works as printed:
/// `aesp` when that is what `PATH` finds, else its path (relative to the current directory
/// when it lies inside it, as `target/release/aesp` does after `cargo run`).
pub fn program() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "aesp".to_string();
    };
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("aesp"))
            .find(|c| c.is_file())
    });
    if on_path.and_then(|p| std::fs::canonicalize(p).ok()).as_ref() == Some(&exe) {
        return "aesp".to_string();
    }
    let cwd = std::env::current_dir().and_then(std::fs::canonicalize);
    match cwd.as_ref().map(|d| exe.strip_prefix(d)) {
        Ok(Ok(rel)) => shell_word(&rel.display().to_string()),
        _ => shell_word(&exe.display().to_string()),
    }
}

/// The "try it yourself" lines: commands that work as printed against the running demo.
fn usage(program: &str, dir: &Path, config: &Path, addrs: &DemoAddrs) -> String {
    let p = program;
    let d = shell_word(&dir.display().to_string());
    let data = dialable(addrs.listen);
    // `aesp call` and `aesp grid-runtime` default to the demo's default port.
    let endpoint = if data == DemoAddrs::default().listen {
        String::new()
    } else {
        format!(" --endpoint https://{data}")
    };
    let call = |stem: &str| {
        format!("{p} call{endpoint} --ca {d}/ca.crt --cert {d}/{stem}.crt --key {d}/{stem}.key")
    };
    let (acme, globex) = (call("acme"), call("globex"));
    let mgmt = dialable(addrs.management_listen);
    let mgmt_endpoint = if mgmt == DemoAddrs::default().management_listen {
        String::new()
    } else {
        format!(" --endpoint https://{mgmt}")
    };
    let tools = format!(
        "{p} tool list{mgmt_endpoint} --ca {d}/ca.crt --cert {d}/admin.crt --key {d}/admin.key"
    );
    let admin = dialable(addrs.admin_listen);
    let grpcurl_target = if data.ip().is_loopback() {
        format!("localhost:{}", data.port())
    } else {
        data.to_string()
    };
    let config = shell_word(&config.display().to_string());
    let own_endpoint = format!("https://{data}");
    format!(
        "
Try it yourself:
  {acme} execute --tool echo --args '{{\"text\":\"hi\"}}'
  {acme} stream --tool count --args '{{\"n\":5}}'
  {globex} create-session --tenant acme   # IDENTITY_MISMATCH
  {acme} execute --tool billing_refund    # AUTHORIZATION_DENIED (not in alice's role, rbac.yaml)
  {acme} --no-token create-session        # AUTHENTICATION_REQUIRED (clients present a token)
  {acme} execute --tool delete_records --args '{{\"customer_id\":\"c-17\",\"reason\":\"gdpr-erasure\"}}'   # TOOL_NOT_APPROVED (contract PENDING review)
  {tools}   # governed tool contracts and their approval (docs/governance.md)
  grpcurl -cacert {d}/ca.crt -cert {d}/acme.crt -key {d}/acme.key -H \"authorization: Bearer $(cat {d}/acme.jwt)\" \\
      -import-path proto -proto altar/grid/v1/grid.proto \\
      -d '{{}}' {grpcurl_target} altar.grid.v1.GridHost/CreateSession
  curl -s http://{admin}/metrics | grep aesp_

Put your own GRID host behind the sidecar (stop the demo first; it holds these ports):
  cp -r {d} ~/my-sidecar      # outside any repository: the directory holds private keys
  edit ~/my-sidecar/sidecar.yaml: upstream.address: http://127.0.0.1:<your host's port>
  {p} serve --config ~/my-sidecar/sidecar.yaml
  {p} grid-runtime --endpoint {own_endpoint} --ca ~/my-sidecar/ca.crt --cert ~/my-sidecar/runtime.crt --key ~/my-sidecar/runtime.key
      (tool calls need a runtime connected through the sidecar: this one, or yours with runtime.crt)
  (the config the demo runs: {config})
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_addresses_give_the_documented_config() {
        assert_eq!(demo_config(&DemoAddrs::default()), DEMO_CONFIG);
    }

    #[test]
    fn other_addresses_land_in_the_four_fields_and_comments_stay() {
        let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let text = demo_config(&DemoAddrs {
            listen: lo(18443),
            admin_listen: lo(19901),
            management_listen: lo(19443),
            host_listen: lo(15051),
        });
        for want in [
            "listen: 127.0.0.1:18443 ",
            "admin_listen: 127.0.0.1:19901 ",
            "management_listen: 127.0.0.1:19443 #",
            "  address: http://127.0.0.1:15051 #",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
        for old in ["8443 ", "9901 ", "9443 ", "50051"] {
            assert!(!text.contains(&format!(":{old}")), "{old}:\n{text}");
        }
        assert_eq!(text.matches('#').count(), DEMO_CONFIG.matches('#').count());
        let cfg = Config::parse(&text, Path::new("/tmp/sidecar.yaml")).unwrap();
        assert_eq!(cfg.listen, lo(18443));
        assert_eq!(cfg.admin_listen, Some(lo(19901)));
        assert_eq!(cfg.management_listen, Some(lo(19443)));
        assert_eq!(cfg.upstream.authority.as_str(), "127.0.0.1:15051");
    }

    #[test]
    fn printed_commands_name_the_ports_the_demo_got() {
        let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let addrs = DemoAddrs {
            listen: lo(18443),
            admin_listen: lo(19901),
            management_listen: lo(19443),
            host_listen: lo(15051),
        };
        let text = usage(
            "target/release/aesp",
            Path::new("/a dir/.aesp-dev"),
            Path::new("/a dir/.aesp-dev/sidecar.yaml"),
            &addrs,
        );
        assert!(
            text.contains("target/release/aesp call --endpoint https://127.0.0.1:18443 --ca '/a dir/.aesp-dev'/ca.crt"),
            "{text}"
        );
        assert!(text.contains("localhost:18443 altar"), "{text}");
        assert!(text.contains("http://127.0.0.1:19901/metrics"), "{text}");
        assert!(
            text.contains("--endpoint https://127.0.0.1:18443 --ca ~/my-sidecar/ca.crt"),
            "{text}"
        );
        for old in [":8443", ":9901", ":9443", ":50051"] {
            assert!(!text.contains(old), "{old}:\n{text}");
        }
        let default = usage(
            "aesp",
            Path::new("/d"),
            Path::new("/d/sidecar.yaml"),
            &DemoAddrs::default(),
        );
        assert!(default.contains("aesp call --ca /d/ca.crt"), "{default}");
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("target/release/aesp"), "target/release/aesp");
        assert_eq!(shell_word("/a dir/x"), "'/a dir/x'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}

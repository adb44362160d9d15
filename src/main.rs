//! `aesp`: the command line. Parsing only; everything else lives in the library.

use aesp_sidecar::client::AespGridClient;
use aesp_sidecar::client::{self, ClientTls};
use aesp_sidecar::config::Config;
use aesp_sidecar::demo;
use aesp_sidecar::proto::grid;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "aesp",
    version,
    about = "AESP enforcement sidecar for GRID (ALTAR) hosts"
)]
struct Cli {
    /// Log filter (tracing syntax, e.g. `info` or `aesp_sidecar=debug`); RUST_LOG also works.
    #[arg(long, global = true, value_name = "FILTER", help_heading = "Logging")]
    log: Option<String>,
    /// Log format on stderr: `human` (coloured only on a terminal) or `json` (one object a line).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Human,
        help_heading = "Logging"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar in front of a GRID host.
    Serve {
        /// The YAML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Validate the configuration and every file it names, then exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Run the reference GRID host (h2c, loopback).
    GridHost {
        /// Where to listen (h2c, no TLS).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// A manifest of trusted contracts (YAML or JSON); the built-in example by default.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Run the reference runtime, connected through the sidecar.
    GridRuntime {
        /// The sidecar (`https://`, mTLS) or a host directly (`http://`, h2c).
        #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:8443")]
        endpoint: String,
        /// The CA the sidecar's certificate chains to.
        #[arg(long, value_name = "FILE", default_value = ".aesp-dev/ca.crt")]
        ca: PathBuf,
        /// The runtime's certificate (a leaf with a runtime SPIFFE ID).
        #[arg(long, value_name = "FILE", default_value = ".aesp-dev/runtime.crt")]
        cert: PathBuf,
        /// The private key of --cert.
        #[arg(long, value_name = "FILE", default_value = ".aesp-dev/runtime.key")]
        key: PathBuf,
        /// The name the sidecar's certificate must carry.
        #[arg(long, default_value = "localhost")]
        domain: String,
        /// The runtime id it announces.
        #[arg(long, value_name = "ID", default_value = "acme-runtime-1")]
        runtime_id: String,
    },
    /// Generate dev certificates, start host, sidecar and runtime, run a scenario, then serve.
    Demo {
        /// Where the dev certificates and sidecar.yaml go.
        #[arg(long, value_name = "DIR", default_value = ".aesp-dev")]
        dir: PathBuf,
        /// Exit after the scenario instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
        /// The sidecar's data plane (mTLS gRPC); port 0 picks a free port.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// The sidecar's admin HTTP (/healthz, /readyz, /metrics).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        /// The sidecar's management gRPC.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9443")]
        management_listen: SocketAddr,
        /// The reference GRID host (h2c), the sidecar's upstream.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
        host_listen: SocketAddr,
    },
    /// A small GRID client for trying the sidecar. Exits 1 on a denial or a tool error.
    Call(CallArgs),
    /// Identity administration against a running sidecar's management listener:
    /// service accounts, role assignments, effective permissions.
    Identity(IdentityArgs),
    /// CEL policies, offline: check files, run test cases against them (docs/policies.md).
    #[command(subcommand)]
    Policy(PolicyOp),
    /// The signed audit trail: verify a log or an export, export it, print the public key.
    #[command(subcommand)]
    Audit(AuditOp),
    /// Governed tool contracts against a running sidecar: submit, import a host's manifest,
    /// approve, reject, list (docs/governance.md).
    Tool(ToolArgs),
    /// Metering and budgets against a running sidecar: usage, set-budget (docs/cost.md).
    Cost(CostArgs),
}

#[derive(Subcommand)]
enum PolicyOp {
    /// Validate a policy file or a directory of them: every error with its file, policy and
    /// position (exit 1), or a summary of the policies.
    Lint {
        /// A policy YAML file, or a directory of them (*.yaml, *.yml).
        #[arg(value_name = "DIR|FILE")]
        path: PathBuf,
    },
    /// Run policy test cases (an input and the expected decision each) offline; exit 1 on
    /// any mismatch.
    Test {
        /// The test cases (YAML), e.g. policies/policy-tests.yaml.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The policies to test, instead of the file's `policies:`.
        #[arg(long, value_name = "DIR|FILE")]
        policies: Option<PathBuf>,
    },
    /// ListPolicies of a running sidecar: the policies in force that you may read (files'
    /// and the API's), one a line.
    List {
        #[command(flatten)]
        conn: Management,
        /// Only this tenant's policies.
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
    },
    /// GetPolicy: one policy in force, as YAML.
    Get {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "POLICY_ID")]
        id: String,
    },
    /// Applies every policy of a policy file through the API of a running sidecar: created
    /// when its id is new, updated (against the version in force) when it changed. Exit 1
    /// if any was refused.
    Apply {
        #[command(flatten)]
        conn: Management,
        /// A policy file (the format of docs/policies.md).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// DeletePolicy (an API policy).
    Delete {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "POLICY_ID")]
        id: String,
        /// Refuse unless the policy is at this version (0: any).
        #[arg(long, value_name = "N", default_value_t = 0)]
        expected_version: u64,
    },
    /// EnablePolicy (an API policy).
    Enable {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "POLICY_ID")]
        id: String,
        #[arg(long, value_name = "N", default_value_t = 0)]
        expected_version: u64,
    },
    /// DisablePolicy (an API policy): validated, kept, never applied.
    Disable {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "POLICY_ID")]
        id: String,
        #[arg(long, value_name = "N", default_value_t = 0)]
        expected_version: u64,
    },
    /// ListPendingPolicyChanges (policies.require_approval).
    Pending {
        #[command(flatten)]
        conn: Management,
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
    },
    /// ApprovePolicyChange: puts another principal's pending change in force.
    Approve {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "CHANGE_ID")]
        change_id: String,
        #[arg(long, value_name = "TEXT", default_value = "")]
        comment: String,
    },
    /// RejectPolicyChange: drops a pending change (its author may withdraw it).
    Reject {
        #[command(flatten)]
        conn: Management,
        #[arg(value_name = "CHANGE_ID")]
        change_id: String,
        #[arg(long, value_name = "TEXT", default_value = "")]
        comment: String,
    },
}

/// One line of `aesp policy list`.
fn policy_line(p: &aesp_sidecar::proto::aesp::Policy) -> String {
    format!(
        "{:<28} v{:<3} {:<5} {:<8} {:<8} tenant={:<8} tools={} source={}{}",
        p.policy_id,
        p.version,
        p.effect,
        if p.mode.is_empty() {
            "ENFORCE"
        } else {
            &p.mode
        },
        if p.enabled { "enabled" } else { "disabled" },
        if p.tenant_id.is_empty() {
            "*"
        } else {
            &p.tenant_id
        },
        if p.tools.is_empty() {
            "*".to_string()
        } else {
            p.tools.join(",")
        },
        p.source,
        if p.change_id.is_empty() {
            String::new()
        } else {
            format!(" status={} change_id={}", p.status, p.change_id)
        }
    )
}

/// `aesp policy list|get|apply|delete|enable|disable|pending|approve|reject` against a
/// running sidecar.
async fn policy_remote(op: PolicyOp) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::policy::PolicySpec;
    use aesp_sidecar::proto::aesp;
    use aesp_sidecar::proto::aesp::enterprise_policy_service_client::EnterprisePolicyServiceClient;
    let conn = match &op {
        PolicyOp::List { conn, .. }
        | PolicyOp::Get { conn, .. }
        | PolicyOp::Apply { conn, .. }
        | PolicyOp::Delete { conn, .. }
        | PolicyOp::Enable { conn, .. }
        | PolicyOp::Disable { conn, .. }
        | PolicyOp::Pending { conn, .. }
        | PolicyOp::Approve { conn, .. }
        | PolicyOp::Reject { conn, .. } => conn,
        PolicyOp::Lint { .. } | PolicyOp::Test { .. } => return policy(op),
    };
    let mut c = EnterprisePolicyServiceClient::new(management_channel(conn).await?);
    let change = |id: String, expected_version: u64| aesp::PolicyChangeRequest {
        policy_id: id,
        expected_version,
    };
    let out: Result<String, tonic::Status> = match op {
        PolicyOp::List { tenant, .. } => c
            .list_policies(aesp::ListPoliciesRequest { tenant_id: tenant })
            .await
            .map(|r| {
                let ps = r.into_inner().policies;
                let mut out = format!("{} policies", ps.len());
                for p in &ps {
                    out.push_str("\n  ");
                    out.push_str(&policy_line(p));
                }
                out
            }),
        PolicyOp::Get { id, .. } => c
            .get_policy(aesp::GetPolicyRequest { policy_id: id })
            .await
            .map(|r| {
                let p = r.into_inner();
                let spec = PolicySpec::from_proto(&p)
                    .ok()
                    .and_then(|s| serde_norway::to_string(&s).ok())
                    .unwrap_or_default();
                format!(
                    "# source: {}; updated by {} at {}\n{spec}",
                    p.source, p.updated_by, p.updated_at
                )
            }),
        PolicyOp::Apply { file, .. } => return policy_apply(&mut c, &file).await,
        PolicyOp::Delete {
            id,
            expected_version,
            ..
        } => c
            .delete_policy(change(id, expected_version))
            .await
            .map(|r| policy_line(&r.into_inner())),
        PolicyOp::Enable {
            id,
            expected_version,
            ..
        } => c
            .enable_policy(change(id, expected_version))
            .await
            .map(|r| policy_line(&r.into_inner())),
        PolicyOp::Disable {
            id,
            expected_version,
            ..
        } => c
            .disable_policy(change(id, expected_version))
            .await
            .map(|r| policy_line(&r.into_inner())),
        PolicyOp::Pending { tenant, .. } => c
            .list_pending_policy_changes(aesp::ListPendingPolicyChangesRequest {
                tenant_id: tenant,
            })
            .await
            .map(|r| {
                let cs = r.into_inner().changes;
                let mut out = format!("{} pending change(s)", cs.len());
                for ch in &cs {
                    out.push_str(&format!(
                        "\n  {} {} {} (against v{}) by {}",
                        ch.change_id, ch.action, ch.policy_id, ch.base_version, ch.requested_by
                    ));
                }
                out
            }),
        PolicyOp::Approve {
            change_id, comment, ..
        } => c
            .approve_policy_change(aesp::ReviewPolicyChangeRequest { change_id, comment })
            .await
            .map(|r| {
                let ch = r.into_inner();
                format!(
                    "{} {}: {} {}",
                    ch.change_id, ch.status, ch.action, ch.policy_id
                )
            }),
        PolicyOp::Reject {
            change_id, comment, ..
        } => c
            .reject_policy_change(aesp::ReviewPolicyChangeRequest { change_id, comment })
            .await
            .map(|r| {
                let ch = r.into_inner();
                format!(
                    "{} {}: {} {}",
                    ch.change_id, ch.status, ch.action, ch.policy_id
                )
            }),
        PolicyOp::Lint { .. } | PolicyOp::Test { .. } => unreachable_local(),
    };
    match out {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            println!("{}", client::describe_status(&s));
            Ok(ExitCode::from(1))
        }
    }
}

/// Lint and test were dispatched before a connection was made.
fn unreachable_local() -> Result<String, tonic::Status> {
    Err(tonic::Status::internal(
        "an offline command reached the remote path",
    ))
}

/// `aesp policy apply FILE`: validated locally (the same validation the API applies), then
/// each policy created or updated through the API.
async fn policy_apply(
    c: &mut aesp_sidecar::proto::aesp::enterprise_policy_service_client::EnterprisePolicyServiceClient<client::GridChannel>,
    file: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::policy::{self, PolicySpec};
    use aesp_sidecar::proto::aesp;
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let policies = match policy::parse(&text, &file.display().to_string()) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: {} error(s); nothing applied",
                file.display(),
                errors.0.len()
            );
            return Ok(ExitCode::from(1));
        }
    };
    let mut failed = 0;
    for p in &policies {
        let spec = p.spec();
        let proto = spec.to_proto();
        let outcome = match c
            .get_policy(aesp::GetPolicyRequest {
                policy_id: spec.id.clone(),
            })
            .await
        {
            Err(s) if s.code() == tonic::Code::NotFound => c
                .create_policy(aesp::CreatePolicyRequest {
                    policy: Some(proto),
                })
                .await
                .map(|r| format!("created  {}", policy_line(&r.into_inner()))),
            Err(s) => Err(s),
            Ok(current) => {
                let current = current.into_inner();
                let same = PolicySpec::from_proto(&current).is_ok_and(|mut cur| {
                    cur.version = spec.version;
                    cur == *spec
                });
                if same {
                    Ok(format!("unchanged {}", policy_line(&current)))
                } else {
                    c.update_policy(aesp::UpdatePolicyRequest {
                        expected_version: current.version,
                        policy: Some(proto),
                    })
                    .await
                    .map(|r| format!("updated  {}", policy_line(&r.into_inner())))
                }
            }
        };
        match outcome {
            Ok(line) => println!("{line}"),
            Err(s) => {
                failed += 1;
                println!("refused  {}: {}", spec.id, client::describe_status(&s));
            }
        }
    }
    println!("{} applied, {failed} refused", policies.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `aesp policy lint|test` (offline).
fn policy(op: PolicyOp) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::policy::{self, CaseFile, Mode};
    let load = |path: &std::path::Path| match policy::load(path) {
        Ok(set) => Ok(set),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            Err(ExitCode::from(1))
        }
    };
    match op {
        PolicyOp::Lint { path } => {
            let set = match load(&path) {
                Ok(set) => set,
                Err(code) => return Ok(code),
            };
            let files = policy::files(&path)?.len();
            let dry = set
                .policies()
                .iter()
                .filter(|p| p.spec().mode == Mode::DryRun)
                .count();
            let disabled = set.policies().iter().filter(|p| !p.spec().enabled).count();
            println!(
                "{}: ok: {files} file(s), {} policies ({dry} dry run, {disabled} disabled)",
                path.display(),
                set.len()
            );
            for p in set.policies() {
                let s = p.spec();
                println!(
                    "  {:<28} {:<5} {:<7} tenant={:<8} tools={}",
                    s.id,
                    s.effect.as_str(),
                    s.mode.as_str(),
                    if s.tenant.is_empty() { "*" } else { &s.tenant },
                    if s.tools.is_empty() {
                        "*".to_string()
                    } else {
                        s.tools.join(",")
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyOp::Test { file, policies } => {
            let cases = CaseFile::load(&file).map_err(anyhow::Error::msg)?;
            let Some(path) = policies.or_else(|| cases.policies_path(&file)) else {
                anyhow::bail!(
                    "{}: names no `policies:`; pass --policies DIR|FILE",
                    file.display()
                );
            };
            let set = match load(&path) {
                Ok(set) => set,
                Err(code) => return Ok(code),
            };
            let reports = policy::run_cases(&set, &cases.cases);
            for r in &reports {
                if r.passed {
                    println!("PASS  {} ({})", r.name, r.got);
                } else {
                    println!("FAIL  {}: {}", r.name, r.mismatch);
                    if !r.explanation.is_empty() {
                        println!("      {}", r.explanation);
                    }
                }
            }
            let failed = reports.iter().filter(|r| !r.passed).count();
            println!("{} passed, {failed} failed", reports.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        _ => anyhow::bail!("this policy command talks to a running sidecar"),
    }
}

/// The filters of `aesp audit query | tail` (QueryEventsRequest).
#[derive(clap::Args)]
struct AuditFilter {
    /// First sequence (default 1).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    from: u64,
    /// Last sequence (default: no bound).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    to: u64,
    /// The tenant (default: the caller's own; a platform auditor sees every record).
    #[arg(long, value_name = "ID", default_value = "")]
    tenant: String,
    #[arg(long, value_name = "ID", default_value = "")]
    principal: String,
    /// TOOL_INVOCATION, SESSION_CREATE, TOOL_RESULT, ... (docs/audit-format.md).
    #[arg(long, value_name = "TYPE", default_value = "")]
    event_type: String,
    /// ALLOW, DENY, ERROR or INFO.
    #[arg(long, value_name = "DECISION", default_value = "")]
    decision: String,
    #[arg(long, value_name = "NAME", default_value = "")]
    tool: String,
    /// At most this many records (0: 1000 for query, no limit for tail).
    #[arg(long, value_name = "N", default_value_t = 0)]
    limit: u32,
}

impl AuditFilter {
    fn request(&self, follow: bool) -> aesp_sidecar::proto::aesp::QueryEventsRequest {
        aesp_sidecar::proto::aesp::QueryEventsRequest {
            from_sequence: self.from,
            to_sequence: self.to,
            tenant_id: self.tenant.clone(),
            principal_id: self.principal.clone(),
            event_type: self.event_type.clone(),
            decision: self.decision.clone(),
            tool_name: self.tool.clone(),
            limit: self.limit,
            follow,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum AuditOp {
    /// Verifies every record (hash chain, signatures, sequence, checkpoints) of an
    /// `audit.redb` (the live file of a running sidecar, or a copy) or of an export.
    /// Prints OK with the count and head hash, or the first bad sequence and what is wrong;
    /// exits 1 on any fault.
    Verify {
        /// An audit.redb (`<state_dir>/audit.redb`).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "export",
            required_unless_present = "export"
        )]
        db: Option<PathBuf>,
        /// An export written by `aesp audit export` (JSON lines).
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// The public key(s) to accept (PEM, as `aesp audit pubkey` prints; several blocks
        /// for a rotated key). Without it, keys are trusted as the chain introduces them.
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
    },
    /// Writes every record and checkpoint as JSON lines, each verifiable on its own
    /// (docs/audit-format.md).
    Export {
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// The only format: one JSON object a line.
        #[arg(long, value_name = "FORMAT", default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        /// Where to write (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// QueryEvents against a running sidecar: the matching records as JSON lines (the
    /// export format, so they verify on their own).
    Query {
        #[command(flatten)]
        conn: Management,
        #[command(flatten)]
        filter: AuditFilter,
    },
    /// Like `query`, then keeps the stream open and prints new records as they are written.
    Tail {
        #[command(flatten)]
        conn: Management,
        #[command(flatten)]
        filter: AuditFilter,
    },
    /// GetComplianceReport for a tenant and period, rendered for people (or JSON), its
    /// signature checked against --pubkey.
    Report {
        #[command(flatten)]
        conn: Management,
        /// The tenant (default: the caller's own).
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
        /// Start of the period: Unix seconds, or 0 for the beginning.
        #[arg(long, value_name = "UNIX_SECONDS", default_value_t = 0)]
        since: u64,
        /// End of the period: Unix seconds, or 0 for now.
        #[arg(long, value_name = "UNIX_SECONDS", default_value_t = 0)]
        until: u64,
        /// Only tools carrying this compliance tag (SOC2, HIPAA, ...).
        #[arg(long, value_name = "TAG", default_value = "")]
        compliance_tag: String,
        /// The audit public key (PEM, from `aesp audit pubkey`) the signature must verify with.
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
        /// `text` (for people) or `json`.
        #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Prints the audit public key (PEM) and its key id.
    Pubkey {
        /// The sidecar's config: its audit.key_file, or `<state_dir>/audit.key`.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "key",
            required_unless_present = "key"
        )]
        config: Option<PathBuf>,
        /// A PKCS#8 PEM Ed25519 private key file.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

/// The connection flags of `aesp call`; they go before or after the operation.
#[derive(clap::Args)]
struct CallArgs {
    /// The sidecar (`https://`, mTLS) or a host directly (`http://`, h2c, no certificates).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "URL",
        default_value = "https://127.0.0.1:8443"
    )]
    endpoint: String,
    /// The CA the server's certificate chains to.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/ca.crt"
    )]
    ca: PathBuf,
    /// The client certificate (a leaf; its SPIFFE ID is the caller's identity).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/acme.crt"
    )]
    cert: PathBuf,
    /// The private key of --cert.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/acme.key"
    )]
    key: PathBuf,
    /// The name the server's certificate must carry.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        default_value = "localhost"
    )]
    domain: String,
    /// Sent as x-aesp-correlation-id.
    #[arg(long, global = true, help_heading = "Connection", value_name = "ID")]
    correlation_id: Option<String>,
    /// A file holding the bearer token (JWT) to present. By default the `.jwt` beside
    /// --cert (`.aesp-dev/acme.jwt` for `.aesp-dev/acme.crt`), when there is one.
    #[arg(long, global = true, help_heading = "Connection", value_name = "FILE")]
    token: Option<PathBuf>,
    /// Present no token, even if a default one exists.
    #[arg(long, global = true, help_heading = "Connection")]
    no_token: bool,
    #[command(subcommand)]
    op: CallOp,
}

/// The token `aesp call` presents: --token, else the `.jwt` beside --cert, else none.
fn call_token(a: &CallArgs) -> anyhow::Result<Option<String>> {
    if a.no_token {
        return Ok(None);
    }
    let (path, explicit) = match &a.token {
        Some(p) => (p.clone(), true),
        None => (a.cert.with_extension("jwt"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t.trim().to_string())),
        Err(e) if explicit => Err(anyhow::anyhow!("--token {}: {e}", path.display())),
        Err(_) => Ok(None),
    }
}

/// How to reach a running sidecar's management listener (mTLS, plus a token).
#[derive(clap::Args)]
struct Management {
    /// The sidecar's management listener.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "URL",
        default_value = "https://127.0.0.1:9443"
    )]
    endpoint: String,
    /// The CA the sidecar's certificate chains to.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/ca.crt"
    )]
    ca: PathBuf,
    /// The administrator's certificate (by default the demo's platform administrator).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/admin.crt"
    )]
    cert: PathBuf,
    /// The private key of --cert.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        default_value = ".aesp-dev/admin.key"
    )]
    key: PathBuf,
    /// The name the sidecar's certificate must carry.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        default_value = "localhost"
    )]
    domain: String,
    /// A file holding the bearer token to present; by default the `.jwt` beside --cert.
    #[arg(long, global = true, help_heading = "Connection", value_name = "FILE")]
    token: Option<PathBuf>,
}

#[derive(clap::Args)]
struct IdentityArgs {
    #[command(flatten)]
    conn: Management,
    #[command(subcommand)]
    op: IdentityOp,
}

#[derive(Subcommand)]
enum IdentityOp {
    /// CreateServiceAccount: prints the new principal and its credential (shown once).
    CreateSa {
        /// The tenant the account belongs to.
        #[arg(long, value_name = "ID")]
        tenant: String,
        /// A name for people.
        #[arg(long, value_name = "TEXT", default_value = "")]
        name: String,
        /// A role of the RBAC state (repeat for several).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Lifetime of the credential; 0 = 30 days.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        ttl: u64,
    },
    /// RevokeServiceAccount: its credential is refused from the next call on.
    RevokeSa {
        #[arg(long, value_name = "ID")]
        principal: String,
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// AssignRole: bind a principal to a role in a tenant.
    AssignRole {
        #[arg(long, value_name = "ID")]
        principal: String,
        #[arg(long, value_name = "ID")]
        tenant: String,
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// GetPrincipalPermissions: effective roles and permissions, inherited ones included.
    Permissions {
        #[arg(long, value_name = "ID")]
        principal: String,
        #[arg(long, value_name = "ID")]
        tenant: String,
    },
}

/// A channel to the management listener, carrying the token (--token, else the `.jwt`
/// beside --cert).
async fn management_channel(m: &Management) -> anyhow::Result<client::GridChannel> {
    let tls = ClientTls::from_files(&m.ca, &m.cert, &m.key, &m.domain)?;
    let token = match &m.token {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--token {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::fs::read_to_string(m.cert.with_extension("jwt"))
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let ch = client::channel(&m.endpoint, Some(&tls)).await?;
    client::with_token(ch, token.as_deref())
}

async fn identity(a: IdentityArgs) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::proto::aesp;
    use aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient;
    let mut c = EnterpriseIdentityServiceClient::new(management_channel(&a.conn).await?);
    let out = match a.op {
        IdentityOp::CreateSa {
            tenant,
            name,
            roles,
            ttl,
        } => c
            .create_service_account(aesp::CreateServiceAccountRequest {
                tenant_id: tenant,
                display_name: name,
                roles,
                credential_ttl_seconds: ttl,
            })
            .await
            .map(|r| {
                let sa = r.into_inner();
                format!(
                    "principal_id: {}\ntenant_id: {}\nroles: {}\ncredential (shown once; present it as `authorization: Bearer ...`):\n{}",
                    sa.principal_id,
                    sa.tenant_id,
                    sa.roles.join(","),
                    sa.credential
                )
            }),
        IdentityOp::RevokeSa { principal, reason } => c
            .revoke_service_account(aesp::RevokeServiceAccountRequest {
                principal_id: principal,
                reason,
            })
            .await
            .map(|r| {
                let sa = r.into_inner();
                format!("principal_id: {}\nrevoked: {} (at {})", sa.principal_id, sa.revoked, sa.revoked_at)
            }),
        IdentityOp::AssignRole {
            principal,
            tenant,
            role,
        } => c
            .assign_role(aesp::AssignRoleRequest {
                principal_id: principal,
                tenant_id: tenant,
                role,
            })
            .await
            .map(|r| {
                let b = r.into_inner();
                format!(
                    "{} holds {} in tenant {} (granted by {})",
                    b.principal_id, b.role, b.tenant_id, b.granted_by
                )
            }),
        IdentityOp::Permissions { principal, tenant } => c
            .get_principal_permissions(aesp::GetPrincipalPermissionsRequest {
                principal_id: principal,
                tenant_id: tenant,
            })
            .await
            .map(|r| {
                let p = r.into_inner();
                format!(
                    "principal_id: {}\ntenant_id: {}\nroles: {}\npermissions:\n  {}",
                    p.principal_id,
                    p.tenant_id,
                    p.roles.join(", "),
                    p.permissions.join("\n  ")
                )
            }),
    };
    match out {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            println!("{}", client::describe_status(&s));
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Subcommand)]
enum CallOp {
    /// CreateSession; --principal/--tenant put claims in its SecurityContext.
    CreateSession {
        /// Requested lifetime in seconds; 0 takes the host's default.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        ttl: u64,
        /// A suggested session id; the host picks one by default.
        #[arg(long, value_name = "ID")]
        session_id: Option<String>,
        /// A principal_id claim (the sidecar refuses one that is not the certificate's).
        #[arg(long, value_name = "ID")]
        principal: Option<String>,
        /// A tenant_id claim (the sidecar refuses one that is not the certificate's).
        #[arg(long, value_name = "ID")]
        tenant: Option<String>,
    },
    /// DestroySession.
    DestroySession {
        /// The id of the session to destroy.
        #[arg(long, value_name = "ID")]
        session: String,
    },
    /// ExecuteTool (creates a session first unless --session is given).
    Execute {
        /// The session to call in; a new one by default.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// The tool's name (the reference runtime's: echo, add, count, fail, get_weather).
        #[arg(long, value_name = "NAME")]
        tool: String,
        /// The arguments as a JSON object.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        args: String,
    },
    /// ExecuteToolStream (creates a session first unless --session is given).
    Stream {
        /// The session to call in; a new one by default.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// The streaming tool's name (the reference runtime's: count).
        #[arg(long, value_name = "NAME")]
        tool: String,
        /// The arguments as a JSON object.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        args: String,
    },
}

fn init_logs(filter: Option<&str>, default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only where a person reads them, not in a redirected file.
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.cmd {
        Cmd::Demo { .. } | Cmd::Call(_) | Cmd::Policy(_) => "warn",
        _ => "info",
    };
    init_logs(cli.log.as_deref(), default_log, cli.log_format);
    match run(cli.cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", client::error_chain(e.chain()));
            ExitCode::from(2)
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Serve {
            config,
            check_config,
        } => {
            let cfg = Config::load(&config)?;
            aesp_sidecar::sidecar::check(&cfg)?;
            if check_config {
                println!("{}: configuration is valid", config.display());
                return Ok(ExitCode::SUCCESS);
            }
            let sidecar = aesp_sidecar::sidecar::Sidecar::start(cfg).await?;
            sidecar.run_until_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GridHost { listen, manifest } => {
            let mut opts = demo::host::HostOptions {
                listen,
                ..Default::default()
            };
            if let Some(m) = manifest {
                opts.manifest = aesp_sidecar::adm::load_manifest(&m)?;
            }
            let host = demo::host::spawn(opts).await?;
            tracing::info!(listen = %host.local_addr, "reference GRID host serving (h2c)");
            aesp_sidecar::sidecar::wait_for_signal().await;
            host.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GridRuntime {
            endpoint,
            ca,
            cert,
            key,
            domain,
            runtime_id,
        } => {
            let tls = if endpoint.starts_with("https://") {
                let t = ClientTls::from_files(&ca, &cert, &key, &domain)?;
                Some(demo::runtime::RuntimeTls {
                    ca_pem: t.ca_pem,
                    cert_pem: t.cert_pem,
                    key_pem: t.key_pem,
                    domain: t.domain,
                })
            } else {
                None
            };
            let rt = demo::runtime::spawn(demo::runtime::RuntimeOptions {
                endpoint,
                tls,
                runtime_id,
                ..Default::default()
            })
            .await?;
            rt.wait_announced(Duration::from_secs(30)).await?;
            tracing::info!("reference runtime announced; serving tool calls");
            aesp_sidecar::sidecar::wait_for_signal().await;
            rt.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            dir,
            once,
            listen,
            admin_listen,
            management_listen,
            host_listen,
        } => {
            let addrs = demo::DemoAddrs {
                listen,
                admin_listen,
                management_listen,
                host_listen,
            };
            let steps = demo::run(demo::DemoOptions { dir, once, addrs }).await?;
            Ok(
                if steps.iter().any(|s| s.allowed) && steps.iter().any(|s| !s.allowed) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                },
            )
        }
        Cmd::Call(args) => call(args).await,
        Cmd::Identity(args) => identity(args).await,
        Cmd::Policy(op) => policy_remote(op).await,
        Cmd::Audit(AuditOp::Query { conn, filter }) => {
            audit_query(&conn, filter.request(false)).await
        }
        Cmd::Audit(AuditOp::Tail { conn, filter }) => {
            audit_query(&conn, filter.request(true)).await
        }
        Cmd::Audit(AuditOp::Report {
            conn,
            tenant,
            since,
            until,
            compliance_tag,
            pubkey,
            format,
        }) => {
            let req = aesp_sidecar::proto::aesp::ComplianceReportRequest {
                tenant_id: tenant,
                since_unix_nanos: since.saturating_mul(1_000_000_000),
                until_unix_nanos: until.saturating_mul(1_000_000_000),
                compliance_tag,
            };
            audit_report(&conn, req, pubkey.as_deref(), &format).await
        }
        Cmd::Audit(op) => audit(op),
        Cmd::Tool(args) => tool(args).await,
        Cmd::Cost(args) => cost(args).await,
    }
}

async fn audit_query(
    conn: &Management,
    req: aesp_sidecar::proto::aesp::QueryEventsRequest,
) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::proto::aesp::enterprise_audit_service_client::EnterpriseAuditServiceClient;
    let mut c = EnterpriseAuditServiceClient::new(management_channel(conn).await?);
    let mut stream = match c.query_events(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            println!("{}", client::describe_status(&s));
            return Ok(ExitCode::from(1));
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(e)) => println!("{}", aesp_sidecar::audit::export::record_line(&e)),
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(s) => {
                println!("{}", client::describe_status(&s));
                return Ok(ExitCode::from(1));
            }
        }
    }
}

async fn audit_report(
    conn: &Management,
    req: aesp_sidecar::proto::aesp::ComplianceReportRequest,
    pubkey: Option<&std::path::Path>,
    format: &str,
) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::proto::aesp::enterprise_audit_service_client::EnterpriseAuditServiceClient;
    let mut c = EnterpriseAuditServiceClient::new(management_channel(conn).await?);
    let r = match c.get_compliance_report(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            println!("{}", client::describe_status(&s));
            return Ok(ExitCode::from(1));
        }
    };
    let signature = match pubkey {
        None => None,
        Some(p) => Some(aesp_sidecar::audit::offline::check_report(&r, p)?),
    };
    print!(
        "{}",
        aesp_sidecar::audit::offline::render_report(&r, signature, format)
    );
    Ok(match signature {
        Some(false) => ExitCode::from(1),
        _ if !r.chain_verified => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

fn audit(op: AuditOp) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::audit::offline;
    match op {
        AuditOp::Verify { db, export, pubkey } => {
            let (outcome, notes) = match (db, export) {
                (Some(db), _) => {
                    let (o, n) = offline::verify_db_noted(&db, pubkey.as_deref())?;
                    (o, offline::describe(&db, &n))
                }
                (None, Some(e)) => (offline::verify_export(&e, pubkey.as_deref())?, Vec::new()),
                (None, None) => anyhow::bail!("give --db FILE or --export FILE"),
            };
            // The verdict first (scripts read the first line), then how the file was read.
            let code = match outcome {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(fault) => {
                    println!("FAILED at {fault}");
                    ExitCode::from(1)
                }
            };
            for n in notes {
                println!("{n}");
            }
            Ok(code)
        }
        AuditOp::Export { db, format: _, out } => {
            let (n, notes) = match out {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("--out {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    let n = offline::export(&db, &mut w)?;
                    std::io::Write::flush(&mut w)
                        .with_context(|| format!("--out {}", path.display()))?;
                    n
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    let n = offline::export(&db, &mut w)?;
                    std::io::Write::flush(&mut w)?;
                    n
                }
            };
            for line in offline::describe(&db, &notes) {
                eprintln!("{line}");
            }
            eprintln!("exported {n} records");
            Ok(ExitCode::SUCCESS)
        }
        AuditOp::Query { .. } | AuditOp::Tail { .. } | AuditOp::Report { .. } => {
            anyhow::bail!("query, tail and report run against a sidecar (handled above)")
        }
        AuditOp::Pubkey { config, key } => {
            let key = match (key, config) {
                (Some(k), _) => k,
                (None, Some(c)) => {
                    let cfg = Config::load(&c)?;
                    cfg.audit
                        .key_file
                        .clone()
                        .unwrap_or_else(|| cfg.state_dir.join(aesp_sidecar::audit::key::FILE_NAME))
                }
                (None, None) => anyhow::bail!("give --config FILE or --key FILE"),
            };
            let (pem, id) = offline::pubkey(&key)?;
            print!("{pem}");
            println!("key id: {id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn tool_call(session: &str, tool: &str, args: &str) -> anyhow::Result<grid::ToolCall> {
    let json: serde_json::Value = serde_json::from_str(args).context("--args is not valid JSON")?;
    client::tool_call(session, tool, &json).map_err(|e| anyhow::anyhow!("--args: {e}"))
}

fn request<T>(msg: T, cid: &Option<String>) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    if let Some(c) = cid {
        r.metadata_mut().insert(
            "x-aesp-correlation-id",
            c.parse()
                .context("--correlation-id is not a valid header value")?,
        );
    }
    Ok(r)
}

/// Prints why a call failed: its status, the decoded `EnterpriseError` or, for a failure of
/// the connection, its cause and a hint. Exits 1.
async fn failed(a: &CallArgs, tls: Option<&ClientTls>, s: tonic::Status) -> ExitCode {
    println!("{}", client::describe_status(&s));
    if let Some(why) = client::explain_transport_failure(&s, &a.endpoint, tls, &a.cert).await {
        println!("{why}");
    }
    ExitCode::from(1)
}

async fn call(a: CallArgs) -> anyhow::Result<ExitCode> {
    // Bad arguments are reported before anything is sent.
    if let CallOp::Execute { tool, args, .. } | CallOp::Stream { tool, args, .. } = &a.op {
        tool_call("", tool, args)?;
    }
    // http:// is h2c: a host called directly, without certificates.
    let tls = if a.endpoint.starts_with("http://") {
        None
    } else {
        Some(ClientTls::from_files(&a.ca, &a.cert, &a.key, &a.domain)?)
    };
    let ch = match client::channel(&a.endpoint, tls.as_ref()).await {
        Ok(ch) => ch,
        Err(e) => {
            let chain = client::error_chain(e.chain());
            return Err(match client::connect_hint(&chain, &a.endpoint) {
                Some(hint) => anyhow::anyhow!("{chain}\n{hint}"),
                None => e,
            });
        }
    };
    let token = if tls.is_some() { call_token(&a)? } else { None };
    let c = AespGridClient::with_token(client::with_token(ch, token.as_deref())?);
    let session = match &a.op {
        CallOp::Execute { session: None, .. } | CallOp::Stream { session: None, .. } => match c
            .create_session(request(grid::CreateSession::default(), &a.correlation_id)?)
            .await
        {
            Ok(ack) => {
                let id = ack.session_id;
                println!("session_id: {id}");
                id
            }
            Err(s) => return Ok(failed(&a, tls.as_ref(), s).await),
        },
        _ => String::new(),
    };
    let result = match &a.op {
        CallOp::CreateSession {
            ttl,
            session_id,
            principal,
            tenant,
        } => {
            let sc = (principal.is_some() || tenant.is_some()).then(|| grid::SecurityContext {
                principal_id: principal.clone().unwrap_or_default(),
                tenant_id: tenant.clone().unwrap_or_default(),
            });
            let msg = grid::CreateSession {
                suggested_session_id: session_id.clone().unwrap_or_default(),
                ttl_seconds: *ttl,
                security_context: sc,
            };
            match c.create_session(request(msg, &a.correlation_id)?).await {
                Ok(view) => {
                    if let Some(e) = &view.error {
                        println!("{}", client::describe(e));
                        return Ok(ExitCode::from(1));
                    }
                    println!(
                        "session_id: {}\nexpires_at_unix_seconds: {}",
                        view.session_id, view.expires_at_unix_seconds
                    );
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
        CallOp::DestroySession { session } => match c
            .destroy_session(request(
                grid::DestroySession {
                    session_id: session.clone(),
                },
                &a.correlation_id,
            )?)
            .await
        {
            Ok(view) => {
                if let Some(e) = &view.error {
                    println!("{}", client::describe(e));
                    return Ok(ExitCode::from(1));
                }
                println!("destroyed: {}", view.destroyed);
                Ok(())
            }
            Err(s) => Err(s),
        },
        CallOp::Execute {
            session: s,
            tool,
            args,
        } => {
            let s = s.as_deref().unwrap_or(&session);
            match c
                .execute_tool(request(tool_call(s, tool, args)?, &a.correlation_id)?)
                .await
            {
                Ok(view) => {
                    let (_, code, text) = demo::scenario::render_result(&view);
                    println!("{text}");
                    if code.is_some() {
                        return Ok(ExitCode::from(1));
                    }
                    Ok(())
                }
                Err(st) => Err(st),
            }
        }
        CallOp::Stream {
            session: s,
            tool,
            args,
        } => {
            let s = s.as_deref().unwrap_or(&session);
            match c
                .execute_tool_stream(request(tool_call(s, tool, args)?, &a.correlation_id)?)
                .await
            {
                Ok(mut stream) => {
                    // A chunk carrying an error (a tool error, NO_RUNTIME, ...) makes the
                    // call a failure, as for `execute`; the rest of the stream still prints.
                    let mut chunk_error = false;
                    loop {
                        match stream.message().await {
                            Ok(Some(view)) => {
                                if let Some(e) = &view.error_details {
                                    chunk_error = true;
                                    println!("chunk {}: {}", view.chunk_id, client::describe(e));
                                } else {
                                    println!(
                                        "chunk {}: {}{}",
                                        view.chunk_id,
                                        String::from_utf8_lossy(&view.payload),
                                        if view.is_final { " (final)" } else { "" }
                                    );
                                }
                            }
                            Ok(None) => break,
                            Err(st) => return Ok(failed(&a, tls.as_ref(), st).await),
                        }
                    }
                    if chunk_error {
                        return Ok(ExitCode::from(1));
                    }
                    Ok(())
                }
                Err(st) => Err(st),
            }
        }
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(st) => Ok(failed(&a, tls.as_ref(), st).await),
    }
}

#[derive(clap::Args)]
struct ToolArgs {
    #[command(flatten)]
    conn: Management,
    #[command(subcommand)]
    op: ToolOp,
}

#[derive(Subcommand)]
enum ToolOp {
    /// SubmitToolContract for every contract of a file in the seed format
    /// (policies/tool-contracts.yaml): each becomes a PENDING revision.
    Submit {
        /// The contracts (declarations inline or from the manifest the file names).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Submits every declaration of a GRID host's manifest as a PENDING contract: putting
    /// the sidecar in front of a new host is "import, review, approve".
    Import {
        /// The host's manifest (ADM FunctionDeclarations, YAML or JSON).
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// The tenant the contracts are for; empty = shared by every tenant.
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
        /// The risk assessment to submit them with (LOW, MEDIUM, HIGH); reviewers change it
        /// by submitting a new revision.
        #[arg(long, value_name = "RISK", default_value = "HIGH")]
        risk: String,
        /// A compliance tag (repeat for several).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// A role a caller must hold (repeat for several; all are required).
        #[arg(long = "required-role", value_name = "ROLE")]
        required_roles: Vec<String>,
    },
    /// ApproveToolContract: puts the pending revision in force (not by its submitter).
    Approve(ReviewArgs),
    /// RejectToolContract: the pending revision never runs; the approved one stays.
    Reject(ReviewArgs),
    /// ListToolContracts: the newest revision of each contract, and the approved one in
    /// force when they differ.
    List {
        /// The tenant; empty = your own (shared contracts included); `*` = every tenant.
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
        /// Only PENDING, APPROVED or REJECTED revisions.
        #[arg(long, value_name = "STATUS", default_value = "")]
        status: String,
    },
}

#[derive(clap::Args)]
struct ReviewArgs {
    /// The tool.
    tool: String,
    /// The revision reviewed (the pending one; see `aesp tool list`).
    #[arg(long, value_name = "N")]
    revision: u64,
    /// Why (required; recorded with the review).
    #[arg(long, value_name = "TEXT")]
    comment: String,
    /// The contract's tenant; empty = the shared contract.
    #[arg(long, value_name = "ID", default_value = "")]
    tenant: String,
}

/// One line per contract revision.
fn contract_line(c: &aesp_sidecar::proto::aesp::EnterpriseToolContract) -> String {
    let digest = aesp_sidecar::governance::hex(&c.declaration_sha256);
    format!(
        "{:<10} {:<16} {:>3} {:<9} {:<6} {:<20} {:<20} {:<12} {} {}",
        if c.tenant_id.is_empty() {
            "*shared*"
        } else {
            &c.tenant_id
        },
        c.declaration.as_ref().map_or("", |d| d.name.as_str()),
        c.revision,
        c.approval_status,
        c.risk_assessment,
        if c.compliance_tags.is_empty() {
            "-".to_string()
        } else {
            c.compliance_tags.join(",")
        },
        if c.required_roles.is_empty() {
            "-".to_string()
        } else {
            c.required_roles.join(",")
        },
        digest.get(..12).unwrap_or(&digest),
        c.submitted_by,
        if c.approved_by.is_empty() {
            String::new()
        } else {
            format!("approved by {}", c.approved_by)
        },
    )
}

async fn tool(a: ToolArgs) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::proto::aesp;
    use aesp_sidecar::proto::aesp::enterprise_governance_service_client::EnterpriseGovernanceServiceClient;
    // Read the files before connecting: a bad file is an error about the file.
    let to_submit: Vec<aesp::EnterpriseToolContract> = match &a.op {
        ToolOp::Submit { file } => {
            let mut v: Vec<_> = aesp_sidecar::governance::seed::load(file)
                .map_err(|e| anyhow::anyhow!(e))?
                .into_iter()
                .collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v.into_iter().map(|(_, c)| c).collect()
        }
        ToolOp::Import {
            manifest,
            tenant,
            risk,
            tags,
            required_roles,
        } => aesp_sidecar::adm::load_manifest(manifest)
            .with_context(|| format!("--manifest {}", manifest.display()))?
            .into_iter()
            .map(|d| aesp::EnterpriseToolContract {
                declaration: Some(d),
                risk_assessment: risk.to_ascii_uppercase(),
                compliance_tags: tags.clone(),
                required_roles: required_roles.clone(),
                tenant_id: tenant.clone(),
                ..Default::default()
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut c = EnterpriseGovernanceServiceClient::new(management_channel(&a.conn).await?);
    let out: Result<String, tonic::Status> = match a.op {
        ToolOp::Submit { .. } | ToolOp::Import { .. } => {
            let mut lines = Vec::new();
            let mut failed = None;
            for contract in to_submit {
                match c
                    .submit_tool_contract(aesp::SubmitToolContractRequest {
                        contract: Some(contract),
                    })
                    .await
                {
                    Ok(r) => lines.push(format!("submitted: {}", contract_line(&r.into_inner()))),
                    Err(s) => {
                        failed = Some(s);
                        break;
                    }
                }
            }
            if !lines.is_empty() {
                println!("{}", lines.join("\n"));
            }
            match failed {
                None => Ok(format!(
                    "{} contract(s) PENDING: a second principal holding aesp.governance.approve reviews each (aesp tool approve TOOL --revision N --comment ...)",
                    lines.len()
                )),
                Some(s) => Err(s),
            }
        }
        ToolOp::Approve(r) => c
            .approve_tool_contract(aesp::ReviewToolContractRequest {
                tool_name: r.tool,
                tenant_id: r.tenant,
                revision: r.revision,
                comment: r.comment,
            })
            .await
            .map(|x| format!("approved: {}", contract_line(&x.into_inner()))),
        ToolOp::Reject(r) => c
            .reject_tool_contract(aesp::ReviewToolContractRequest {
                tool_name: r.tool,
                tenant_id: r.tenant,
                revision: r.revision,
                comment: r.comment,
            })
            .await
            .map(|x| format!("rejected: {}", contract_line(&x.into_inner()))),
        ToolOp::List { tenant, status } => c
            .list_tool_contracts(aesp::ListToolContractsRequest {
                tenant_id: tenant,
                approval_status: status,
            })
            .await
            .map(|x| {
                let mut lines = vec![format!(
                    "{:<10} {:<16} {:>3} {:<9} {:<6} {:<20} {:<20} {:<12} SUBMITTED_BY",
                    "TENANT", "TOOL", "REV", "STATUS", "RISK", "TAGS", "REQUIRED_ROLES", "SHA256"
                )];
                lines.extend(x.into_inner().contracts.iter().map(contract_line));
                lines.join("\n")
            }),
    };
    match out {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            println!("{}", client::describe_status(&s));
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(clap::Args)]
struct CostArgs {
    #[command(flatten)]
    conn: Management,
    #[command(subcommand)]
    op: CostOp,
}

#[derive(Subcommand)]
enum CostOp {
    /// GetUsage: an account's usage in its current window, and its budget.
    Usage {
        /// The tenant; empty = your own.
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
        /// A principal of the tenant; empty = the tenant's own account.
        #[arg(long, value_name = "ID", default_value = "")]
        principal: String,
    },
    /// SetBudget: the budget of a tenant or of one of its principals (0 = unlimited; both
    /// limits 0 removes the budget).
    SetBudget {
        /// The tenant; empty = your own.
        #[arg(long, value_name = "ID", default_value = "")]
        tenant: String,
        /// A principal of the tenant; empty = the whole tenant.
        #[arg(long, value_name = "ID", default_value = "")]
        principal: String,
        /// Calls per window (0 = unlimited).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_invocations: u64,
        /// Cost units per window (0 = unlimited).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_cost_units: u64,
        /// The window, in seconds (windows are aligned to the Unix epoch).
        #[arg(long, value_name = "S", default_value_t = 0)]
        window_seconds: u64,
    },
}

fn limit_text(n: u64) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

fn unix_text(s: u64) -> String {
    i64::try_from(s)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || s.to_string(),
            |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

async fn cost(a: CostArgs) -> anyhow::Result<ExitCode> {
    use aesp_sidecar::proto::aesp;
    use aesp_sidecar::proto::aesp::enterprise_cost_service_client::EnterpriseCostServiceClient;
    let mut c = EnterpriseCostServiceClient::new(management_channel(&a.conn).await?);
    let out: Result<String, tonic::Status> = match a.op {
        CostOp::Usage { tenant, principal } => c
            .get_usage(aesp::GetUsageRequest {
                tenant_id: tenant,
                principal_id: principal,
            })
            .await
            .map(|r| {
                let u = r.into_inner();
                let who = if u.principal_id.is_empty() {
                    format!("tenant {}", u.tenant_id)
                } else {
                    format!("principal {} of tenant {}", u.principal_id, u.tenant_id)
                };
                let mut lines = vec![
                    format!(
                        "usage of {who}, window {} .. {}",
                        unix_text(u.window_started_at),
                        unix_text(u.window_resets_at)
                    ),
                    format!(
                        "  invocations {}  cost_units {}  in_flight {}  request_bytes {}  response_bytes {}  duration_ms {}",
                        u.invocations,
                        u.cost_units,
                        u.in_flight,
                        u.request_bytes,
                        u.response_bytes,
                        u.duration_ms
                    ),
                ];
                match &u.budget {
                    Some(b) => lines.push(format!(
                        "  budget: max_invocations {}  max_cost_units {}  window_seconds {}",
                        limit_text(b.max_invocations),
                        limit_text(b.max_cost_units),
                        b.window_seconds
                    )),
                    None => lines.push("  budget: none".into()),
                }
                let mut tools: Vec<_> = u.invocations_by_tool.iter().collect();
                tools.sort();
                for (tool, n) in tools {
                    lines.push(format!(
                        "  {tool}: invocations {n}  cost_units {}",
                        u.cost_units_by_tool.get(tool).copied().unwrap_or(0)
                    ));
                }
                lines.join("\n")
            }),
        CostOp::SetBudget {
            tenant,
            principal,
            max_invocations,
            max_cost_units,
            window_seconds,
        } => c
            .set_budget(aesp::SetBudgetRequest {
                budget: Some(aesp::Budget {
                    tenant_id: tenant,
                    principal_id: principal,
                    max_invocations,
                    max_cost_units,
                    window_seconds,
                }),
            })
            .await
            .map(|r| {
                let b = r.into_inner();
                let who = if b.principal_id.is_empty() {
                    format!("tenant {}", b.tenant_id)
                } else {
                    format!("principal {} of tenant {}", b.principal_id, b.tenant_id)
                };
                if b.max_invocations == 0 && b.max_cost_units == 0 {
                    format!("budget of {who}: none (unlimited)")
                } else {
                    format!(
                        "budget of {who}: max_invocations {}  max_cost_units {}  window_seconds {}",
                        limit_text(b.max_invocations),
                        limit_text(b.max_cost_units),
                        b.window_seconds
                    )
                }
            }),
    };
    match out {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            println!("{}", client::describe_status(&s));
            Ok(ExitCode::from(1))
        }
    }
}

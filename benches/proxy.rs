//! The sidecar's overhead, as ratios against baselines measured in the same run.
//!
//! `cargo bench --bench proxy` starts, in this one process, four complete GRID stacks on
//! loopback with ports picked by the OS, each with its own reference host and its own
//! reference runtime:
//!
//! - `direct`: client → host over h2c; the runtime connects to the host over h2c;
//! - `direct-tls`: client → host over mTLS (the host's own tonic TLS); the runtime likewise;
//! - `sidecar-certonly`: client → sidecar over mTLS 1.3 → host over h2c, clients
//!   authenticated by certificate alone (`auth.tokens_required: []`);
//! - `sidecar-policies`: the demo's configuration plus the shipped CEL policies
//!   (`policies/cel/`, evaluated on every tool invocation);
//! - `sidecar`: the same with the demo's configuration: clients present a bearer token
//!   (verified once, then served from the cache); the runtime connects through the sidecar,
//!   as in a real deployment.
//!
//! Every path is driven by the same client code (tonic, `AespGridClient`) over a few HTTP/2
//! connections with C calls in flight, for a fixed time after a warm-up, in alternating
//! slices (A B … B A) so that drift on a busy machine hits every path alike. Cases:
//! `CreateSession`, `ExecuteTool echo` and `ExecuteToolStream count n=100`. The table gives
//! calls per second, latency percentiles, process CPU per call, and the ratios
//! sidecar/direct. Nothing is asserted about timings.
//!
//! With `AESP_BENCH_TARGET` set it starts nothing and drives endpoints that are already
//! running instead (see `bench/compare-nginx.sh`). Every knob is an environment variable;
//! `bench/README.md` lists them. Run without `--bench` (as `cargo test --benches` does) it
//! is a short smoke run whose numbers mean nothing.

use aesp_sidecar::client::{self, AespGridClient, ClientTls};
use aesp_sidecar::config::Config;
use aesp_sidecar::demo::{self, certs, host, runtime};
use aesp_sidecar::proto::{adm, grid};
use aesp_sidecar::sidecar::Sidecar;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------- settings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    CreateSession,
    ExecuteTool,
    ExecuteToolStream,
}

impl Case {
    fn parse(s: &str) -> anyhow::Result<Case> {
        Ok(match s.trim() {
            "create_session" => Case::CreateSession,
            "execute_tool" => Case::ExecuteTool,
            "execute_tool_stream" => Case::ExecuteToolStream,
            other => bail!(
                "unknown case {other:?} (expected create_session, execute_tool, execute_tool_stream)"
            ),
        })
    }

    fn label(self, stream_n: u64) -> String {
        match self {
            Case::CreateSession => "CreateSession".to_string(),
            Case::ExecuteTool => "ExecuteTool echo".to_string(),
            Case::ExecuteToolStream => format!("ExecuteToolStream count n={stream_n}"),
        }
    }
}

struct Settings {
    /// Measured time per case, per path (split into `rounds` slices).
    secs: Duration,
    warmup: Duration,
    rounds: u32,
    concurrency: Vec<usize>,
    connections: usize,
    cases: Vec<Case>,
    stream_n: u64,
    smoke: bool,
}

fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        _ => Ok(default),
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn seconds(name: &str, default: f64) -> anyhow::Result<Duration> {
    let s: f64 = env_or(name, default)?;
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

impl Settings {
    fn from_env(smoke: bool) -> anyhow::Result<Settings> {
        let (secs, warmup, rounds, conc) = if smoke {
            (0.3, 0.1, 1, "1,4")
        } else {
            (5.0, 1.0, 2, "1,32")
        };
        let concurrency = env_list("AESP_BENCH_CONCURRENCY", conc)
            .iter()
            .map(|c| match c.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("AESP_BENCH_CONCURRENCY: {c:?} is not a positive integer"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cases = env_list(
            "AESP_BENCH_CASES",
            "create_session,execute_tool,execute_tool_stream",
        )
        .iter()
        .map(|c| Case::parse(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
        let rounds: u32 = env_or("AESP_BENCH_ROUNDS", rounds)?;
        let connections: usize = env_or("AESP_BENCH_CONNECTIONS", 4)?;
        let stream_n: u64 = env_or("AESP_BENCH_STREAM_N", 100)?;
        if rounds == 0 || connections == 0 || !(1..=1000).contains(&stream_n) {
            bail!(
                "AESP_BENCH_ROUNDS and AESP_BENCH_CONNECTIONS must be positive, AESP_BENCH_STREAM_N 1..=1000"
            );
        }
        Ok(Settings {
            secs: seconds("AESP_BENCH_SECS", secs)?,
            warmup: seconds("AESP_BENCH_WARMUP_SECS", warmup)?,
            rounds,
            concurrency,
            connections,
            cases,
            stream_n,
            smoke,
        })
    }
}

// ------------------------------------------------------------------------------- paths

/// One way to reach a GRID host.
struct PathSpec {
    name: String,
    endpoint: String,
    tls: Option<ClientTls>,
    /// The bearer token the path's calls carry (the sidecar requires one of clients).
    token: Option<String>,
    /// Processes whose CPU time is charged to this path; empty = this process.
    pids: Vec<u32>,
}

/// A path, connected, with a session its runtime fulfils.
struct BenchPath {
    spec: PathSpec,
    channels: Vec<client::GridChannel>,
    session_id: String,
}

async fn connect(spec: PathSpec, connections: usize) -> anyhow::Result<BenchPath> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        // One tonic channel is one HTTP/2 connection.
        let ch = client::channel(&spec.endpoint, spec.tls.as_ref()).await?;
        channels.push(client::with_token(ch, spec.token.as_deref())?);
    }
    let session_id = ready_session(&channels[0], &spec.name).await?;
    Ok(BenchPath {
        spec,
        channels,
        session_id,
    })
}

/// A long-lived session whose `echo` works: waits (up to 30 s) for the runtime to be there.
async fn ready_session(ch: &client::GridChannel, name: &str) -> anyhow::Result<String> {
    let c = AespGridClient::with_token(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match c
            .create_session(grid::CreateSession {
                ttl_seconds: 86_400,
                ..Default::default()
            })
            .await
        {
            Ok(ack) if ack.error.is_none() && !ack.session_id.is_empty() => {
                match c.execute_tool(echo_call(&ack.session_id)).await {
                    Ok(r) if r.error_details.is_none() => return Ok(ack.session_id),
                    Ok(r) => last = format!("echo answered {:?}", r.error_details),
                    Err(s) => last = client::describe_status(&s),
                }
            }
            Ok(ack) => last = format!("CreateSession answered {:?}", ack.error),
            Err(s) => last = client::describe_status(&s),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{name}: no working session within 30 s (is a runtime connected?): {last}")
}

fn tool_call(session: &str, tool: &str, args: serde_json::Value) -> grid::ToolCall {
    grid::ToolCall {
        session_id: session.to_string(),
        function_call: Some(adm::FunctionCall {
            name: tool.to_string(),
            args: aesp_sidecar::adm::json_to_struct(&args).ok(),
            call_id: String::new(),
        }),
        ..Default::default()
    }
}

fn echo_call(session: &str) -> grid::ToolCall {
    tool_call(session, "echo", serde_json::json!({"text": "hello, GRID"}))
}

/// The DEMO_CONFIG with every port picked by the OS and `upstream` as given (as
/// `tests/common::config_text` does).
fn config_text(upstream: &str) -> String {
    demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9443", "127.0.0.1:0")
        .replace("http://127.0.0.1:50051", upstream)
        .replace("shutdown_grace_seconds: 5", "shutdown_grace_seconds: 2")
}

/// `text` with tokens required of nobody (certificates alone), for the token-less path.
fn certificates_only(text: &str) -> String {
    match (text.find("\nauth:\n"), text.find("\nstate_dir:")) {
        (Some(a), Some(r)) if a < r => {
            format!("{}\nauth:\n  tokens_required: []{}", &text[..a], &text[r..])
        }
        _ => text.to_string(),
    }
}

fn read(files: &certs::DevFiles, name: &str) -> anyhow::Result<Vec<u8>> {
    files.read(name)
}

fn runtime_tls(files: &certs::DevFiles) -> anyhow::Result<runtime::RuntimeTls> {
    Ok(runtime::RuntimeTls {
        ca_pem: read(files, "ca.crt")?,
        cert_pem: read(files, "runtime.crt")?,
        key_pem: read(files, "runtime.key")?,
        domain: "localhost".into(),
    })
}

fn client_tls(dir: &Path, stem: &str, domain: &str) -> anyhow::Result<ClientTls> {
    ClientTls::from_files(
        &dir.join("ca.crt"),
        &dir.join(format!("{stem}.crt")),
        &dir.join(format!("{stem}.key")),
        domain,
    )
}

/// The three in-process stacks.
struct Embedded {
    _dir: tempfile::TempDir,
    runtimes: Vec<runtime::RuntimeHandle>,
    sidecars: Vec<Sidecar>,
    hosts: Vec<host::HostHandle>,
    specs: Vec<PathSpec>,
}

async fn start_runtime(
    endpoint: String,
    tls: Option<runtime::RuntimeTls>,
    id: &str,
) -> anyhow::Result<runtime::RuntimeHandle> {
    let rt = runtime::spawn(runtime::RuntimeOptions {
        endpoint,
        tls,
        runtime_id: id.to_string(),
        ..Default::default()
    })
    .await?;
    rt.wait_announced(Duration::from_secs(10))
        .await
        .with_context(|| format!("runtime {id}"))?;
    Ok(rt)
}

fn loopback_host() -> host::HostOptions {
    host::HostOptions {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        ..Default::default()
    }
}

impl Embedded {
    async fn start() -> anyhow::Result<Embedded> {
        let dir = tempfile::tempdir()?;
        let (files, _) = certs::ensure(dir.path())?;
        let acme = client_tls(dir.path(), "acme", "localhost")?;

        // direct: h2c all the way.
        let host_d = host::spawn(loopback_host()).await?;
        let rt_d = start_runtime(
            format!("http://{}", host_d.local_addr),
            None,
            "bench-direct",
        )
        .await?;

        // direct-tls: the host terminates mTLS itself.
        let server_tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read(&files, "server.crt")?,
                read(&files, "server.key")?,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                &files, "ca.crt",
            )?));
        let host_t = host::spawn_tls(loopback_host(), server_tls).await?;
        let rt_t = start_runtime(
            format!("https://127.0.0.1:{}", host_t.local_addr.port()),
            Some(runtime_tls(&files)?),
            "bench-direct-tls",
        )
        .await?;

        let acme_token = String::from_utf8(read(&files, "acme.jwt")?)?
            .trim()
            .to_string();
        let mut specs = vec![
            PathSpec {
                name: "direct".into(),
                endpoint: format!("http://{}", host_d.local_addr),
                tls: None,
                token: None,
                pids: Vec::new(),
            },
            PathSpec {
                name: "direct-tls".into(),
                endpoint: format!("https://127.0.0.1:{}", host_t.local_addr.port()),
                tls: Some(acme.clone()),
                token: None,
                pids: Vec::new(),
            },
        ];
        let mut runtimes = vec![rt_d, rt_t];
        let mut hosts = vec![host_d, host_t];
        let mut sidecars = Vec::new();
        // The sidecar paths: mTLS to the sidecar, h2c from it to a host of its own, its
        // runtime connected through it; each with a state_dir of its own. `sidecar` is the
        // demo's configuration (tokens, audit sync).
        let variants: [(&str, bool, &str, &str); 5] = [
            // (name, token, a setting of the demo's config replaced, by)
            ("sidecar-certonly", false, "", ""),
            (
                "sidecar-policies",
                true,
                "governance:\n",
                concat!(
                    "policies:\n  path: ",
                    env!("CARGO_MANIFEST_DIR"),
                    "/policies/cel\ngovernance:\n"
                ),
            ),
            (
                "sidecar-audit-off",
                true,
                "audit:\n",
                "audit:\n  enabled: false\n",
            ),
            (
                "sidecar-audit-async",
                true,
                "  mode: sync ",
                "  mode: async ",
            ),
            ("sidecar", true, "", ""),
        ];
        let wanted = env_list(
            "AESP_BENCH_SIDECARS",
            "sidecar-certonly,sidecar-audit-off,sidecar-audit-async,sidecar-policies,sidecar",
        );
        for (name, token, from, to) in variants {
            if !wanted.iter().any(|w| w == name) {
                continue;
            }
            let host = host::spawn(loopback_host()).await?;
            let mut text = config_text(&format!("http://{}", host.local_addr))
                .replacen("state_dir: state ", &format!("state_dir: state-{name} "), 1)
                .replacen(from, to, usize::from(!from.is_empty()));
            anyhow::ensure!(
                from.is_empty() || text.contains(to),
                "{name}: the demo's config no longer has {from:?} to change"
            );
            if !token {
                text = certificates_only(&text);
            }
            let cfg = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&cfg, text)?;
            let sidecar = Sidecar::start(Config::load(&cfg)?).await?;
            let ep = format!("https://127.0.0.1:{}", sidecar.data_addr.port());
            runtimes.push(
                start_runtime(ep.clone(), Some(runtime_tls(&files)?), "acme-runtime-1").await?,
            );
            specs.push(PathSpec {
                name: name.into(),
                endpoint: ep,
                tls: Some(acme.clone()),
                token: token.then(|| acme_token.clone()),
                pids: Vec::new(),
            });
            sidecars.push(sidecar);
            hosts.push(host);
        }
        Ok(Embedded {
            _dir: dir,
            runtimes,
            sidecars,
            hosts,
            specs,
        })
    }

    async fn stop(self) {
        for rt in self.runtimes {
            rt.shutdown().await;
        }
        for s in self.sidecars {
            s.shutdown().await;
        }
        for h in self.hosts {
            h.shutdown().await;
        }
    }
}

/// `[name=]host:port` or `[name=]scheme://host:port`; a bare `host:port` is https when client
/// certificates are configured.
fn external_spec(item: &str, default_name: &str, tls: &Option<ClientTls>) -> PathSpec {
    let (name, addr) = match item.split_once('=') {
        Some((n, a)) => (n.trim().to_string(), a.trim()),
        None => (default_name.to_string(), item.trim()),
    };
    let endpoint = if addr.contains("://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let tls = if endpoint.starts_with("https://") {
        tls.clone()
    } else {
        None
    };
    // A token for the target: AESP_BENCH_TOKEN (a file), else acme.jwt of the cert dir.
    let token = std::env::var("AESP_BENCH_TOKEN")
        .ok()
        .or_else(|| {
            std::env::var("AESP_BENCH_CERT_DIR")
                .ok()
                .map(|d| format!("{d}/acme.jwt"))
        })
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_string())
        .filter(|_| tls.is_some());
    PathSpec {
        name,
        endpoint,
        tls,
        token,
        pids: Vec::new(),
    }
}

/// The endpoints of external mode: the baselines (the first is the reference) then the target.
fn external_specs(target: &str) -> anyhow::Result<Vec<PathSpec>> {
    let domain = std::env::var("AESP_BENCH_DOMAIN").unwrap_or_else(|_| "localhost".into());
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let tls = match (
        var("AESP_BENCH_CERT_DIR"),
        var("AESP_BENCH_CA"),
        var("AESP_BENCH_CERT"),
        var("AESP_BENCH_KEY"),
    ) {
        (_, Some(ca), Some(cert), Some(key)) => Some(ClientTls::from_files(
            &PathBuf::from(ca),
            &PathBuf::from(cert),
            &PathBuf::from(key),
            &domain,
        )?),
        (Some(dir), ..) => Some(client_tls(Path::new(&dir), "acme", &domain)?),
        (None, None, None, None) => None,
        _ => bail!(
            "set AESP_BENCH_CERT_DIR, or all of AESP_BENCH_CA, AESP_BENCH_CERT and AESP_BENCH_KEY"
        ),
    };
    let mut specs: Vec<PathSpec> = env_list("AESP_BENCH_BASELINE", "")
        .iter()
        .enumerate()
        .map(|(i, b)| external_spec(b, &format!("baseline{}", i + 1), &tls))
        .collect();
    specs.push(external_spec(target, "target", &tls));
    // AESP_BENCH_PIDS=name=pid+pid,name=pid: whose CPU time to charge to each path.
    for item in env_list("AESP_BENCH_PIDS", "") {
        let Some((name, pids)) = item.split_once('=') else {
            bail!("AESP_BENCH_PIDS: expected name=pid+pid, got {item:?}");
        };
        let Some(spec) = specs.iter_mut().find(|s| s.name == name.trim()) else {
            bail!("AESP_BENCH_PIDS: no path named {name:?}");
        };
        spec.pids = pids
            .split('+')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("AESP_BENCH_PIDS: {item:?}"))?;
    }
    let mut names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() != specs.len() {
        bail!("every path needs its own name (name=host:port)");
    }
    Ok(specs)
}

// ------------------------------------------------------------------------------- load

/// The request messages, built once.
struct Work {
    create: grid::CreateSession,
    echo: grid::ToolCall,
    stream: grid::ToolCall,
    stream_n: u64,
}

impl Work {
    fn new(session: &str, stream_n: u64) -> Work {
        Work {
            // The reference host keeps every session until it expires and scans them all on
            // each CreateSession: the shortest TTL keeps that table (and its cost) small.
            create: grid::CreateSession {
                ttl_seconds: 1,
                ..Default::default()
            },
            echo: echo_call(session),
            stream: tool_call(session, "count", serde_json::json!({ "n": stream_n })),
            stream_n,
        }
    }
}

/// One call; `Err` describes what went wrong (a failed call is never timed).
async fn one_call(c: &AespGridClient, case: Case, w: &Work) -> Result<(), String> {
    match case {
        Case::CreateSession => {
            let ack = c
                .create_session(w.create.clone())
                .await
                .map_err(|s| client::describe_status(&s))?;
            match ack.error {
                None if !ack.session_id.is_empty() => Ok(()),
                e => Err(format!("CreateSession answered {e:?}")),
            }
        }
        Case::ExecuteTool => {
            let r = c
                .execute_tool(w.echo.clone())
                .await
                .map_err(|s| client::describe_status(&s))?;
            match r.error_details {
                None if r.status == grid::ResultStatus::Success as i32 => Ok(()),
                e => Err(format!("ExecuteTool answered {e:?}")),
            }
        }
        Case::ExecuteToolStream => {
            let mut s = c
                .execute_tool_stream(w.stream.clone())
                .await
                .map_err(|s| client::describe_status(&s))?;
            let mut n = 0u64;
            let mut last_final = false;
            while let Some(chunk) = s.message().await.map_err(|s| client::describe_status(&s))? {
                if let Some(e) = chunk.error_details {
                    return Err(format!(
                        "chunk {}: {}",
                        chunk.chunk_id,
                        client::describe(&e)
                    ));
                }
                n += 1;
                last_final = chunk.is_final;
            }
            if n != w.stream_n || !last_final {
                return Err(format!(
                    "stream ended after {n} of {} chunks (final: {last_final})",
                    w.stream_n
                ));
            }
            Ok(())
        }
    }
}

/// What one slice (or the sum of a path's slices) measured.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ns: Vec<u64>,
    wall: Duration,
    cpu: Option<Duration>,
    /// How many measured slices this sums (0 for one load task's share of a slice).
    slices: u32,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.latencies_ns.extend(o.latencies_ns);
        self.wall += o.wall;
        // CPU is known for the sum only if it is known for every slice in it.
        self.cpu = if self.slices == 0 {
            o.cpu
        } else {
            self.cpu.zip(o.cpu).map(|(a, b)| a + b)
        };
        self.slices += o.slices;
    }
}

/// CPU time (user + system) of `pids`, or of this process; Linux `/proc` only.
fn cpu_time(pids: &[u32]) -> Option<Duration> {
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat, in clock ticks (USER_HZ is 100
    // on every Linux this runs on).
    let ticks = |pid: &str| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let total = if pids.is_empty() {
        ticks("self")?
    } else {
        let mut t = 0;
        for p in pids {
            t += ticks(&p.to_string())?;
        }
        t
    };
    Some(Duration::from_millis(total * 10))
}

/// Drives `case` on `path` with `concurrency` calls in flight for `dur`.
async fn run_slice(
    path: &BenchPath,
    work: &Arc<Work>,
    case: Case,
    concurrency: usize,
    dur: Duration,
) -> Tally {
    let cpu0 = cpu_time(&path.spec.pids);
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let c = AespGridClient::with_token(path.channels[i % path.channels.len()].clone());
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally {
                latencies_ns: Vec::with_capacity(4096),
                ..Default::default()
            };
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match one_call(&c, case, &work).await {
                    Ok(()) => {
                        t.ok += 1;
                        t.latencies_ns.push(t0.elapsed().as_nanos() as u64);
                    }
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e);
                    }
                }
            }
            t
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(t) => total.add(t),
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert(format!("load task failed: {e}"));
            }
        }
    }
    // Until the last call in flight at the deadline has finished.
    total.wall = start.elapsed();
    total.slices = 1;
    total.cpu = cpu0
        .zip(cpu_time(&path.spec.pids))
        .map(|(a, b)| b.saturating_sub(a));
    total
}

// ------------------------------------------------------------------------------- report

struct Row {
    case: Case,
    concurrency: usize,
    /// Per path, in the order of the paths.
    tallies: Vec<Tally>,
}

fn percentile(sorted: &[u64], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(Duration::from_nanos(
        sorted[rank.clamp(1, sorted.len()) - 1],
    ))
}

fn rate(t: &Tally) -> f64 {
    if t.wall.is_zero() {
        0.0
    } else {
        t.ok as f64 / t.wall.as_secs_f64()
    }
}

fn us(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1e6))
        .unwrap_or_else(|| "-".into())
}

fn cpu_per_call(t: &Tally) -> Option<f64> {
    let calls = t.ok + t.errors;
    (calls > 0)
        .then_some(t.cpu?)
        .map(|c| c.as_secs_f64() * 1e6 / calls as f64)
}

fn print_report(paths: &[BenchPath], rows: &mut [Row], s: &Settings, cpu_what: &str) {
    for row in rows.iter_mut() {
        for t in &mut row.tallies {
            t.latencies_ns.sort_unstable();
        }
    }
    let reference = &paths[0].spec.name;
    let target = &paths[paths.len() - 1].spec.name;
    println!();
    println!(
        "## {target} vs {reference}  ({} s per case and path in {} slices, {} s warm-up, {} connections per path; latency in µs)",
        s.secs.as_secs_f64(),
        s.rounds,
        s.warmup.as_secs_f64(),
        s.connections
    );
    println!();
    println!(
        "| case | C | {reference} req/s | {target} req/s | ratio {target}/{reference} | {reference} p50 / p99 | {target} p50 / p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter() {
        let (r, t) = (&row.tallies[0], &row.tallies[row.tallies.len() - 1]);
        let ratio = if rate(r) > 0.0 {
            format!("{:.2}", rate(t) / rate(r))
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {:.0} | {:.0} | {} | {} / {} | {} / {} |",
            row.case.label(s.stream_n),
            row.concurrency,
            rate(r),
            rate(t),
            ratio,
            us(percentile(&r.latencies_ns, 50.0)),
            us(percentile(&r.latencies_ns, 99.0)),
            us(percentile(&t.latencies_ns, 50.0)),
            us(percentile(&t.latencies_ns, 99.0)),
        );
    }
    println!();
    println!("## Every path ({cpu_what}; ratios against {reference})");
    println!();
    println!(
        "| case | C | path | req/s | ratio | p50 | p90 | p99 | p99.9 | CPU µs/call | CPU ratio | errors |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter() {
        let r = &row.tallies[0];
        for (p, t) in paths.iter().zip(&row.tallies) {
            let ratio = if rate(r) > 0.0 {
                format!("{:.2}", rate(t) / rate(r))
            } else {
                "-".into()
            };
            let cpu = cpu_per_call(t);
            let cpu_ratio = match (cpu, cpu_per_call(r)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            println!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.case.label(s.stream_n),
                row.concurrency,
                p.spec.name,
                rate(t),
                ratio,
                us(percentile(&t.latencies_ns, 50.0)),
                us(percentile(&t.latencies_ns, 90.0)),
                us(percentile(&t.latencies_ns, 99.0)),
                us(percentile(&t.latencies_ns, 99.9)),
                cpu.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
                cpu_ratio,
                t.errors,
            );
        }
    }
    for row in rows.iter() {
        for (p, t) in paths.iter().zip(&row.tallies) {
            if let Some(e) = &t.first_error {
                println!(
                    "\n{} C={} on {}: {} failed calls; first: {e}",
                    row.case.label(s.stream_n),
                    row.concurrency,
                    p.spec.name,
                    t.errors
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------- main

async fn measure(paths: &[BenchPath], s: &Settings) -> Vec<Row> {
    let mut rows = Vec::new();
    let works: Vec<Arc<Work>> = paths
        .iter()
        .map(|p| Arc::new(Work::new(&p.session_id, s.stream_n)))
        .collect();
    let slice = s.secs / s.rounds;
    for &case in &s.cases {
        for &c in &s.concurrency {
            eprintln!("  {} C={c} ...", case.label(s.stream_n));
            for (p, w) in paths.iter().zip(&works) {
                if !s.warmup.is_zero() {
                    run_slice(p, w, case, c, s.warmup).await;
                }
            }
            let mut tallies: Vec<Tally> = paths.iter().map(|_| Tally::default()).collect();
            for round in 0..s.rounds {
                // A B C, then C B A, ...: slow drift of a shared machine hits every path alike.
                let order: Vec<usize> = if round % 2 == 0 {
                    (0..paths.len()).collect()
                } else {
                    (0..paths.len()).rev().collect()
                };
                for i in order {
                    let t = run_slice(&paths[i], &works[i], case, c, slice).await;
                    tallies[i].add(t);
                }
            }
            rows.push(Row {
                case,
                concurrency: c,
                tallies,
            });
        }
    }
    rows
}

async fn bench(s: Settings) -> anyhow::Result<bool> {
    let target = std::env::var("AESP_BENCH_TARGET")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let mut stacks = None;
    let (specs, cpu_what) = match &target {
        Some(t) => {
            let specs = external_specs(t)?;
            let what = if specs.iter().all(|s| !s.pids.is_empty()) {
                "CPU = the processes named in AESP_BENCH_PIDS"
            } else {
                "CPU = the processes named in AESP_BENCH_PIDS, else the load generator itself"
            };
            (specs, what)
        }
        None => {
            let mut e = Embedded::start().await?;
            let specs = std::mem::take(&mut e.specs);
            stacks = Some(e);
            (
                specs,
                "CPU = this whole process: load generator, hosts, runtimes and sidecar",
            )
        }
    };
    println!(
        "aesp-sidecar proxy benchmark: {} mode, {} CPUs available to this process{}",
        if stacks.is_some() {
            "in-process"
        } else {
            "external"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if s.smoke {
            " (SMOKE RUN without --bench: the numbers mean nothing)"
        } else {
            ""
        }
    );
    for spec in &specs {
        println!(
            "  {:<11} {} ({})",
            spec.name,
            spec.endpoint,
            if spec.tls.is_some() { "mTLS" } else { "h2c" }
        );
    }
    let mut paths = Vec::with_capacity(specs.len());
    for spec in specs {
        paths.push(connect(spec, s.connections).await?);
    }
    let mut rows = measure(&paths, &s).await;
    print_report(&paths, &mut rows, &s, cpu_what);
    let failed = rows
        .iter()
        .any(|r| r.tallies.iter().any(|t| t.errors > 0 || t.ok == 0));
    // Close the client connections first, so the sidecar has nothing to drain.
    drop(paths);
    if let Some(e) = stacks {
        let _ = tokio::time::timeout(Duration::from_secs(10), e.stop()).await;
    }
    Ok(!failed)
}

/// `AESP_BENCH_CERTS_ONLY=DIR`: writes the dev certificates and the demo's `sidecar.yaml`
/// into DIR (for `bench/compare-nginx.sh`) and exits.
fn certs_only(dir: &Path) -> anyhow::Result<()> {
    let (files, fresh) = certs::ensure(dir)?;
    std::fs::write(files.path("sidecar.yaml"), demo::DEMO_CONFIG)?;
    println!(
        "{} certificates and sidecar.yaml in {}",
        if fresh { "generated" } else { "reused" },
        dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if let Some(dir) = std::env::var_os("AESP_BENCH_CERTS_ONLY").filter(|d| !d.is_empty()) {
        return match certs_only(Path::new(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    // RUST_LOG (e.g. `aesp_sidecar=debug`) shows what the stacks log, on stderr.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let settings = match Settings::from_env(smoke) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start tokio: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(bench(settings)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some calls failed (or none succeeded); see above");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

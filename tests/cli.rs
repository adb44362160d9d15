//! The `aesp` binary as users run it: config validation, SIGTERM, the demo on ports of its
//! own, `aesp call` (exit codes, transport errors explained, flags and help), and logs.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn aesp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aesp"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_config_names_the_file_the_field_and_the_expectation() {
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    let cfg = dir.path().join("sidecar.yaml");
    let good = aesp_sidecar::demo::DEMO_CONFIG;

    std::fs::write(&cfg, good).unwrap();
    let out = aesp()
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    for (broken, field, expected) in [
        (
            good.replace("http://127.0.0.1:50051", "localhost:50051"),
            "upstream.address",
            "expected",
        ),
        (
            good.replace("cert: server.crt", "cert: missing.crt"),
            "tls.cert",
            "missing.crt",
        ),
        (
            good.replace("key: server.key", "key: ca.crt"),
            "tls.key",
            "private key",
        ),
        (
            good.replace("deployment_environment: DEV", "deployment_environment: LAB"),
            "runtime.deployment_environment",
            "DEV, TEST, PROD",
        ),
        (
            good.replace("max_message_bytes: 4194304", "max_mesage_bytes: 4194304"),
            "max_mesage_bytes",
            "unknown field",
        ),
        ("listen: [1, 2\n".to_string(), "", ""),
    ] {
        std::fs::write(&cfg, &broken).unwrap();
        let out = aesp()
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--check-config")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{field}: {err}");
        assert!(
            err.contains(&cfg.display().to_string()),
            "names the file: {err}"
        );
        assert!(err.contains(field), "names {field}: {err}");
        assert!(err.contains(expected), "says {expected}: {err}");
    }
}

#[test]
fn the_readme_shows_the_config_error_the_binary_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sample = readme
        .lines()
        .find(|l| l.starts_with("error: ") && l.contains("upstream.address"))
        .expect("a sample error in the README");
    let (_, after_path) = sample.split_once("sidecar.yaml: ").unwrap();

    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    let cfg = dir.path().join("sidecar.yaml");
    let text = aesp_sidecar::demo::DEMO_CONFIG.replace("http://127.0.0.1:50051", "localhost");
    std::fs::write(&cfg, text).unwrap();
    let out = aesp()
        .args(["serve", "--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!("error: {}: {after_path}", cfg.display()),
        "README: {sample}"
    );
}

#[test]
fn serve_drains_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    let cfg = dir.path().join("sidecar.yaml");
    let (data, admin) = (free_port(), free_port());
    let text = aesp_sidecar::demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{data}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace(
            "management_listen: 127.0.0.1:9443",
            "management_listen: \"off\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let mut child = aesp()
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it serves.
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the sidecar did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", data)).is_err(),
        "no longer listening"
    );
}

/// Holds the demo's default ports while a test runs, where they are free: a demo under test
/// must not need them (a user's own demo may hold them).
fn occupy_default_demo_ports() -> Vec<std::net::TcpListener> {
    [
        "127.0.0.1:8443",
        "127.0.0.1:9901",
        "127.0.0.1:9443",
        "127.0.0.1:50051",
    ]
    .iter()
    .filter_map(|a| std::net::TcpListener::bind(a).ok())
    .collect()
}

#[test]
fn demo_runs_its_scenario_on_the_ports_it_is_given_and_writes_its_files() {
    let _defaults = occupy_default_demo_ports();
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let [data, admin, management, host] = ports.map(|p| format!("127.0.0.1:{p}"));
    let out = aesp()
        .args(["demo", "--once", "--dir"])
        .arg(dir.path())
        .args(["--listen", &data, "--admin-listen", &admin])
        .args(["--management-listen", &management, "--host-listen", &host])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "ALLOWED",
        "DENIED",
        "IDENTITY_MISMATCH",
        "METHOD_NOT_ALLOWED",
        "TOOL_ERROR",
        "correlation_id",
        "tenant_id: \"acme\"",
    ] {
        assert!(stdout.contains(want), "missing {want}:\n{stdout}");
    }
    for f in [
        "ca.crt",
        "server.crt",
        "server.key",
        "acme.crt",
        "acme.key",
        "globex.crt",
        "globex.key",
        "runtime.crt",
        "runtime.key",
        "admin.crt",
        "admin.key",
        "sidecar.yaml",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // The written config is the one it ran, on the ports it was given, and it validates.
    let yaml = std::fs::read_to_string(dir.path().join("sidecar.yaml")).unwrap();
    for want in [
        format!("listen: {data} "),
        format!("admin_listen: {admin} "),
        format!("management_listen: {management} "),
        format!("address: http://{host} "),
    ] {
        assert!(yaml.contains(&want), "{want}:\n{yaml}");
    }
    let out = aesp()
        .args(["serve", "--check-config", "--config"])
        .arg(dir.path().join("sidecar.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    // The "try it yourself" lines name the ports it got, and the binary as it can be run.
    let usage = &stdout[stdout.find("Try it yourself").expect("usage lines")..];
    assert!(
        usage.contains(&format!("call --endpoint https://{data} --ca ")),
        "{usage}"
    );
    assert!(
        usage.contains(&format!("localhost:{}", ports[0])),
        "{usage}"
    );
    assert!(
        usage.contains(&format!("http://{admin}/metrics")),
        "{usage}"
    );
    for default in [":8443", ":9901", ":9443", ":50051"] {
        assert!(!usage.contains(default), "{default} in:\n{usage}");
    }
    // Each printed `aesp` command starts with a path that, from where the demo ran, is
    // the binary that printed it (or plain `aesp`, when PATH finds that binary).
    let program = std::fs::canonicalize(env!("CARGO_BIN_EXE_aesp")).unwrap();
    let commands: Vec<&str> = usage
        .lines()
        .map(str::trim_start)
        .filter(|l| {
            [" call ", " serve ", " grid-runtime ", " tool "]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert_eq!(commands.len(), 9, "{usage}");
    for c in commands {
        let first = c.split_whitespace().next().unwrap();
        let resolves = if first == "aesp" {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("aesp"))
                .find(|p| p.is_file())
                .and_then(|p| std::fs::canonicalize(p).ok())
        } else {
            std::fs::canonicalize(first).ok()
        };
        assert_eq!(resolves.as_ref(), Some(&program), "{c}");
    }
}

#[test]
fn demo_names_a_busy_port_and_the_flag_that_moves_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = aesp()
        .args(["demo", "--once", "--dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--management-listen", "127.0.0.1:0"])
        .args(["--host-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("port {port}")),
        "names the port: {err}"
    );
    assert!(err.contains("in use"), "{err}");
    assert!(
        err.contains("--admin-listen 127.0.0.1:PORT"),
        "names the flag: {err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Scenario"),
        "nothing ran"
    );
}

async fn run_call(stack: &common::Stack, stem: &str, args: &[&str]) -> (i32, String) {
    let f = |n: &str| stack.files.path(n).display().to_string();
    let mut cmd = aesp();
    cmd.args(["call", "--endpoint", &stack.endpoint, "--ca", &f("ca.crt")])
        .args([
            "--cert",
            &f(&format!("{stem}.crt")),
            "--key",
            &f(&format!("{stem}.key")),
        ])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn aesp_call_prints_results_streams_and_decoded_denials() {
    let stack = common::Stack::start().await;
    let (code, out) = run_call(
        &stack,
        "acme",
        &[
            "--correlation-id",
            "cli-1",
            "execute",
            "--tool",
            "echo",
            "--args",
            r#"{"text":"hi there"}"#,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(r#"{"text":"hi there"}"#), "{out}");
    assert!(
        out.contains("cli-1"),
        "the correlation id went end to end: {out}"
    );

    let (code, out) = run_call(
        &stack,
        "acme",
        &["stream", "--tool", "count", "--args", r#"{"n":3}"#],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("chunk ")).count(),
        3,
        "{out}"
    );
    assert!(out.contains("(final)"));

    let (code, out) = run_call(&stack, "acme", &["execute", "--tool", "fail"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("EnterpriseError TOOL_ERROR") && out.contains("correlation_id: "),
        "{out}"
    );

    let (code, out) = run_call(&stack, "globex", &["create-session", "--tenant", "acme"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PermissionDenied") && out.contains("IDENTITY_MISMATCH"),
        "{out}"
    );

    let (code, out) = run_call(
        &stack,
        "acme",
        &["execute", "--tool", "echo", "--args", "not json"],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--args is not valid JSON"), "{out}");
    assert!(!out.contains("session_id"), "nothing was sent: {out}");
    stack.stop().await;
}

#[tokio::test]
async fn call_stream_exits_1_when_a_chunk_carries_an_error() {
    let stack = common::Stack::start().await;
    let (code, out) = run_call(&stack, "acme", &["stream", "--tool", "fail"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("chunk ") && out.contains("EnterpriseError TOOL_ERROR"),
        "{out}"
    );
    stack.stop().await;

    // No runtime connected: the host answers NO_RUNTIME.
    let stack = common::Stack::start_with("", false).await;
    let (code, out) = run_call(
        &stack,
        "acme",
        &["stream", "--tool", "count", "--args", r#"{"n":2}"#],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NO_RUNTIME"), "{out}");
    stack.stop().await;
}

#[tokio::test]
async fn call_with_a_ca_certificate_as_client_certificate_prints_the_cause_and_a_hint() {
    let stack = common::Stack::start().await;
    let (code, out) = run_call(&stack, "ca", &["execute", "--tool", "echo"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cause: ") && out.contains("received fatal alert: CertificateUnknown"),
        "the server's refusal: {out}"
    );
    assert!(
        out.contains("hint: the server refused the client certificate")
            && out.contains("ca.crt is a CA certificate (CaUsedAsEndEntity)")
            && out.contains("use a leaf certificate"),
        "{out}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn call_with_http_against_the_tls_port_says_to_use_https() {
    let stack = common::Stack::start().await;
    let plain = stack.endpoint.replacen("https://", "http://", 1);
    let mut cmd = aesp();
    cmd.args(["call", "--endpoint", &plain, "execute", "--tool", "echo"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cause: transport error: "), "{text}");
    assert!(
        text.contains(&format!(
            "hint: the endpoint speaks TLS: use https:// ({})",
            stack.endpoint
        )),
        "{text}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn connection_flags_are_accepted_after_the_operation_too() {
    let stack = common::Stack::start().await;
    let f = |n: &str| stack.files.path(n).display().to_string();
    let mut cmd = aesp();
    cmd.args([
        "call",
        "execute",
        "--tool",
        "echo",
        "--args",
        r#"{"text":"after"}"#,
    ])
    .args(["--endpoint", &stack.endpoint, "--ca", &f("ca.crt")])
    .args(["--cert", &f("acme.crt"), "--key", &f("acme.key")])
    .args(["--correlation-id", "cli-after"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(r#"{"text":"after"}"#) && text.contains("cli-after"),
        "{text}"
    );
    stack.stop().await;
}

#[test]
fn every_flag_of_every_command_has_help_text() {
    for cmd in [
        &["serve"][..],
        &["grid-host"],
        &["grid-runtime"],
        &["demo"],
        &["call"],
        &["call", "create-session"],
        &["call", "destroy-session"],
        &["call", "execute"],
        &["call", "stream"],
    ] {
        let out = aesp().args(cmd).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd:?}: {help}");
        let flags: Vec<&str> = help
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("--") || l.starts_with("-h"))
            .collect();
        assert!(flags.len() >= 2, "{cmd:?}:\n{help}");
        for line in flags {
            // "--flag <VALUE>  Text": the text after the flag and its value name.
            let text = line
                .split_once("  ")
                .map(|(_, t)| t.trim())
                .unwrap_or_default();
            assert!(!text.is_empty(), "{cmd:?}: no help for {line:?}\n{help}");
        }
    }
    let out = aesp().args(["call", "execute", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--tool <NAME>",
        "--session <ID>",
        "--args <JSON>",
        "--cert <FILE>",
    ] {
        assert!(help.contains(flag), "{flag}:\n{help}");
    }
}

/// Runs the reference host with `flags`, stderr piped, until it logs that it serves; returns
/// what it logged.
fn host_log(flags: &[&str]) -> String {
    use std::io::BufRead;
    let mut child = aesp()
        .args(flags)
        .args(["grid-host", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("serving");
            log.push_str(&line);
            log.push('\n');
            if done {
                break;
            }
        }
        let _ = tx.send(log);
    });
    let log = rx.recv_timeout(Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    log.expect("the host logged that it serves")
}

#[test]
fn logs_off_a_terminal_carry_no_colour_codes_and_json_logs_parse() {
    let human = host_log(&[]);
    assert!(human.contains("INFO"), "{human}");
    assert!(!human.contains('\u{1b}'), "no ANSI escapes: {human:?}");

    let json = host_log(&["--log-format", "json"]);
    let lines: Vec<&str> = json.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(json.contains("\"listen\":\"127.0.0.1:"), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aesp_identity_administers_a_running_sidecar() {
    let stack = common::Stack::start_with("", false).await;
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let d = stack.files.dir.clone();
    let run = |stem: &str, args: &[&str]| {
        let out = aesp()
            .arg("identity")
            .args(args)
            .arg("--endpoint")
            .arg(&ep)
            .arg("--ca")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join(format!("{stem}.crt")))
            .arg("--key")
            .arg(d.join(format!("{stem}.key")))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = tokio::task::block_in_place(|| {
        run(
            "admin",
            &["permissions", "--principal", "alice", "--tenant", "acme"],
        )
    });
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("grid.session.create"), "{out}");
    let (code, out) = tokio::task::block_in_place(|| {
        run(
            "admin",
            &[
                "create-sa",
                "--tenant",
                "acme",
                "--name",
                "ci",
                "--role",
                "client-user",
            ],
        )
    });
    assert_eq!(code, Some(0), "{out}");
    let principal = out
        .lines()
        .find_map(|l| l.strip_prefix("principal_id: "))
        .unwrap()
        .to_string();
    assert!(principal.starts_with("sa-"));
    let (code, out) = tokio::task::block_in_place(|| {
        run(
            "admin",
            &["revoke-sa", "--principal", &principal, "--reason", "test"],
        )
    });
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("revoked: true"), "{out}");
    // alice (acme.crt with acme.jwt beside it) may not administer globex.
    let (code, out) = tokio::task::block_in_place(|| {
        run(
            "acme",
            &[
                "assign-role",
                "--principal",
                "bob",
                "--tenant",
                "globex",
                "--role",
                "auditor",
            ],
        )
    });
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("AUTHORIZATION_DENIED"), "{out}");
    stack.stop().await;
}

/// A damaged control store (its pages, not its data) stops `aesp serve` with an error that
/// names the file, never a panic.
#[test]
fn serve_on_a_damaged_control_store_says_so_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    aesp_sidecar::demo::certs::ensure(dir.path()).unwrap();
    let cfg = dir.path().join("sidecar.yaml");
    let text = aesp_sidecar::demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{}", free_port()))
        .replace(
            "management_listen: 127.0.0.1:9443",
            "management_listen: \"off\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let state = dir.path().join("state");
    drop(aesp_sidecar::store::ControlStore::open(&state).unwrap());
    let file = state.join("control.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    for b in bytes.iter_mut().skip(4096) {
        *b = 0xa5;
    }
    std::fs::write(&file, &bytes).unwrap();
    let out = aesp()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "a panic: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("control.redb") && stderr.contains("damaged"),
        "{stderr}"
    );
}

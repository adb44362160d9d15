//! The `aesp` binary as users run it: config validation, SIGTERM, and the demo.

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

#[test]
fn demo_runs_its_scenario_and_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = aesp()
        .args(["demo", "--once", "--dir"])
        .arg(dir.path())
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
    // The written config is the one it ran, and it validates.
    let out = aesp()
        .args(["serve", "--check-config", "--config"])
        .arg(dir.path().join("sidecar.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
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

//! `aesp policy lint|test` as users run them: the shipped example set lints and passes its
//! test cases; a broken condition, a duplicate id and a wrong expectation each exit 1 with
//! the file, the policy, the position or the case named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn aesp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aesp"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

#[test]
fn the_shipped_policies_lint_and_pass_their_tests() {
    let out = aesp(&["policy", "lint", "policies/cel"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("policies/cel: ok: 5 file(s), 11 policies (3 dry run, 0 disabled)"),
        "{stdout}"
    );
    assert!(stdout.contains("refund-amount-limit"), "{stdout}");

    let out = aesp(&["policy", "test", "policies/policy-tests.yaml"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("PASS  refund above 500 by an operator (DENY)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PASS  demo - alice echoes (NOT_APPLICABLE)"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn a_broken_condition_exits_1_naming_file_policy_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "broken.yaml",
        r#"
policies:
  - id: fine
    effect: DENY
    condition: "false"
  - id: misspelt
    effect: DENY
    condition: principal.tenant_id == 'acme' && principl.roles.size() > 0
  - id: unbalanced
    effect: ALLOW
    condition: (args.a > 1
"#,
    );
    let out = aesp(&["policy", "lint", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: policies[1]: policy \"misspelt\": condition 1:34: unknown variable `principl`",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("policy \"unbalanced\": condition 1:"),
        "{stderr}"
    );
    assert!(stderr.contains("syntax"), "{stderr}");
    assert!(stderr.contains("2 error(s)"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // Not YAML of the documented shape: the file and the field.
    let file = write(
        dir.path(),
        "shape.yaml",
        "policies:\n  - id: a\n    efect: DENY\n",
    );
    let out = aesp(&["policy", "lint", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("shape.yaml"), "{stderr}");
    assert!(stderr.contains("unknown field `efect`"), "{stderr}");
}

#[test]
fn a_duplicate_id_across_files_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "policies:\n  - {id: same, effect: DENY, condition: 'true'}\n",
    );
    write(
        dir.path(),
        "b.yml",
        "policies:\n  - {id: same, effect: ALLOW, condition: 'true'}\n",
    );
    write(dir.path(), "notes.txt", "not a policy file");
    let out = aesp(&["policy", "lint", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("b.yml: policies[0]: policy \"same\": duplicate id"),
        "{stderr}"
    );
    assert!(stderr.contains("a.yaml: policies[0]"), "{stderr}");
}

#[test]
fn a_failing_case_exits_1_and_says_what_differed() {
    let dir = tempfile::tempdir().unwrap();
    let cases = write(
        dir.path(),
        "cases.yaml",
        &format!(
            r#"
policies: {}
cases:
  - name: a secret in echo is allowed (wrong)
    principal: {{ principal_id: alice, tenant_id: acme }}
    tool: {{ name: echo }}
    args: {{ text: "AKIAIOSFODNN7EXAMPLE" }}
    expect: {{ decision: allow }}
  - name: a small refund in business hours
    principal: {{ principal_id: bob, tenant_id: globex }}
    tool: {{ name: billing_refund }}
    args: {{ amount: 10 }}
    request: {{ time: "2025-01-06T09:00:00Z" }}
    expect: {{ decision: allow, policy: refund-amount-limit }}
  - name: echo
    principal: {{ tenant_id: acme }}
    tool: {{ name: echo }}
    args: {{ text: hi }}
    expect: {{ decision: no_opinion }}
"#,
            repo("policies/cel")
        ),
    );
    let out = aesp(&["policy", "test", cases.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("FAIL  a secret in echo is allowed (wrong): expected ALLOW, got DENY"),
        "{stdout}"
    );
    assert!(
        stdout.contains("denied by policy no-secrets-in-text-args"),
        "{stdout}"
    );
    assert!(
        stdout.contains("expected policy refund-amount-limit among the deciding ones, got [billing-business-hours]"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS  echo (NOT_APPLICABLE)"), "{stdout}");
    assert!(stdout.ends_with("1 passed, 2 failed\n"), "{stdout}");

    // The same cases against a broken policy file (--policies wins over the file's own).
    let broken = write(
        dir.path(),
        "broken.yaml",
        "policies:\n  - {id: x, effect: DENY, condition: 'nope'}\n",
    );
    let out = aesp(&[
        "policy",
        "test",
        cases.to_str().unwrap(),
        "--policies",
        broken.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("policy \"x\": condition 1:1: unknown variable `nope`"),
        "{stderr}"
    );
}

//! Metering and budgets on the real listener (issue 19, cost): a budget hammered by many
//! concurrent calls admits exactly its limit and the rest never reach the host; refused and
//! failed calls release their reservation; `BUDGET_EXCEEDED` carries what remains, the
//! limit, the window and when it resets; the window resets; usage and budgets survive a
//! restart; `EnterpriseCostService` permissions and tenant scoping; a CEL policy on `usage`;
//! the `aesp cost` commands.

mod common;

use aesp_sidecar::client::{self, AespGridClient};
use aesp_sidecar::proto::aesp::enterprise_cost_service_client::EnterpriseCostServiceClient;
use aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient;
use aesp_sidecar::proto::aesp::{AssignRoleRequest, Budget, GetUsageRequest, SetBudgetRequest};
use common::Stack;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Cost = EnterpriseCostServiceClient<client::GridChannel>;

async fn cost(stack: &Stack, stem: &str) -> Cost {
    EnterpriseCostServiceClient::new(stack.management(stem).await)
}

fn code(s: &tonic::Status) -> String {
    client::enterprise_error(s)
        .map(|e| e.code)
        .unwrap_or_default()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Waits, if fewer than `need_ms` are left of the current window of `seconds` (aligned to
/// the epoch), until the next one has begun, so a test's calls do not straddle a reset.
async fn clear_of_reset(seconds: u64, need_ms: u128) {
    let w = u128::from(seconds) * 1000;
    let left = w - now_ms() % w;
    if left < need_ms {
        tokio::time::sleep(Duration::from_millis((left + 50) as u64)).await;
    }
}

async fn session(c: &AespGridClient, id: &str) {
    let ack = c
        .create_session(aesp_sidecar::proto::grid::CreateSession {
            suggested_session_id: id.into(),
            ttl_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(ack.error.is_none(), "{ack:?}");
}

async fn call(
    c: &AespGridClient,
    session: &str,
    tool: &str,
    args: serde_json::Value,
) -> Result<aesp_sidecar::proto::aesp::EnterpriseToolResult, tonic::Status> {
    c.execute_tool(client::tool_call(session, tool, &args).unwrap())
        .await
}

fn host_tool_calls(stack: &Stack) -> usize {
    stack
        .host
        .state
        .request_metadata()
        .iter()
        .filter(|(m, _)| m.ends_with("/ExecuteTool"))
        .count()
}

fn budget(tenant: &str, principal: &str, inv: u64, units: u64, w: u64) -> SetBudgetRequest {
    SetBudgetRequest {
        budget: Some(Budget {
            tenant_id: tenant.into(),
            principal_id: principal.into(),
            max_invocations: inv,
            max_cost_units: units,
            window_seconds: w,
        }),
    }
}

fn usage_of(tenant: &str, principal: &str) -> GetUsageRequest {
    GetUsageRequest {
        tenant_id: tenant.into(),
        principal_id: principal.into(),
    }
}

const ALICE_20: &str = "cost:\n  budgets:\n    - {tenant: acme, principal: alice, max_invocations: 20, window_seconds: 86400}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_calls_on_a_budget_of_twenty_admit_exactly_twenty() {
    clear_of_reset(86_400, 60_000).await;
    let stack = Stack::start_with(ALICE_20, true).await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-hammer").await;
    let before = host_tool_calls(&stack);
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let c = alice.clone();
            tokio::spawn(async move {
                call(
                    &c,
                    "s-hammer",
                    "echo",
                    serde_json::json!({"text": format!("n{i}")}),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut exceeded = Vec::new();
    for c in calls {
        match c.await.unwrap() {
            Ok(r) => {
                assert!(r.error_details.is_none(), "{r:?}");
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert_eq!(code(&s), "BUDGET_EXCEEDED");
                exceeded.push(s);
            }
        }
    }
    assert_eq!((ok, exceeded.len()), (20, 44));
    assert_eq!(
        host_tool_calls(&stack) - before,
        20,
        "only the admitted reached the host"
    );

    // What the refusal says: whose budget, the limit, what remains, the window, its reset.
    let ee = client::enterprise_error(&exceeded[0]).unwrap();
    let d = |k: &str| ee.details.get(k).cloned().unwrap_or_default();
    assert_eq!(d("budget"), "principal");
    assert_eq!(
        (d("tenant"), d("principal")),
        ("acme".into(), "alice".into())
    );
    assert_eq!(d("limit"), "max_invocations");
    assert_eq!(d("max_invocations"), "20");
    assert_eq!(d("remaining_invocations"), "0");
    assert_eq!(d("window_seconds"), "86400");
    let now = (now_ms() / 1000) as u64;
    let resets: u64 = d("window_resets_at").parse().unwrap();
    assert!(resets > now && resets <= now + 86_400, "{resets} vs {now}");
    assert_eq!(resets % 86_400, 0, "windows are aligned to the epoch");
    assert!(
        d("window_resets_at_rfc3339").ends_with("T00:00:00Z"),
        "{ee:?}"
    );
    assert!(!ee.correlation_id.is_empty());
    assert!(
        ee.remediation_steps.contains("aesp cost set-budget"),
        "{ee:?}"
    );

    // Usage, metrics.
    let mut root = cost(&stack, "admin").await;
    let u = root
        .get_usage(usage_of("acme", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((u.invocations, u.cost_units, u.in_flight), (20, 20, 0));
    assert_eq!(u.invocations_by_tool.get("echo"), Some(&20));
    assert!(u.request_bytes > 0 && u.response_bytes > 0, "{u:?}");
    assert_eq!(u.budget.map(|b| b.max_invocations), Some(20));
    let m = |name: &str, labels: &[(&str, &str)]| common::counter(&stack.sidecar, name, labels);
    let acme_echo = [("tenant", "acme"), ("tool", "echo")];
    assert_eq!(
        m(
            "aesp_tool_invocations_total",
            &[("tenant", "acme"), ("tool", "echo"), ("outcome", "charged")]
        ),
        20
    );
    assert_eq!(m("aesp_cost_units_total", &acme_echo), 20);
    assert!(m("aesp_tool_response_bytes_total", &acme_echo) > 0);
    assert_eq!(
        m(
            "aesp_budget_exceeded_total",
            &[("tenant", "acme"), ("scope", "principal")]
        ),
        44
    );
    assert_eq!(common::denials(&stack.sidecar, "BUDGET_EXCEEDED"), 44);
    let text = stack.sidecar.metrics.render();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("aesp_") && l.contains("principal=\"")),
        "no per-principal label in Prometheus"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_calls_release_their_reservation_and_tool_errors_are_charged() {
    clear_of_reset(86_400, 60_000).await;
    let stack = Stack::start_with(
        "cost:\n  budgets:\n    - {tenant: acme, principal: alice, max_invocations: 2, window_seconds: 86400}\n",
        true,
    )
    .await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-rel").await;
    let mut root = cost(&stack, "admin").await;
    // (A call is settled when its response has ended, which can be a moment after the
    // client has its answer: wait for nothing in flight, up to 5 s.)
    let usage = |mut c: Cost| async move {
        let mut last = (0, 0);
        for _ in 0..50 {
            let u = c
                .get_usage(usage_of("acme", "alice"))
                .await
                .unwrap()
                .into_inner();
            last = (u.invocations, u.in_flight);
            if u.in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    };

    // Refused before the budget stage: nothing reserved.
    let s = call(
        &alice,
        "s-rel",
        "echo",
        serde_json::json!({"text": "x", "extra": 1}),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&s), "INVALID_ARGUMENTS");
    // Refused after it (the audit trail cannot record the allow): reserved, then released.
    stack.sidecar.audit_faults.set(true);
    let s = call(&alice, "s-rel", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "AUDIT_UNAVAILABLE");
    stack.sidecar.audit_faults.set(false);
    let mut back = false;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if alice
            .create_session(aesp_sidecar::proto::grid::CreateSession {
                suggested_session_id: format!("s-back-{i}"),
                ttl_seconds: 60,
                ..Default::default()
            })
            .await
            .is_ok_and(|a| a.error.is_none())
        {
            back = true;
            break;
        }
    }
    assert!(back, "traffic resumes once the audit store is writable");
    let released = common::counter(
        &stack.sidecar,
        "aesp_tool_invocations_total",
        &[
            ("tenant", "acme"),
            ("tool", "echo"),
            ("outcome", "released"),
        ],
    );
    assert!(released >= 1, "the refused call had reserved and released");
    assert_eq!(usage(root.clone()).await, (0, 0));

    // An in-band tool error: the host answered, the call is charged.
    let r = call(&alice, "s-rel", "fail", serde_json::json!({}))
        .await
        .unwrap();
    assert!(r.error_details.is_some(), "{r:?}");
    assert_eq!(usage(root.clone()).await, (1, 0));
    call(&alice, "s-rel", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap();
    let s = call(&alice, "s-rel", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "BUDGET_EXCEEDED");
    assert_eq!(usage(root.clone()).await, (2, 0));
    let u = root
        .get_usage(usage_of("acme", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        u.invocations, 2,
        "the tenant's account counts alice's calls too"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_be_reached_is_not_charged() {
    let stack = Stack::start_with(
        "cost:\n  budgets:\n    - {tenant: acme, principal: alice, max_invocations: 1, window_seconds: 86400}\n",
        false,
    )
    .await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    // A session created through the sidecar (calls need one it knows), then the host goes.
    session(&alice, "s-none").await;
    let mut admin = cost(&stack, "admin").await;
    let Stack { sidecar, host, .. } = stack;
    host.shutdown().await;
    for _ in 0..3 {
        let s = call(&alice, "s-none", "echo", serde_json::json!({"text": "x"}))
            .await
            .unwrap_err();
        assert_eq!(code(&s), "UPSTREAM_UNAVAILABLE", "{s:?}");
    }
    let u = admin
        .get_usage(usage_of("acme", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((u.invocations, u.in_flight), (0, 0));
    assert_eq!(
        common::counter(
            &sidecar,
            "aesp_tool_invocations_total",
            &[("tenant", "acme"), ("outcome", "released")]
        ),
        3
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_resets() {
    let stack = Stack::start_with(
        "cost:\n  budgets:\n    - {tenant: acme, max_invocations: 1, window_seconds: 3}\n",
        true,
    )
    .await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-win").await;
    clear_of_reset(3, 2_500).await;
    call(&alice, "s-win", "echo", serde_json::json!({"text": "1"}))
        .await
        .unwrap();
    let s = call(&alice, "s-win", "echo", serde_json::json!({"text": "2"}))
        .await
        .unwrap_err();
    let ee = client::enterprise_error(&s).unwrap();
    assert_eq!(ee.code, "BUDGET_EXCEEDED");
    assert_eq!(ee.details.get("budget").map(String::as_str), Some("tenant"));
    let resets: u128 = ee.details["window_resets_at"].parse().unwrap();
    let wait = (resets * 1000 + 100).saturating_sub(now_ms());
    assert!(wait <= 3100, "resets within the window: {wait} ms");
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    call(&alice, "s-win", "echo", serde_json::json!({"text": "3"}))
        .await
        .unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_budgets_survive_a_restart() {
    clear_of_reset(86_400, 60_000).await;
    let stack = Stack::start().await;
    let mut root = cost(&stack, "admin").await;
    let b = root
        .set_budget(budget("acme", "alice", 5, 0, 86_400))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.tenant_id.as_str(), b.max_invocations), ("acme", 5));
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-r1").await;
    for _ in 0..2 {
        call(&alice, "s-r1", "echo", serde_json::json!({"text": "x"}))
            .await
            .unwrap();
    }
    let dir = stack.stop().await;

    let stack = Stack::restart(dir, true).await;
    let mut root = cost(&stack, "admin").await;
    let u = root
        .get_usage(usage_of("acme", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.invocations, 2, "{u:?}");
    assert_eq!(u.budget.map(|b| b.max_invocations), Some(5));
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-r2").await;
    for _ in 0..3 {
        call(&alice, "s-r2", "echo", serde_json::json!({"text": "x"}))
            .await
            .unwrap();
    }
    let s = call(&alice, "s-r2", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "BUDGET_EXCEEDED");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_usage_and_set_budget_need_their_permission_on_the_tenant() {
    let stack = Stack::start_with("", false).await;
    let mut alice = cost(&stack, "acme").await;
    let mut root = cost(&stack, "admin").await;
    fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> String {
        match r {
            Ok(x) => panic!("allowed: {x:?}"),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                code(&s)
            }
        }
    }
    // A client-user reads its own usage only, and sets nothing.
    assert!(alice.get_usage(usage_of("", "alice")).await.is_ok());
    assert!(alice.get_usage(usage_of("acme", "alice")).await.is_ok());
    assert_eq!(
        denied(alice.get_usage(usage_of("acme", "")).await),
        "AUTHORIZATION_DENIED"
    );
    assert_eq!(
        denied(alice.get_usage(usage_of("acme", "carol")).await),
        "AUTHORIZATION_DENIED"
    );
    assert_eq!(
        denied(alice.get_usage(usage_of("globex", "bob")).await),
        "AUTHORIZATION_DENIED"
    );
    assert_eq!(
        denied(alice.set_budget(budget("acme", "alice", 9, 0, 60)).await),
        "AUTHORIZATION_DENIED"
    );
    // The platform administrator does both on every tenant.
    root.set_budget(budget("globex", "", 7, 0, 60))
        .await
        .unwrap();
    assert_eq!(
        root.get_usage(usage_of("globex", ""))
            .await
            .unwrap()
            .into_inner()
            .budget
            .map(|b| b.max_invocations),
        Some(7)
    );
    // A tenant-admin (aesp.cost.admin) of acme: acme only.
    let mut ids = EnterpriseIdentityServiceClient::new(stack.management("admin").await);
    ids.assign_role(AssignRoleRequest {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        role: "tenant-admin".into(),
    })
    .await
    .unwrap();
    // An auditor (aesp.cost.read) of globex: reads globex, sets nothing, reads no other tenant.
    ids.assign_role(AssignRoleRequest {
        principal_id: "bob".into(),
        tenant_id: "globex".into(),
        role: "auditor".into(),
    })
    .await
    .unwrap();
    let mut alice = cost(&stack, "acme").await;
    let mut bob_now = cost(&stack, "globex").await;
    let b = alice
        .set_budget(budget("", "carol", 3, 30, 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            b.tenant_id.as_str(),
            b.principal_id.as_str(),
            b.max_cost_units
        ),
        ("acme", "carol", 30)
    );
    assert!(alice.get_usage(usage_of("acme", "")).await.is_ok());
    let s = alice
        .set_budget(budget("globex", "", 1, 0, 60))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "AUTHORIZATION_DENIED");
    let ee = client::enterprise_error(&s).unwrap();
    assert_eq!(
        ee.details.get("permission").map(String::as_str),
        Some("aesp.cost.admin")
    );
    assert!(bob_now.get_usage(usage_of("globex", "")).await.is_ok());
    assert_eq!(
        denied(bob_now.get_usage(usage_of("acme", "")).await),
        "AUTHORIZATION_DENIED"
    );
    assert_eq!(
        denied(bob_now.set_budget(budget("globex", "", 1, 0, 60)).await),
        "AUTHORIZATION_DENIED"
    );
    // Each change is audited with the budget before and after.
    let mut audit = aesp_sidecar::proto::aesp::enterprise_audit_service_client::EnterpriseAuditServiceClient::new(
        stack.management("admin").await,
    );
    let mut events = audit
        .query_events(aesp_sidecar::proto::aesp::QueryEventsRequest {
            event_type: "MANAGEMENT_CHANGE".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut changes = Vec::new();
    while let Some(e) = events.message().await.unwrap() {
        if e.attributes.get("change").map(String::as_str) == Some("budget.set") {
            let a = |k: &str| e.attributes.get(k).cloned().unwrap_or_default();
            changes.push((
                e.principal_id.clone(),
                a("target_tenant"),
                a("before"),
                a("after"),
            ));
        }
    }
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(
        (
            changes[0].0.as_str(),
            changes[0].1.as_str(),
            changes[0].2.as_str()
        ),
        ("root", "globex", "null")
    );
    assert!(
        changes[0].3.contains("\"max_invocations\":7"),
        "{changes:?}"
    );
    assert_eq!(
        (changes[1].0.as_str(), changes[1].1.as_str()),
        ("alice", "acme")
    );
    assert!(
        changes[1].3.contains("\"principal_id\":\"carol\""),
        "{changes:?}"
    );
    // A budget that limits something needs a window; ids must be ids.
    let s = root
        .set_budget(budget("acme", "", 5, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        client::enterprise_error(&s)
            .unwrap()
            .details
            .get("field")
            .map(String::as_str),
        Some("budget.window_seconds")
    );
    let s = root
        .get_usage(usage_of("acme", "no/slash"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cel_policy_refuses_high_risk_tools_after_80_percent_of_the_budget() {
    clear_of_reset(86_400, 60_000).await;
    // `add` assessed HIGH for this test; the shipped example policy alone.
    let extra = tempfile::tempdir().unwrap();
    let contracts = aesp_sidecar::demo::certs::CONTRACTS_SEED.replacen(
        "  - tool: add\n    risk_assessment: LOW",
        "  - tool: add\n    risk_assessment: HIGH",
        1,
    );
    assert_ne!(contracts, aesp_sidecar::demo::certs::CONTRACTS_SEED);
    std::fs::write(extra.path().join("contracts.yaml"), contracts).unwrap();
    let policies = extra.path().join("cel");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("budget.yaml"),
        include_str!("../policies/cel/budget.yaml"),
    )
    .unwrap();
    let contracts_path = extra.path().join("contracts.yaml");
    let stack = Stack::start_edited(
        |t| {
            let t = t.replace(
                "contracts: tool-contracts.yaml",
                &format!("contracts: {}", contracts_path.display()),
            );
            common::with_extra(
                t,
                &format!(
                    "policies:\n  path: {}\ncost:\n  budgets:\n    - {{tenant: acme, principal: alice, max_invocations: 5, window_seconds: 86400}}\n",
                    policies.display()
                ),
            )
        },
        true,
    )
    .await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-cel").await;
    // 0%, 20%, 40%, 60% used before each: allowed.
    for _ in 0..4 {
        let r = call(&alice, "s-cel", "add", serde_json::json!({"a": 1, "b": 2}))
            .await
            .unwrap();
        assert!(r.error_details.is_none(), "{r:?}");
    }
    // 80%: the HIGH-risk tool is refused by the policy, a LOW-risk one still runs.
    let s = call(&alice, "s-cel", "add", serde_json::json!({"a": 1, "b": 2}))
        .await
        .unwrap_err();
    let ee = client::enterprise_error(&s).unwrap();
    assert_eq!(ee.code, "POLICY_DENIED", "{ee:?}");
    assert_eq!(
        ee.details.get("policy_id").map(String::as_str),
        Some("high-risk-budget-reserve")
    );
    call(&alice, "s-cel", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap();
    // Spent: the budget refuses whatever the risk.
    let s = call(&alice, "s-cel", "echo", serde_json::json!({"text": "x"}))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "BUDGET_EXCEEDED");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_commands_set_a_budget_and_show_usage() {
    let stack = Stack::start_with("", false).await;
    let port = stack.sidecar.management_addr.unwrap().port();
    let run = |stem: &str, args: &[&str]| {
        let p = |f: &str| stack.dir.path().join(f).to_str().unwrap().to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_aesp"))
            .arg("cost")
            .args(args)
            .args([
                "--endpoint",
                &format!("https://127.0.0.1:{port}"),
                "--ca",
                &p("ca.crt"),
                "--cert",
                &p(&format!("{stem}.crt")),
                "--key",
                &p(&format!("{stem}.key")),
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (status, out) = run(
        "admin",
        &[
            "set-budget",
            "--tenant",
            "acme",
            "--principal",
            "alice",
            "--max-invocations",
            "3",
            "--window-seconds",
            "3600",
        ],
    );
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("budget of principal alice of tenant acme: max_invocations 3  max_cost_units unlimited  window_seconds 3600"),
        "{out}"
    );
    let (status, out) = run(
        "admin",
        &["usage", "--tenant", "acme", "--principal", "alice"],
    );
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("usage of principal alice of tenant acme"),
        "{out}"
    );
    assert!(
        out.contains("invocations 0  cost_units 0  in_flight 0"),
        "{out}"
    );
    assert!(out.contains("budget: max_invocations 3"), "{out}");
    // alice (no aesp.cost.*) reads her own usage, not the tenant's.
    let (status, out) = run("acme", &["usage", "--principal", "alice"]);
    assert_eq!(status, Some(0), "{out}");
    let (status, out) = run("acme", &["usage", "--tenant", "acme"]);
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("AUTHORIZATION_DENIED"), "{out}");
    assert!(out.contains("aesp.cost.read"), "{out}");
    stack.stop().await;
}

//! Every error code of the wire contract, produced by a real call through the sidecar and
//! decoded by a client in both views (issue: tenancy, cost and enterprise errors): the base
//! view (the gRPC status a GRID client without AESP reads, with its message) and the
//! enterprise view (the `EnterpriseError` in `grpc-status-details-bin`, with its correlation
//! id). docs/errors.md lists them.

mod common;

use aesp_sidecar::client::{self, AespGridClient};
use aesp_sidecar::grpc::ErrorCode;
use aesp_sidecar::proto::grid;
use common::{Stack, frame};

fn echo(session: &str, args: serde_json::Value) -> grid::ToolCall {
    client::tool_call(session, "echo", &args).unwrap()
}

/// Both views of `s` agree with the contract's code table for `want`.
fn check(want: ErrorCode, s: &tonic::Status, seen: &mut Vec<&'static str>) {
    // Base view: the gRPC status and a message.
    assert_eq!(
        s.code() as i32,
        want.grpc() as i32,
        "{}: gRPC status: {s:?}",
        want.as_str()
    );
    assert!(!s.message().is_empty(), "{}: no message", want.as_str());
    // Enterprise view.
    let e = client::enterprise_error(s)
        .unwrap_or_else(|| panic!("{}: no EnterpriseError: {s:?}", want.as_str()));
    assert_eq!(e.code, want.as_str(), "{e:?}");
    assert!(!e.correlation_id.is_empty(), "{e:?}");
    assert!(
        !e.remediation_steps.is_empty(),
        "{}: what to do: {e:?}",
        want.as_str()
    );
    seen.push(want.as_str());
}

/// The same for a raw HTTP/2 answer.
fn check_raw(want: ErrorCode, r: &common::RawResponse, seen: &mut Vec<&'static str>) {
    assert_eq!(r.grpc_status(), Some(want.grpc() as i32), "{r:?}");
    let e = r.enterprise_error().expect("an EnterpriseError");
    assert_eq!(e.code, want.as_str(), "{e:?}");
    assert!(!e.correlation_id.is_empty());
    seen.push(want.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_of_the_contract_reaches_a_client_in_both_views() {
    // A policy that denies echo of "forbidden", and a budget of one call for globex.
    let pol_dir = tempfile::tempdir().unwrap();
    let pol = pol_dir.path().join("deny.yaml");
    std::fs::write(
        &pol,
        "policies:\n  - id: no-forbidden-echo\n    effect: DENY\n    tools: [echo]\n    condition: args.text == 'forbidden'\n    remediation_steps: Echo something else.\n",
    )
    .unwrap();
    let extra = format!(
        "policies:\n  path: {}\ncost:\n  budgets:\n    - {{tenant: globex, max_invocations: 1, window_seconds: 86400}}\n",
        pol.display()
    );
    let stack = Stack::start_with(&extra, true).await;
    let mut seen = Vec::new();
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    let ack = alice
        .create_session(grid::CreateSession {
            suggested_session_id: "s-err".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = ack.session_id;

    // AUTHENTICATION_REQUIRED: no token.
    let no_token = AespGridClient::new(stack.channel_without_token("acme").await);
    let e = no_token
        .create_session(grid::CreateSession::default())
        .await
        .unwrap_err();
    check(ErrorCode::AuthenticationRequired, &e, &mut seen);
    // INVALID_CREDENTIALS: a token that does not verify.
    let ch = client::with_token(stack.channel_without_token("acme").await, Some("a.b.c")).unwrap();
    let e = AespGridClient::with_token(ch)
        .create_session(grid::CreateSession::default())
        .await
        .unwrap_err();
    check(ErrorCode::InvalidCredentials, &e, &mut seen);
    // IDENTITY_MISMATCH: a session claimed for another tenant.
    let e = alice
        .create_session(grid::CreateSession {
            security_context: Some(grid::SecurityContext {
                principal_id: "alice".into(),
                tenant_id: "globex".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    check(ErrorCode::IdentityMismatch, &e, &mut seen);
    // AUTHORIZATION_DENIED: a tool outside alice's role.
    let e = alice
        .execute_tool(client::tool_call(&s, "billing_refund", &serde_json::json!({})).unwrap())
        .await
        .unwrap_err();
    check(ErrorCode::AuthorizationDenied, &e, &mut seen);
    // POLICY_DENIED.
    let e = alice
        .execute_tool(echo(&s, serde_json::json!({"text": "forbidden"})))
        .await
        .unwrap_err();
    check(ErrorCode::PolicyDenied, &e, &mut seen);
    assert_eq!(
        client::enterprise_error(&e).unwrap().remediation_steps,
        "Echo something else."
    );
    // TOOL_NOT_APPROVED: a contract pending review.
    let e = alice
        .execute_tool(
            client::tool_call(
                &s,
                "delete_records",
                &serde_json::json!({"customer_id": "c", "reason": "gdpr-erasure"}),
            )
            .unwrap(),
        )
        .await
        .unwrap_err();
    check(ErrorCode::ToolNotApproved, &e, &mut seen);
    // TENANT_ISOLATION_VIOLATION: a session nobody created through the sidecar.
    let e = alice
        .execute_tool(echo("s-nobody", serde_json::json!({"text": "x"})))
        .await
        .unwrap_err();
    check(ErrorCode::TenantIsolationViolation, &e, &mut seen);
    // INVALID_ARGUMENTS.
    let e = alice
        .execute_tool(echo(&s, serde_json::json!({"text": 1})))
        .await
        .unwrap_err();
    check(ErrorCode::InvalidArguments, &e, &mut seen);
    // BUDGET_EXCEEDED: globex may make one call a day.
    let bob = AespGridClient::with_token(stack.channel("globex").await);
    let b = bob
        .create_session(grid::CreateSession::default())
        .await
        .unwrap()
        .session_id;
    bob.execute_tool(echo(&b, serde_json::json!({"text": "1"})))
        .await
        .unwrap();
    let mut e = None;
    for _ in 0..50 {
        match bob
            .execute_tool(echo(&b, serde_json::json!({"text": "2"})))
            .await
        {
            Err(s) => {
                e = Some(s);
                break;
            }
            // The first call's settlement may still be on its way.
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    check(ErrorCode::BudgetExceeded, &e.unwrap(), &mut seen);
    // METHOD_NOT_ALLOWED and MALFORMED_MESSAGE, as a raw HTTP/2 client sees them.
    let mut raw = stack.raw("acme").await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/DropAllSessions",
            &[],
            vec![frame(&[])],
        )
        .await;
    check_raw(ErrorCode::MethodNotAllowed, &r, &mut seen);
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&[0xff, 0xff, 0xff])],
        )
        .await;
    check_raw(ErrorCode::MalformedMessage, &r, &mut seen);
    // AUDIT_UNAVAILABLE: the audit store cannot write.
    stack.sidecar.audit_faults.set(true);
    let e = alice
        .execute_tool(echo(&s, serde_json::json!({"text": "x"})))
        .await
        .unwrap_err();
    check(ErrorCode::AuditUnavailable, &e, &mut seen);
    stack.sidecar.audit_faults.set(false);
    // UPSTREAM_UNAVAILABLE: the host is gone.
    let Stack {
        sidecar,
        host,
        runtime,
        ..
    } = stack;
    if let Some(rt) = runtime {
        rt.shutdown().await;
    }
    host.shutdown().await;
    let mut e = None;
    for _ in 0..50 {
        // Until the audit writer is back, calls are AUDIT_UNAVAILABLE.
        match alice
            .execute_tool(echo(&s, serde_json::json!({"text": "x"})))
            .await
        {
            Err(st)
                if client::enterprise_error(&st)
                    .is_some_and(|x| x.code == "UPSTREAM_UNAVAILABLE") =>
            {
                e = Some(st);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    check(
        ErrorCode::UpstreamUnavailable,
        &e.expect("UPSTREAM_UNAVAILABLE"),
        &mut seen,
    );

    let mut all: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    all.sort_unstable();
    seen.sort_unstable();
    assert_eq!(seen, all, "every code of the contract, once");
    sidecar.shutdown().await;
}

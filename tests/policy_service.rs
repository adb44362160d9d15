//! `EnterprisePolicyService` against a real sidecar (issue 18, items 1, 6 and 13): the API's
//! lifecycle (create, update with optimistic concurrency, invalid CEL with its position,
//! delete, enable, disable), persistence across a restart, governed changes with a second
//! approver, tenant scoping, a POLICY_DENIED and a dry run through the data plane, hot reload
//! of the policy files beside the API's policies, and `TestPolicy` answering what the live
//! call gets over generated inputs.

mod common;

use aesp_sidecar::client;
use aesp_sidecar::demo::tokens::DemoIssuer;
use aesp_sidecar::proto::aesp::enterprise_audit_service_client::EnterpriseAuditServiceClient;
use aesp_sidecar::proto::aesp::enterprise_policy_service_client::EnterprisePolicyServiceClient;
use aesp_sidecar::proto::aesp::{
    self, CreatePolicyRequest, GetPolicyRequest, ListPendingPolicyChangesRequest,
    ListPoliciesRequest, Policy, PolicyChangeRequest, ReviewPolicyChangeRequest, TestPolicyRequest,
    UpdatePolicyRequest,
};
use common::{Stack, frame};
use prost::Message;
use std::time::Duration;

type Client = EnterprisePolicyServiceClient<client::GridChannel>;

fn mgmt(stack: &Stack) -> String {
    format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    )
}

/// A policy client as the certificate `stem` with `token` (none: the certificate alone).
async fn policies(stack: &Stack, stem: &str, token: Option<String>) -> Client {
    let ch = client::channel(&mgmt(stack), Some(&stack.tls(stem)))
        .await
        .unwrap();
    EnterprisePolicyServiceClient::new(client::with_token(ch, token.as_deref()).unwrap())
}

/// The platform administrator (admin.crt, kind admin, certificate alone).
async fn root(stack: &Stack) -> Client {
    policies(stack, "admin", None).await
}

/// A client of tenant acme acting as `principal` with token roles `roles`.
async fn acme_as(stack: &Stack, principal: &str, roles: &[&str]) -> Client {
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let token = issuer
        .mint(principal, "acme", roles, 600, serde_json::json!({}))
        .unwrap();
    policies(stack, "acme", Some(token)).await
}

fn code(s: &tonic::Status) -> String {
    client::enterprise_error(s)
        .map(|e| e.code)
        .unwrap_or_default()
}

fn policy(id: &str, tenant: &str, effect: &str, tools: &[&str], condition: &str) -> Policy {
    Policy {
        policy_id: id.into(),
        tenant_id: tenant.into(),
        effect: effect.into(),
        tools: tools.iter().map(|t| t.to_string()).collect(),
        condition: condition.into(),
        enabled: true,
        ..Default::default()
    }
}

fn create(p: Policy) -> CreatePolicyRequest {
    CreatePolicyRequest { policy: Some(p) }
}

fn change(id: &str, expected_version: u64) -> PolicyChangeRequest {
    PolicyChangeRequest {
        policy_id: id.into(),
        expected_version,
    }
}

fn get(id: &str) -> GetPolicyRequest {
    GetPolicyRequest {
        policy_id: id.into(),
    }
}

async fn ids(c: &mut Client, tenant: &str) -> Vec<String> {
    c.list_policies(ListPoliciesRequest {
        tenant_id: tenant.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .policies
    .into_iter()
    .map(|p| p.policy_id)
    .collect()
}

/// A directory of policy files, and the config lines naming it.
fn policy_dir(files: &[(&str, &str)], extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let cfg = format!(
        "policies:\n  path: {}\n  reload_seconds: 1\n{extra}",
        dir.path().display()
    );
    (dir, cfg)
}

const FILE_POLICY: &str = "policies:\n  - id: file-no-secrets\n    effect: DENY\n    condition: \"args.anyStringMatches('AKIA[0-9A-Z]{16}')\"\n";

/// Every `MANAGEMENT_CHANGE` record's `change` attribute, in order, as the platform auditor
/// reads them through `QueryEvents`.
async fn management_changes(stack: &Stack) -> Vec<(String, String, String)> {
    let ch = client::channel(&mgmt(stack), Some(&stack.tls("admin")))
        .await
        .unwrap();
    let mut a = EnterpriseAuditServiceClient::new(client::with_token(ch, None).unwrap());
    let mut s = a
        .query_events(aesp::QueryEventsRequest {
            event_type: "MANAGEMENT_CHANGE".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push((
            e.attributes.get("change").cloned().unwrap_or_default(),
            e.principal_id.clone(),
            e.attributes.get("after").cloned().unwrap_or_default(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_lifecycle_with_versions_positions_and_tenant_scoping() {
    let (_pdir, cfg) = policy_dir(&[("base.yaml", FILE_POLICY)], "");
    let stack = Stack::start_with(&cfg, false).await;
    let mut root = root(&stack).await;

    // Create: version 1, from the API, in force.
    let p = root
        .create_policy(create(policy(
            "acme-refund-cap",
            "acme",
            "DENY",
            &["billing_refund"],
            "has(args.amount) && args.amount > 100",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.version, p.source.as_str(), p.status.as_str()),
        (1, "api", "ACTIVE")
    );
    assert_eq!(p.updated_by, "root");
    let all = ids(&mut root, "").await;
    assert!(all.contains(&"acme-refund-cap".to_string()), "{all:?}");
    assert!(all.contains(&"file-no-secrets".to_string()), "{all:?}");

    // Invalid CEL: INVALID_ARGUMENT with the line, column and reason.
    let e = root
        .create_policy(create(policy(
            "broken",
            "acme",
            "DENY",
            &[],
            "args.amount > principl.limit",
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let ee = client::enterprise_error(&e).unwrap();
    assert_eq!(ee.details["field"], "condition");
    assert_eq!(ee.details["line"], "1");
    let column: usize = ee.details["column"].parse().unwrap();
    assert!((14..=16).contains(&column), "{ee:?}");
    assert!(ee.details["reason"].contains("principl"), "{ee:?}");
    assert!(e.message().contains("condition 1:"), "{}", e.message());
    assert!(
        root.get_policy(get("broken")).await.is_err(),
        "nothing installed"
    );

    // Duplicates: an API id, a file's id.
    let e = root
        .create_policy(create(policy(
            "acme-refund-cap",
            "acme",
            "DENY",
            &[],
            "true",
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = root
        .create_policy(create(policy("file-no-secrets", "", "DENY", &[], "true")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("base.yaml"), "{}", e.message());
    // A file's policy is changed in its file.
    let e = root
        .disable_policy(change("file-no-secrets", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // Update: a stale version is refused naming both; the current one bumps it.
    let mut next = policy(
        "acme-refund-cap",
        "acme",
        "DENY",
        &["billing_refund"],
        "has(args.amount) && args.amount > 200",
    );
    let e = root
        .update_policy(UpdatePolicyRequest {
            policy: Some(next.clone()),
            expected_version: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("version 1") && e.message().contains("version 7"),
        "{}",
        e.message()
    );
    next.version = 1; // expected_version 0: the policy's own version is the expectation
    let p = root
        .update_policy(UpdatePolicyRequest {
            policy: Some(next.clone()),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.version, 2);
    assert!(p.condition.contains("200"));
    // Invalid CEL on update: refused, the version in force unchanged.
    next.condition = "args.amount +".into();
    let e = root
        .update_policy(UpdatePolicyRequest {
            policy: Some(next),
            expected_version: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let p = root
        .get_policy(get("acme-refund-cap"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.version, 2);

    // Disable, enable, delete; each a new version; stale versions refused.
    let p = root
        .disable_policy(change("acme-refund-cap", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.enabled, p.version), (false, 3));
    let e = root
        .enable_policy(change("acme-refund-cap", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let p = root
        .enable_policy(change("acme-refund-cap", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.enabled, p.version), (true, 4));

    // Tenant scoping: acme's administrator acts on acme's policies only.
    let mut acme_admin = acme_as(&stack, "acme-admin", &[]).await;
    acme_admin
        .create_policy(create(policy(
            "acme-own",
            "acme",
            "DENY",
            &["echo"],
            "false",
        )))
        .await
        .unwrap();
    for tenant in ["globex", ""] {
        let e = acme_admin
            .create_policy(create(policy("not-mine", tenant, "DENY", &[], "false")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{tenant}: {e:?}");
        assert_eq!(code(&e), "AUTHORIZATION_DENIED");
        assert_eq!(
            client::enterprise_error(&e).unwrap().details["permission"],
            "aesp.policy.write"
        );
    }
    root.create_policy(create(policy("globex-own", "globex", "DENY", &[], "false")))
        .await
        .unwrap();
    let seen = ids(&mut acme_admin, "").await;
    assert_eq!(seen, ["acme-own", "acme-refund-cap"], "only acme's");
    let e = acme_admin.get_policy(get("globex-own")).await.unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    let e = acme_admin
        .list_policies(ListPoliciesRequest {
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    let e = acme_admin
        .delete_policy(change("globex-own", 0))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    // alice (client-user) may not read policies at all.
    let mut alice = acme_as(&stack, "alice", &[]).await;
    assert!(ids(&mut alice, "").await.is_empty());
    let e = alice
        .create_policy(create(policy("alice-p", "acme", "DENY", &[], "false")))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");

    // Delete: gone from the set in force.
    let p = root
        .delete_policy(change("acme-refund-cap", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, "DELETED");
    let e = root.get_policy(get("acme-refund-cap")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Every change audited, with who made it.
    let changes = management_changes(&stack).await;
    let names: Vec<&str> = changes.iter().map(|(c, _, _)| c.as_str()).collect();
    for want in [
        "policy_created",
        "policy_updated",
        "policy_disabled",
        "policy_enabled",
        "policy_deleted",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(
        changes
            .iter()
            .any(|(c, who, _)| c == "policy_created" && who == "acme-admin"),
        "{changes:?}"
    );
    stack.stop().await;
}

/// Stops the sidecar of `stack` and starts another on the same directory and config.
async fn restart(stack: Stack) -> Stack {
    let Stack {
        dir,
        files,
        host,
        sidecar,
        runtime,
        endpoint: _,
    } = stack;
    if let Some(rt) = runtime {
        rt.shutdown().await;
    }
    sidecar.shutdown().await;
    let cfg = aesp_sidecar::config::Config::load(&dir.path().join("sidecar.yaml")).unwrap();
    let sidecar = aesp_sidecar::sidecar::Sidecar::start(cfg).await.unwrap();
    let endpoint = format!("https://127.0.0.1:{}", sidecar.data_addr.port());
    Stack {
        dir,
        files,
        host,
        sidecar,
        runtime: None,
        endpoint,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_policies_and_pending_changes_survive_a_restart() {
    let stack = Stack::start_with("policies:\n  require_approval: true\n", false).await;
    let mut admin = acme_as(&stack, "acme-admin", &[]).await;
    let mut reviewer = acme_as(&stack, "acme-reviewer", &["policy-approver"]).await;
    let pending = admin
        .create_policy(create(policy("kept", "acme", "DENY", &["echo"], "false")))
        .await
        .unwrap()
        .into_inner();
    reviewer
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: pending.change_id,
            comment: "ok".into(),
        })
        .await
        .unwrap();
    let mut up = policy("kept", "acme", "DENY", &["echo"], "true");
    up.version = 1;
    let waiting = admin
        .update_policy(UpdatePolicyRequest {
            policy: Some(up),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.status, "PENDING_APPROVAL");

    let stack = restart(stack).await;
    let mut root = root(&stack).await;
    let p = root.get_policy(get("kept")).await.unwrap().into_inner();
    assert_eq!((p.version, p.condition.as_str()), (1, "false"));
    assert_eq!(p.updated_by, "acme-admin");
    let changes = root
        .list_pending_policy_changes(ListPendingPolicyChangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].change_id, waiting.change_id);
    assert_eq!(changes[0].action, "UPDATE");
    // Approved after the restart by another principal: in force.
    let done = root
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: waiting.change_id,
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, "APPROVED");
    let p = root.get_policy(get("kept")).await.unwrap().into_inner();
    assert_eq!((p.version, p.condition.as_str()), (2, "true"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governed_changes_wait_for_a_second_principal_never_the_author() {
    let stack = Stack::start_with("policies:\n  require_approval: true\n", false).await;
    let mut author = acme_as(&stack, "acme-admin", &[]).await;
    let mut reviewer = acme_as(&stack, "acme-reviewer", &["policy-approver"]).await;

    let pending = author
        .create_policy(create(policy("gov", "acme", "DENY", &["echo"], "false")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.status, "PENDING_APPROVAL");
    assert!(pending.change_id.starts_with("chg-"), "{pending:?}");
    // Not in force while pending.
    let e = author.get_policy(get("gov")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let listed = reviewer
        .list_pending_policy_changes(ListPendingPolicyChangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].requested_by, "acme-admin");

    // The author cannot approve (though a tenant admin holds aesp.policy.approve).
    let e = author
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: pending.change_id.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let ee = client::enterprise_error(&e).unwrap();
    assert_eq!(ee.details["reason"], "self-approval");
    assert!(e.message().contains("cannot approve"), "{}", e.message());
    // Nor can a reviewer of another tenant, nor a principal without the permission.
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let t = issuer
        .mint(
            "globex-reviewer",
            "globex",
            &["policy-approver"],
            600,
            serde_json::json!({}),
        )
        .unwrap();
    let mut foreign = policies(&stack, "globex", Some(t)).await;
    let e = foreign
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: pending.change_id.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    let mut alice = acme_as(&stack, "alice", &[]).await;
    let e = alice
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: pending.change_id.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    assert!(
        author.get_policy(get("gov")).await.is_err(),
        "still pending"
    );

    // A second principal approves: in force at version 1.
    let done = reviewer
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: pending.change_id.clone(),
            comment: "looks right".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, "APPROVED");
    assert_eq!(done.reviewed_by, "acme-reviewer");
    let p = author.get_policy(get("gov")).await.unwrap().into_inner();
    assert_eq!((p.version, p.status.as_str()), (1, "ACTIVE"));

    // Two updates against version 1: the first approved, the second is stale.
    let mut up = policy("gov", "acme", "DENY", &["echo"], "true");
    up.version = 1;
    let first = author
        .update_policy(UpdatePolicyRequest {
            policy: Some(up.clone()),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let second = author
        .disable_policy(change("gov", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.status, "PENDING_APPROVAL");
    reviewer
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: first.change_id,
            comment: String::new(),
        })
        .await
        .unwrap();
    let e = reviewer
        .approve_policy_change(ReviewPolicyChangeRequest {
            change_id: second.change_id.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("now at version 2"), "{}", e.message());
    // Rejected: gone, the policy unchanged.
    let r = reviewer
        .reject_policy_change(ReviewPolicyChangeRequest {
            change_id: second.change_id,
            comment: "stale".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, "REJECTED");
    let p = author.get_policy(get("gov")).await.unwrap().into_inner();
    assert_eq!((p.version, p.enabled), (2, true));
    assert!(
        reviewer
            .list_pending_policy_changes(ListPendingPolicyChangesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .changes
            .is_empty()
    );

    // Every transition audited.
    let changes = management_changes(&stack).await;
    let count = |n: &str| changes.iter().filter(|(c, _, _)| c == n).count();
    assert_eq!(count("policy_change_proposed"), 3, "{changes:?}");
    assert_eq!(count("policy_created"), 1);
    assert_eq!(count("policy_updated"), 1);
    assert_eq!(count("policy_change_rejected"), 1);
    assert!(
        changes.iter().any(|(c, who, after)| c == "policy_created"
            && who == "acme-reviewer"
            && after.contains("\"requested_by\":\"acme-admin\"")),
        "{changes:?}"
    );
    stack.stop().await;
}

/// Opens a session as alice (the demo's acme client) and returns it with the connection.
async fn alice_session(stack: &Stack) -> (common::RawH2, String) {
    let mut raw = stack.raw("acme").await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(
                &aesp_sidecar::proto::grid::CreateSession::default().encode_to_vec(),
            )],
        )
        .await;
    let session = aesp::EnterpriseCreateSessionAck::decode(&r.messages()[0][..])
        .unwrap()
        .session_id;
    (raw, session)
}

async fn execute(
    raw: &mut common::RawH2,
    session: &str,
    tool: &str,
    args: serde_json::Value,
) -> common::RawResponse {
    let tc = client::tool_call(session, tool, &args).unwrap();
    raw.call(
        "/altar.grid.v1.GridHost/ExecuteTool",
        &[],
        vec![frame(&tc.encode_to_vec())],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_denial_reaches_the_client_and_a_dry_run_lets_the_call_through() {
    let stack = Stack::start().await;
    let mut root = root(&stack).await;
    let mut deny = policy(
        "no-secret-echo",
        "acme",
        "DENY",
        &["echo"],
        "has(args.text) && args.text.contains('secret')",
    );
    deny.compliance_impact = "PCI-DSS 3.4: secrets must not leave the tenant".into();
    deny.remediation_steps = "Remove the secret from the text.".into();
    root.create_policy(create(deny)).await.unwrap();
    let (mut raw, session) = alice_session(&stack).await;

    let r = execute(
        &mut raw,
        &session,
        "echo",
        serde_json::json!({"text": "my secret"}),
    )
    .await;
    assert_eq!(r.grpc_status(), Some(7), "PERMISSION_DENIED");
    let ee = r.enterprise_error().unwrap();
    assert_eq!(ee.code, "POLICY_DENIED");
    assert_eq!(ee.details["policy_id"], "no-secret-echo");
    assert_eq!(
        ee.compliance_impact,
        "PCI-DSS 3.4: secrets must not leave the tenant"
    );
    assert_eq!(ee.remediation_steps, "Remove the secret from the text.");
    let r = execute(
        &mut raw,
        &session,
        "echo",
        serde_json::json!({"text": "hi"}),
    )
    .await;
    assert!(r.enterprise_error().is_none(), "{:?}", r.enterprise_error());
    assert_eq!(r.grpc_status(), Some(0));

    // A dry-run policy that would deny: the call goes through, the record says so.
    let mut dry = policy(
        "dry-no-hello",
        "acme",
        "DENY",
        &["echo"],
        "has(args.text) && args.text == 'hello'",
    );
    dry.mode = "DRY_RUN".into();
    root.create_policy(create(dry)).await.unwrap();
    let before = common::counter(&stack.sidecar, "aesp_policy_dry_run_denials_total", &[]);
    let r = execute(
        &mut raw,
        &session,
        "echo",
        serde_json::json!({"text": "hello"}),
    )
    .await;
    assert_eq!(r.grpc_status(), Some(0), "{:?}", r.enterprise_error());
    assert_eq!(
        common::counter(&stack.sidecar, "aesp_policy_dry_run_denials_total", &[]),
        before + 1
    );
    let ch = client::channel(&mgmt(&stack), Some(&stack.tls("admin")))
        .await
        .unwrap();
    let mut audit = EnterpriseAuditServiceClient::new(client::with_token(ch, None).unwrap());
    let mut s = audit
        .query_events(aesp::QueryEventsRequest {
            tool_name: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut would = Vec::new();
    let mut denied = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        if let Some(w) = e.attributes.get("dry_run_would_deny") {
            would.push((e.decision.clone(), w.clone()));
        }
        if e.decision == "DENY" {
            denied.push(e);
        }
    }
    assert_eq!(would, [("ALLOW".to_string(), "dry-no-hello".to_string())]);
    assert_eq!(denied.len(), 1, "the one enforced denial");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_file_keeps_the_previous_set_beside_the_api_policies() {
    let (pdir, cfg) = policy_dir(&[("base.yaml", FILE_POLICY)], "");
    let stack = Stack::start_with(&cfg, false).await;
    let mut root = root(&stack).await;
    root.create_policy(create(policy(
        "api-one",
        "acme",
        "DENY",
        &["echo"],
        "false",
    )))
    .await
    .unwrap();
    let failures = || common::counter(&stack.sidecar, "aesp_config_reload_failures_total", &[]);
    let start = failures();
    let wait = || tokio::time::sleep(Duration::from_millis(2500));

    // Broken: the previous set stays, the failure is counted.
    std::fs::write(
        pdir.path().join("base.yaml"),
        "policies:\n  - {id: file-two, effect: DENY, condition: 'nope == 1'}\n",
    )
    .unwrap();
    wait().await;
    assert!(failures() > start, "a failed reload is counted");
    assert_eq!(ids(&mut root, "").await, ["api-one", "file-no-secrets"]);

    // A file taking an API policy's id: refused too.
    let after_broken = failures();
    std::fs::write(
        pdir.path().join("base.yaml"),
        "policies:\n  - {id: api-one, effect: DENY, condition: 'true'}\n",
    )
    .unwrap();
    wait().await;
    assert!(failures() > after_broken, "a clash is a failed reload");
    assert_eq!(ids(&mut root, "").await, ["api-one", "file-no-secrets"]);

    // Fixed: the new file set in force, the API's policies kept.
    std::fs::write(
        pdir.path().join("base.yaml"),
        "policies:\n  - {id: file-two, effect: DENY, condition: 'false'}\n",
    )
    .unwrap();
    wait().await;
    assert_eq!(ids(&mut root, "").await, ["api-one", "file-two"]);
    let p = root.get_policy(get("file-two")).await.unwrap().into_inner();
    assert!(p.source.contains("base.yaml"), "{p:?}");
    stack.stop().await;
}

// ------------------------------------------------------------------ TestPolicy vs live

/// A small deterministic generator (xorshift), seeded so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// What the pipeline decided: the refusal's code and deciding policy, or "allowed" (a
/// call that reached the host, whatever the host answered).
fn live_verdict(r: &common::RawResponse) -> (String, String) {
    match r.enterprise_error() {
        Some(e) => (
            e.code.clone(),
            e.details.get("policy_id").cloned().unwrap_or_default(),
        ),
        None => ("allowed".into(), String::new()),
    }
}

fn tested_verdict(t: &aesp::TestPolicyResponse) -> (String, String) {
    match (&t.decision[..], &t.error) {
        ("DENY", Some(e)) => (
            e.code.clone(),
            e.details.get("policy_id").cloned().unwrap_or_default(),
        ),
        _ => ("allowed".into(), String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_policy_answers_what_the_live_call_gets_over_generated_inputs() {
    let stack = Stack::start().await;
    let mut root = root(&stack).await;
    for p in [
        // An amount limit on one tenant's billing tools.
        policy(
            "acme-amount-cap",
            "acme",
            "DENY",
            &["billing_*", "add"],
            "has(args.a) && args.a > 100.0",
        ),
        // An allow-list: `count` only for tool admins.
        policy(
            "count-admins-only",
            "",
            "ALLOW",
            &["count"],
            "'tool-admin' in principal.roles",
        ),
        // A secrets check everywhere.
        policy(
            "no-secrets",
            "",
            "DENY",
            &[],
            "args.anyStringMatches('secret')",
        ),
        // A condition that fails at run time on some inputs: fail closed.
        policy(
            "needs-text",
            "acme",
            "DENY",
            &["echo"],
            "args.text == 'boom'",
        ),
    ] {
        root.create_policy(create(p)).await.unwrap();
    }
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let (mut raw, session) = alice_session(&stack).await;
    let mut rng = Rng(0x5eed_2025_0118);
    let principals = ["alice", "carol", "dave"];
    let role_sets: [&[&str]; 5] = [
        &[],
        &["client-user"],
        &["billing-operator"],
        &["tool-admin"],
        &["client-user", "billing-operator"],
    ];
    let tools = ["echo", "add", "count", "billing_refund"];
    let texts = ["hi", "top secret", "boom"];
    let amounts = [5.0, 150.0];
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..48 {
        let principal = *rng.pick(&principals);
        let roles = *rng.pick(&role_sets);
        let tool = *rng.pick(&tools);
        // Arguments the approved contracts declare (billing_refund has none: governance
        // refuses it); one input in six carries an undeclared key (INVALID_ARGUMENTS).
        let mut args = match tool {
            "echo" => serde_json::json!({"text": *rng.pick(&texts)}),
            "add" => serde_json::json!({"a": *rng.pick(&amounts), "b": 1.0}),
            "count" => serde_json::json!({"n": 3}),
            _ => serde_json::json!({"amount": *rng.pick(&amounts)}),
        };
        if rng.next().is_multiple_of(6) {
            args["note"] = "x".into();
        }

        raw.token = Some(
            issuer
                .mint(principal, "acme", roles, 600, serde_json::json!({}))
                .unwrap(),
        );
        let live = live_verdict(&execute(&mut raw, &session, tool, args.clone()).await);
        let tested = root
            .test_policy(TestPolicyRequest {
                context: Some(aesp::EnterpriseSecurityContext {
                    principal_id: principal.into(),
                    tenant_id: "acme".into(),
                    roles: roles.iter().map(|r| r.to_string()).collect(),
                    ..Default::default()
                }),
                call: Some(aesp_sidecar::proto::adm::FunctionCall {
                    name: tool.into(),
                    args: Some(aesp_sidecar::adm::json_to_struct(&args).unwrap()),
                    call_id: String::new(),
                }),
                // The live call's session (alice's): the same tenancy answer as live.
                request: [("session_id".to_string(), session.clone())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            tested_verdict(&tested),
            live,
            "input {i}: {principal} {roles:?} {tool} {args}: TestPolicy said {tested:?}"
        );
        *seen.entry(format!("{}:{}", live.0, live.1)).or_default() += 1;
    }
    // The generated inputs exercised allows, RBAC and governance denials and each policy's
    // denial.
    for want in [
        "allowed:",
        "AUTHORIZATION_DENIED:",
        "TOOL_NOT_APPROVED:",
        "INVALID_ARGUMENTS:",
        "TENANT_ISOLATION_VIOLATION:",
        "POLICY_DENIED:acme-amount-cap",
        "POLICY_DENIED:no-secrets",
    ] {
        assert!(seen.contains_key(want), "{want} never seen: {seen:?}");
    }

    // A draft, not installed: answered, and the live call is unaffected by it.
    let tested = root
        .test_policy(TestPolicyRequest {
            policy: Some(policy("draft-no-echo", "acme", "DENY", &["echo"], "true")),
            context: Some(aesp::EnterpriseSecurityContext {
                principal_id: "alice".into(),
                tenant_id: "acme".into(),
                ..Default::default()
            }),
            call: Some(aesp_sidecar::proto::adm::FunctionCall {
                name: "echo".into(),
                args: Some(
                    aesp_sidecar::adm::json_to_struct(&serde_json::json!({"text": "hi"})).unwrap(),
                ),
                call_id: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tested.decision, "DENY");
    assert_eq!(tested.error.unwrap().details["policy_id"], "draft-no-echo");
    raw.token = stack.token("acme");
    let r = execute(
        &mut raw,
        &session,
        "echo",
        serde_json::json!({"text": "hi"}),
    )
    .await;
    assert_eq!(r.grpc_status(), Some(0), "{:?}", r.enterprise_error());
    // An invalid draft: refused with its position, like CreatePolicy.
    let e = root
        .test_policy(TestPolicyRequest {
            policy: Some(policy("draft", "acme", "DENY", &[], "args.x >")),
            context: Some(aesp::EnterpriseSecurityContext {
                principal_id: "alice".into(),
                tenant_id: "acme".into(),
                ..Default::default()
            }),
            call: Some(aesp_sidecar::proto::adm::FunctionCall {
                name: "echo".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        client::enterprise_error(&e).unwrap().details["field"],
        "condition"
    );
    stack.stop().await;
}

/// `aesp policy ...` against the running sidecar as the platform administrator: the output
/// and the exit status.
fn cli(stack: &Stack, args: &[&str]) -> (bool, String) {
    let f = |n: &str| stack.files.path(n).display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aesp"))
        .arg("policy")
        .args(args)
        .args(["--endpoint", &mgmt(stack), "--ca", &f("ca.crt")])
        .args(["--cert", &f("admin.crt"), "--key", &f("admin.key")])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_a_file_through_the_api_and_lists_it() {
    let stack = Stack::start_with("", false).await;
    let file = stack.dir.path().join("mine.yaml");
    let v1 = "policies:\n  - {id: cli-a, tenant: acme, effect: DENY, tools: [echo], condition: 'false'}\n  - {id: cli-b, effect: DENY, condition: 'false'}\n";
    std::fs::write(&file, v1).unwrap();
    let path = file.display().to_string();
    let (ok, out) = cli(&stack, &["apply", &path]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("created").count(), 2, "{out}");
    // Applied again: unchanged; one changed: updated to version 2.
    let (ok, out) = cli(&stack, &["apply", &path]);
    assert!(ok && out.matches("unchanged").count() == 2, "{out}");
    std::fs::write(
        &file,
        v1.replace(
            "tools: [echo], condition: 'false'",
            "tools: [echo], condition: 'true'",
        ),
    )
    .unwrap();
    let (ok, out) = cli(&stack, &["apply", &path]);
    assert!(ok && out.contains("updated") && out.contains("v2"), "{out}");
    let mut root = root(&stack).await;
    let p = root.get_policy(get("cli-a")).await.unwrap().into_inner();
    assert_eq!((p.version, p.condition.as_str()), (2, "true"));

    let (ok, out) = cli(&stack, &["list"]);
    assert!(
        ok && out.contains("2 policies") && out.contains("cli-a") && out.contains("source=api"),
        "{out}"
    );
    let (ok, out) = cli(&stack, &["disable", "cli-b"]);
    assert!(ok && out.contains("disabled"), "{out}");
    let (ok, out) = cli(&stack, &["delete", "cli-b", "--expected-version", "9"]);
    assert!(!ok && out.contains("version 9"), "{out}");
    // A file that does not validate: nothing sent, the error with its position.
    std::fs::write(
        &file,
        "policies:\n  - {id: cli-c, effect: DENY, condition: 'args.x >'}\n",
    )
    .unwrap();
    let (ok, out) = cli(&stack, &["apply", &path]);
    assert!(
        !ok && out.contains("condition 1:") && out.contains("nothing applied"),
        "{out}"
    );
    assert!(root.get_policy(get("cli-c")).await.is_err());
    stack.stop().await;
}

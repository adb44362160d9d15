//! Governed tool contracts on the real listener (issue: CEL policies and governed tool
//! contracts): only an approved revision runs (TOOL_NOT_APPROVED before the host), the
//! approval workflow with separation of duties through `EnterpriseGovernanceService`,
//! `required_roles`, arguments checked against the approved declaration with the offending
//! path, a declaration that drifts on the host refused until its new revision is approved,
//! listing scoped by tenant, and the `aesp tool` commands.

mod common;

use aesp_sidecar::client::{self, AespGridClient};
use aesp_sidecar::proto::aesp::enterprise_governance_service_client::EnterpriseGovernanceServiceClient;
use aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient;
use aesp_sidecar::proto::aesp::{
    AssignRoleRequest, EnterpriseToolContract, ListToolContractsRequest, ReviewToolContractRequest,
    SubmitToolContractRequest,
};
use common::Stack;
use std::process::Command;
use std::time::Duration;

type Governance = EnterpriseGovernanceServiceClient<client::GridChannel>;

async fn governance(stack: &Stack, stem: &str) -> Governance {
    EnterpriseGovernanceServiceClient::new(stack.management(stem).await)
}

fn code(s: &tonic::Status) -> String {
    client::enterprise_error(s)
        .map(|e| e.code)
        .unwrap_or_default()
}

async fn session(c: &AespGridClient, id: &str) {
    let ack = c
        .create_session(aesp_sidecar::proto::grid::CreateSession {
            suggested_session_id: id.into(),
            ttl_seconds: 60,
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

/// The host's `echo` declaration (as the demo's manifest has it).
fn echo_declaration() -> aesp_sidecar::proto::adm::FunctionDeclaration {
    aesp_sidecar::adm::example_manifest()
        .into_iter()
        .find(|d| d.name == "echo")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_approved_contract_runs_and_arguments_must_match_it_before_the_host() {
    let stack = Stack::start().await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-gov").await;
    let host_calls = || stack.host.state.request_metadata().len();

    let ok = call(&alice, "s-gov", "echo", serde_json::json!({"text": "hi"}))
        .await
        .unwrap();
    assert!(ok.error_details.is_none(), "{ok:?}");

    // Pending in the seed (delete_records), unknown (teleport): refused before the host,
    // even to a caller RBAC lets run every tool (tool-admin: tool:*:execute).
    EnterpriseIdentityServiceClient::new(stack.management("admin").await)
        .assign_role(AssignRoleRequest {
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
            role: "tool-admin".into(),
        })
        .await
        .unwrap();
    let before = host_calls();
    for (tool, reason) in [
        ("delete_records", "revision 1 PENDING"),
        ("teleport", "no contract"),
    ] {
        let s = call(
            &alice,
            "s-gov",
            tool,
            serde_json::json!({"customer_id": "c1", "reason": "gdpr-erasure"}),
        )
        .await
        .unwrap_err();
        let e = client::enterprise_error(&s).unwrap();
        assert_eq!(
            (e.code.as_str(), s.code()),
            ("TOOL_NOT_APPROVED", tonic::Code::PermissionDenied),
            "{tool}: {e:?}"
        );
        assert_eq!(e.details["reason"], reason, "{e:?}");
        assert_eq!(e.details["tool"], tool);
        assert!(!e.remediation_steps.is_empty());
    }

    // Arguments against the approved declaration: the offending path, nothing at the host.
    for (tool, args, path) in [
        ("echo", serde_json::json!({}), "args.text"),
        ("echo", serde_json::json!({"text": 5}), "args.text"),
        (
            "echo",
            serde_json::json!({"text": "x", "shell": "rm -rf /"}),
            "args.shell",
        ),
        (
            "get_weather",
            serde_json::json!({"city": "Oslo", "units": "kelvin"}),
            "args.units",
        ),
        ("count", serde_json::json!({"n": 2.5}), "args.n"),
    ] {
        let s = call(&alice, "s-gov", tool, args.clone()).await.unwrap_err();
        let e = client::enterprise_error(&s).unwrap();
        assert_eq!(
            (e.code.as_str(), s.code()),
            ("INVALID_ARGUMENTS", tonic::Code::InvalidArgument),
            "{args}: {e:?}"
        );
        assert_eq!(e.details["path"], path, "{args}");
        assert_eq!(e.details["tool_revision"], "1");
    }
    assert_eq!(host_calls(), before, "no refused call reached the host");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_workflow_separates_duties_enforces_required_roles_and_lists_by_tenant() {
    let stack = Stack::start().await;
    let mut root = governance(&stack, "admin").await;

    // root submits acme's own revision of echo, requiring the auditor role.
    let submitted = root
        .submit_tool_contract(SubmitToolContractRequest {
            contract: Some(EnterpriseToolContract {
                declaration: Some(echo_declaration()),
                risk_assessment: "MEDIUM".into(),
                compliance_tags: vec!["PII".into()],
                required_roles: vec!["auditor".into()],
                tenant_id: "acme".into(),
                // Approval fields are ignored: it starts PENDING.
                approval_status: "APPROVED".into(),
                approved_by: "root".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            submitted.approval_status.as_str(),
            submitted.revision,
            submitted.approved_by.as_str()
        ),
        ("PENDING", 1, "")
    );
    assert_eq!(submitted.submitted_by, "root");
    assert_eq!(submitted.declaration_sha256.len(), 32);

    // Pending: acme still runs the shared approved echo.
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-1").await;
    call(&alice, "s-1", "echo", serde_json::json!({"text": "a"}))
        .await
        .unwrap();

    // Separation of duties: the submitter cannot approve its own revision.
    let review = |revision, comment: &str| ReviewToolContractRequest {
        tool_name: "echo".into(),
        tenant_id: "acme".into(),
        revision,
        comment: comment.into(),
    };
    let s = root
        .approve_tool_contract(review(1, "looks fine"))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "AUTHORIZATION_DENIED", "{s:?}");
    assert_eq!(
        client::enterprise_error(&s).unwrap().details["reason"],
        "separation of duties"
    );
    // bob (globex, no approve permission) cannot review acme's contracts.
    let mut bob = governance(&stack, "globex").await;
    let s = bob.approve_tool_contract(review(1, "x")).await.unwrap_err();
    assert_eq!(code(&s), "AUTHORIZATION_DENIED", "{s:?}");

    // alice becomes acme's tool-admin (aesp.governance.approve) and reviews it.
    let mut ids = EnterpriseIdentityServiceClient::new(stack.management("admin").await);
    ids.assign_role(AssignRoleRequest {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        role: "tool-admin".into(),
    })
    .await
    .unwrap();
    let mut alice_gov = governance(&stack, "acme").await;
    let s = alice_gov
        .approve_tool_contract(review(1, ""))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        tonic::Code::InvalidArgument,
        "a comment is required"
    );
    let s = alice_gov
        .approve_tool_contract(review(2, "wrong revision"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    let approved = alice_gov
        .approve_tool_contract(review(1, "PII reviewed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            approved.approval_status.as_str(),
            approved.approved_by.as_str()
        ),
        ("APPROVED", "alice")
    );

    // In force for acme: alice lacks `auditor`. globex keeps the shared echo.
    let s = call(&alice, "s-1", "echo", serde_json::json!({"text": "b"}))
        .await
        .unwrap_err();
    let e = client::enterprise_error(&s).unwrap();
    assert_eq!(e.code, "AUTHORIZATION_DENIED");
    assert_eq!(e.details["missing_roles"], "auditor");
    assert_eq!(e.details["compliance_tags"], "PII");
    let bob_client = AespGridClient::with_token(stack.channel("globex").await);
    session(&bob_client, "s-2").await;
    call(&bob_client, "s-2", "echo", serde_json::json!({"text": "c"}))
        .await
        .unwrap();
    ids.assign_role(AssignRoleRequest {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        role: "auditor".into(),
    })
    .await
    .unwrap();
    call(&alice, "s-1", "echo", serde_json::json!({"text": "d"}))
        .await
        .unwrap();

    // Listing: acme sees its own echo and the shared contracts; globex never sees acme's.
    let list = |tenant: &str, status: &str| ListToolContractsRequest {
        tenant_id: tenant.into(),
        approval_status: status.into(),
    };
    let acme = alice_gov
        .list_tool_contracts(list("", ""))
        .await
        .unwrap()
        .into_inner()
        .contracts;
    let names = |cs: &[EnterpriseToolContract]| -> Vec<(String, String, String)> {
        cs.iter()
            .map(|c| {
                (
                    c.tenant_id.clone(),
                    c.declaration.as_ref().unwrap().name.clone(),
                    c.approval_status.clone(),
                )
            })
            .collect()
    };
    let acme = names(&acme);
    assert!(
        acme.contains(&("acme".into(), "echo".into(), "APPROVED".into())),
        "{acme:?}"
    );
    assert!(acme.contains(&("".into(), "echo".into(), "APPROVED".into())));
    assert!(acme.contains(&("acme".into(), "delete_records".into(), "PENDING".into())));
    let mut bob_gov = governance(&stack, "globex").await;
    let s = bob_gov
        .list_tool_contracts(list("acme", ""))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "AUTHORIZATION_DENIED");
    // bob has no governance role at all: even his own tenant is refused.
    let s = bob_gov.list_tool_contracts(list("", "")).await.unwrap_err();
    assert_eq!(code(&s), "AUTHORIZATION_DENIED");
    let globex = root
        .list_tool_contracts(list("globex", ""))
        .await
        .unwrap()
        .into_inner()
        .contracts;
    assert!(
        globex.iter().all(|c| c.tenant_id != "acme"),
        "{:?}",
        names(&globex)
    );
    let pending = root
        .list_tool_contracts(list("*", "pending"))
        .await
        .unwrap()
        .into_inner()
        .contracts;
    assert_eq!(
        names(&pending),
        vec![("acme".into(), "delete_records".into(), "PENDING".into())]
    );

    // Survives a restart (control store).
    let dir = stack.stop().await;
    let cfg = aesp_sidecar::config::Config::load(&dir.path().join("sidecar.yaml")).unwrap();
    let reg = aesp_sidecar::governance::Registry::open(
        cfg.governance.clone(),
        Some(std::sync::Arc::new(
            aesp_sidecar::store::ControlStore::open(&cfg.state_dir).unwrap(),
        )),
    )
    .unwrap();
    let snap = reg.snapshot();
    let c = snap.in_force("acme", "echo").unwrap();
    assert_eq!(
        (c.tenant_id.as_str(), c.approved_by.as_str()),
        ("acme", "alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_drifts_on_the_host_is_refused_until_its_new_revision_is_approved() {
    let stack = Stack::start_edited(
        |t| common::in_section(&t, "governance", "  reload_seconds: 1\n"),
        true,
    )
    .await;
    let manifest = stack.dir.path().join("grid-manifest.yaml");
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-d").await;
    call(&alice, "s-d", "echo", serde_json::json!({"text": "a"}))
        .await
        .unwrap();

    // The host's echo changes (a new description): calls stop until it is re-approved.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let changed = text.replace(
        "Echoes its text back.",
        "Echoes its text back, and logs it.",
    );
    assert_ne!(text, changed);
    std::fs::write(&manifest, &changed).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        match call(&alice, "s-d", "echo", serde_json::json!({"text": "b"})).await {
            Err(s) => break client::enterprise_error(&s).unwrap(),
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(_) => panic!("the drifted declaration is still served"),
        }
    };
    assert_eq!(e.code, "TOOL_NOT_APPROVED");
    assert!(
        e.details["reason"].starts_with("declaration digest"),
        "{e:?}"
    );
    assert_ne!(e.details["approved_sha256"], e.details["host_sha256"]);

    // Import the host's new manifest for acme (PENDING), have a second principal approve echo.
    let aesp = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aesp"));
        c.arg("tool").args(args).args([
            "--endpoint",
            &format!(
                "https://127.0.0.1:{}",
                stack.sidecar.management_addr.unwrap().port()
            ),
            "--ca",
            stack.dir.path().join("ca.crt").to_str().unwrap(),
            "--cert",
            stack.dir.path().join("admin.crt").to_str().unwrap(),
            "--key",
            stack.dir.path().join("admin.key").to_str().unwrap(),
        ]);
        c.output().unwrap()
    };
    let out = aesp(&[
        "import",
        "--manifest",
        manifest.to_str().unwrap(),
        "--tenant",
        "acme",
        "--risk",
        "LOW",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 contract(s) PENDING"), "{stdout}");
    // root imported them: root may not approve them.
    let out = aesp(&[
        "approve",
        "echo",
        "--tenant",
        "acme",
        "--revision",
        "1",
        "--comment",
        "ok",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("AUTHORIZATION_DENIED"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Still refused while pending.
    let s = call(&alice, "s-d", "echo", serde_json::json!({"text": "c"}))
        .await
        .unwrap_err();
    assert_eq!(code(&s), "TOOL_NOT_APPROVED");
    // A second principal: alice, made acme's tool-admin, approves acme's revision.
    let mut ids = EnterpriseIdentityServiceClient::new(stack.management("admin").await);
    ids.assign_role(AssignRoleRequest {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        role: "tool-admin".into(),
    })
    .await
    .unwrap();
    let mut alice_gov = governance(&stack, "acme").await;
    let approved = alice_gov
        .approve_tool_contract(ReviewToolContractRequest {
            tool_name: "echo".into(),
            tenant_id: "acme".into(),
            revision: 1,
            comment: "the new description is harmless".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.tenant_id, "acme");
    assert_eq!(approved.revision, 1);
    call(&alice, "s-d", "echo", serde_json::json!({"text": "d"}))
        .await
        .unwrap();
    // The list shows it, through the CLI.
    let out = aesp(&["list", "--tenant", "*"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.contains(" echo ")
            && l.contains("APPROVED")
            && l.contains("approved by alice")),
        "{stdout}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_sees_and_fulfils_only_the_contracts_approved_for_its_tenant() {
    use aesp_sidecar::proto::aesp::enterprise_host_message::Kind;
    use aesp_sidecar::proto::{aesp, grid};
    use prost::Message;
    // A registry where get_weather waits for review and count is globex's alone.
    let seed_dir = tempfile::tempdir().unwrap();
    let seed = seed_dir.path().join("contracts.yaml");
    std::fs::write(
        &seed,
        format!(
            "manifest: {}\ncontracts:\n  - {{tool: echo, risk_assessment: LOW}}\n  - {{tool: add, risk_assessment: LOW}}\n  - {{tool: fail, risk_assessment: LOW}}\n  - {{tool: count, tenant: globex, risk_assessment: LOW}}\n  - {{tool: get_weather, status: PENDING, risk_assessment: MEDIUM}}\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies/grid-manifest.yaml")
        ),
    )
    .unwrap();
    let seed_path = seed.display().to_string();
    let stack = Stack::start_edited(
        move |t| {
            t.replace(
                "contracts: tool-contracts.yaml",
                &format!("contracts: {seed_path}"),
            )
        },
        false,
    )
    .await;
    let alice = AespGridClient::with_token(stack.channel("acme").await);
    session(&alice, "s-rt").await;

    let announce = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Announce(
            grid::AnnounceRuntime {
                runtime_id: "rt-gov".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    let fulfill = grid::RuntimeMessage {
        kind: Some(grid::runtime_message::Kind::Fulfill(grid::FulfillTools {
            session_id: "s-rt".into(),
            tool_contract_names: vec!["echo".into(), "get_weather".into(), "count".into()],
        })),
    }
    .encode_to_vec();
    let mut both = common::frame(&announce);
    both.extend(common::frame(&fulfill));
    let r = stack
        .connect_runtime_raw("runtime", &[], both, Duration::from_millis(300))
        .await;
    let msgs: Vec<aesp::EnterpriseHostMessage> = r
        .messages()
        .iter()
        .map(|m| aesp::EnterpriseHostMessage::decode(&m[..]).unwrap())
        .collect();
    // The host lists its five tools; the acme runtime sees the three approved for acme.
    let Some(Kind::AnnounceAck(ack)) = &msgs[0].kind else {
        panic!("{msgs:?}")
    };
    let fulfil_ack = msgs.iter().find_map(|m| match &m.kind {
        Some(Kind::FulfillAck(fa)) => Some(fa),
        _ => None,
    });
    assert!(ack.accepted);
    let mut listed = ack.available_contracts.clone();
    listed.sort();
    assert_eq!(listed, ["add", "echo", "fail"]);
    // The fulfilment reached the host narrowed to echo; the ack says what was refused.
    let fa = fulfil_ack.unwrap_or_else(|| panic!("no FulfillAck: {msgs:?}"));
    assert_eq!(
        fa.accepted,
        ["echo"],
        "the host never saw the refused contracts"
    );
    let e = fa.error.as_ref().expect("the refusal");
    assert_eq!(e.code, "TOOL_NOT_APPROVED");
    assert_eq!(e.details["refused_contracts"], "get_weather,count");
    assert!(
        !e.details.contains_key("origin"),
        "the sidecar's refusal, not the host's"
    );
    assert!(!e.correlation_id.is_empty());
    // Recorded as a refusal.
    assert!(common::denials(&stack.sidecar, "TOOL_NOT_APPROVED") >= 1);
    stack.stop().await;
}

//! RBAC on every call, on the real listener with the demo's `rbac.yaml` (issue: identity and
//! RBAC): each GRID method and each tool needs its permission; runtimes alone may open
//! `Connect`; IdP groups in a token grant their roles; a denial names the missing
//! permission and never reaches the host.

mod common;

use aesp_sidecar::demo::tokens::DemoIssuer;
use aesp_sidecar::proto::grid;
use common::{Stack, frame};
use prost::Message;

fn tool_call(session: &str, tool: &str) -> Vec<Vec<u8>> {
    let tc =
        aesp_sidecar::client::tool_call(session, tool, &serde_json::json!({"text": "x"})).unwrap();
    vec![frame(&tc.encode_to_vec())]
}

#[tokio::test]
async fn every_call_is_authorized_and_a_denial_names_the_missing_permission() {
    let stack = Stack::start().await;
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let mut alice = stack.raw("acme").await;
    let r = alice
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let session =
        aesp_sidecar::proto::aesp::EnterpriseCreateSessionAck::decode(&r.messages()[0][..])
            .unwrap()
            .session_id;
    let host_calls = || stack.host.state.request_metadata().len();

    // A tool of her role: allowed. A tool outside it: refused before the host.
    let r = alice
        .call(
            "/altar.grid.v1.GridHost/ExecuteTool",
            &[],
            tool_call(&session, "echo"),
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let before = host_calls();
    let r = alice
        .call(
            "/altar.grid.v1.GridHost/ExecuteTool",
            &[],
            tool_call(&session, "billing_refund"),
        )
        .await;
    let e = r.enterprise_error().unwrap();
    assert_eq!(
        (e.code.as_str(), r.grpc_status()),
        ("AUTHORIZATION_DENIED", Some(7))
    );
    assert_eq!(e.details["permission"], "tool:billing_refund:execute");
    assert!(e.details["roles"].contains("client-user"), "{e:?}");
    assert_eq!(
        host_calls(),
        before,
        "the refused call never reached the host"
    );

    // A client certificate cannot open the runtimes' channel.
    let r = alice
        .call("/altar.grid.v1.GridRuntime/Connect", &[], vec![frame(&[])])
        .await;
    let e = r.enterprise_error().unwrap();
    assert_eq!(e.code, "AUTHORIZATION_DENIED");
    assert_eq!(e.details["permission"], "grid.runtime.connect");

    // A caller with no binding gets nothing; an IdP group grants its roles (acme-engineers:
    // tool-admin, every tool), so an unknown tool now reaches the host.
    let carol = |groups: &[&str]| {
        let t = issuer
            .mint(
                "carol",
                "acme",
                &[],
                600,
                serde_json::json!({"groups": groups}),
            )
            .unwrap();
        format!("Bearer {t}")
    };
    let nobody = carol(&[]);
    let r = alice
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &nobody)],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    let e = r.enterprise_error().unwrap();
    assert_eq!(e.code, "AUTHORIZATION_DENIED");
    assert_eq!(e.details["permission"], "grid.session.create");
    assert_eq!(e.details["principal"], "carol");
    stack.stop().await;
}

#[tokio::test]
async fn idp_groups_in_a_token_grant_the_roles_the_rbac_file_binds_them_to() {
    // The demo maps no groups claim; an issuer configured with `groups: groups` does.
    let stack = Stack::start_edited(
        |cfg| {
            cfg.replace(
                "      jwks_file: issuer.jwks.json",
                "      jwks_file: issuer.jwks.json\n      claims: {groups: groups}",
            )
        },
        true,
    )
    .await;
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let eng = issuer
        .mint(
            "carol",
            "acme",
            &[],
            600,
            serde_json::json!({"groups": ["acme-engineers"]}),
        )
        .unwrap();
    let auth = format!("Bearer {eng}");
    let mut raw = stack.raw("acme").await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &auth)],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let session =
        aesp_sidecar::proto::aesp::EnterpriseCreateSessionAck::decode(&r.messages()[0][..])
            .unwrap()
            .session_id;
    let sc = stack.host.state.security_contexts().pop().unwrap();
    assert!(
        sc.roles.contains(&"tool-admin".to_string()),
        "{:?}",
        sc.roles
    );
    // tool:*:execute: a tool without a contract passes RBAC and stops at governance.
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/ExecuteTool",
            &[("authorization", &auth)],
            tool_call(&session, "billing_refund"),
        )
        .await;
    assert_eq!(
        r.enterprise_error().unwrap().code,
        "TOOL_NOT_APPROVED",
        "{r:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_changed_rbac_file_is_put_in_force_and_a_broken_one_keeps_the_last_good_state() {
    let stack = Stack::start_edited(
        |cfg| {
            cfg.replace(
                "  file: rbac.yaml",
                "  reload_seconds: 1\n  file: rbac.yaml",
            )
        },
        true,
    )
    .await;
    let mut alice = stack.raw("acme").await;
    let r = alice
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[],
            vec![frame(&grid::CreateSession::default().encode_to_vec())],
        )
        .await;
    let session =
        aesp_sidecar::proto::aesp::EnterpriseCreateSessionAck::decode(&r.messages()[0][..])
            .unwrap()
            .session_id;
    assert_eq!(
        billing(&mut alice, &session).await.as_deref(),
        Some("AUTHORIZATION_DENIED")
    );
    // The operator binds alice to billing-operator in the file.
    let path = stack.files.path("rbac.yaml");
    let good = std::fs::read_to_string(&path).unwrap()
        + "  - principal: alice\n    tenant: acme\n    roles: [billing-operator]\n";
    std::fs::write(&path, &good).unwrap();
    let mut allowed = false;
    for _ in 0..50 {
        if billing(&mut alice, &session).await.as_deref() == Some(PASSED_RBAC) {
            allowed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(allowed, "the changed file was not put in force");
    // A broken file: the last good state stays, the failure is counted.
    std::fs::write(&path, good.replace("billing-operator]", "no-such-role]")).unwrap();
    for _ in 0..50 {
        if common::counter(&stack.sidecar, "aesp_config_reload_failures_total", &[]) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        common::counter(&stack.sidecar, "aesp_config_reload_failures_total", &[]),
        1
    );
    assert_eq!(
        billing(&mut alice, &session).await.as_deref(),
        Some(PASSED_RBAC),
        "the last good state stays"
    );
    stack.stop().await;
}

/// What a billing call gets once RBAC lets it through: billing_refund has no approved
/// contract, so governance, the next check, refuses it.
const PASSED_RBAC: &str = "TOOL_NOT_APPROVED";

/// A billing tool call of `session`: the sidecar's refusal code, or `None` when it passed.
async fn billing(raw: &mut common::RawH2, session: &str) -> Option<String> {
    raw.call(
        "/altar.grid.v1.GridHost/ExecuteTool",
        &[],
        tool_call(session, "billing_refund"),
    )
    .await
    .enterprise_error()
    .map(|e| e.code)
}

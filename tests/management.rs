//! The management listener (issue: identity, RBAC and the management plane):
//! `EnterpriseIdentityService` served by the sidecar itself, with the same authentication as
//! the data plane and RBAC on the tenant each RPC acts on.

mod common;

use aesp_sidecar::client;
use aesp_sidecar::demo::tokens::DemoIssuer;
use aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient;
use aesp_sidecar::proto::aesp::{AssignRoleRequest, GetPrincipalPermissionsRequest};
use aesp_sidecar::proto::grid;
use common::{Stack, frame};
use prost::Message;

type Identity = EnterpriseIdentityServiceClient<client::GridChannel>;

async fn identity(stack: &Stack, stem: &str, token: Option<String>) -> Identity {
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = client::channel(&ep, Some(&stack.tls(stem))).await.unwrap();
    EnterpriseIdentityServiceClient::new(client::with_token(ch, token.as_deref()).unwrap())
}

fn code(s: &tonic::Status) -> String {
    client::enterprise_error(s)
        .map(|e| e.code)
        .unwrap_or_default()
}

fn perms(p: &str, t: &str) -> GetPrincipalPermissionsRequest {
    GetPrincipalPermissionsRequest {
        principal_id: p.into(),
        tenant_id: t.into(),
    }
}

#[tokio::test]
async fn permissions_answer_what_enforcement_does_and_only_to_whom_they_may() {
    let stack = Stack::start_with("", false).await;
    // The platform administrator (admin.crt, kind admin: certificate alone).
    let mut root = identity(&stack, "admin", None).await;
    let p = root
        .get_principal_permissions(perms("alice", "acme"))
        .await
        .unwrap()
        .into_inner();
    assert!(p.roles.contains(&"client-user".to_string()), "{p:?}");
    assert!(p.permissions.contains(&"grid.session.create".to_string()));
    assert!(p.permissions.contains(&"tool:echo:execute".to_string()));
    assert!(
        !p.permissions.iter().any(|x| x.contains("billing")),
        "{p:?}"
    );

    // alice may read her own, not bob's.
    let mut alice = identity(&stack, "acme", stack.token("acme")).await;
    alice
        .get_principal_permissions(perms("alice", "acme"))
        .await
        .unwrap();
    let e = alice
        .get_principal_permissions(perms("bob", "globex"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(code(&e), "AUTHORIZATION_DENIED");
    let ee = client::enterprise_error(&e).unwrap();
    assert_eq!(ee.details["permission"], "aesp.identity.admin");
    assert_eq!(ee.details["target_tenant"], "globex");

    // A service not served yet, and no identity at all.
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = client::channel(&ep, Some(&stack.tls("admin")))
        .await
        .unwrap();
    let e = client::call_raw(ch, "/altar.aesp.v1.EnterprisePolicyService/CreatePolicy")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "METHOD_NOT_ALLOWED");
    let ch = client::channel(&ep, Some(&stack.tls("admin")))
        .await
        .unwrap();
    let e = client::call_raw(
        ch,
        "/altar.aesp.v1.EnterpriseIdentityService/DeleteEverything",
    )
    .await
    .unwrap_err();
    assert_eq!(
        code(&e),
        "METHOD_NOT_ALLOWED",
        "an unknown RPC of a served service"
    );
    let mut anon = identity(&stack, "acme", None).await;
    let e = anon
        .get_principal_permissions(perms("alice", "acme"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHENTICATION_REQUIRED");
    stack.stop().await;
}

#[tokio::test]
async fn an_assigned_role_takes_effect_on_the_next_call_and_tenant_admins_stay_in_their_tenant() {
    let stack = Stack::start().await;
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let mut raw = stack.raw("acme").await;
    let r = raw
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
    let billing = || {
        let tc = client::tool_call(&session, "billing_refund", &serde_json::json!({})).unwrap();
        vec![frame(&tc.encode_to_vec())]
    };
    let r = raw
        .call("/altar.grid.v1.GridHost/ExecuteTool", &[], billing())
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "AUTHORIZATION_DENIED");

    // acme's tenant administrator (a token of acme-admin through acme's certificate).
    let admin_token = issuer
        .mint("acme-admin", "acme", &[], 600, serde_json::json!({}))
        .unwrap();
    let mut acme_admin = identity(&stack, "acme", Some(admin_token)).await;
    let e = acme_admin
        .assign_role(AssignRoleRequest {
            principal_id: "bob".into(),
            tenant_id: "globex".into(),
            role: "tool-admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED", "{e:?}");
    let b = acme_admin
        .assign_role(AssignRoleRequest {
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
            role: "tool-admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.granted_by.as_str(), b.role.as_str()),
        ("acme-admin", "tool-admin")
    );
    // Again: already held.
    let e = acme_admin
        .assign_role(AssignRoleRequest {
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
            role: "tool-admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // The very next call of alice, on the same connection, has the new role: the tool now
    // passes the sidecar and the host answers that it does not know it.
    let r = raw
        .call("/altar.grid.v1.GridHost/ExecuteTool", &[], billing())
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let res =
        aesp_sidecar::proto::aesp::EnterpriseToolResult::decode(&r.messages()[0][..]).unwrap();
    assert_eq!(res.error_details.unwrap().code, "TOOL_NOT_FOUND");
    stack.stop().await;
}

#[tokio::test]
async fn assigned_roles_survive_a_restart() {
    let stack = Stack::start_with("", false).await;
    let mut root = identity(&stack, "admin", None).await;
    root.assign_role(AssignRoleRequest {
        principal_id: "bob".into(),
        tenant_id: "globex".into(),
        role: "auditor".into(),
    })
    .await
    .unwrap();
    let Stack {
        dir, sidecar, host, ..
    } = stack;
    sidecar.shutdown().await;
    let cfg = aesp_sidecar::config::Config::load(&dir.path().join("sidecar.yaml")).unwrap();
    assert!(cfg.state_dir.join("control.redb").is_file());
    let again = aesp_sidecar::sidecar::Sidecar::start(cfg).await.unwrap();
    let ep = format!(
        "https://127.0.0.1:{}",
        again.management_addr.unwrap().port()
    );
    let tls = aesp_sidecar::client::ClientTls::from_files(
        &dir.path().join("ca.crt"),
        &dir.path().join("admin.crt"),
        &dir.path().join("admin.key"),
        "localhost",
    )
    .unwrap();
    let ch = client::channel(&ep, Some(&tls)).await.unwrap();
    let mut root = EnterpriseIdentityServiceClient::new(client::with_token(ch, None).unwrap());
    let p = root
        .get_principal_permissions(perms("bob", "globex"))
        .await
        .unwrap()
        .into_inner();
    assert!(p.roles.contains(&"auditor".to_string()), "{p:?}");
    again.shutdown().await;
    host.shutdown().await;
}

#[tokio::test]
async fn a_service_account_works_until_revoked_on_the_very_next_call_and_after_a_restart() {
    use aesp_sidecar::proto::aesp::{CreateServiceAccountRequest, RevokeServiceAccountRequest};
    let stack = Stack::start_with("", false).await;
    let mut root = identity(&stack, "admin", None).await;
    let sa = root
        .create_service_account(CreateServiceAccountRequest {
            tenant_id: "acme".into(),
            display_name: "ci bot".into(),
            roles: vec!["client-user".into()],
            credential_ttl_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        sa.principal_id.starts_with("sa-") && !sa.credential.is_empty(),
        "{sa:?}"
    );
    assert_eq!(sa.tenant_id, "acme");

    // The credential is signed by the sidecar's own key, published on the admin port.
    let (status, jwks) =
        http_get(stack.sidecar.admin_addr.unwrap(), "/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    let kid = jsonwebtoken::decode_header(&sa.credential)
        .unwrap()
        .kid
        .unwrap();
    assert!(jwks.contains(&kid), "{jwks}");

    let auth = format!("Bearer {}", sa.credential);
    let create = || vec![frame(&grid::CreateSession::default().encode_to_vec())];
    let mut raw = stack.raw("acme").await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &auth)],
            create(),
        )
        .await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    let sc = stack.host.state.security_contexts().pop().unwrap();
    assert_eq!(sc.principal_id, sa.principal_id);

    // A tenant admin of globex may not revoke acme's account.
    let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
    let globex_admin = issuer
        .mint(
            "globex-admin",
            "globex",
            &["tenant-admin"],
            600,
            serde_json::json!({}),
        )
        .unwrap();
    let mut other = identity(&stack, "globex", Some(globex_admin)).await;
    let e = other
        .revoke_service_account(RevokeServiceAccountRequest {
            principal_id: sa.principal_id.clone(),
            reason: "not yours".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AUTHORIZATION_DENIED", "{e:?}");

    let revoked = root
        .revoke_service_account(RevokeServiceAccountRequest {
            principal_id: sa.principal_id.clone(),
            reason: "leaked".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked && revoked.credential.is_empty());
    // The very next call, same connection, same (cached) token.
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &auth)],
            create(),
        )
        .await;
    let e = r.enterprise_error().unwrap();
    assert_eq!(e.code, "INVALID_CREDENTIALS");
    assert!(e.details["reason"].contains("revoked"), "{e:?}");

    // After a restart too.
    let Stack {
        dir, sidecar, host, ..
    } = stack;
    sidecar.shutdown().await;
    let again = aesp_sidecar::sidecar::Sidecar::start(
        aesp_sidecar::config::Config::load(&dir.path().join("sidecar.yaml")).unwrap(),
    )
    .await
    .unwrap();
    let cc = aesp_sidecar::tls::client_config_from_pem(
        &std::fs::read(dir.path().join("ca.crt")).unwrap(),
        Some((
            &std::fs::read(dir.path().join("acme.crt")).unwrap(),
            &std::fs::read(dir.path().join("acme.key")).unwrap(),
        )),
    )
    .unwrap();
    let mut raw = common::RawH2::connect(again.data_addr, cc).await;
    let r = raw
        .call(
            "/altar.grid.v1.GridHost/CreateSession",
            &[("authorization", &auth)],
            create(),
        )
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "INVALID_CREDENTIALS");
    again.shutdown().await;
    host.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

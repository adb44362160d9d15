//! The management listener (issue: identity, RBAC and the management plane):
//! `EnterpriseIdentityService` served by the sidecar itself, with the same authentication as
//! the data plane and RBAC on the tenant each RPC acts on. `GetPrincipalPermissions` is
//! checked against enforcement over generated RBAC states (seeded, replayable).

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

    // A service the sidecar does not serve, and no identity at all.
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = client::channel(&ep, Some(&stack.tls("admin")))
        .await
        .unwrap();
    let e = client::call_raw(ch, "/altar.aesp.v1.EnterpriseTenantService/CreateTenant")
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
    // passes RBAC and is stopped by governance (no approved contract for billing_refund).
    let r = raw
        .call("/altar.grid.v1.GridHost/ExecuteTool", &[], billing())
        .await;
    assert_eq!(r.grpc_status(), Some(7), "{r:?}");
    assert_eq!(r.enterprise_error().unwrap().code, "TOOL_NOT_APPROVED");
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
        common::http_get(stack.sidecar.admin_addr.unwrap(), "/.well-known/jwks.json").await;
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

// ---------------------------------------------------------------------------------------
// GetPrincipalPermissions against enforcement, over generated RBAC states.

/// splitmix64: a small seeded generator, so a failing case can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Permissions roles are drawn from: the GRID operations, tools, and globs over both.
const PERMISSION_POOL: &[&str] = &[
    "grid.session.create",
    "grid.session.destroy",
    "grid.tool.execute",
    "tool:echo:execute",
    "tool:add:execute",
    "tool:billing_refund:execute",
    "tool:*:execute",
    "tool:billing_*:execute",
    "tool:e*:execute",
    "grid.session.*",
    "grid.*",
    "*.execute",
    "aesp.audit.read",
];

/// Tools each principal tries (their permissions are `tool:<name>:execute`).
const TOOLS: &[&str] = &["echo", "add", "billing_refund", "billing_export", "sleep"];

/// `*` in `glob` matches any run of characters (the engine's documented rule).
fn glob_matches(glob: &str, s: &str) -> bool {
    match glob.split_once('*') {
        None => glob == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else {
                return false;
            };
            (0..=s.len()).any(|i| s.is_char_boundary(i) && glob_matches(rest, &s[i..]))
        }
    }
}

/// The generated RBAC state and, independently of the engine, what it should grant.
struct Model {
    /// name, includes (indices of earlier roles: no cycles), permissions
    roles: Vec<(String, Vec<usize>, Vec<String>)>,
    /// (principal or None for `kind: client`, tenant or "*", role index)
    bindings: Vec<(Option<String>, String, usize)>,
}

impl Model {
    fn generate(rng: &mut Rng, principals: &[&str]) -> Model {
        let mut roles = Vec::new();
        for i in 0..12 {
            let includes = (0..i).filter(|_| rng.chance(18)).collect();
            let n = rng.below(4);
            let mut perms: Vec<String> = (0..n)
                .map(|_| PERMISSION_POOL[rng.below(PERMISSION_POOL.len())].to_string())
                .collect();
            perms.sort();
            perms.dedup();
            roles.push((format!("gen-role-{i:02}"), includes, perms));
        }
        let mut bindings: Vec<(Option<String>, String, usize)> = Vec::new();
        for _ in 0..14 {
            let subject = if rng.chance(10) {
                None
            } else {
                Some(principals[rng.below(principals.len())].to_string())
            };
            let tenant = ["acme", "globex", "*"][rng.below(3)].to_string();
            let role = rng.below(roles.len());
            let b = (subject, tenant, role);
            if !bindings.contains(&b) {
                bindings.push(b);
            }
        }
        Model { roles, bindings }
    }

    fn yaml(&self) -> String {
        let mut y = String::from(
            "roles:\n  - name: platform-admin\n    permissions: [\"aesp.*\"]\n  - name: runtime\n    permissions: [grid.runtime.connect]\n",
        );
        for (name, includes, perms) in &self.roles {
            let inc: Vec<&str> = includes.iter().map(|&i| self.roles[i].0.as_str()).collect();
            let perms: Vec<String> = perms.iter().map(|p| format!("{p:?}")).collect();
            y += &format!(
                "  - name: {name}\n    includes: [{}]\n    permissions: [{}]\n",
                inc.join(", "),
                perms.join(", ")
            );
        }
        y += "bindings:\n  - {principal: root, tenant: platform, scope: platform, roles: [platform-admin]}\n  - {kind: runtime, tenant: \"*\", roles: [runtime]}\n";
        for (subject, tenant, role) in &self.bindings {
            let who = match subject {
                Some(p) => format!("principal: {p}"),
                None => "kind: client".into(),
            };
            y += &format!(
                "  - {{{who}, tenant: {tenant:?}, roles: [{}]}}\n",
                self.roles[*role].0
            );
        }
        y
    }

    /// Effective roles (sorted names) and permissions (sorted, globs as written) of a
    /// client `principal` of `tenant`.
    fn grants(&self, principal: &str, tenant: &str) -> (Vec<String>, Vec<String>) {
        let mut held = vec![false; self.roles.len()];
        let mut todo: Vec<usize> = self
            .bindings
            .iter()
            .filter(|(s, t, _)| {
                (t == tenant || t == "*") && s.as_deref().is_none_or(|p| p == principal)
            })
            .map(|(_, _, r)| *r)
            .collect();
        while let Some(r) = todo.pop() {
            if !held[r] {
                held[r] = true;
                todo.extend(self.roles[r].1.iter().copied());
            }
        }
        let mut roles = Vec::new();
        let mut perms = Vec::new();
        for (i, (name, _, p)) in self.roles.iter().enumerate() {
            if held[i] {
                roles.push(name.clone());
                perms.extend(p.iter().cloned());
            }
        }
        roles.sort();
        perms.sort();
        perms.dedup();
        (roles, perms)
    }
}

/// A call to try: its method, its request messages, the permissions it needs.
type Attempt = (&'static str, Vec<Vec<u8>>, Vec<String>);

/// [`Stack::raw`] over a socket with Nagle off: the many small calls below do not wait for
/// delayed ACKs.
async fn raw_nodelay(stack: &Stack, stem: &str) -> common::RawH2 {
    let tcp = tokio::net::TcpStream::connect(stack.sidecar.data_addr)
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(stack.client_config(Some(stem))))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
    common::RawH2::over(tls).await
}

#[tokio::test]
async fn get_principal_permissions_matches_enforcement_over_generated_rbac_states() {
    const PRINCIPALS: &[&str] = &["u0", "u1", "u2", "u3", "u4", "u5"];
    let mut checked_calls = 0;
    let (mut allowed, mut denied) = (0, 0);
    for seed in [1u64, 7, 42, 2024, 0xfeed, 0xdead_beef, 31337, 99] {
        let mut rng = Rng(seed);
        let mut model = Model::generate(&mut rng, PRINCIPALS);
        let rbac_dir = tempfile::tempdir().unwrap();
        let rbac = rbac_dir.path().join("generated-rbac.yaml");
        std::fs::write(&rbac, model.yaml()).unwrap();
        let rbac_path = rbac.display().to_string();
        let stack = Stack::start_edited(
            move |t| t.replace("  file: rbac.yaml", &format!("  file: {rbac_path}")),
            false,
        )
        .await;
        let issuer = DemoIssuer::ensure(&stack.files.dir).unwrap();
        let mut root = identity(&stack, "admin", None).await;
        // Role assignments through the API on top of the file.
        for _ in 0..8 {
            let p = PRINCIPALS[rng.below(PRINCIPALS.len())];
            let t = ["acme", "globex"][rng.below(2)];
            let r = rng.below(model.roles.len());
            let res = root
                .assign_role(AssignRoleRequest {
                    principal_id: p.into(),
                    tenant_id: t.into(),
                    role: model.roles[r].0.clone(),
                })
                .await;
            let b = (Some(p.to_string()), t.to_string(), r);
            if model.bindings.contains(&b) {
                let e = res.unwrap_err();
                assert!(e.message().contains("already holds"), "seed {seed}: {e:?}");
            } else {
                res.unwrap_or_else(|e| panic!("seed {seed}: AssignRole {b:?}: {e:?}"));
                model.bindings.push(b);
            }
        }
        for tenant in ["acme", "globex"] {
            let mut raw = raw_nodelay(&stack, tenant).await;
            for p in PRINCIPALS {
                let answer = root
                    .get_principal_permissions(perms(p, tenant))
                    .await
                    .unwrap()
                    .into_inner();
                let ctx = format!("seed {seed}, {p}@{tenant}: {answer:?}");
                // The answer is what the generated state says, inheritance included.
                let (roles, permissions) = model.grants(p, tenant);
                assert_eq!(answer.roles, roles, "{ctx}");
                assert_eq!(answer.permissions, permissions, "{ctx}");
                let granted = |perm: &str| answer.permissions.iter().any(|g| glob_matches(g, perm));
                // And it is what enforcement does, call by call.
                let token = issuer
                    .mint(p, tenant, &[], 600, serde_json::json!({}))
                    .unwrap();
                let auth = format!("Bearer {token}");
                let mut attempts: Vec<Attempt> = vec![
                    (
                        "/altar.grid.v1.GridHost/CreateSession",
                        vec![frame(&grid::CreateSession::default().encode_to_vec())],
                        vec!["grid.session.create".into()],
                    ),
                    (
                        "/altar.grid.v1.GridHost/DestroySession",
                        vec![frame(
                            &grid::DestroySession {
                                session_id: "no-such-session".into(),
                            }
                            .encode_to_vec(),
                        )],
                        vec!["grid.session.destroy".into()],
                    ),
                ];
                for tool in TOOLS {
                    let tc =
                        client::tool_call("no-such-session", tool, &serde_json::json!({})).unwrap();
                    attempts.push((
                        "/altar.grid.v1.GridHost/ExecuteTool",
                        vec![frame(&tc.encode_to_vec())],
                        vec!["grid.tool.execute".into(), format!("tool:{tool}:execute")],
                    ));
                }
                for (method, body, needed) in attempts {
                    let sessions = stack.host.state.security_contexts().len();
                    let r = raw
                        .call(method, &[("authorization", auth.as_str())], body)
                        .await;
                    let missing = needed.iter().find(|n| !granted(n));
                    let e = r.enterprise_error();
                    let what = format!("{ctx}: {method} needing {needed:?}: {r:?}");
                    match missing {
                        Some(m) => {
                            let e = e.unwrap_or_else(|| panic!("denial expected, {what}"));
                            assert_eq!(e.code, "AUTHORIZATION_DENIED", "{what}");
                            assert_eq!(&e.details["permission"], m, "{what}");
                            denied += 1;
                        }
                        None => {
                            assert!(
                                e.as_ref().is_none_or(|e| e.code != "AUTHORIZATION_DENIED"
                                    && e.code != "INVALID_CREDENTIALS"
                                    && e.code != "IDENTITY_MISMATCH"),
                                "allowed expected, {what}"
                            );
                            if method.ends_with("CreateSession") {
                                assert_eq!(r.grpc_status(), Some(0), "{what}");
                                // The roles the host was told are the same effective roles.
                                let sc = stack.host.state.security_contexts();
                                assert_eq!(sc.len(), sessions + 1, "{what}");
                                assert_eq!(sc.last().unwrap().roles, answer.roles, "{what}");
                            }
                            allowed += 1;
                        }
                    }
                    checked_calls += 1;
                }
            }
        }
        stack.stop().await;
    }
    eprintln!("checked {checked_calls} calls: {allowed} allowed, {denied} denied");
    // The generated states exercised both outcomes, many times.
    assert!(checked_calls >= 8 * 2 * 6 * 7, "{checked_calls}");
    assert!(
        allowed >= 20 && denied >= 20,
        "allowed {allowed}, denied {denied}"
    );
}

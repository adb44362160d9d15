//! Check 5, RBAC: the effective caller holds the permission of what it does, in its own
//! tenant. Deny unless a binding allows.
//!
//! | call | permission(s) |
//! |---|---|
//! | `GridHost/CreateSession` | `grid.session.create` |
//! | `GridHost/DestroySession` | `grid.session.destroy` |
//! | `GridHost/ExecuteTool`, `ExecuteToolStream` | `grid.tool.execute` and `tool:<name>:execute` |
//! | `GridRuntime/Connect` | `grid.runtime.connect` |
//! | a pass-through method `/pkg.Service/Method` | `passthrough:pkg.Service.Method` |
//!
//! The subject's grants are resolved once per connection (certificate alone) or per verified
//! token, and again only when the RBAC snapshot changes: the check itself is a set lookup.

use crate::authz::{Authz, GrantsCache, Resolved, rbac::Subject};
use crate::grid::{GridMethod, Route};
use crate::grpc::{Denial, ErrorCode};
use crate::identity::Caller;
use crate::ids::{PrincipalId, TenantId};
use crate::listener::PeerIdentity;
use std::sync::Arc;

/// The permission a call needs before its message is known (the tool's comes with it).
fn permission(route: Route, method: &str) -> Option<String> {
    Some(match route {
        Route::Grid(GridMethod::CreateSession) => "grid.session.create".into(),
        Route::Grid(GridMethod::DestroySession) => "grid.session.destroy".into(),
        Route::Grid(GridMethod::ExecuteTool | GridMethod::ExecuteToolStream) => {
            "grid.tool.execute".into()
        }
        Route::Grid(GridMethod::Connect) => "grid.runtime.connect".into(),
        Route::Passthrough => format!(
            "passthrough:{}",
            method.trim_start_matches('/').replace('/', ".")
        ),
        Route::Unknown | Route::Management => return None,
    })
}

/// A tool name that can be part of a permission: letters, digits, `.`, `-`, `_`.
fn valid_tool(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

pub(super) struct Who<'a> {
    pub id: &'a PeerIdentity,
    pub caller: Option<&'a Caller>,
    pub principal: &'a PrincipalId,
    pub tenant: &'a TenantId,
    /// The connection's cache (certificate alone); a caller has its own.
    pub conn_cache: &'a GrantsCache,
}

pub(super) fn authorized(
    authz: &Authz,
    who: &Who<'_>,
    route: Route,
    method: &str,
    tool: Option<&str>,
) -> Result<Arc<Resolved>, Denial> {
    let (groups, roles, cache) = match who.caller {
        Some(c) => (&c.groups[..], &c.roles[..], &c.grants),
        None => (&[][..], &[][..], who.conn_cache),
    };
    let resolved = authz.grants(
        cache,
        &Subject {
            tenant: who.tenant,
            principal: who.principal,
            kind: &who.id.kind,
            groups,
            roles,
        },
    );
    let deny = |perm: &str| {
        Denial::new(
            ErrorCode::AuthorizationDenied,
            format!(
                "{} of tenant {} lacks the permission {perm}",
                who.principal, who.tenant
            ),
        )
        .detail("permission", perm)
        .detail("principal", who.principal.as_str())
        .detail("tenant", who.tenant.as_str())
        .detail("roles", resolved.grants.roles().join(","))
    };
    let Some(perm) = permission(route, method) else {
        return Ok(resolved);
    };
    if !resolved.grants.allows(&perm, who.tenant, who.tenant) {
        return Err(deny(&perm));
    }
    if let Some(t) = tool {
        if !valid_tool(t) {
            return Err(Denial::new(
                ErrorCode::AuthorizationDenied,
                format!("no permission can name the tool {t:?}"),
            )
            .detail("tool", t)
            .detail("reason", "tool names are letters, digits, '.', '-', '_'"));
        }
        let tp = format!("tool:{t}:execute");
        if !resolved.grants.allows(&tp, who.tenant, who.tenant) {
            return Err(deny(&tp).detail("tool", t));
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::rbac::Rbac;
    use crate::ids::PeerKind;

    const POLICY: &str = "roles:\n  - name: user\n    permissions: [grid.session.create, grid.tool.execute, \"tool:echo:execute\"]\n  - name: runtime\n    permissions: [grid.runtime.connect]\n  - name: pass\n    permissions: [\"passthrough:test.Echo.*\"]\nbindings:\n  - {principal: alice, tenant: acme, roles: [user, pass]}\n  - {kind: runtime, tenant: \"*\", roles: [runtime]}\n";

    fn who<'a>(id: &'a PeerIdentity, cache: &'a GrantsCache) -> Who<'a> {
        Who {
            id,
            caller: None,
            principal: &id.principal_id,
            tenant: &id.tenant_id,
            conn_cache: cache,
        }
    }

    #[test]
    fn each_call_needs_its_permission_and_a_tool_call_the_tool_too() {
        let authz = Authz::new(Rbac::parse(POLICY, std::path::Path::new("rbac.yaml")).unwrap());
        let ident = |p: &str, k: PeerKind| {
            PeerIdentity::new(
                PrincipalId::new(p).unwrap(),
                TenantId::new("acme").unwrap(),
                k,
                None,
                String::new(),
            )
        };
        let alice = ident("alice", PeerKind::Client);
        let rt = ident("rt-1", PeerKind::Runtime);
        let g = |m| Route::Grid(m);
        // (identity, route, method, tool) -> missing permission, or None when allowed
        type Case<'a> = (
            &'a PeerIdentity,
            Route,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: [Case; 8] = [
            (&alice, g(GridMethod::CreateSession), "", None, None),
            (
                &alice,
                g(GridMethod::DestroySession),
                "",
                None,
                Some("grid.session.destroy"),
            ),
            (&alice, g(GridMethod::ExecuteTool), "", Some("echo"), None),
            (
                &alice,
                g(GridMethod::ExecuteToolStream),
                "",
                Some("add"),
                Some("tool:add:execute"),
            ),
            (
                &alice,
                g(GridMethod::Connect),
                "",
                None,
                Some("grid.runtime.connect"),
            ),
            (&rt, g(GridMethod::Connect), "", None, None),
            (
                &alice,
                Route::Passthrough,
                "/test.Echo/Trailers",
                None,
                None,
            ),
            (
                &rt,
                Route::Passthrough,
                "/test.Echo/Trailers",
                None,
                Some("passthrough:test.Echo.Trailers"),
            ),
        ];
        for (id, route, method, tool, missing) in cases {
            let cache = GrantsCache::default();
            let got = authorized(&authz, &who(id, &cache), route, method, tool);
            match (got, missing) {
                (Ok(_), None) => {}
                (Err(d), Some(p)) => {
                    assert_eq!(d.code, ErrorCode::AuthorizationDenied);
                    assert_eq!(d.details["permission"], p);
                }
                (got, want) => panic!(
                    "{route:?} {tool:?}: got {:?}, want {want:?}",
                    got.map(|_| ())
                ),
            }
        }
        let cache = GrantsCache::default();
        let d = authorized(
            &authz,
            &who(&alice, &cache),
            g(GridMethod::ExecuteTool),
            "",
            Some("a:b"),
        )
        .err()
        .unwrap();
        assert_eq!(d.details["tool"], "a:b");
    }

    #[test]
    fn cached_grants_follow_a_new_snapshot() {
        let authz = Authz::new(Rbac::parse(POLICY, std::path::Path::new("rbac.yaml")).unwrap());
        let bob = PeerIdentity::new(
            PrincipalId::new("bob").unwrap(),
            TenantId::new("acme").unwrap(),
            PeerKind::Client,
            None,
            String::new(),
        );
        let cache = GrantsCache::default();
        let create = Route::Grid(GridMethod::CreateSession);
        assert!(authorized(&authz, &who(&bob, &cache), create, "", None).is_err());
        let more = POLICY.to_string() + "  - {principal: bob, tenant: acme, roles: [user]}\n";
        authz.replace(Rbac::parse(&more, std::path::Path::new("rbac.yaml")).unwrap());
        let r = authorized(&authz, &who(&bob, &cache), create, "", None).unwrap();
        assert_eq!(r.grants.roles(), ["user"]);
    }
}

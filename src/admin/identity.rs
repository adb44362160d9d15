//! `EnterpriseIdentityService`: role assignments and effective permissions of principals.
//!
//! | RPC | permission | on tenant |
//! |---|---|---|
//! | `AssignRole` | `aesp.identity.admin` | the request's `tenant_id` |
//! | `GetPrincipalPermissions` | `aesp.identity.admin`, or none for one's own | the request's `tenant_id` |
//! | `CreateServiceAccount`, `RevokeServiceAccount` | `aesp.identity.admin` | the account's tenant |
//!
//! A tenant administrator administers its own tenant only; acting on another tenant needs a
//! binding with scope `platform`. `GetPrincipalPermissions` answers from the same RBAC
//! snapshot and the same resolution the data plane enforces.

use super::{Shared, caller, id_field};
use crate::authz::rbac::{Binding, BindingSubject, BindingTenant, Scope, Subject};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::{PeerKind, PrincipalId, TenantId};
use crate::proto::aesp;
use crate::proto::aesp::enterprise_identity_service_server::EnterpriseIdentityService;
use crate::store::{BindingRecord, ServiceAccountRecord};
use tonic::{Request, Response, Status};

pub struct IdentityService {
    pub shared: Shared,
}

/// Lifetime of a service account's credential when the request names none: 30 days.
const DEFAULT_TTL: u64 = 30 * 24 * 3600;
/// The longest a credential may be asked to live: a year.
const MAX_TTL: u64 = 365 * 24 * 3600;

fn account(r: &ServiceAccountRecord, credential: String) -> aesp::ServiceAccount {
    aesp::ServiceAccount {
        principal_id: r.principal_id.to_string(),
        tenant_id: r.tenant_id.to_string(),
        display_name: r.display_name.clone(),
        roles: r.roles.clone(),
        revoked: r.revoked,
        created_at: r.created_at,
        revoked_at: r.revoked_at,
        credential,
    }
}

/// A blocking store call's outcome, or `UNAVAILABLE` (logged) when the store failed.
fn store_result<T>(
    c: &super::ManagementCaller,
    r: Result<Result<T, crate::store::StoreError>, tokio::task::JoinError>,
) -> Result<T, Status> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, correlation_id = %c.correlation_id, "the control store failed; nothing was changed");
            Err(Status::unavailable(
                "the control store cannot record the change; nothing was changed (see the sidecar's log)",
            ))
        }
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl IdentityService {
    /// The request's `principal_id` and `tenant_id` as ids, or a refusal naming the field.
    fn principal_in_tenant(
        &self,
        c: &super::ManagementCaller,
        principal_id: &str,
        tenant_id: &str,
    ) -> Result<(PrincipalId, TenantId), Status> {
        let tenant = id_field(c, &self.shared, "tenant_id", tenant_id, TenantId::new)?;
        let principal = id_field(
            c,
            &self.shared,
            "principal_id",
            principal_id,
            PrincipalId::new,
        )?;
        Ok((principal, tenant))
    }
}

#[tonic::async_trait]
impl EnterpriseIdentityService for IdentityService {
    async fn create_service_account(
        &self,
        req: Request<aesp::CreateServiceAccountRequest>,
    ) -> Result<Response<aesp::ServiceAccount>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let tenant = id_field(&c, &self.shared, "tenant_id", &r.tenant_id, TenantId::new)?;
        self.shared.require(&c, "aesp.identity.admin", &tenant)?;
        let ttl = match r.credential_ttl_seconds {
            0 => DEFAULT_TTL,
            n if n > MAX_TTL => {
                return Err(self.shared.refuse(
                    &c,
                    Denial::new(
                        ErrorCode::MalformedMessage,
                        format!("credential_ttl_seconds: at most {MAX_TTL} (a year), got {n}"),
                    )
                    .detail("field", "credential_ttl_seconds"),
                ));
            }
            n => n,
        };
        let principal = PrincipalId::new(&format!(
            "sa-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
        .ok_or_else(|| Status::internal("a generated principal id is not valid"))?;
        // The roles as bindings of the new principal: checked against the RBAC state first.
        let binding = Binding {
            subject: BindingSubject::Principal(principal.clone()),
            tenant: BindingTenant::Tenant(tenant.clone()),
            scope: Scope::Tenant,
            roles: r.roles.clone(),
        };
        let next = if r.roles.is_empty() {
            None
        } else {
            Some(
                self.shared
                    .authz
                    .current()
                    .with_binding(binding.clone())
                    .map_err(|e| {
                        self.shared.refuse(
                            &c,
                            Denial::new(ErrorCode::MalformedMessage, format!("roles: {e}"))
                                .detail("field", "roles"),
                        )
                    })?,
            )
        };
        let at = now();
        let exp = at + ttl;
        let credential = self
            .shared
            .own
            .mint(principal.as_str(), tenant.as_str(), at, exp)
            .map_err(|e| Status::internal(e.to_string()))?;
        let record = ServiceAccountRecord {
            principal_id: principal.clone(),
            tenant_id: tenant.clone(),
            display_name: r.display_name.clone(),
            roles: r.roles.clone(),
            created_at: at,
            created_by: c.principal.to_string(),
            revoked: false,
            revoked_at: 0,
            revoke_reason: String::new(),
            credential_expires_at: exp,
        };
        let bindings = if r.roles.is_empty() {
            Vec::new()
        } else {
            BindingRecord::from_binding(&binding, c.principal.as_str(), at)
        };
        let control = self.shared.control.clone();
        let rec = record.clone();
        let stored =
            tokio::task::spawn_blocking(move || control.create_service_account(&rec, &bindings))
                .await;
        store_result(&c, stored)?;
        if let Some(next) = next {
            self.shared.authz.replace(next);
        }
        self.shared.verifier.set_account(&principal, false);
        self.shared.changed(
            &c,
            "service_account_created",
            &tenant,
            serde_json::Value::Null,
            serde_json::json!({
                "principal_id": principal.as_str(), "tenant_id": tenant.as_str(),
                "display_name": r.display_name, "roles": r.roles, "credential_expires_at": exp,
            }),
        );
        tracing::info!(
            principal = %principal, tenant = %tenant, roles = ?r.roles,
            created_by = %c.principal, correlation_id = %c.correlation_id,
            "service account created"
        );
        Ok(Response::new(account(&record, credential)))
    }

    async fn revoke_service_account(
        &self,
        req: Request<aesp::RevokeServiceAccountRequest>,
    ) -> Result<Response<aesp::ServiceAccount>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let principal = id_field(
            &c,
            &self.shared,
            "principal_id",
            &r.principal_id,
            PrincipalId::new,
        )?;
        let control = self.shared.control.clone();
        let p = principal.clone();
        let found = tokio::task::spawn_blocking(move || {
            control.load().map(|s| s.service_account(&p).cloned())
        })
        .await;
        let Some(existing) = store_result(&c, found)? else {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    format!("no service account {principal}"),
                )
                .detail("field", "principal_id"),
            ));
        };
        self.shared
            .require(&c, "aesp.identity.admin", &existing.tenant_id)?;
        let control = self.shared.control.clone();
        let p = principal.clone();
        let reason = r.reason.clone();
        let revoked =
            tokio::task::spawn_blocking(move || control.revoke_service_account(&p, now(), &reason))
                .await;
        let record = store_result(&c, revoked)?;
        self.shared.verifier.set_account(&principal, true);
        self.shared.changed(
            &c,
            "service_account_revoked",
            &existing.tenant_id,
            serde_json::json!({"principal_id": principal.as_str(), "revoked": existing.revoked}),
            serde_json::json!({"principal_id": principal.as_str(), "revoked": true, "reason": r.reason}),
        );
        tracing::info!(
            principal = %principal, revoked_by = %c.principal, reason = %r.reason,
            correlation_id = %c.correlation_id, "service account revoked"
        );
        Ok(Response::new(account(&record, String::new())))
    }

    async fn assign_role(
        &self,
        req: Request<aesp::AssignRoleRequest>,
    ) -> Result<Response<aesp::RoleBinding>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (principal, tenant) = self.principal_in_tenant(&c, &r.principal_id, &r.tenant_id)?;
        self.shared.require(&c, "aesp.identity.admin", &tenant)?;
        let binding = Binding {
            subject: BindingSubject::Principal(principal.clone()),
            tenant: BindingTenant::Tenant(tenant.clone()),
            scope: Scope::Tenant,
            roles: vec![r.role.clone()],
        };
        let next = self
            .shared
            .authz
            .current()
            .with_binding(binding.clone())
            .map_err(|e| {
                let code = if matches!(e, crate::authz::rbac::RbacError::Duplicate { .. }) {
                    "the principal already holds this role in this tenant"
                } else {
                    "the role assignment is not valid"
                };
                self.shared.refuse(
                    &c,
                    Denial::new(ErrorCode::MalformedMessage, format!("{code}: {e}"))
                        .detail("role", r.role.as_str()),
                )
            })?;
        // Durable first, then in force: a role the store could not keep is not granted.
        let records = BindingRecord::from_binding(&binding, c.principal.as_str(), now());
        let control = self.shared.control.clone();
        let stored = tokio::task::spawn_blocking(move || {
            records.iter().try_for_each(|r| control.add_binding(r))
        })
        .await;
        store_result(&c, stored)?;
        let before = self
            .shared
            .authz
            .current()
            .grants(&Subject {
                tenant: &tenant,
                principal: &principal,
                kind: &PeerKind::Client,
                groups: &[],
                roles: &[],
            })
            .roles()
            .to_vec();
        self.shared.authz.replace(next);
        let mut after = before.clone();
        after.push(r.role.clone());
        self.shared.changed(
            &c,
            "role_assigned",
            &tenant,
            serde_json::json!({"principal_id": principal.as_str(), "roles": before}),
            serde_json::json!({"principal_id": principal.as_str(), "roles": after}),
        );
        tracing::info!(
            principal = %principal, tenant = %tenant, role = %r.role,
            granted_by = %c.principal, correlation_id = %c.correlation_id,
            "role assigned"
        );
        Ok(Response::new(aesp::RoleBinding {
            principal_id: principal.to_string(),
            tenant_id: tenant.to_string(),
            role: r.role,
            granted_by: c.principal.to_string(),
            granted_at: now(),
        }))
    }

    async fn get_principal_permissions(
        &self,
        req: Request<aesp::GetPrincipalPermissionsRequest>,
    ) -> Result<Response<aesp::PrincipalPermissions>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (principal, tenant) = self.principal_in_tenant(&c, &r.principal_id, &r.tenant_id)?;
        if !(principal == c.principal && tenant == c.tenant) {
            self.shared.require(&c, "aesp.identity.admin", &tenant)?;
        }
        // The principal as a client of its tenant, with no groups or token roles: what the
        // bindings of the RBAC state give it.
        let grants = self.shared.authz.current().grants(&Subject {
            tenant: &tenant,
            principal: &principal,
            kind: &PeerKind::Client,
            groups: &[],
            roles: &[],
        });
        Ok(Response::new(aesp::PrincipalPermissions {
            principal_id: principal.to_string(),
            tenant_id: tenant.to_string(),
            roles: grants.roles().to_vec(),
            permissions: grants.permissions(),
        }))
    }
}

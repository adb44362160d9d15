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
use crate::store::BindingRecord;
use tonic::{Request, Response, Status};

pub struct IdentityService {
    pub shared: Shared,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tonic::async_trait]
impl EnterpriseIdentityService for IdentityService {
    async fn create_service_account(
        &self,
        req: Request<aesp::CreateServiceAccountRequest>,
    ) -> Result<Response<aesp::ServiceAccount>, Status> {
        let c = caller(&req)?;
        Err(self.shared.refuse(
            &c,
            Denial::new(
                ErrorCode::MethodNotAllowed,
                "CreateServiceAccount is not served in this release",
            ),
        ))
    }

    async fn revoke_service_account(
        &self,
        req: Request<aesp::RevokeServiceAccountRequest>,
    ) -> Result<Response<aesp::ServiceAccount>, Status> {
        let c = caller(&req)?;
        Err(self.shared.refuse(
            &c,
            Denial::new(
                ErrorCode::MethodNotAllowed,
                "RevokeServiceAccount is not served in this release",
            ),
        ))
    }

    async fn assign_role(
        &self,
        req: Request<aesp::AssignRoleRequest>,
    ) -> Result<Response<aesp::RoleBinding>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let tenant = id_field(&c, &self.shared, "tenant_id", &r.tenant_id, TenantId::new)?;
        let principal = id_field(
            &c,
            &self.shared,
            "principal_id",
            &r.principal_id,
            PrincipalId::new,
        )?;
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
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, correlation_id = %c.correlation_id, "cannot store a role assignment; nothing was changed");
                return Err(Status::unavailable(
                    "the control store cannot record the assignment; nothing was changed (see the sidecar's log)",
                ));
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        self.shared.authz.replace(next);
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
        let tenant = id_field(&c, &self.shared, "tenant_id", &r.tenant_id, TenantId::new)?;
        let principal = id_field(
            &c,
            &self.shared,
            "principal_id",
            &r.principal_id,
            PrincipalId::new,
        )?;
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

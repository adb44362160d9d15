//! The whole decision of a tool invocation, for `benches/decision.rs`: the pipeline as the
//! sidecar builds it (RBAC, governance with strict argument validation, the CEL policies),
//! driven without sockets. Not part of the API.

use super::{DecisionInput, Pipeline, TokenRules};
use crate::authz::{Authz, GrantsCache};
use crate::governance::{GovernanceConfig, Registry};
use crate::grid::{GridMethod, Route};
use crate::ids::{PeerKind, PrincipalId, TenantId};
use crate::listener::PeerIdentity;
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;

/// A pipeline and a caller (a client certificate, no token).
pub struct WholeDecision {
    pipeline: Pipeline,
    identity: PeerIdentity,
    grants: GrantsCache,
}

impl WholeDecision {
    /// `rbac` (a file's text), the contracts seed `contracts`, the policies at `policies`
    /// (a file or directory; `None`: no policies); the caller is `principal` of `tenant`.
    pub fn new(
        rbac: &str,
        contracts: &Path,
        policies: Option<&Path>,
        principal: &str,
        tenant: &str,
    ) -> anyhow::Result<WholeDecision> {
        let rbac = crate::authz::rbac::Rbac::parse(rbac, Path::new("rbac.yaml"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let governance = Registry::open(
            GovernanceConfig {
                contracts: Some(contracts.to_path_buf()),
                ..Default::default()
            },
            None,
        )
        .map_err(anyhow::Error::msg)?;
        let set = match policies {
            Some(p) => crate::policy::load(p).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => Default::default(),
        };
        let identity = PeerIdentity::new(
            PrincipalId::new(principal).context("principal")?,
            TenantId::new(tenant).context("tenant")?,
            PeerKind::Client,
            None,
            "CN=bench".into(),
        );
        let sessions = crate::tenancy::Sessions::new();
        sessions.created(
            "s-bench",
            identity.tenant_id.clone(),
            identity.principal_id.clone(),
            u64::MAX,
        );
        Ok(WholeDecision {
            pipeline: Pipeline {
                overwrite_identity_fields: false,
                tokens: TokenRules::default(),
                authz: Arc::new(Authz::new(rbac)),
                policies: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
                organization_id: Arc::from("bench-org"),
                governance: Arc::new(governance),
                sessions: Arc::new(sessions),
                cost: None,
            },
            identity,
            grants: GrantsCache::default(),
        })
    }

    /// Decides an `ExecuteTool` of `tool` with `args`: `Ok(matched policies)` or the
    /// refusal's code.
    pub fn decide(&self, tool: &str, args: &prost_types::Struct) -> Result<usize, &'static str> {
        let input = DecisionInput {
            method: GridMethod::ExecuteTool.path(),
            route: Route::Grid(GridMethod::ExecuteTool),
            identity: Ok(&self.identity),
            authorization: None,
            grants: &self.grants,
            claims: Default::default(),
            tool_name: Some(tool),
            args: Some(args),
            session_id: Some("s-bench"),
            correlation_id: "c-bench",
            source: "127.0.0.1:40000",
        };
        match self.pipeline.decide(&input) {
            Ok(a) => Ok(a.facts.matched_policies.len()),
            Err(d) => Err(d.denial.code.as_str()),
        }
    }
}

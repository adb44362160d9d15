//! The governance stage of a tool invocation (docs/governance.md), after RBAC: the tool has
//! an APPROVED contract for the caller's tenant that the host's manifest still matches
//! (`TOOL_NOT_APPROVED`), the caller holds every one of its `required_roles`
//! (`AUTHORIZATION_DENIED`), and the arguments conform to the approved declaration, extra
//! keys refused (`INVALID_ARGUMENTS`, with the path of the offending field).

use crate::authz::Resolved;
use crate::governance::{Contracts, NotInForce, scope};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::TenantId;
use crate::proto::aesp::EnterpriseToolContract;
use std::sync::Arc;

/// The contract the call runs against, or the refusal.
pub(crate) fn checked(
    contracts: &Contracts,
    tenant: &TenantId,
    tool: &str,
    grants: &Resolved,
    args: Option<&prost_types::Struct>,
) -> Result<Arc<EnterpriseToolContract>, Denial> {
    let c = contracts
        .in_force(tenant.as_str(), tool)
        .map_err(|why| not_approved(tenant, tool, why))?;
    let roles = grants.grants.roles();
    let missing: Vec<&str> = c
        .required_roles
        .iter()
        .filter(|r| !roles.contains(r))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(with_contract(
            Denial::new(
                ErrorCode::AuthorizationDenied,
                format!(
                    "the contract of {tool} requires the roles {}: the caller lacks {}",
                    c.required_roles.join(", "),
                    missing.join(", ")
                ),
            )
            .detail("required_roles", c.required_roles.join(","))
            .detail("missing_roles", missing.join(","))
            .detail("roles", roles.join(",")),
            c,
        ));
    }
    if let Some(decl) = &c.declaration
        && let Err(e) = crate::adm::validate_args_strict(decl, args)
    {
        let mut d = with_contract(
            Denial::new(
                ErrorCode::InvalidArguments,
                format!("the arguments of {tool} do not match its approved contract: {e}"),
            )
            .detail("path", e.path.clone())
            .detail("problem", e.message.clone()),
            c,
        );
        d.remediation_steps = format!(
            "Fix {} and call again; the approved declaration of {tool} (revision {}) lists the parameters and their types.",
            e.path, c.revision
        );
        return Err(d);
    }
    Ok(c.clone())
}

/// The contract's identity and compliance tags in a denial's details.
fn with_contract(d: Denial, c: &EnterpriseToolContract) -> Denial {
    let d = d
        .detail("tool_revision", c.revision.to_string())
        .detail("risk_assessment", c.risk_assessment.clone());
    if c.compliance_tags.is_empty() {
        d
    } else {
        d.detail("compliance_tags", c.compliance_tags.join(","))
    }
}

fn not_approved(tenant: &TenantId, tool: &str, why: NotInForce) -> Denial {
    let (message, reason, remediation) = match &why {
        NotInForce::Unknown => (
            format!("no approved contract for tool {tool} for tenant {tenant}"),
            "no contract".to_string(),
            "Submit the tool's contract (aesp tool submit, or aesp tool import --manifest for a host's manifest) and have a second principal holding aesp.governance.approve approve it."
                .to_string(),
        ),
        NotInForce::NotApproved {
            revision,
            status,
            tenant: of,
        } => (
            format!(
                "tool {tool} has no approved contract for tenant {tenant}: revision {revision} is {status}"
            ),
            format!("revision {revision} {status}"),
            format!(
                "A principal holding aesp.governance.approve, other than its submitter, reviews revision {revision} (aesp tool approve {tool}{} --revision {revision} --comment ...).",
                if of.is_empty() {
                    String::new()
                } else {
                    format!(" --tenant {of}")
                }
            ),
        ),
        NotInForce::Drifted {
            revision,
            approved,
            host,
        } => (
            format!(
                "the GRID host declares tool {tool} differently from its approved revision {revision}: calls are refused until the new declaration is approved"
            ),
            format!("declaration digest {host} differs from the approved {approved}"),
            "Submit the host's new declaration (aesp tool import --manifest) and have it approved."
                .to_string(),
        ),
        NotInForce::NotDeclared { revision } => (
            format!(
                "the GRID host's manifest no longer declares tool {tool} (approved revision {revision})"
            ),
            "not in the host's manifest".to_string(),
            "Check governance.host_manifest: the host no longer offers this tool.".to_string(),
        ),
    };
    let mut d = Denial::new(ErrorCode::ToolNotApproved, message)
        .detail("tool", tool)
        .detail("tenant", tenant.as_str())
        .detail("reason", reason);
    if let NotInForce::Drifted { approved, host, .. } = &why {
        d = d
            .detail("approved_sha256", approved.clone())
            .detail("host_sha256", host.clone());
    }
    d.remediation_steps = remediation;
    d.compliance_impact = format!(
        "Only reviewed tool contracts may run ({}); an unreviewed tool is an unassessed risk.",
        scope(tenant.as_str())
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::{GovernanceConfig, Registry};

    fn registry() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("tool-contracts.yaml");
        std::fs::write(
            &seed,
            "contracts:\n  - tool: pay\n    risk_assessment: HIGH\n    compliance_tags: [SOX]\n    required_roles: [billing, auditor]\n    declaration: {name: pay, description: d, parameters: {type: OBJECT, properties: {amount: {type: NUMBER}, to: {type: OBJECT, properties: {iban: {type: STRING}}, required: [iban]}}, required: [amount]}}\n  - tool: later\n    status: PENDING\n    risk_assessment: LOW\n    declaration: {name: later, description: d}\n",
        )
        .unwrap();
        Registry::open(
            GovernanceConfig {
                contracts: Some(seed),
                ..Default::default()
            },
            None,
        )
        .unwrap()
    }

    fn grants(roles: &[&str]) -> Resolved {
        let mut text = String::from("roles:\n");
        for r in ["billing", "auditor", "other"] {
            text.push_str(&format!(
                "  - {{name: {r}, permissions: [grid.tool.execute]}}\n"
            ));
        }
        text.push_str("bindings:\n");
        if !roles.is_empty() {
            text.push_str(&format!(
                "  - {{principal: alice, tenant: acme, roles: [{}]}}\n",
                roles.join(", ")
            ));
        }
        let rbac =
            crate::authz::rbac::Rbac::parse(&text, std::path::Path::new("rbac.yaml")).unwrap();
        let (tenant, principal) = (
            TenantId::new("acme").unwrap(),
            crate::ids::PrincipalId::new("alice").unwrap(),
        );
        let who = crate::authz::rbac::Subject {
            tenant: &tenant,
            principal: &principal,
            kind: &crate::ids::PeerKind::Client,
            groups: &[],
            roles: &[],
        };
        let a = crate::authz::Authz::new(rbac);
        let r = a.grants(&crate::authz::GrantsCache::default(), &who);
        Resolved {
            generation: r.generation,
            grants: r.grants.clone(),
            roles_context: r.roles_context.clone(),
        }
    }

    fn args(json: &str) -> prost_types::Struct {
        crate::adm::json_to_struct(&serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn each_governance_rule_refuses_with_its_code_and_the_offending_detail() {
        let r = registry();
        let s = r.snapshot();
        let acme = TenantId::new("acme").unwrap();
        let both = grants(&["billing", "auditor"]);
        let ok = args(r#"{"amount": 5, "to": {"iban": "DE1"}}"#);
        // (tool, grants, args) -> Ok or (code, detail key, detail value)
        let c = checked(&s, &acme, "pay", &both, Some(&ok)).unwrap();
        assert_eq!(c.risk_assessment, "HIGH");

        let d = checked(&s, &acme, "nope", &both, None).unwrap_err();
        assert_eq!(d.code, ErrorCode::ToolNotApproved);
        assert_eq!(d.details["reason"], "no contract");

        let d = checked(&s, &acme, "later", &both, None).unwrap_err();
        assert_eq!(d.code, ErrorCode::ToolNotApproved);
        assert_eq!(d.details["reason"], "revision 1 PENDING");
        assert!(
            d.remediation_steps
                .contains("aesp tool approve later --revision 1")
        );

        let d = checked(&s, &acme, "pay", &grants(&["billing"]), Some(&ok)).unwrap_err();
        assert_eq!(d.code, ErrorCode::AuthorizationDenied);
        assert_eq!(d.details["missing_roles"], "auditor");
        assert_eq!(d.details["compliance_tags"], "SOX");

        for (json, path) in [
            (r#"{"to": {"iban": "DE1"}}"#, "args.amount"),
            (r#"{"amount": "5"}"#, "args.amount"),
            (r#"{"amount": 5, "to": {}}"#, "args.to.iban"),
            (
                r#"{"amount": 5, "to": {"iban": "DE1", "bic": "X"}}"#,
                "args.to.bic",
            ),
            (r#"{"amount": 5, "memo": "x"}"#, "args.memo"),
        ] {
            let d = checked(&s, &acme, "pay", &both, Some(&args(json))).unwrap_err();
            assert_eq!(d.code, ErrorCode::InvalidArguments, "{json}");
            assert_eq!(d.details["path"], path, "{json}");
        }
    }
}

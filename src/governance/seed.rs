//! The seed file of the contract registry (`governance.contracts`, docs/governance.md): the
//! operator's reviewed contracts, like `rbac.yaml` is for roles. Each entry names a tool and
//! the tenant it is for (absent or `""`: shared by every tenant), its risk, compliance tags and
//! required roles, and its status (`APPROVED`, the default, or `PENDING`). The declaration is
//! written inline (`declaration:`, an ADM `FunctionDeclaration` in the manifest's format) or
//! taken by name from the manifest the file names (`manifest:`, relative to the file). A
//! declaration taken from a manifest follows that file: when it is also the host manifest
//! (`governance.host_manifest`), a change on the host is approved with it, so write reviewed
//! declarations inline.

use super::{APPROVED, PENDING, RISKS, digest};
use crate::adm;
use crate::proto::adm::FunctionDeclaration;
use crate::proto::aesp::EnterpriseToolContract;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeed {
    manifest: Option<String>,
    #[serde(default)]
    contracts: Vec<RawContract>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    tool: String,
    #[serde(default)]
    tenant: String,
    status: Option<String>,
    risk_assessment: String,
    #[serde(default)]
    compliance_tags: Vec<String>,
    #[serde(default)]
    required_roles: Vec<String>,
    approved_by: Option<String>,
    review_comment: Option<String>,
    /// An inline declaration (the manifest's contract format, JSON-shaped YAML).
    declaration: Option<serde_json::Value>,
}

/// One contract of the seed, keyed by (tenant, tool).
pub type SeedContracts = HashMap<(String, String), EnterpriseToolContract>;

/// Reads and checks the seed file. Every error names the file and the field.
pub fn load(path: &Path) -> Result<SeedContracts, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse(&text, path)
}

/// [`load`] of `text` read from `path` (relative manifest paths are resolved from it).
pub fn parse(text: &str, path: &Path) -> Result<SeedContracts, String> {
    let file = path.display();
    let raw: RawSeed = serde_norway::from_str(text)
        .map_err(|e| format!("{file}: {e} (format: docs/governance.md)"))?;
    let manifest: HashMap<String, FunctionDeclaration> = match &raw.manifest {
        None => HashMap::new(),
        Some(m) => {
            let p = resolve(path, m);
            adm::load_manifest(&p)
                .map_err(|e| format!("{file}: manifest: {}: {e}", p.display()))?
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect()
        }
    };
    let at = |i: usize, c: &RawContract, field: &str| {
        format!("{file}: contracts[{i}] ({}): {field}", c.tool)
    };
    let mut out = SeedContracts::new();
    for (i, c) in raw.contracts.iter().enumerate() {
        if !c.tenant.is_empty() && crate::ids::TenantId::new(&c.tenant).is_none() {
            return Err(format!(
                "{}: expected a tenant id (letters, digits, '.', '-', '_') or \"\" for every tenant, got {:?}",
                at(i, c, "tenant"),
                c.tenant
            ));
        }
        let declaration = match &c.declaration {
            Some(v) => {
                let doc = serde_json::json!({ "manifest_version": "1.0.0", "contracts": [v] });
                let mut decls = adm::parse_manifest(&doc.to_string())
                    .map_err(|e| format!("{}: {e}", at(i, c, "declaration")))?;
                let d = decls.pop().ok_or_else(|| at(i, c, "declaration: empty"))?;
                if d.name != c.tool {
                    return Err(format!(
                        "{}: names {:?}, expected the entry's tool {:?}",
                        at(i, c, "declaration.name"),
                        d.name,
                        c.tool
                    ));
                }
                d
            }
            None => match manifest.get(&c.tool) {
                Some(d) => d.clone(),
                None => {
                    return Err(format!(
                        "{}: no inline declaration, and {} declares no tool {:?}",
                        at(i, c, "declaration"),
                        raw.manifest.as_deref().map_or_else(
                            || "no manifest:".to_string(),
                            |m| format!("the manifest {m}")
                        ),
                        c.tool
                    ));
                }
            },
        };
        let status = match c.status.as_deref() {
            None | Some("APPROVED") => APPROVED,
            Some("PENDING") => PENDING,
            Some(other) => {
                return Err(format!(
                    "{}: expected APPROVED or PENDING, got {other:?}",
                    at(i, c, "status")
                ));
            }
        };
        let contract = EnterpriseToolContract {
            declaration_sha256: digest(&declaration).to_vec(),
            declaration: Some(declaration),
            approval_status: status.to_string(),
            approved_by: if status == APPROVED {
                c.approved_by
                    .clone()
                    .unwrap_or_else(|| format!("seed:{}", file_name(path)))
            } else {
                String::new()
            },
            approved_at: 0,
            risk_assessment: c.risk_assessment.clone(),
            compliance_tags: c.compliance_tags.clone(),
            required_roles: c.required_roles.clone(),
            tenant_id: c.tenant.clone(),
            submitted_by: format!("seed:{}", file_name(path)),
            submitted_at: 0,
            review_comment: c.review_comment.clone().unwrap_or_default(),
            revision: 1,
        };
        check_fields(&contract).map_err(|(field, why)| format!("{}: {why}", at(i, c, field)))?;
        if out
            .insert((c.tenant.clone(), c.tool.clone()), contract)
            .is_some()
        {
            return Err(format!(
                "{}: tool {:?} is already listed for {}",
                at(i, c, "tool"),
                c.tool,
                if c.tenant.is_empty() {
                    "every tenant".to_string()
                } else {
                    format!("tenant {}", c.tenant)
                }
            ));
        }
    }
    Ok(out)
}

/// The governance fields every contract must have right, wherever it comes from (the seed
/// file or `SubmitToolContract`): `(field, what is wrong)`.
pub fn check_fields(c: &EnterpriseToolContract) -> Result<(), (&'static str, String)> {
    let Some(d) = &c.declaration else {
        return Err((
            "declaration",
            "required: the tool's ADM FunctionDeclaration".into(),
        ));
    };
    adm::validate_declaration(d).map_err(|e| ("declaration", e.to_string()))?;
    if !c.tenant_id.is_empty() && crate::ids::TenantId::new(&c.tenant_id).is_none() {
        return Err((
            "tenant_id",
            format!(
                "expected a tenant id or \"\" (every tenant), got {:?}",
                c.tenant_id
            ),
        ));
    }
    if !RISKS.contains(&c.risk_assessment.as_str()) {
        return Err((
            "risk_assessment",
            format!(
                "expected one of LOW, MEDIUM, HIGH, got {:?}",
                c.risk_assessment
            ),
        ));
    }
    let mut seen = HashSet::new();
    for r in &c.required_roles {
        if r.trim().is_empty() || !seen.insert(r) {
            return Err((
                "required_roles",
                format!(
                    "expected distinct, non-empty role names, got {:?}",
                    c.required_roles
                ),
            ));
        }
    }
    if c.compliance_tags.iter().any(|t| t.trim().is_empty()) {
        return Err(("compliance_tags", "a tag is empty".into()));
    }
    Ok(())
}

fn resolve(file: &Path, rel: &str) -> PathBuf {
    let p = Path::new(rel);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    file.parent().unwrap_or(Path::new(".")).join(p)
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_here(text: &str) -> Result<SeedContracts, String> {
        parse(text, Path::new("/nonexistent/tool-contracts.yaml"))
    }

    #[test]
    fn inline_declarations_become_approved_revision_one_with_their_digest() {
        let s = parse_here(
            "contracts:\n  - tool: t\n    risk_assessment: HIGH\n    compliance_tags: [HIPAA]\n    required_roles: [clinician]\n    declaration: {name: t, description: d, parameters: {type: OBJECT, properties: {a: {type: STRING}}}}\n  - tool: t\n    tenant: acme\n    status: PENDING\n    risk_assessment: LOW\n    declaration: {name: t, description: d}\n",
        )
        .unwrap();
        let shared = &s[&(String::new(), "t".to_string())];
        assert_eq!(shared.approval_status, "APPROVED");
        assert_eq!(shared.approved_by, "seed:tool-contracts.yaml");
        assert_eq!(shared.revision, 1);
        assert_eq!(
            shared.declaration_sha256,
            digest(shared.declaration.as_ref().unwrap()).to_vec()
        );
        let acme = &s[&("acme".to_string(), "t".to_string())];
        assert_eq!(acme.approval_status, "PENDING");
        assert!(acme.approved_by.is_empty());
    }

    #[test]
    fn every_mistake_names_the_entry_and_the_field() {
        let cases = [
            (
                "contracts:\n  - tool: t\n    risk_assessment: SEVERE\n    declaration: {name: t, description: d}\n",
                "contracts[0] (t): risk_assessment: expected one of LOW, MEDIUM, HIGH",
            ),
            (
                "contracts:\n  - tool: t\n    risk_assessment: LOW\n",
                "contracts[0] (t): declaration: no inline declaration, and no manifest: declares no tool",
            ),
            (
                "contracts:\n  - tool: t\n    risk_assessment: LOW\n    declaration: {name: u, description: d}\n",
                "contracts[0] (t): declaration.name: names \"u\"",
            ),
            (
                "contracts:\n  - tool: t\n    tenant: ../x\n    risk_assessment: LOW\n    declaration: {name: t, description: d}\n",
                "contracts[0] (t): tenant: expected a tenant id",
            ),
            (
                "contracts:\n  - tool: t\n    status: REJECTED\n    risk_assessment: LOW\n    declaration: {name: t, description: d}\n",
                "status: expected APPROVED or PENDING",
            ),
            (
                "contracts:\n  - tool: t\n    risk_assessment: LOW\n    required_roles: [a, a]\n    declaration: {name: t, description: d}\n",
                "required_roles: expected distinct",
            ),
            (
                "contracts:\n  - tool: t\n    risk_assessment: LOW\n    declaration: {name: t, description: d}\n  - tool: t\n    risk_assessment: LOW\n    declaration: {name: t, description: d}\n",
                "contracts[1] (t): tool: tool \"t\" is already listed for every tenant",
            ),
            (
                "contracts:\n  - tool: t\n    risk: LOW\n",
                "unknown field `risk`",
            ),
            (
                "contracts:\n  - tool: t\n    risk_assessment: LOW\n    declaration: {name: t, description: d, parameters: {type: STRING}}\n",
                "contracts[0] (t): declaration:",
            ),
        ];
        for (text, want) in cases {
            let e = parse_here(text).unwrap_err();
            assert!(e.contains(want), "{text}\n got: {e}\n want: {want}");
            assert!(e.starts_with("/nonexistent/tool-contracts.yaml"), "{e}");
        }
    }

    #[test]
    fn the_shipped_seed_approves_the_reference_hosts_declarations_as_they_are() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tool-contracts.yaml");
        let s = load(&p).unwrap();
        // Every reference-host tool is approved for everyone, exactly as the host declares it
        // (the demo runs with governance.host_manifest).
        for d in adm::example_manifest() {
            let c = &s[&(String::new(), d.name.clone())];
            assert_eq!(c.approval_status, "APPROVED", "{}", d.name);
            assert_eq!(c.declaration_sha256, digest(&d).to_vec(), "{}", d.name);
        }
    }
}

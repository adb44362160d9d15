//! Policy test cases (like OPA's policy tests): each case is an input and the decision the
//! policies are expected to give; `aesp policy test FILE` runs them offline. The format is
//! documented in `docs/policies.md`; the shipped example is `policies/policy-tests.yaml`.

use super::engine::{PolicySet, Verdict};
use super::{EXECUTE_TOOL, Input, RequestInfo};
use crate::proto::adm::FunctionDeclaration;
use crate::proto::aesp::{
    EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The `request.time` of a case that gives none: a Monday, noon UTC, so that cases do not
/// depend on when they run.
pub const DEFAULT_TIME: &str = "2025-01-06T12:00:00Z";

/// A test file: the policies it tests (a file or directory, relative to the test file) and
/// its cases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(default)]
    pub policies: Option<PathBuf>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub principal: PrincipalIn,
    pub tool: ToolIn,
    #[serde(default)]
    pub args: Option<serde_json::Value>,
    #[serde(default)]
    pub runtime: Option<RuntimeIn>,
    #[serde(default)]
    pub session: SessionIn,
    #[serde(default)]
    pub request: RequestIn,
    #[serde(default)]
    pub usage: HashMap<String, f64>,
    pub expect: Expect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalIn {
    #[serde(default)]
    pub principal_id: String,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub organization_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub security_clearance: String,
    #[serde(default)]
    pub claims: HashMap<String, String>,
    #[serde(default)]
    pub policy_context: HashMap<String, String>,
}

/// The tool called and, when any field beyond `name` is given, its contract.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolIn {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub risk_assessment: String,
    #[serde(default)]
    pub compliance_tags: Vec<String>,
    #[serde(default)]
    pub required_roles: Vec<String>,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub approval_status: String,
    #[serde(default)]
    pub revision: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeIn {
    #[serde(default)]
    pub runtime_id: String,
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub security_zone: String,
    #[serde(default)]
    pub deployment_environment: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionIn {
    #[serde(default)]
    pub id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIn {
    /// Default: `ExecuteTool`.
    #[serde(default)]
    pub method: Option<String>,
    /// RFC 3339; default [`DEFAULT_TIME`].
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub source_address: String,
    #[serde(default)]
    pub correlation_id: String,
}

/// `allow`, `deny` or `no_opinion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVerdict {
    Allow,
    Deny,
    NoOpinion,
}

impl ExpectedVerdict {
    fn verdict(self) -> Verdict {
        match self {
            ExpectedVerdict::Allow => Verdict::Allow,
            ExpectedVerdict::Deny => Verdict::Deny,
            ExpectedVerdict::NoOpinion => Verdict::NoOpinion,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: ExpectedVerdict,
    /// A policy that must be among the deciding ones.
    #[serde(default)]
    pub policy: Option<String>,
    /// The verdict with the dry-run policies enforced too (the enforced one when none
    /// applies).
    #[serde(default)]
    pub dry_run: Option<ExpectedVerdict>,
}

impl CaseFile {
    /// Reads a test file; the error names the file.
    pub fn load(path: &Path) -> Result<CaseFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The policies the file names, resolved against the file's directory.
    pub fn policies_path(&self, file: &Path) -> Option<PathBuf> {
        self.policies.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                file.parent().unwrap_or(Path::new(".")).join(p)
            }
        })
    }
}

/// What one case gave.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    pub passed: bool,
    /// `ALLOW`, `DENY`, `NOT_APPLICABLE`, or `ERROR` when the case itself is malformed.
    pub got: String,
    /// The outcome's explanation, or why the case could not run.
    pub explanation: String,
    /// What did not match, when it failed.
    pub mismatch: String,
}

fn parse_time(s: Option<&str>) -> Result<SystemTime, String> {
    let s = s.unwrap_or(DEFAULT_TIME);
    chrono::DateTime::parse_from_rfc3339(s)
        .map(SystemTime::from)
        .map_err(|e| format!("request.time {s:?}: not an RFC 3339 time: {e}"))
}

fn run_case(set: &PolicySet, c: &Case) -> Result<CaseReport, String> {
    let principal = EnterpriseSecurityContext {
        principal_id: c.principal.principal_id.clone(),
        tenant_id: c.principal.tenant_id.clone(),
        claims: c.principal.claims.clone(),
        organization_id: c.principal.organization_id.clone(),
        roles: c.principal.roles.clone(),
        security_clearance: c.principal.security_clearance.clone(),
        policy_context: c.principal.policy_context.clone(),
    };
    let t = &c.tool;
    let has_contract = !(t.description.is_empty()
        && t.risk_assessment.is_empty()
        && t.compliance_tags.is_empty()
        && t.required_roles.is_empty()
        && t.tenant_id.is_empty()
        && t.approval_status.is_empty()
        && t.revision == 0);
    let contract = has_contract.then(|| EnterpriseToolContract {
        declaration: Some(FunctionDeclaration {
            name: t.name.clone(),
            description: t.description.clone(),
            ..Default::default()
        }),
        approval_status: t.approval_status.clone(),
        risk_assessment: t.risk_assessment.clone(),
        compliance_tags: t.compliance_tags.clone(),
        required_roles: t.required_roles.clone(),
        tenant_id: t.tenant_id.clone(),
        revision: t.revision,
        ..Default::default()
    });
    let args = match &c.args {
        None => None,
        Some(v) => Some(crate::adm::json_to_struct(v).map_err(|e| format!("args: {e}"))?),
    };
    let runtime = c.runtime.as_ref().map(|r| EnterpriseRuntimeAnnouncement {
        runtime_id: r.runtime_id.clone(),
        language: r.language.clone(),
        version: r.version.clone(),
        capabilities: r.capabilities.clone(),
        tenant_id: r.tenant_id.clone(),
        security_zone: r.security_zone.clone(),
        deployment_environment: r.deployment_environment.clone(),
    });
    let time = parse_time(c.request.time.as_deref())?;
    let input = Input {
        principal: &principal,
        tool_name: &t.name,
        tool: contract.as_ref(),
        args: args.as_ref(),
        runtime: runtime.as_ref(),
        session_id: &c.session.id,
        request: RequestInfo {
            method: c.request.method.as_deref().unwrap_or(EXECUTE_TOOL),
            time,
            source_address: &c.request.source_address,
            correlation_id: &c.request.correlation_id,
        },
        usage: Some(&c.usage),
    };
    let out = set.evaluate(&input);
    let mut mismatch = Vec::new();
    if out.verdict != c.expect.decision.verdict() {
        mismatch.push(format!(
            "expected {}, got {}",
            c.expect.decision.verdict().as_str(),
            out.verdict.as_str()
        ));
    }
    if let Some(id) = &c.expect.policy
        && !out.deciding.iter().any(|p| p.id() == id)
    {
        mismatch.push(format!(
            "expected policy {id} among the deciding ones, got [{}]",
            out.deciding_ids().join(", ")
        ));
    }
    if let Some(expected) = c.expect.dry_run {
        let got = out.dry_run.as_ref().map_or(out.verdict, |d| d.verdict);
        if got != expected.verdict() {
            mismatch.push(format!(
                "expected a dry-run verdict of {}, got {}",
                expected.verdict().as_str(),
                got.as_str()
            ));
        }
    }
    Ok(CaseReport {
        name: c.name.clone(),
        passed: mismatch.is_empty(),
        got: out.verdict.as_str().to_string(),
        explanation: out.explanation(),
        mismatch: mismatch.join("; "),
    })
}

/// Runs every case against `set`. A case that cannot run (bad `args`, bad time) fails.
pub fn run_cases(set: &PolicySet, cases: &[Case]) -> Vec<CaseReport> {
    cases
        .iter()
        .map(|c| {
            run_case(set, c).unwrap_or_else(|e| CaseReport {
                name: c.name.clone(),
                passed: false,
                got: "ERROR".to_string(),
                explanation: String::new(),
                mismatch: e,
            })
        })
        .collect()
}

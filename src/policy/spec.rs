//! A policy as written: the YAML file format and the proto `Policy`, both read into a
//! [`PolicySpec`] that [`super::Policy::compile`] validates. The format is documented in
//! `docs/policies.md`.

use crate::proto::aesp;
use serde::{Deserialize, Serialize};

/// ALLOW or DENY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Effect {
    #[serde(rename = "ALLOW", alias = "allow")]
    Allow,
    #[serde(rename = "DENY", alias = "deny")]
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "ALLOW",
            Effect::Deny => "DENY",
        }
    }
}

/// `enforce` (the default) or `dry_run`: evaluated and reported, never enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Mode {
    #[default]
    #[serde(rename = "enforce", alias = "ENFORCE")]
    Enforce,
    #[serde(rename = "dry_run", alias = "DRY_RUN")]
    DryRun,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry_run",
        }
    }
}

fn yes() -> bool {
    true
}

fn one() -> u64 {
    1
}

/// One policy, as a file or the API states it, before it is validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique in the set: 1 to 128 letters, digits, `.`, `-`, `_`, the first a letter or a
    /// digit.
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// The tenant whose calls it applies to; empty applies to every tenant.
    #[serde(default)]
    pub tenant: String,
    pub effect: Effect,
    /// Tool names it applies to; `*` matches any run of characters. Empty: every tool.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Full gRPC methods it applies to (`/altar.grid.v1.GridHost/ExecuteTool`); `*` as in
    /// `tools`. Empty: every method that invokes a tool.
    #[serde(default)]
    pub methods: Vec<String>,
    /// A CEL expression that yields a bool: whether the effect applies to the call.
    pub condition: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "one")]
    pub version: u64,
    /// Copied into the `EnterpriseError` of a denial it decides.
    #[serde(default)]
    pub compliance_impact: String,
    /// Copied into the `EnterpriseError` of a denial it decides.
    #[serde(default)]
    pub remediation_steps: String,
}

/// A policy file: `policies:`, a list of [`PolicySpec`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub policies: Vec<PolicySpec>,
}

impl PolicySpec {
    /// The spec of a proto `Policy` (from `CreatePolicy`, `UpdatePolicy`, `TestPolicy`). An
    /// effect or mode the proto spells in an unknown way is reported by the caller's
    /// [`super::Policy::compile`] through the returned error text.
    pub fn from_proto(p: &aesp::Policy) -> Result<PolicySpec, String> {
        let effect = match p.effect.to_ascii_uppercase().as_str() {
            "ALLOW" => Effect::Allow,
            "DENY" => Effect::Deny,
            other => return Err(format!("effect: expected ALLOW or DENY, got {other:?}")),
        };
        let mode = match p.mode.to_ascii_uppercase().as_str() {
            "" | "ENFORCE" => Mode::Enforce,
            "DRY_RUN" => Mode::DryRun,
            other => return Err(format!("mode: expected ENFORCE or DRY_RUN, got {other:?}")),
        };
        Ok(PolicySpec {
            id: p.policy_id.clone(),
            description: p.description.clone(),
            tenant: p.tenant_id.clone(),
            effect,
            tools: p.tools.clone(),
            methods: p.methods.clone(),
            condition: p.condition.clone(),
            mode,
            enabled: p.enabled,
            version: p.version,
            compliance_impact: p.compliance_impact.clone(),
            remediation_steps: p.remediation_steps.clone(),
        })
    }

    /// The proto `Policy` of this spec (`updated_by` and `updated_at` are the store's).
    pub fn to_proto(&self) -> aesp::Policy {
        aesp::Policy {
            policy_id: self.id.clone(),
            tenant_id: self.tenant.clone(),
            description: self.description.clone(),
            effect: self.effect.as_str().to_string(),
            condition: self.condition.clone(),
            tools: self.tools.clone(),
            version: self.version,
            enabled: self.enabled,
            compliance_impact: self.compliance_impact.clone(),
            remediation_steps: self.remediation_steps.clone(),
            mode: match self.mode {
                Mode::Enforce => "ENFORCE".to_string(),
                Mode::DryRun => "DRY_RUN".to_string(),
            },
            methods: self.methods.clone(),
            ..Default::default()
        }
    }
}

/// A glob of `tools` or `methods`: `*` matches any run of characters (the empty one too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    parts: Vec<String>,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            parts: pattern.split('*').map(str::to_string).collect(),
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self.parts.as_slice() {
            [] => s.is_empty(),
            [exact] => s == exact,
            [first, middle @ .., last] => {
                if s.len() < first.len() + last.len()
                    || !s.starts_with(first.as_str())
                    || !s.ends_with(last.as_str())
                {
                    return false;
                }
                let mut rest = &s[first.len()..s.len() - last.len()];
                for m in middle {
                    match rest.find(m.as_str()) {
                        Some(i) => rest = &rest[i + m.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("billing_*");
        assert!(g.matches("billing_refund"));
        assert!(g.matches("billing_"));
        assert!(!g.matches("billin"));
        assert!(!g.matches("xbilling_refund"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*").matches("echo"));
        assert!(Glob::new("echo").matches("echo"));
        assert!(!Glob::new("echo").matches("echo2"));
        assert!(Glob::new("a*b*c").matches("abc"));
        assert!(Glob::new("a*b*c").matches("a-b-b-c"));
        assert!(!Glob::new("a*b*c").matches("acb"));
        // The prefix and suffix may not overlap.
        assert!(!Glob::new("ab*ba").matches("aba"));
    }

    #[test]
    fn a_proto_policy_round_trips() {
        let spec = PolicySpec {
            id: "p1".into(),
            description: "d".into(),
            tenant: "acme".into(),
            effect: Effect::Deny,
            tools: vec!["billing_*".into()],
            methods: vec![],
            condition: "true".into(),
            mode: Mode::DryRun,
            enabled: true,
            version: 3,
            compliance_impact: "SOX".into(),
            remediation_steps: "ask".into(),
        };
        assert_eq!(PolicySpec::from_proto(&spec.to_proto()), Ok(spec));
        let bad = aesp::Policy {
            effect: "MAYBE".into(),
            ..Default::default()
        };
        assert!(
            PolicySpec::from_proto(&bad)
                .unwrap_err()
                .contains("ALLOW or DENY")
        );
    }
}

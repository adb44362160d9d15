//! Compiled policies, the immutable set the hot path reads, and how their results combine.

use super::Input;
use super::condition::{Condition, ConditionError};
use super::input::Vars;
use super::spec::{Effect, Glob, Mode, PolicySpec};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::valid_segment;
use cel::Context;
use cel::common::types::CelBool;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Longest `description`, `compliance_impact` or `remediation_steps` accepted, in bytes.
const MAX_TEXT_LEN: usize = 4096;
/// Most `tools` or `methods` globs in one policy.
const MAX_TARGETS: usize = 256;

// ------------------------------------------------------------------------------ errors

/// Why a policy, a file or a set was refused. `Display` reads `WHERE: policy "ID": WHAT`,
/// where `WHERE` is the file and the policy's index in it (`policies/cel/x.yaml:
/// policies[2]`), or the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("{origin}: cannot read: {message}")]
    Read { origin: String, message: String },
    /// Not YAML, or not the documented shape (an unknown field, a missing one, a wrong type).
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// A field other than the condition is malformed.
    #[error("{origin}: policy {id:?}: {field}: {problem}")]
    Invalid {
        origin: String,
        id: String,
        field: String,
        problem: String,
    },
    /// The condition does not compile; `error` has its line, column and reason.
    #[error("{origin}: policy {id:?}: condition {error}\n{}", .error.snippet)]
    Condition {
        origin: String,
        id: String,
        error: ConditionError,
    },
    /// Two policies with the same id.
    #[error("{origin}: policy {id:?}: duplicate id (first defined at {first})")]
    Duplicate {
        origin: String,
        id: String,
        first: String,
    },
}

/// Every error found in a set of files or policies, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

// ------------------------------------------------------------------------------ policy

/// A validated policy: its spec, where it came from, its compiled condition and targets.
#[derive(Debug)]
pub struct Policy {
    spec: PolicySpec,
    origin: String,
    condition: Condition,
    tools: Vec<Glob>,
    methods: Vec<Glob>,
}

fn check_globs(
    values: &[String],
    field: &str,
    valid: impl Fn(&str) -> bool,
    what: &str,
) -> Result<Vec<Glob>, (String, String)> {
    if values.len() > MAX_TARGETS {
        return Err((field.into(), format!("more than {MAX_TARGETS} entries")));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if valid(v) {
                Ok(Glob::new(v))
            } else {
                Err((format!("{field}[{i}]"), format!("{v:?} is not {what}")))
            }
        })
        .collect()
}

fn tool_glob(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*'))
}

fn method_glob(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/' | b'*'))
}

impl Policy {
    /// The one validation of a policy, for files and the API alike: every field, and the
    /// condition compiled once. `origin` says where it came from, for the errors (a file
    /// and index, `"api"`...).
    pub fn compile(spec: PolicySpec, origin: impl Into<String>) -> Result<Policy, PolicyError> {
        let origin = origin.into();
        let invalid = |field: &str, problem: String| PolicyError::Invalid {
            origin: origin.clone(),
            id: spec.id.clone(),
            field: field.into(),
            problem,
        };
        if !valid_segment(&spec.id) {
            return Err(invalid(
                "id",
                "expected 1 to 128 letters, digits, '.', '-', '_', the first a letter or a digit"
                    .into(),
            ));
        }
        if !spec.tenant.is_empty() && !valid_segment(&spec.tenant) {
            return Err(invalid(
                "tenant",
                format!(
                    "{:?} is not a tenant id (empty applies to every tenant)",
                    spec.tenant
                ),
            ));
        }
        for (field, text) in [
            ("description", &spec.description),
            ("compliance_impact", &spec.compliance_impact),
            ("remediation_steps", &spec.remediation_steps),
        ] {
            if text.len() > MAX_TEXT_LEN {
                return Err(invalid(field, format!("longer than {MAX_TEXT_LEN} bytes")));
            }
        }
        let tools = check_globs(
            &spec.tools,
            "tools",
            tool_glob,
            "a tool name glob (letters, digits, '_', '-', '*')",
        )
        .map_err(|(f, p)| invalid(&f, p))?;
        let methods = check_globs(
            &spec.methods,
            "methods",
            method_glob,
            "a gRPC method glob (/package.Service/Method, '*' allowed)",
        )
        .map_err(|(f, p)| invalid(&f, p))?;
        let condition =
            Condition::compile(&spec.condition).map_err(|error| PolicyError::Condition {
                origin: origin.clone(),
                id: spec.id.clone(),
                error,
            })?;
        Ok(Policy {
            spec,
            origin,
            condition,
            tools,
            methods,
        })
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether it applies to a call: enabled, of the call's tenant (or every tenant), and
    /// targeting its tool and method.
    fn applies(&self, tenant: &str, tool: &str, method: &str) -> bool {
        self.spec.enabled
            && (self.spec.tenant.is_empty() || self.spec.tenant == tenant)
            && (self.tools.is_empty() || self.tools.iter().any(|g| g.matches(tool)))
            && (self.methods.is_empty() || self.methods.iter().any(|g| g.matches(method)))
    }

    /// Its condition on one call: the bool, or why there is none.
    fn eval(&self, ctx: &Context<'_, '_>) -> Result<bool, String> {
        match cel::Value::resolve_val(&self.condition.expr, ctx) {
            Ok(v) => match v.downcast_ref::<CelBool>() {
                Some(b) => Ok(*b.inner()),
                None => Err(format!(
                    "the condition yielded {}, not a bool",
                    v.get_type().name()
                )),
            },
            Err(e) => Err(e.to_string()),
        }
    }
}

// ------------------------------------------------------------------------------ the set

/// An immutable set of policies: what the hot path reads, one snapshot per call (hold it in
/// an `ArcSwap<PolicySet>`; build a new one to change it). Policies are kept in id order.
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    /// The root CEL scope: the environment, and the compiled patterns of every policy.
    root: Context<'static, 'static>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field(
                "policies",
                &self.policies.iter().map(|p| p.id()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::empty()
    }
}

impl PolicySet {
    /// No policy: every call is "no opinion".
    pub fn empty() -> PolicySet {
        PolicySet {
            policies: Vec::new(),
            root: Context::with_env(super::condition::env().clone()),
        }
    }

    /// A set of compiled policies; refused if two share an id (each duplicate reported).
    pub fn new(policies: Vec<Policy>) -> Result<PolicySet, PolicyErrors> {
        PolicySet::from_shared(policies.into_iter().map(Arc::new).collect())
    }

    fn from_shared(mut policies: Vec<Arc<Policy>>) -> Result<PolicySet, PolicyErrors> {
        let mut first: HashMap<&str, &str> = HashMap::new();
        let mut errors = Vec::new();
        for p in &policies {
            if let Some(f) = first.get(p.id()) {
                errors.push(PolicyError::Duplicate {
                    origin: p.origin.clone(),
                    id: p.id().to_string(),
                    first: (*f).to_string(),
                });
            } else {
                first.insert(p.id(), p.origin());
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        policies.sort_by(|a, b| a.id().cmp(b.id()));
        let mut root = Context::with_env(super::condition::env().clone());
        for p in &policies {
            for (name, pattern) in &p.condition.patterns {
                root.add_variable_as_val(name.clone(), Box::new(pattern.clone()));
            }
        }
        Ok(PolicySet { policies, root })
    }

    /// The policies of `a` and of `b` in one set (the files' and the API's); refused, each
    /// clash named with both origins, when an id is in both.
    pub fn merged(a: &PolicySet, b: &PolicySet) -> Result<PolicySet, PolicyErrors> {
        PolicySet::from_shared(a.policies.iter().chain(&b.policies).cloned().collect())
    }

    /// Every policy, disabled ones included, in id order.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Policy>> {
        self.policies
            .binary_search_by(|p| p.id().cmp(id))
            .ok()
            .map(|i| &self.policies[i])
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// This set with `policy` added, or in place of the policy with its id.
    pub fn with(&self, policy: Policy) -> PolicySet {
        let mut all: Vec<Arc<Policy>> = self
            .policies
            .iter()
            .filter(|p| p.id() != policy.id())
            .cloned()
            .collect();
        all.push(Arc::new(policy));
        self.rebuilt(all)
    }

    /// This set without the policy `id` (unchanged if there is none).
    pub fn without(&self, id: &str) -> PolicySet {
        self.rebuilt(
            self.policies
                .iter()
                .filter(|p| p.id() != id)
                .cloned()
                .collect(),
        )
    }

    /// A set of the policy `id` alone (`TestPolicy` of an installed policy).
    pub fn only(&self, id: &str) -> Option<PolicySet> {
        self.get(id).map(|p| self.rebuilt(vec![p.clone()]))
    }

    /// A set of `policy` alone (`TestPolicy` of a draft).
    pub fn single(policy: Policy) -> PolicySet {
        PolicySet::empty().with(policy)
    }

    fn rebuilt(&self, policies: Vec<Arc<Policy>>) -> PolicySet {
        // The ids are unique by construction (filtered above), so this cannot fail; an
        // error would leave an empty set, which denies nothing more than it did.
        PolicySet::from_shared(policies).unwrap_or_else(|e| {
            tracing::error!(error = %e, "policy set rebuilt with duplicate ids");
            PolicySet::empty()
        })
    }

    /// Evaluates every policy that applies to the call and combines their results (see
    /// the module documentation). Dry-run policies are evaluated only when one applies.
    pub fn evaluate<'s>(&'s self, input: &Input<'_>) -> Outcome<'s> {
        let vars = Vars::new(input);
        let root: &Context<'_, '_> = &self.root;
        let mut ctx = root.new_inner_scope();
        ctx.set_variable_resolver(&vars);

        let tenant = input.principal.tenant_id.as_str();
        let mut enforced = Tally::default();
        let mut dry: Vec<(&'s Policy, Result<bool, String>)> = Vec::new();
        for p in &self.policies {
            if !p.applies(tenant, input.tool_name, input.request.method) {
                continue;
            }
            let result = p.eval(&ctx);
            match p.spec.mode {
                Mode::Enforce => enforced.add(p, result),
                Mode::DryRun => dry.push((p, result)),
            }
        }
        let dry_run = if dry.is_empty() {
            None
        } else {
            let mut all = enforced.clone();
            for (p, r) in dry {
                all.add(p, r);
            }
            Some(Box::new(all.outcome()))
        };
        let mut out = enforced.outcome();
        out.dry_run = dry_run;
        out
    }
}

// ------------------------------------------------------------------------------ combining

/// The results of the policies that applied to a call.
#[derive(Clone, Default)]
struct Tally<'s> {
    deny_matched: Vec<&'s Policy>,
    allow_targeting: Vec<&'s Policy>,
    allow_matched: Vec<&'s Policy>,
    errors: Vec<(&'s Policy, String)>,
}

impl<'s> Tally<'s> {
    fn add(&mut self, p: &'s Policy, result: Result<bool, String>) {
        if p.spec.effect == Effect::Allow {
            self.allow_targeting.push(p);
        }
        match result {
            Ok(true) => match p.spec.effect {
                Effect::Deny => self.deny_matched.push(p),
                Effect::Allow => self.allow_matched.push(p),
            },
            Ok(false) => {}
            Err(e) => self.errors.push((p, e)),
        }
    }

    /// The rules, in order: a matching DENY or a failed condition denies; where ALLOW
    /// policies target the call, one must match; otherwise no opinion.
    fn outcome(self) -> Outcome<'s> {
        let mut matched = self.deny_matched.clone();
        matched.extend(self.allow_matched.iter().copied());
        matched.sort_by(|a, b| a.id().cmp(b.id()));
        let (verdict, reason, deciding) = if !self.deny_matched.is_empty() {
            let mut d = self.deny_matched;
            d.extend(self.errors.iter().map(|(p, _)| *p));
            (Verdict::Deny, Reason::DenyMatched, d)
        } else if !self.errors.is_empty() {
            let d = self.errors.iter().map(|(p, _)| *p).collect();
            (Verdict::Deny, Reason::ConditionFailed, d)
        } else if !self.allow_matched.is_empty() {
            (Verdict::Allow, Reason::AllowMatched, self.allow_matched)
        } else if !self.allow_targeting.is_empty() {
            (Verdict::Deny, Reason::NoAllowMatched, self.allow_targeting)
        } else {
            (Verdict::NoOpinion, Reason::NotTargeted, Vec::new())
        };
        Outcome {
            verdict,
            reason,
            deciding,
            matched,
            errors: self.errors,
            dry_run: None,
        }
    }
}

/// What the policies say about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// No enforced policy targets the call: RBAC (and the other checks) alone decide.
    NoOpinion,
}

impl Verdict {
    /// `ALLOW`, `DENY`, `NOT_APPLICABLE` (the words of `TestPolicyResponse.decision`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::NoOpinion => "NOT_APPLICABLE",
        }
    }
}

/// Which rule gave the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy's condition held.
    DenyMatched,
    /// A condition failed at run time (an error, or not a bool): fail closed.
    ConditionFailed,
    /// ALLOW policies target the call and one of them held.
    AllowMatched,
    /// ALLOW policies target the call and none of them held.
    NoAllowMatched,
    /// No policy targets the call.
    NotTargeted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DenyMatched => "deny_matched",
            Reason::ConditionFailed => "condition_failed",
            Reason::AllowMatched => "allow_matched",
            Reason::NoAllowMatched => "no_allow_matched",
            Reason::NotTargeted => "not_targeted",
        }
    }
}

/// The policies' answer for one call. Borrows the [`PolicySet`] it came from.
#[derive(Debug, Clone)]
pub struct Outcome<'s> {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The policies that gave the verdict: the matching DENY policies and those whose
    /// condition failed (a denial), the matching ALLOW policies (an allow), or the ALLOW
    /// policies that targeted the call and did not hold (a denial). In id order per group.
    pub deciding: Vec<&'s Policy>,
    /// Enforced policies whose condition held, ALLOW and DENY, in id order: the audit
    /// record's `matched_policies`.
    pub matched: Vec<&'s Policy>,
    /// Enforced policies whose condition failed, and why. Each denies (fail closed).
    pub errors: Vec<(&'s Policy, String)>,
    /// When dry-run policies applied to the call: the outcome had they been enforced too.
    /// Never enforced; for the audit record and the would-be-denial counter.
    pub dry_run: Option<Box<Outcome<'s>>>,
}

impl Outcome<'_> {
    /// Ids of [`Outcome::matched`].
    pub fn matched_ids(&self) -> Vec<String> {
        self.matched.iter().map(|p| p.id().to_string()).collect()
    }

    /// Ids of [`Outcome::deciding`].
    pub fn deciding_ids(&self) -> Vec<String> {
        self.deciding.iter().map(|p| p.id().to_string()).collect()
    }

    /// Whether the dry-run policies would have denied a call that is not denied now.
    pub fn dry_run_would_deny(&self) -> bool {
        self.verdict != Verdict::Deny
            && self
                .dry_run
                .as_ref()
                .is_some_and(|d| d.verdict == Verdict::Deny)
    }

    /// Dry-run policies that would have denied: those among the dry-run outcome's deciding
    /// policies (when it denies).
    pub fn dry_run_deniers(&self) -> Vec<&Policy> {
        match &self.dry_run {
            Some(d) if d.verdict == Verdict::Deny => d
                .deciding
                .iter()
                .copied()
                .filter(|p| p.spec.mode == Mode::DryRun)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// One sentence for people: the verdict and why (`TestPolicyResponse.explanation`).
    pub fn explanation(&self) -> String {
        let ids = |ps: &[&Policy]| ps.iter().map(|p| p.id()).collect::<Vec<_>>().join(", ");
        let mut s = match self.reason {
            Reason::DenyMatched => format!("denied by policy {}", ids(&self.deciding)),
            Reason::ConditionFailed => format!(
                "denied: the condition of {} failed ({}); a failed condition denies",
                ids(&self.deciding),
                self.errors
                    .iter()
                    .map(|(p, e)| format!("{}: {e}", p.id()))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Reason::AllowMatched => format!("allowed by policy {}", ids(&self.deciding)),
            Reason::NoAllowMatched => format!(
                "denied: ALLOW policies target this call and none holds ({})",
                ids(&self.deciding)
            ),
            Reason::NotTargeted => "no policy targets this call; RBAC decides".to_string(),
        };
        if let Some(d) = &self.dry_run
            && d.verdict != self.verdict
        {
            s.push_str(&format!(
                "; dry run: would be {} ({})",
                d.verdict.as_str(),
                d.explanation()
            ));
        }
        s
    }

    /// The refusal to answer with, when the verdict is a denial: `POLICY_DENIED`, the
    /// deciding policy in `details` (`policy_id`, and `policies` when several decided,
    /// `reason`, and `error` for a failed condition), and the first deciding policy's
    /// `compliance_impact` and `remediation_steps` where it has them.
    pub fn denial(&self) -> Option<Denial> {
        if self.verdict != Verdict::Deny {
            return None;
        }
        let first = self.deciding.first()?;
        let mut d = Denial::new(ErrorCode::PolicyDenied, self.explanation())
            .detail("policy_id", first.id())
            .detail("reason", self.reason.as_str());
        if self.deciding.len() > 1 {
            d = d.detail("policies", self.deciding_ids().join(","));
        }
        if let Some((_, e)) = self.errors.first() {
            d = d.detail("error", e.clone());
        }
        if !first.spec.compliance_impact.is_empty() {
            d.compliance_impact = first.spec.compliance_impact.clone();
        }
        if !first.spec.remediation_steps.is_empty() {
            d.remediation_steps = first.spec.remediation_steps.clone();
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{RequestInfo, parse};
    use crate::proto::aesp::{
        EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
    };
    use std::time::SystemTime;

    fn set(yaml: &str) -> PolicySet {
        let ps = parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        PolicySet::new(ps).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A call by alice@acme (roles client-user) to `tool` with `args`.
    struct Call {
        principal: EnterpriseSecurityContext,
        tool: String,
        contract: Option<EnterpriseToolContract>,
        args: prost_types::Struct,
        runtime: Option<EnterpriseRuntimeAnnouncement>,
        method: String,
    }

    fn call(tool: &str, args: serde_json::Value) -> Call {
        Call {
            principal: EnterpriseSecurityContext {
                principal_id: "alice".into(),
                tenant_id: "acme".into(),
                roles: vec!["client-user".into()],
                ..Default::default()
            },
            tool: tool.into(),
            contract: None,
            args: crate::adm::json_to_struct(&args).unwrap_or_default(),
            runtime: None,
            method: crate::policy::EXECUTE_TOOL.into(),
        }
    }

    impl Call {
        fn tenant(mut self, t: &str) -> Self {
            self.principal.tenant_id = t.into();
            self
        }
        fn eval<'s>(&self, set: &'s PolicySet) -> Outcome<'s> {
            set.evaluate(&Input {
                principal: &self.principal,
                tool_name: &self.tool,
                tool: self.contract.as_ref(),
                args: Some(&self.args),
                runtime: self.runtime.as_ref(),
                session_id: "s1",
                request: RequestInfo {
                    method: &self.method,
                    time: SystemTime::now(),
                    source_address: "127.0.0.1:5000",
                    correlation_id: "c1",
                },
                usage: None,
            })
        }
    }

    const MIXED: &str = r#"
policies:
  - id: deny-big-refund
    effect: DENY
    tools: [billing_refund]
    condition: args.amount > 500
    compliance_impact: SOX
    remediation_steps: Ask a billing supervisor.
  - id: allow-refund-operators
    effect: ALLOW
    tools: ["billing_*"]
    condition: "'billing-operator' in principal.roles"
  - id: allow-refund-acme
    effect: ALLOW
    tools: ["billing_*"]
    condition: principal.tenant_id == 'acme' && args.amount < 10
"#;

    #[test]
    fn a_matching_deny_denies_even_when_an_allow_matches() {
        let s = set(MIXED);
        let mut c = call("billing_refund", serde_json::json!({"amount": 900}));
        c.principal.roles.push("billing-operator".into());
        let out = c.eval(&s);
        assert_eq!(out.verdict, Verdict::Deny);
        assert_eq!(out.reason, Reason::DenyMatched);
        assert_eq!(out.deciding_ids(), ["deny-big-refund"]);
        let d = out.denial().unwrap_or_else(|| panic!("no denial"));
        assert_eq!(d.code, ErrorCode::PolicyDenied);
        assert_eq!(
            d.details.get("policy_id").map(String::as_str),
            Some("deny-big-refund")
        );
        assert_eq!(d.compliance_impact, "SOX");
        assert_eq!(d.remediation_steps, "Ask a billing supervisor.");
    }

    #[test]
    fn where_allows_target_a_tool_one_must_hold() {
        let s = set(MIXED);
        // Neither ALLOW holds: denied, naming both.
        let out = call("billing_refund", serde_json::json!({"amount": 50})).eval(&s);
        assert_eq!(out.verdict, Verdict::Deny);
        assert_eq!(out.reason, Reason::NoAllowMatched);
        assert_eq!(
            out.deciding_ids(),
            ["allow-refund-acme", "allow-refund-operators"]
        );
        assert!(out.matched.is_empty());
        // One holds: allowed by it.
        let out = call("billing_refund", serde_json::json!({"amount": 5})).eval(&s);
        assert_eq!(out.verdict, Verdict::Allow);
        assert_eq!(out.deciding_ids(), ["allow-refund-acme"]);
        assert_eq!(out.matched_ids(), ["allow-refund-acme"]);
        assert!(out.denial().is_none());
    }

    #[test]
    fn no_policy_targeting_the_tool_is_no_opinion() {
        let s = set(MIXED);
        let out = call("echo", serde_json::json!({"text": "hi"})).eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
        assert_eq!(out.reason, Reason::NotTargeted);
        assert!(out.deciding.is_empty() && out.matched.is_empty());
        assert!(out.denial().is_none());
        assert_eq!(PolicySet::empty().evaluate_for_test(), Verdict::NoOpinion);
    }

    impl PolicySet {
        fn evaluate_for_test(&self) -> Verdict {
            call("echo", serde_json::json!({})).eval(self).verdict
        }
    }

    #[test]
    fn a_runtime_error_denies_and_names_the_policy() {
        let s = set(r#"
policies:
  - id: needs-amount
    effect: DENY
    tools: [billing_refund]
    condition: args.amount > 500
  - id: yields-a-string-at-run-time
    effect: ALLOW
    tools: [echo]
    condition: args.text
"#);
        // `args.amount` missing: no such key.
        let out = call("billing_refund", serde_json::json!({})).eval(&s);
        assert_eq!(out.verdict, Verdict::Deny);
        assert_eq!(out.reason, Reason::ConditionFailed);
        assert_eq!(out.deciding_ids(), ["needs-amount"]);
        assert!(out.errors[0].1.contains("amount"), "{:?}", out.errors);
        let d = out.denial().unwrap_or_else(|| panic!("no denial"));
        assert!(d.details.get("error").is_some_and(|e| e.contains("amount")));
        assert!(d.message.contains("needs-amount"), "{}", d.message);
        // A condition that yields a string at run time denies too, even an ALLOW.
        let out = call("echo", serde_json::json!({"text": "hi"})).eval(&s);
        assert_eq!(out.verdict, Verdict::Deny);
        assert_eq!(out.reason, Reason::ConditionFailed);
        assert!(out.errors[0].1.contains("not a bool"), "{:?}", out.errors);
    }

    #[test]
    fn dry_run_policies_are_reported_never_enforced() {
        let s = set(r#"
policies:
  - id: would-deny-long-text
    effect: DENY
    mode: dry_run
    tools: [echo]
    condition: size(args.text) > 3
  - id: would-fail
    effect: DENY
    mode: dry_run
    tools: [add]
    condition: args.missing == 1
"#);
        let out = call("echo", serde_json::json!({"text": "hello"})).eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
        let dry = out.dry_run.as_ref().unwrap_or_else(|| panic!("no dry run"));
        assert_eq!(dry.verdict, Verdict::Deny);
        assert_eq!(dry.deciding_ids(), ["would-deny-long-text"]);
        assert!(out.dry_run_would_deny());
        assert_eq!(out.dry_run_deniers().len(), 1);
        assert!(out.explanation().contains("dry run: would be DENY"));
        // Short text: the dry run agrees.
        let out = call("echo", serde_json::json!({"text": "hi"})).eval(&s);
        assert!(!out.dry_run_would_deny());
        assert_eq!(
            out.dry_run.as_ref().map(|d| d.verdict),
            Some(Verdict::NoOpinion)
        );
        // A dry-run error is not enforced either.
        let out = call("add", serde_json::json!({"a": 1})).eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
        assert!(out.dry_run_would_deny());
        // No dry-run policy applies: no dry run at all.
        let out = call("count", serde_json::json!({"n": 1})).eval(&s);
        assert!(out.dry_run.is_none());
    }

    #[test]
    fn a_dry_run_allow_does_not_make_an_enforced_allow_required() {
        let s = set(r#"
policies:
  - id: trial-allow
    effect: ALLOW
    mode: dry_run
    tools: [echo]
    condition: "false"
"#);
        let out = call("echo", serde_json::json!({"text": "x"})).eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
        assert_eq!(
            out.dry_run.as_ref().map(|d| d.reason),
            Some(Reason::NoAllowMatched)
        );
    }

    #[test]
    fn tenant_scoped_policies_apply_to_their_tenant_only() {
        let s = set(r#"
policies:
  - id: acme-no-echo
    tenant: acme
    effect: DENY
    condition: "true"
  - id: globex-allow-nothing
    tenant: globex
    effect: ALLOW
    condition: "false"
"#);
        let out = call("echo", serde_json::json!({})).eval(&s);
        assert_eq!(out.deciding_ids(), ["acme-no-echo"]);
        let out = call("echo", serde_json::json!({}))
            .tenant("globex")
            .eval(&s);
        assert_eq!(out.reason, Reason::NoAllowMatched);
        assert_eq!(out.deciding_ids(), ["globex-allow-nothing"]);
        let out = call("echo", serde_json::json!({}))
            .tenant("initech")
            .eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
    }

    #[test]
    fn tools_and_methods_globs_select_the_calls() {
        let s = set(r#"
policies:
  - id: streams-only
    effect: DENY
    tools: ["cou*", "*_weather"]
    methods: ["/altar.grid.v1.GridHost/*Stream"]
    condition: "true"
"#);
        let mut c = call("count", serde_json::json!({}));
        assert_eq!(c.eval(&s).verdict, Verdict::NoOpinion);
        c.method = "/altar.grid.v1.GridHost/ExecuteToolStream".into();
        assert_eq!(c.eval(&s).verdict, Verdict::Deny);
        c.tool = "get_weather".into();
        assert_eq!(c.eval(&s).verdict, Verdict::Deny);
        c.tool = "echo".into();
        assert_eq!(c.eval(&s).verdict, Verdict::NoOpinion);
    }

    #[test]
    fn disabled_policies_do_not_apply() {
        let s = set(r#"
policies:
  - id: off
    effect: DENY
    enabled: false
    condition: "true"
"#);
        assert_eq!(s.len(), 1);
        assert_eq!(s.evaluate_for_test(), Verdict::NoOpinion);
    }

    #[test]
    fn duplicate_ids_are_refused_naming_both_places() {
        let mut ps = parse(
            "policies:\n  - {id: a, effect: DENY, condition: 'true'}\n",
            "one.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ps.extend(
            parse(
                "policies:\n  - {id: a, effect: ALLOW, condition: 'true'}\n",
                "two.yaml",
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let e = PolicySet::new(ps).unwrap_err().to_string();
        assert!(e.contains("two.yaml: policies[0]"), "{e}");
        assert!(e.contains("duplicate id"), "{e}");
        assert!(e.contains("one.yaml: policies[0]"), "{e}");
    }

    #[test]
    fn errors_name_the_file_the_policy_and_the_position() {
        let e = parse(
            "policies:\n  - {id: ok, effect: DENY, condition: 'true'}\n  - id: bad\n    effect: DENY\n    condition: principal.tenant_id == tenant\n",
            "p.yaml",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 1);
        let text = e.to_string();
        assert!(
            text.starts_with("p.yaml: policies[1]: policy \"bad\": condition 1:24:"),
            "{text}"
        );
        assert!(text.contains("unknown variable `tenant`"), "{text}");
        match &e.0[0] {
            PolicyError::Condition { error, .. } => assert_eq!((error.line, error.column), (1, 24)),
            other => panic!("{other:?}"),
        }
        // Other fields.
        for (yaml, needle) in [
            (
                "policies:\n  - {id: 'bad id', effect: DENY, condition: 'true'}\n",
                "id: expected",
            ),
            (
                "policies:\n  - {id: a, effect: DENY, tools: ['a b'], condition: 'true'}\n",
                "tools[0]",
            ),
            (
                "policies:\n  - {id: a, effect: DENY, methods: [Execute], condition: 'true'}\n",
                "methods[0]",
            ),
            (
                "policies:\n  - {id: a, effect: DENY, tenant: '../x', condition: 'true'}\n",
                "tenant",
            ),
            (
                "policies:\n  - {id: a, effect: MAYBE, condition: 'true'}\n",
                "p.yaml: ",
            ),
            (
                "policies:\n  - {id: a, effect: DENY, conditon: 'true'}\n",
                "unknown field",
            ),
        ] {
            let e = parse(yaml, "p.yaml").unwrap_err().to_string();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_set_can_be_changed_one_policy_at_a_time() {
        let s = set(MIXED);
        let p = Policy::compile(
            PolicySpec {
                id: "deny-big-refund".into(),
                description: String::new(),
                tenant: String::new(),
                effect: Effect::Deny,
                tools: vec!["billing_refund".into()],
                methods: vec![],
                condition: "args.amount > 5000".into(),
                mode: Mode::Enforce,
                enabled: true,
                version: 2,
                compliance_impact: String::new(),
                remediation_steps: String::new(),
            },
            "api",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s2 = s.with(p);
        assert_eq!(s2.len(), 3);
        assert_eq!(s2.get("deny-big-refund").map(|p| p.spec().version), Some(2));
        let mut c = call("billing_refund", serde_json::json!({"amount": 900}));
        c.principal.roles.push("billing-operator".into());
        assert_eq!(c.eval(&s).verdict, Verdict::Deny);
        assert_eq!(c.eval(&s2).verdict, Verdict::Allow);
        let s3 = s2.without("allow-refund-operators");
        assert_eq!(s3.len(), 2);
        assert_eq!(c.eval(&s3).reason, Reason::NoAllowMatched);
        let only = s
            .only("deny-big-refund")
            .unwrap_or_else(|| panic!("missing"));
        assert_eq!(only.len(), 1);
        assert!(s.only("nope").is_none());
    }

    #[test]
    fn patterns_work_after_the_set_is_rebuilt() {
        let s = set(r#"
policies:
  - id: secrets
    effect: DENY
    condition: has(args.text) && args.text.matches('AKIA[0-9A-Z]{16}')
"#);
        let s = s.without("nothing");
        let out = call(
            "echo",
            serde_json::json!({"text": "key AKIAABCDEFGHIJKLMNOP"}),
        )
        .eval(&s);
        assert_eq!(out.verdict, Verdict::Deny);
        let out = call("echo", serde_json::json!({"text": "hello"})).eval(&s);
        assert_eq!(out.verdict, Verdict::NoOpinion);
    }
}

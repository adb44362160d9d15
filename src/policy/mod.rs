//! The CEL policy engine: policies that allow or deny a tool invocation on a condition
//! written in CEL. The file format, the variables and the combining rules are documented for
//! policy authors in `docs/policies.md`; this header is the same contract for the code.
//!
//! # Lifecycle
//!
//! - A [`PolicySpec`] (a YAML file's entry, or a proto `Policy` through
//!   [`PolicySpec::from_proto`]) becomes a [`Policy`] through [`Policy::compile`], the one
//!   validation for files and the API: the id, tenant, targets, texts, and the condition,
//!   parsed and checked once (unknown variables and fields, unknown functions, invalid
//!   literal regular expressions, conditions that cannot yield a bool are refused with their
//!   line and column).
//! - A [`PolicySet`] is an immutable set of them (ids unique), built once per change and
//!   read by every call: hold it in an `ArcSwap`. [`load`] reads a file or a directory;
//!   [`PolicySource::reload`] returns a new set only when the files changed and load.
//! - [`PolicySet::evaluate`] decides one call from an [`Input`] that borrows the call.
//!
//! # The evaluation context
//!
//! | variable | fields (CEL type) |
//! |---|---|
//! | `principal` | `principal_id`, `tenant_id`, `organization_id`, `security_clearance` (string); `roles` (list of string); `claims`, `policy_context` (map string → string). The `EnterpriseSecurityContext` of the call |
//! | `tool` | `name` (as called), `description`, `risk_assessment` (`LOW`/`MEDIUM`/`HIGH`), `tenant_id`, `approval_status` (string); `compliance_tags`, `required_roles` (list of string); `revision` (int). From the `EnterpriseToolContract`; empty (`''`, `[]`, `0`) but `name` when there is none |
//! | `args` | the call's arguments, a map: the `google.protobuf.Struct` of the `FunctionCall`, numbers as doubles |
//! | `runtime` | `runtime_id`, `language`, `version`, `tenant_id`, `security_zone`, `deployment_environment` (string); `capabilities` (list of string). The `EnterpriseRuntimeAnnouncement` of the runtime serving the session; empty when not known |
//! | `session` | `id` (string; empty outside a session) |
//! | `request` | `method` (full gRPC method), `source_address`, `correlation_id` (string); `time` (timestamp) |
//! | `usage` | the caller's metered usage, a map string → double; empty until metering exists |
//!
//! Records (`principal`, `tool`, `runtime`, `session`, `request`) always have every field
//! listed (empty when unknown), so a condition compares rather than tests presence;
//! `has()` is for the maps (`has(args.amount)`). Reading a key a map does not have is a
//! run-time error, and an error denies.
//!
//! # Combining
//!
//! A policy applies to a call when it is enabled, its `tenant` is empty or the caller's
//! (`principal.tenant_id`), its `tools` globs are empty or match the tool, and its `methods`
//! globs are empty or match the method. Among the enforced policies that apply:
//!
//! 1. a DENY whose condition holds denies ([`Reason::DenyMatched`]);
//! 2. a condition that fails at run time (an error, or not a bool) denies
//!    ([`Reason::ConditionFailed`]), naming the policy and the error;
//! 3. otherwise, if ALLOW policies apply, one of them must hold ([`Reason::AllowMatched`])
//!    or the call is denied ([`Reason::NoAllowMatched`]);
//! 4. otherwise the policies have no opinion ([`Verdict::NoOpinion`]): RBAC alone decides.
//!
//! `dry_run` policies are evaluated when they apply and never change the verdict: the
//! outcome computed as if they were enforced is [`Outcome::dry_run`].
//!
//! # Cost
//!
//! One CEL environment for the process (the standard library, the `strings` and `lists`
//! extensions, `matches` on a precompiled pattern and `anyStringMatches`, built once); one
//! root scope per set (holding its compiled patterns); per call, one child scope whose
//! variables borrow the [`Input`] and are converted to CEL values on first read only.
//! `record.field` is rewritten at compile time to one identifier that the per-call resolver
//! answers directly. Ten policies that all apply cost about 5 µs per call
//! (`benches/policy.rs`, figures in `docs/policies.md`).

mod cases;
mod condition;
mod engine;
mod input;
mod installed;
mod load;
mod spec;

pub use cases::{CaseFile, CaseReport, run_cases};
pub use condition::{ConditionError, MAX_CONDITION_LEN};
pub use engine::{Outcome, Policy, PolicyError, PolicyErrors, PolicySet, Reason, Verdict};
pub use installed::Installed;
pub use load::{MAX_FILE_LEN, PolicySource, files, load, parse};
pub use spec::{Effect, Mode, PolicySpec};

use crate::proto::aesp::{
    EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
};
use std::collections::HashMap;
use std::time::SystemTime;

/// The method of a unary tool call, the default of `request.method` in test cases.
pub const EXECUTE_TOOL: &str = "/altar.grid.v1.GridHost/ExecuteTool";

/// Everything a policy sees of one tool invocation, borrowed from the call.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The caller (the effective principal and tenant, roles resolved). Its `tenant_id`
    /// selects the tenant-scoped policies.
    pub principal: &'a EnterpriseSecurityContext,
    /// The tool's name, as called.
    pub tool_name: &'a str,
    /// The tool's approved contract, where there is one.
    pub tool: Option<&'a EnterpriseToolContract>,
    /// The call's `FunctionCall.args`.
    pub args: Option<&'a prost_types::Struct>,
    /// The runtime serving the session, where known.
    pub runtime: Option<&'a EnterpriseRuntimeAnnouncement>,
    /// Empty outside a session.
    pub session_id: &'a str,
    pub request: RequestInfo<'a>,
    /// Metered usage by name; `None` is an empty map.
    pub usage: Option<&'a HashMap<String, f64>>,
}

/// The `request` variable.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The full gRPC method (`/altar.grid.v1.GridHost/ExecuteTool`).
    pub method: &'a str,
    pub time: SystemTime,
    /// The peer's address (`ip:port`), or empty.
    pub source_address: &'a str,
    pub correlation_id: &'a str,
}

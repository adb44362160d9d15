//! What a condition sees: the variables of the evaluation context, their fields and types
//! (one table, [`VARIABLES`], read by the checker and by the values alike), and the per-call
//! values, bound without copying the call.
//!
//! Each top-level variable is a [`Record`] (or, for `args` and `usage`, a map) that borrows
//! the caller's structs. A field becomes a CEL value the first time a condition reads it
//! during a call, and is kept for the other policies of the same call: strings are borrowed,
//! never copied; a list or a map is built once per call, and only if read.

use super::Input;
use crate::proto::aesp::{
    EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
};
use cel::ExecutionError;
use cel::common::traits::Indexer;
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
    DYN_TYPE, Type,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use std::collections::HashMap;
use std::sync::OnceLock;

// ------------------------------------------------------------------------------ schema

/// The static type of a field, as the checker knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldType {
    String,
    Int,
    Timestamp,
    /// `list(string)`.
    StringList,
    /// `map(string, string)`.
    StringMap,
    /// `map(string, double)`.
    DoubleMap,
    /// `map(string, dyn)`: JSON-like values.
    DynMap,
}

/// A variable with a fixed set of fields.
#[derive(Debug)]
pub(crate) struct RecordSchema {
    pub var: &'static str,
    pub ty: Type,
    pub fields: &'static [(&'static str, FieldType)],
}

impl PartialEq for RecordSchema {
    fn eq(&self, other: &Self) -> bool {
        self.var == other.var
    }
}

impl RecordSchema {
    pub fn field(&self, name: &str) -> Option<(usize, FieldType)> {
        self.fields
            .iter()
            .position(|(n, _)| *n == name)
            .map(|i| (i, self.fields[i].1))
    }

    pub fn field_names(&self) -> String {
        self.fields
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The most fields a record has (the size of its per-call cache).
const MAX_FIELDS: usize = 8;

pub(crate) static PRINCIPAL: RecordSchema = RecordSchema {
    var: "principal",
    ty: Type::new_struct_type("aesp.Principal"),
    fields: &[
        ("principal_id", FieldType::String),
        ("tenant_id", FieldType::String),
        ("organization_id", FieldType::String),
        ("roles", FieldType::StringList),
        ("security_clearance", FieldType::String),
        ("claims", FieldType::StringMap),
        ("policy_context", FieldType::StringMap),
    ],
};

pub(crate) static TOOL: RecordSchema = RecordSchema {
    var: "tool",
    ty: Type::new_struct_type("aesp.Tool"),
    fields: &[
        ("name", FieldType::String),
        ("description", FieldType::String),
        ("risk_assessment", FieldType::String),
        ("compliance_tags", FieldType::StringList),
        ("required_roles", FieldType::StringList),
        ("tenant_id", FieldType::String),
        ("approval_status", FieldType::String),
        ("revision", FieldType::Int),
    ],
};

pub(crate) static RUNTIME: RecordSchema = RecordSchema {
    var: "runtime",
    ty: Type::new_struct_type("aesp.Runtime"),
    fields: &[
        ("runtime_id", FieldType::String),
        ("language", FieldType::String),
        ("version", FieldType::String),
        ("capabilities", FieldType::StringList),
        ("tenant_id", FieldType::String),
        ("security_zone", FieldType::String),
        ("deployment_environment", FieldType::String),
    ],
};

pub(crate) static SESSION: RecordSchema = RecordSchema {
    var: "session",
    ty: Type::new_struct_type("aesp.Session"),
    fields: &[("id", FieldType::String)],
};

pub(crate) static REQUEST: RecordSchema = RecordSchema {
    var: "request",
    ty: Type::new_struct_type("aesp.Request"),
    fields: &[
        ("method", FieldType::String),
        ("time", FieldType::Timestamp),
        ("source_address", FieldType::String),
        ("correlation_id", FieldType::String),
    ],
};

/// The type of a top-level variable.
#[derive(Debug, Clone, Copy)]
pub(crate) enum VarType {
    Record(&'static RecordSchema),
    Map(FieldType),
}

/// Every variable a condition may name, in the order the documentation lists them.
pub(crate) static VARIABLES: [(&str, VarType); 7] = [
    ("principal", VarType::Record(&PRINCIPAL)),
    ("tool", VarType::Record(&TOOL)),
    ("args", VarType::Map(FieldType::DynMap)),
    ("runtime", VarType::Record(&RUNTIME)),
    ("session", VarType::Record(&SESSION)),
    ("request", VarType::Record(&REQUEST)),
    ("usage", VarType::Map(FieldType::DoubleMap)),
];

pub(crate) fn variable(name: &str) -> Option<VarType> {
    VARIABLES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

pub(crate) fn variable_names() -> String {
    VARIABLES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------------------ values

/// What a record reads its fields from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Principal(&'a EnterpriseSecurityContext),
    Tool {
        name: &'a str,
        contract: Option<&'a EnterpriseToolContract>,
    },
    Runtime(Option<&'a EnterpriseRuntimeAnnouncement>),
    Session(&'a str),
    Request(&'a super::RequestInfo<'a>),
}

type Boxed<'a> = Box<dyn Val + 'a>;

fn string<'a>(s: &'a str) -> Boxed<'a> {
    Box::new(CelString::from(s))
}

fn string_list<'a>(v: &'a [String]) -> Boxed<'a> {
    Box::new(CelList::from(
        v.iter().map(|s| string(s.as_str())).collect::<Vec<_>>(),
    ))
}

fn string_map<'a>(m: &'a HashMap<String, String>) -> Boxed<'a> {
    Box::new(CelMap::from(
        m.iter()
            .map(|(k, v)| (CelMapKey::from(k.as_str()), string(v.as_str())))
            .collect::<HashMap<_, _>>(),
    ))
}

fn double_map<'a>(m: &'a HashMap<String, f64>) -> Boxed<'a> {
    Box::new(CelMap::from(
        m.iter()
            .map(|(k, v)| {
                (
                    CelMapKey::from(k.as_str()),
                    Box::new(CelDouble::from(*v)) as Boxed<'a>,
                )
            })
            .collect::<HashMap<_, _>>(),
    ))
}

/// A `google.protobuf.Struct` as a CEL map: strings borrowed, numbers as doubles (the
/// Struct has no integers), `null` as null, nested objects and lists alike.
pub(crate) fn struct_value<'a>(s: &'a prost_types::Struct) -> Boxed<'a> {
    Box::new(CelMap::from(
        s.fields
            .iter()
            .map(|(k, v)| (CelMapKey::from(k.as_str()), json_value(v)))
            .collect::<HashMap<_, _>>(),
    ))
}

fn json_value<'a>(v: &'a prost_types::Value) -> Boxed<'a> {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Box::new(CelNull),
        Some(Kind::NumberValue(n)) => Box::new(CelDouble::from(*n)),
        Some(Kind::StringValue(s)) => string(s.as_str()),
        Some(Kind::BoolValue(b)) => Box::new(CelBool::from(*b)),
        Some(Kind::StructValue(s)) => struct_value(s),
        Some(Kind::ListValue(l)) => Box::new(CelList::from(
            l.values.iter().map(json_value).collect::<Vec<_>>(),
        )),
    }
}

const EMPTY: &[String] = &[];

impl<'a> Source<'a> {
    /// The value of field `name` (one the schema lists; anything else is empty).
    fn field(&self, name: &str) -> Boxed<'a> {
        match *self {
            Source::Principal(p) => match name {
                "principal_id" => string(&p.principal_id),
                "tenant_id" => string(&p.tenant_id),
                "organization_id" => string(&p.organization_id),
                "roles" => string_list(&p.roles),
                "security_clearance" => string(&p.security_clearance),
                "claims" => string_map(&p.claims),
                "policy_context" => string_map(&p.policy_context),
                _ => Box::new(CelNull),
            },
            Source::Tool {
                name: called,
                contract,
            } => match name {
                "name" => string(called),
                "description" => string(
                    contract
                        .and_then(|c| c.declaration.as_ref())
                        .map_or("", |d| d.description.as_str()),
                ),
                "risk_assessment" => string(contract.map_or("", |c| c.risk_assessment.as_str())),
                "compliance_tags" => string_list(contract.map_or(EMPTY, |c| &c.compliance_tags)),
                "required_roles" => string_list(contract.map_or(EMPTY, |c| &c.required_roles)),
                "tenant_id" => string(contract.map_or("", |c| c.tenant_id.as_str())),
                "approval_status" => string(contract.map_or("", |c| c.approval_status.as_str())),
                "revision" => Box::new(CelInt::from(
                    contract.map_or(0, |c| i64::try_from(c.revision).unwrap_or(i64::MAX)),
                )),
                _ => Box::new(CelNull),
            },
            Source::Runtime(r) => match name {
                "runtime_id" => string(r.map_or("", |r| r.runtime_id.as_str())),
                "language" => string(r.map_or("", |r| r.language.as_str())),
                "version" => string(r.map_or("", |r| r.version.as_str())),
                "capabilities" => string_list(r.map_or(EMPTY, |r| &r.capabilities)),
                "tenant_id" => string(r.map_or("", |r| r.tenant_id.as_str())),
                "security_zone" => string(r.map_or("", |r| r.security_zone.as_str())),
                "deployment_environment" => {
                    string(r.map_or("", |r| r.deployment_environment.as_str()))
                }
                _ => Box::new(CelNull),
            },
            Source::Session(id) => match name {
                "id" => string(id),
                _ => Box::new(CelNull),
            },
            Source::Request(r) => match name {
                "method" => string(r.method),
                "time" => {
                    let t: chrono::DateTime<chrono::Utc> = r.time.into();
                    Box::new(CelTimestamp::from(t.fixed_offset()))
                }
                "source_address" => string(r.source_address),
                "correlation_id" => string(r.correlation_id),
                _ => Box::new(CelNull),
            },
        }
    }
}

/// A top-level variable with fixed fields, read lazily from the call and cached per call.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    schema: &'static RecordSchema,
    source: Source<'a>,
    cells: [OnceLock<Boxed<'a>>; MAX_FIELDS],
}

impl<'a> Record<'a> {
    fn new(schema: &'static RecordSchema, source: Source<'a>) -> Self {
        debug_assert!(schema.fields.len() <= MAX_FIELDS);
        Record {
            schema,
            source,
            cells: Default::default(),
        }
    }
}

impl<'a> Record<'a> {
    /// Field `name`, converted on first read and kept for the rest of the call.
    fn field_ref(&self, name: &str) -> Option<&(dyn Val + 'a)> {
        let (i, _) = self.schema.field(name).filter(|(i, _)| *i < MAX_FIELDS)?;
        Some(
            self.cells[i]
                .get_or_init(|| self.source.field(name))
                .as_ref(),
        )
    }
}

impl Val for Record<'_> {
    fn get_type(&self) -> &Type {
        &self.schema.ty
    }

    fn cel_type() -> &'static Type
    where
        Self: Sized,
    {
        // Each record has a type of its own; `DYN_TYPE` is what a macro naming it would see.
        &DYN_TYPE
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(Record::new(self.schema, self.source))
    }
}

impl Indexer for Record<'_> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let name = idx
            .downcast_ref::<CelString>()
            .ok_or_else(|| ExecutionError::UnexpectedType {
                got: idx.get_type().name().to_owned(),
                want: "string".to_owned(),
            })?
            .inner();
        self.field_ref(name)
            .map(CowVal::Borrowed)
            .ok_or_else(|| ExecutionError::no_such_key(name))
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

/// The variables of one call, handed to the per-call CEL scope as its resolver.
#[derive(Debug)]
pub(crate) struct Vars<'a> {
    principal: Record<'a>,
    tool: Record<'a>,
    runtime: Record<'a>,
    session: Record<'a>,
    request: Record<'a>,
    args_source: Option<&'a prost_types::Struct>,
    args: OnceLock<Boxed<'a>>,
    usage_source: Option<&'a HashMap<String, f64>>,
    usage: OnceLock<Boxed<'a>>,
}

impl<'a> Vars<'a> {
    pub fn new(input: &'a Input<'a>) -> Self {
        Vars {
            principal: Record::new(&PRINCIPAL, Source::Principal(input.principal)),
            tool: Record::new(
                &TOOL,
                Source::Tool {
                    name: input.tool_name,
                    contract: input.tool,
                },
            ),
            runtime: Record::new(&RUNTIME, Source::Runtime(input.runtime)),
            session: Record::new(&SESSION, Source::Session(input.session_id)),
            request: Record::new(&REQUEST, Source::Request(&input.request)),
            args_source: input.args,
            args: OnceLock::new(),
            usage_source: input.usage,
            usage: OnceLock::new(),
        }
    }
}

static NO_USAGE: OnceLock<HashMap<String, f64>> = OnceLock::new();

impl VariableResolver for Vars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v: &'b (dyn Val + 'b) = match variable {
            "principal" => &self.principal,
            "tool" => &self.tool,
            "runtime" => &self.runtime,
            "session" => &self.session,
            "request" => &self.request,
            "args" => self
                .args
                .get_or_init(|| match self.args_source {
                    Some(s) => struct_value(s),
                    None => Box::new(CelMap::default()),
                })
                .as_ref(),
            "usage" => self
                .usage
                .get_or_init(|| {
                    double_map(
                        self.usage_source
                            .unwrap_or_else(|| NO_USAGE.get_or_init(HashMap::new)),
                    )
                })
                .as_ref(),
            // `record.field`, as the condition compiler flattens it.
            dotted => {
                let (var, field) = dotted.split_once('.')?;
                let record = match var {
                    "principal" => &self.principal,
                    "tool" => &self.tool,
                    "runtime" => &self.runtime,
                    "session" => &self.session,
                    "request" => &self.request,
                    _ => return None,
                };
                record.field_ref(field)?
            }
        };
        Some(CowVal::Borrowed(v))
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{Input, PolicySet, RequestInfo, Verdict, parse};
    use crate::proto::aesp::{
        EnterpriseRuntimeAnnouncement, EnterpriseSecurityContext, EnterpriseToolContract,
    };
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

    /// Whether `condition` holds for a fixed, fully populated call.
    fn holds(condition: &str) -> Result<bool, String> {
        let yaml = format!(
            "policies:\n  - id: p\n    effect: DENY\n    condition: {}\n",
            serde_json::to_string(condition).unwrap_or_default()
        );
        let set = PolicySet::new(parse(&yaml, "t.yaml").map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let principal = EnterpriseSecurityContext {
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
            claims: HashMap::from([("dept".to_string(), "finance".to_string())]),
            organization_id: "acme-corp".into(),
            roles: vec!["client-user".into(), "auditor".into()],
            security_clearance: "SECRET".into(),
            policy_context: HashMap::new(),
        };
        let contract = EnterpriseToolContract {
            risk_assessment: "HIGH".into(),
            compliance_tags: vec!["HIPAA".into()],
            required_roles: vec!["clinician".into()],
            revision: 4,
            ..Default::default()
        };
        let runtime = EnterpriseRuntimeAnnouncement {
            runtime_id: "rt-1".into(),
            security_zone: "pci-zone".into(),
            deployment_environment: "PROD".into(),
            capabilities: vec!["streaming".into()],
            ..Default::default()
        };
        let args = crate::adm::json_to_struct(&serde_json::json!({
            "text": "hello", "amount": 12.5, "n": 3, "flag": true, "none": null,
            "nested": {"list": [1, "two"]},
        }))?;
        let usage = HashMap::from([("calls".to_string(), 7.0)]);
        // 2025-01-06T10:30:00Z, a Monday.
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_736_159_400);
        let out = set.evaluate(&Input {
            principal: &principal,
            tool_name: "lookup_patient",
            tool: Some(&contract),
            args: Some(&args),
            runtime: Some(&runtime),
            session_id: "s-1",
            request: RequestInfo {
                method: "/altar.grid.v1.GridHost/ExecuteTool",
                time,
                source_address: "10.0.0.7:5000",
                correlation_id: "corr-1",
            },
            usage: Some(&usage),
        });
        match out.errors.first() {
            Some((_, e)) => Err(e.clone()),
            None => Ok(out.verdict == Verdict::Deny),
        }
    }

    #[test]
    fn every_variable_reads_the_call() {
        for c in [
            "principal.principal_id == 'alice' && principal.tenant_id == 'acme'",
            "principal.organization_id == 'acme-corp'",
            "'auditor' in principal.roles && size(principal.roles) == 2",
            "principal.security_clearance == 'SECRET'",
            "principal.claims.dept == 'finance' && !has(principal.claims.team)",
            "size(principal.policy_context) == 0",
            "tool.name == 'lookup_patient' && tool.risk_assessment == 'HIGH'",
            "'HIPAA' in tool.compliance_tags && tool.required_roles == ['clinician']",
            "tool.revision == 4 && tool.description == ''",
            "args.text == 'hello' && args.amount > 12 && args.amount < 13",
            "args.n == 3 && args.flag && args.none == null",
            "args.nested.list[1] == 'two' && args.nested.list[0] == 1",
            "'text' in args && !has(args.missing)",
            "runtime.runtime_id == 'rt-1' && runtime.security_zone == 'pci-zone'",
            "runtime.deployment_environment == 'PROD' && 'streaming' in runtime.capabilities",
            "runtime.language == '' && runtime.tenant_id == ''",
            "session.id == 's-1'",
            "request.method.endsWith('/ExecuteTool') && request.source_address.startsWith('10.')",
            "request.correlation_id == 'corr-1'",
            "request.time == timestamp('2025-01-06T10:30:00Z')",
            "request.time.getHours() == 10 && request.time.getDayOfWeek() == 1",
            "request.time.getHours('America/New_York') == 5",
            "usage.calls == 7.0 && usage['calls'] > 6",
            "principal.roles.exists(r, r == 'auditor') && args.exists(k, k == 'n')",
            "principal.tenant_id.lowerAscii() == 'acme'",
            // Any string at any depth, map keys excluded; a pattern computed at run time too.
            "args.anyStringMatches('^t[w]o$') && !args.anyStringMatches('^nested$')",
            "args.anyStringMatches(args.text) && ['a', ['b']].anyStringMatches('b')",
            // A comprehension variable named like a record hides the record.
            "[{'tenant_id': 'zzz'}].exists(principal, principal.tenant_id == 'zzz')",
            "principal['tenant_id'] == 'acme' && principal.roles[0] == 'client-user'",
        ] {
            assert_eq!(holds(c), Ok(true), "{c}");
        }
        for c in [
            "principal.tenant_id == 'globex'",
            "'admin' in principal.roles",
            "args.text.matches('(?i)password')",
            "args.anyStringMatches('AKIA')",
        ] {
            assert_eq!(holds(c), Ok(false), "{c}");
        }
    }

    #[test]
    fn a_missing_key_of_a_map_is_an_error() {
        let e = holds("args.missing == 1").unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }
}

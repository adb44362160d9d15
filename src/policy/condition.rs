//! Conditions: a CEL expression, parsed and checked once, when its policy is loaded.
//!
//! [`Condition::compile`] refuses, with the line, the column and the reason:
//!
//! - text that does not parse;
//! - a variable that is not one of the evaluation context's (a comprehension's own variables,
//!   `x` in `args.exists(x, ...)`, are fine), and a field that a record does not have
//!   (`principal.role`);
//! - a function the environment does not declare (`matchs(...)`), and a `matches` pattern
//!   written as a literal that is not a valid regular expression;
//! - anything whose type is known to be wrong: a condition that yields a string, a number, a
//!   list...; `&&`, `||`, `!` or `?:` applied to a known non-bool; `in` on a string; a field
//!   selected on a scalar; `has()` on a field of a record (always true, see `docs/policies.md`).
//!
//! What cannot be known before a call (the values in `args`, `claims` or `usage`) is `dyn`:
//! a condition that yields something other than a bool at run time is an error, and an error
//! denies.
//!
//! A `matches` whose pattern is a string literal is rewritten to use the regular expression
//! compiled here: the `cel` crate's own `matches` compiles its pattern on every call.

use super::input::{self, FieldType, RecordSchema, VarType};
use cel::common::ast::{CallExpr, Expr, IdedExpr, LiteralValue, SourceInfo, operators};
use cel::common::types::{
    CelBool, CelList, CelMap, CelString, LIST_TYPE, MAP_TYPE, STRING_TYPE, Type,
};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::{Context, Env, ExecutionError};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Longest condition accepted, in bytes.
pub const MAX_CONDITION_LEN: usize = 8 * 1024;

/// Why a condition was refused: where (1-based line and column in the expression) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub line: usize,
    pub column: usize,
    pub reason: String,
    /// The line of the expression and a caret under the column.
    pub snippet: String,
}

impl std::fmt::Display for ConditionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.reason)
    }
}

impl ConditionError {
    fn at(source: &str, line: usize, column: usize, reason: impl Into<String>) -> Self {
        let text = source.lines().nth(line.saturating_sub(1)).unwrap_or("");
        let caret = format!("{}^", " ".repeat(column.saturating_sub(1)));
        ConditionError {
            line,
            column,
            reason: reason.into(),
            snippet: format!("| {text}\n| {caret}"),
        }
    }

    /// At the start of expression node `id`.
    fn at_node(source: &str, info: &SourceInfo, id: u64, reason: impl Into<String>) -> Self {
        let (line, column) = info
            .offset_for(id)
            .map(|(start, _)| line_column(source, start as usize))
            .unwrap_or((1, 1));
        ConditionError::at(source, line, column, reason)
    }
}

/// 1-based line and column of the `offset`-th character (the parser counts characters).
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for c in source.chars().take(offset) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

// ------------------------------------------------------------------------------ environment

/// A regular expression compiled when its policy was loaded.
#[derive(Debug, Clone)]
pub(crate) struct Pattern(pub Arc<regex::Regex>);

static PATTERN_TYPE: Type = Type::new_unspecified_type("aesp.Pattern");

impl Val for Pattern {
    fn get_type(&self) -> &Type {
        &PATTERN_TYPE
    }

    fn cel_type() -> &'static Type
    where
        Self: Sized,
    {
        &PATTERN_TYPE
    }

    fn equals(&self, other: &dyn Val) -> bool {
        other
            .downcast_ref::<Pattern>()
            .is_some_and(|o| o.0.as_str() == self.0.as_str())
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(self.clone())
    }

    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl StaticVal for Pattern {}

/// `matches(string, aesp.Pattern)` and `string.matches(aesp.Pattern)`.
fn matches_pattern<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let text = args
        .first()
        .and_then(|a| a.downcast_ref::<CelString>())
        .ok_or_else(|| ExecutionError::function_error("matches", "expected a string"))?;
    let pattern = args
        .get(1)
        .and_then(|a| a.downcast_ref::<Pattern>())
        .ok_or_else(|| ExecutionError::function_error("matches", "expected a pattern"))?;
    Ok(CowVal::owned(CelBool::from(
        pattern.0.is_match(text.inner()),
    )))
}

/// Deepest nesting `anyStringMatches` looks into; deeper is an error (fail closed), never a
/// silent skip.
const MAX_SCAN_DEPTH: usize = 128;

/// Whether any string inside `v` (itself, a list's elements, a map's values, at any depth)
/// satisfies `is_match`.
fn any_string(
    v: &dyn Val,
    is_match: &dyn Fn(&str) -> bool,
    depth: usize,
) -> Result<bool, ExecutionError> {
    if depth > MAX_SCAN_DEPTH {
        return Err(ExecutionError::function_error(
            "anyStringMatches",
            format!("nested deeper than {MAX_SCAN_DEPTH} levels"),
        ));
    }
    if let Some(s) = v.downcast_ref::<CelString>() {
        return Ok(is_match(s.inner()));
    }
    if let Some(m) = v.downcast_ref::<CelMap>() {
        for x in m.inner().values() {
            if any_string(x.as_ref(), is_match, depth + 1)? {
                return Ok(true);
            }
        }
    } else if let Some(l) = v.downcast_ref::<CelList>() {
        for x in l.inner() {
            if any_string(x.as_ref(), is_match, depth + 1)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// `map.anyStringMatches(pattern)`, `list.anyStringMatches(pattern)`: whether any string
/// value inside (map values, list elements, at any depth; not map keys) matches. The pattern
/// is an `aesp.Pattern` (a literal, compiled at load) or a string (compiled on every call).
fn any_string_matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (Some(target), Some(pattern)) = (args.first(), args.get(1)) else {
        return Err(ExecutionError::function_error(
            "anyStringMatches",
            "expected a target and a pattern",
        ));
    };
    let found = if let Some(p) = pattern.downcast_ref::<Pattern>() {
        any_string(target.as_ref(), &|s| p.0.is_match(s), 0)?
    } else if let Some(p) = pattern.downcast_ref::<CelString>() {
        let re = regex::Regex::new(p.inner())
            .map_err(|e| ExecutionError::function_error("anyStringMatches", regex_reason(&e)))?;
        any_string(target.as_ref(), &|s| re.is_match(s), 0)?
    } else {
        return Err(ExecutionError::function_error(
            "anyStringMatches",
            "expected a pattern",
        ));
    };
    Ok(CowVal::owned(CelBool::from(found)))
}

fn build_env() -> Result<Env, cel::DeclarationError> {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)?;
    env.add_extension(cel::extensions::lists)?;
    env.add_overload(
        "matches",
        "aesp_matches_string_pattern",
        vec![STRING_TYPE, PATTERN_TYPE.to_owned()],
        matches_pattern,
    )?;
    env.add_member_overload(
        "matches",
        "aesp_string_matches_pattern",
        STRING_TYPE,
        vec![PATTERN_TYPE.to_owned()],
        matches_pattern,
    )?;
    for (i, target) in [MAP_TYPE, LIST_TYPE].into_iter().enumerate() {
        for (j, pattern) in [PATTERN_TYPE.to_owned(), STRING_TYPE]
            .into_iter()
            .enumerate()
        {
            env.add_member_overload(
                ANY_STRING_MATCHES,
                &format!("aesp_any_string_matches_{i}_{j}"),
                target.to_owned(),
                vec![pattern],
                any_string_matches,
            )?;
        }
    }
    Ok(env)
}

/// The member function that scans a map or a list for a matching string.
pub(crate) const ANY_STRING_MATCHES: &str = "anyStringMatches";

/// The one CEL environment of the process: the standard library, the `strings` and `lists`
/// extensions, and `matches` on a precompiled pattern. Built once (about 25 µs).
pub(crate) fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        // The declarations above are fixed by this file, not by any input: a conflict is a
        // programming error that the unit tests catch.
        #[allow(clippy::expect_used)]
        Arc::new(build_env().expect("the policy CEL environment declares no conflicting overload"))
    })
}

/// Whether the environment declares a function (global or member) called `name`.
fn is_function(name: &str) -> bool {
    // `add_function` refuses exactly the names the environment declares as overloads.
    Context::with_env(env().clone())
        .add_function(name, |x: i64| x)
        .is_err()
}

// ------------------------------------------------------------------------------ compiled

/// A checked condition, ready to evaluate.
#[derive(Debug)]
pub(crate) struct Condition {
    pub expr: IdedExpr,
    /// The regular expressions its literal `matches` patterns were compiled to, each under
    /// the variable name the rewritten expression reads it from.
    pub patterns: Vec<(String, Pattern)>,
}

impl Condition {
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        if source.trim().is_empty() {
            return Err(ConditionError::at(source, 1, 1, "the condition is empty"));
        }
        if source.len() > MAX_CONDITION_LEN {
            return Err(ConditionError::at(
                source,
                1,
                1,
                format!("the condition is longer than {MAX_CONDITION_LEN} bytes"),
            ));
        }
        let (mut expr, info) = env()
            .parser()
            .parse_with_source_info(source)
            .map_err(|e| parse_error(source, &e))?;
        let mut checker = Checker {
            source,
            info: &info,
            scopes: Vec::new(),
        };
        let ty = checker.check(&expr)?;
        match ty {
            Ty::Bool | Ty::Dyn => {}
            other => {
                return Err(ConditionError::at_node(
                    source,
                    &info,
                    expr.id,
                    format!(
                        "the condition yields {}, not a bool",
                        other.describe_with_article()
                    ),
                ));
            }
        }
        let mut patterns = Vec::new();
        rewrite_patterns(&mut expr, source, &info, &mut patterns)?;
        flatten_record_fields(&mut expr, &mut Vec::new());
        Ok(Condition { expr, patterns })
    }
}

fn parse_error(source: &str, e: &cel::ParseErrors) -> ConditionError {
    match e.errors.first() {
        Some(first) => {
            let line = usize::try_from(first.pos.0).unwrap_or(1).max(1);
            let column = usize::try_from(first.pos.1).unwrap_or(1).max(1);
            ConditionError::at(source, line, column, format!("syntax: {}", first.msg))
        }
        None => ConditionError::at(source, 1, 1, "syntax error"),
    }
}

/// Replaces each string-literal pattern of `matches` by a variable holding it compiled.
fn rewrite_patterns(
    e: &mut IdedExpr,
    source: &str,
    info: &SourceInfo,
    out: &mut Vec<(String, Pattern)>,
) -> Result<(), ConditionError> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if let Expr::Call(call) = &mut e.expr
        && (call.func_name == "matches" || call.func_name == ANY_STRING_MATCHES)
    {
        let pattern_arg = match (&call.target, call.args.len()) {
            (Some(_), 1) => call.args.get_mut(0),
            (None, 2) => call.args.get_mut(1),
            _ => None,
        };
        if let Some(arg) = pattern_arg
            && let Expr::Literal(LiteralValue::String(p)) = &arg.expr
        {
            let re = regex::Regex::new(p.inner()).map_err(|err| {
                ConditionError::at_node(
                    source,
                    info,
                    arg.id,
                    format!("not a valid regular expression: {}", regex_reason(&err)),
                )
            })?;
            let name = format!("@aesp_pattern_{}", NEXT.fetch_add(1, Ordering::Relaxed));
            arg.expr = Expr::Ident(name.clone());
            out.push((name, Pattern(Arc::new(re))));
        }
    }
    for child in children_mut(e) {
        rewrite_patterns(child, source, info, out)?;
    }
    Ok(())
}

/// Replaces each `record.field` (`principal.tenant_id`) by one identifier of that name,
/// which the per-call resolver answers directly: the interpreter's path for a selection
/// allocates twice per evaluation, an identifier's none. `shadowed` holds the comprehension
/// variables in scope (a variable named like a record hides it).
fn flatten_record_fields(e: &mut IdedExpr, shadowed: &mut Vec<String>) {
    if let Expr::Select(s) = &e.expr
        && !s.test
        && let Expr::Ident(var) = &s.operand.expr
        && !shadowed.contains(var)
        && let Some(VarType::Record(r)) = input::variable(var)
        && r.field(&s.field).is_some()
    {
        e.expr = Expr::Ident(format!("{var}.{}", s.field));
        return;
    }
    if let Expr::Comprehension(c) = &mut e.expr {
        flatten_record_fields(&mut c.iter_range, shadowed);
        flatten_record_fields(&mut c.accu_init, shadowed);
        let depth = shadowed.len();
        shadowed.push(c.iter_var.clone());
        if let Some(v2) = &c.iter_var2 {
            shadowed.push(v2.clone());
        }
        shadowed.push(c.accu_var.clone());
        flatten_record_fields(&mut c.loop_cond, shadowed);
        flatten_record_fields(&mut c.loop_step, shadowed);
        shadowed.truncate(depth);
        shadowed.push(c.accu_var.clone());
        flatten_record_fields(&mut c.result, shadowed);
        shadowed.truncate(depth);
        return;
    }
    for child in children_mut(e) {
        flatten_record_fields(child, shadowed);
    }
}

/// The reason of a regex error on one line (its `Display` repeats the pattern with a caret).
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("error: ").to_string())
        .unwrap_or(text)
}

fn children_mut(e: &mut IdedExpr) -> Vec<&mut IdedExpr> {
    use cel::common::ast::EntryExpr;
    match &mut e.expr {
        Expr::Call(c) => c
            .target
            .iter_mut()
            .map(|t| t.as_mut())
            .chain(c.args.iter_mut())
            .collect(),
        Expr::Comprehension(c) => vec![
            &mut c.iter_range,
            &mut c.accu_init,
            &mut c.loop_cond,
            &mut c.loop_step,
            &mut c.result,
        ],
        Expr::List(l) => l.elements.iter_mut().collect(),
        Expr::Map(m) => m
            .entries
            .iter_mut()
            .flat_map(|en| match &mut en.expr {
                EntryExpr::MapEntry(me) => vec![&mut me.key, &mut me.value],
                EntryExpr::StructField(sf) => vec![&mut sf.value],
            })
            .collect(),
        Expr::Struct(s) => s
            .entries
            .iter_mut()
            .flat_map(|en| match &mut en.expr {
                EntryExpr::MapEntry(me) => vec![&mut me.key, &mut me.value],
                EntryExpr::StructField(sf) => vec![&mut sf.value],
            })
            .collect(),
        Expr::Select(s) => vec![s.operand.as_mut()],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

// ------------------------------------------------------------------------------ checker

/// What the checker knows of an expression's type.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Bool,
    Int,
    Double,
    Str,
    Timestamp,
    List(Box<Ty>),
    Map(Box<Ty>),
    Record(&'static RecordSchema),
    Null,
    /// Not known before the call.
    Dyn,
    /// Known not to be a bool; says what it is.
    Other(&'static str),
}

impl Ty {
    fn describe(&self) -> String {
        match self {
            Ty::Bool => "bool".into(),
            Ty::Int => "int".into(),
            Ty::Double => "double".into(),
            Ty::Str => "string".into(),
            Ty::Timestamp => "timestamp".into(),
            Ty::List(_) => "list".into(),
            Ty::Map(_) => "map".into(),
            Ty::Record(r) => format!("the record `{}`", r.var),
            Ty::Null => "null".into(),
            Ty::Dyn => "dyn".into(),
            Ty::Other(what) => (*what).into(),
        }
    }

    fn describe_with_article(&self) -> String {
        match self {
            Ty::Record(_) | Ty::Null | Ty::Other(_) => self.describe(),
            Ty::Int => "an int".into(),
            other => format!("a {}", other.describe()),
        }
    }

    fn of_field(t: FieldType) -> Ty {
        match t {
            FieldType::String => Ty::Str,
            FieldType::Int => Ty::Int,
            FieldType::Timestamp => Ty::Timestamp,
            FieldType::StringList => Ty::List(Box::new(Ty::Str)),
            FieldType::StringMap => Ty::Map(Box::new(Ty::Str)),
            FieldType::DoubleMap => Ty::Map(Box::new(Ty::Double)),
            FieldType::DynMap => Ty::Map(Box::new(Ty::Dyn)),
        }
    }

    fn may_be_bool(&self) -> bool {
        matches!(self, Ty::Bool | Ty::Dyn)
    }
}

/// Identifiers that name types (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

/// Return types of the functions whose result is known.
fn function_type(name: &str) -> Ty {
    match name {
        "matches" | "startsWith" | "endsWith" | "contains" | "hasValue" | "bool"
        | ANY_STRING_MATCHES => Ty::Bool,
        "size" | "int" | "getHours" | "getMinutes" | "getSeconds" | "getMilliseconds"
        | "getDayOfWeek" | "getDayOfMonth" | "getDate" | "getDayOfYear" | "getMonth"
        | "getFullYear" | "indexOf" | "lastIndexOf" => Ty::Int,
        "string" | "lowerAscii" | "upperAscii" | "trim" | "replace" | "substring" | "charAt"
        | "format" | "join" | "quote" => Ty::Str,
        "double" => Ty::Double,
        "timestamp" => Ty::Timestamp,
        "uint" => Ty::Other("a uint"),
        "bytes" => Ty::Other("bytes"),
        "duration" => Ty::Other("a duration"),
        "type" => Ty::Other("a type"),
        "split" | "distinct" | "flatten" | "range" | "slice" | "sort" | "sortBy" => {
            Ty::List(Box::new(Ty::Dyn))
        }
        _ => Ty::Dyn,
    }
}

struct Checker<'s> {
    source: &'s str,
    info: &'s SourceInfo,
    /// Comprehension variables in scope, innermost last.
    scopes: Vec<(String, Ty)>,
}

type Checked = Result<Ty, ConditionError>;

impl Checker<'_> {
    fn error(&self, id: u64, reason: impl Into<String>) -> ConditionError {
        ConditionError::at_node(self.source, self.info, id, reason)
    }

    fn check(&mut self, e: &IdedExpr) -> Checked {
        match &e.expr {
            Expr::Unspecified => Err(self.error(e.id, "empty expression")),
            Expr::Literal(l) => Ok(match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::UInt(_) => Ty::Other("a uint"),
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::String(_) => Ty::Str,
                LiteralValue::Bytes(_) => Ty::Other("bytes"),
                LiteralValue::Null => Ty::Null,
            }),
            Expr::Ident(name) => self.ident(e.id, name),
            Expr::Select(s) => {
                let operand = self.check(&s.operand)?;
                self.select(e.id, &operand, &s.field, s.test)
            }
            Expr::List(l) => {
                let mut elem: Option<Ty> = None;
                for el in &l.elements {
                    let t = self.check(el)?;
                    elem = Some(match elem {
                        None => t,
                        Some(prev) if prev == t => prev,
                        Some(_) => Ty::Dyn,
                    });
                }
                Ok(Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))))
            }
            Expr::Map(m) => {
                for en in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &en.expr {
                        self.check(&me.key)?;
                        self.check(&me.value)?;
                    }
                }
                Ok(Ty::Map(Box::new(Ty::Dyn)))
            }
            Expr::Struct(s) => Err(self.error(
                e.id,
                format!(
                    "`{}{{...}}` builds a message, and no message type is declared",
                    s.type_name
                ),
            )),
            Expr::Comprehension(c) => {
                let range = self.check(&c.iter_range)?;
                let elem = match &range {
                    Ty::List(t) => (**t).clone(),
                    Ty::Map(_) => Ty::Str,
                    Ty::Dyn => Ty::Dyn,
                    other => {
                        return Err(self.error(
                            c.iter_range.id,
                            format!(
                                "a comprehension needs a list or a map, got {}",
                                other.describe_with_article()
                            ),
                        ));
                    }
                };
                let accu = self.check(&c.accu_init)?;
                let depth = self.scopes.len();
                match &c.iter_var2 {
                    // Two variables: index/key and value.
                    Some(v2) => {
                        let (first, second) = match &range {
                            Ty::List(t) => (Ty::Int, (**t).clone()),
                            Ty::Map(v) => (Ty::Str, (**v).clone()),
                            _ => (Ty::Dyn, Ty::Dyn),
                        };
                        self.scopes.push((c.iter_var.clone(), first));
                        self.scopes.push((v2.clone(), second));
                    }
                    None => self.scopes.push((c.iter_var.clone(), elem)),
                }
                self.scopes.push((c.accu_var.clone(), accu));
                let checked = self
                    .check(&c.loop_cond)
                    .and_then(|_| self.check(&c.loop_step));
                // The result sees the accumulator only.
                self.scopes.truncate(depth);
                checked?;
                let accu = self.check(&c.accu_init)?;
                self.scopes.push((c.accu_var.clone(), accu));
                let result = self.check(&c.result);
                self.scopes.truncate(depth);
                result
            }
            Expr::Call(call) => self.call(e.id, call),
        }
    }

    fn ident(&self, id: u64, name: &str) -> Checked {
        if let Some((_, t)) = self.scopes.iter().rev().find(|(n, _)| n == name) {
            return Ok(t.clone());
        }
        match input::variable(name) {
            Some(VarType::Record(r)) => Ok(Ty::Record(r)),
            Some(VarType::Map(v)) => Ok(Ty::of_field(v)),
            None if TYPE_NAMES.contains(&name) => Ok(Ty::Other("a type")),
            None => Err(self.error(
                id,
                format!(
                    "unknown variable `{name}` (the variables are {})",
                    input::variable_names()
                ),
            )),
        }
    }

    fn select(&self, id: u64, operand: &Ty, field: &str, test: bool) -> Checked {
        match operand {
            Ty::Record(r) => match r.field(field) {
                None => Err(self.error(
                    id,
                    format!(
                        "`{}` has no field `{field}` (its fields are {})",
                        r.var,
                        r.field_names()
                    ),
                )),
                Some(_) if test => Err(self.error(
                    id,
                    format!(
                        "has({}.{field}) is always true: every field of `{}` is set (empty when \
                         unknown); compare it with '' or [] instead",
                        r.var, r.var
                    ),
                )),
                Some((_, t)) => Ok(Ty::of_field(t)),
            },
            _ if test => match operand {
                Ty::Map(_) | Ty::Dyn => Ok(Ty::Bool),
                other => Err(self.error(
                    id,
                    format!("has() needs a map, got {}", other.describe_with_article()),
                )),
            },
            Ty::Map(v) => Ok((**v).clone()),
            Ty::Dyn => Ok(Ty::Dyn),
            other => Err(self.error(
                id,
                format!(
                    "`.{field}` on {}: only maps and the records principal, tool, runtime, \
                     session and request have fields",
                    other.describe_with_article()
                ),
            )),
        }
    }

    /// `a.b.c` spelled by `e` when its root is not a variable: a function namespace.
    fn namespace(&self, e: &IdedExpr) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = e;
        loop {
            match &cur.expr {
                Expr::Ident(n) => {
                    if self.scopes.iter().any(|(s, _)| s == n) || input::variable(n).is_some() {
                        return None;
                    }
                    parts.push(n.as_str());
                    break;
                }
                Expr::Select(s) if !s.test => {
                    parts.push(s.field.as_str());
                    cur = &s.operand;
                }
                _ => return None,
            }
        }
        parts.reverse();
        Some(parts.join("."))
    }

    fn bool_operand(&mut self, e: &IdedExpr, op: &str) -> Result<(), ConditionError> {
        let t = self.check(e)?;
        if t.may_be_bool() {
            Ok(())
        } else {
            Err(self.error(
                e.id,
                format!(
                    "the operand of `{op}` is {}, not a bool",
                    t.describe_with_article()
                ),
            ))
        }
    }

    fn call(&mut self, id: u64, call: &CallExpr) -> Checked {
        let name = call.func_name.as_str();
        match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT => {
                let op = match name {
                    operators::LOGICAL_AND => "&&",
                    operators::LOGICAL_OR => "||",
                    _ => "!",
                };
                for a in &call.args {
                    self.bool_operand(a, op)?;
                }
                return Ok(Ty::Bool);
            }
            operators::NOT_STRICTLY_FALSE => {
                for a in &call.args {
                    self.check(a)?;
                }
                return Ok(Ty::Bool);
            }
            operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                for a in &call.args {
                    self.check(a)?;
                }
                return Ok(Ty::Bool);
            }
            operators::IN => {
                let mut types = Vec::new();
                for a in &call.args {
                    types.push(self.check(a)?);
                }
                if let (Some(t), Some(rhs)) = (types.get(1), call.args.get(1))
                    && !matches!(t, Ty::List(_) | Ty::Map(_) | Ty::Dyn)
                {
                    return Err(self.error(
                        rhs.id,
                        format!(
                            "`in` needs a list or a map on its right, got {}",
                            t.describe_with_article()
                        ),
                    ));
                }
                return Ok(Ty::Bool);
            }
            operators::CONDITIONAL => {
                if let [cond, yes, no] = call.args.as_slice() {
                    self.bool_operand(cond, "?:")?;
                    let a = self.check(yes)?;
                    let b = self.check(no)?;
                    return Ok(if a == b { a } else { Ty::Dyn });
                }
                return Err(self.error(id, "malformed conditional"));
            }
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO
            | operators::NEGATE => {
                let mut types = Vec::new();
                for a in &call.args {
                    types.push(self.check(a)?);
                }
                return Ok(if types.iter().all(|t| *t == Ty::Int) {
                    Ty::Int
                } else if types.contains(&Ty::Double) {
                    Ty::Double
                } else if types.contains(&Ty::Str) {
                    Ty::Str
                } else if types.iter().any(|t| matches!(t, Ty::List(_))) {
                    Ty::List(Box::new(Ty::Dyn))
                } else {
                    Ty::Other("an arithmetic result")
                });
            }
            operators::INDEX => {
                if let [container, index] = call.args.as_slice() {
                    let c = self.check(container)?;
                    self.check(index)?;
                    return match c {
                        Ty::List(t) | Ty::Map(t) => Ok(*t),
                        Ty::Record(r) => match &index.expr {
                            Expr::Literal(LiteralValue::String(f)) => {
                                self.select(id, &Ty::Record(r), f.inner(), false)
                            }
                            _ => Ok(Ty::Dyn),
                        },
                        Ty::Dyn => Ok(Ty::Dyn),
                        other => Err(self.error(
                            id,
                            format!("{} cannot be indexed", other.describe_with_article()),
                        )),
                    };
                }
                return Err(self.error(id, "malformed index"));
            }
            operators::OPT_INDEX | operators::OPT_SELECT => {
                for a in &call.args {
                    self.check(a)?;
                }
                return Ok(Ty::Other("an optional"));
            }
            _ => {}
        }

        // A namespaced function: `base64.encode(x)`, `optional.of(x)`.
        if let Some(target) = &call.target
            && let Some(ns) = self.namespace(target)
        {
            let full = format!("{ns}.{name}");
            if is_function(&full) {
                for a in &call.args {
                    self.check(a)?;
                }
                return Ok(function_type(&full));
            }
        }
        if !is_function(name) {
            return Err(self.error(id, format!("unknown function `{name}`")));
        }
        if let Some(target) = &call.target {
            self.check(target)?;
        }
        for a in &call.args {
            self.check(a)?;
        }
        Ok(function_type(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> ConditionError {
        match Condition::compile(src) {
            Ok(_) => panic!("{src:?} compiled"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_environment_builds() {
        assert!(build_env().is_ok());
        assert!(is_function("size"));
        assert!(is_function("lowerAscii"));
        assert!(!is_function("no_such_function"));
    }

    #[test]
    fn valid_conditions_compile() {
        for src in [
            "true",
            "principal.tenant_id == 'acme'",
            "'admin' in principal.roles",
            "tool.risk_assessment == 'HIGH' && runtime.deployment_environment != 'PROD'",
            "has(args.text) && args.text.matches('(?i)password')",
            "args.amount > 500",
            "args.exists(k, k.startsWith('x'))",
            "principal.roles.all(r, r != 'guest')",
            "request.time.getHours('Europe/Paris') < 9",
            "size(principal.claims) > 0 || principal.claims.dept == 'x'",
            "usage['calls'] > 100.0",
            "args.amount",
            "[1, 2].map(x, x * 2)[0] == 2",
            "optional.of(1).hasValue()",
            "tool.name.lowerAscii().startsWith('billing')",
            "principal['tenant_id'] == 'acme'",
        ] {
            if let Err(e) = Condition::compile(src) {
                panic!("{src:?}: {e}");
            }
        }
    }

    #[test]
    fn a_syntax_error_has_its_position() {
        let e = err("principal.tenant_id == ");
        assert_eq!((e.line, e.column), (1, 24), "{e}");
        assert!(e.reason.starts_with("syntax"), "{e}");
        let e = err("tool.name == 'x' && @y");
        assert_eq!((e.line, e.column), (1, 21), "{e}");
        let e = err("(true");
        assert_eq!((e.line, e.column), (1, 6), "{e}");
        let e = err("true &&\n  (principal.roles");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn an_unknown_variable_is_refused_where_it_is() {
        let e = err("principal.tenant_id == 'a' && user.id == 'b'");
        assert_eq!((e.line, e.column), (1, 31), "{e}");
        assert!(e.reason.contains("unknown variable `user`"), "{e}");
        assert!(e.snippet.contains("^"), "{e:?}");
        // A comprehension's own variable is fine inside it, unknown outside.
        assert!(Condition::compile("principal.roles.exists(r, r == 'x')").is_ok());
        let e = err("principal.roles.exists(r, r == 'x') && r == 'y'");
        assert!(e.reason.contains("unknown variable `r`"), "{e}");
    }

    #[test]
    fn an_unknown_field_of_a_record_is_refused() {
        let e = err("principal.role == 'admin'");
        assert!(e.reason.contains("no field `role`"), "{e}");
        assert!(e.reason.contains("roles"), "{e}");
        let e = err("has(principal.roles)");
        assert!(e.reason.contains("always true"), "{e}");
    }

    #[test]
    fn a_condition_that_cannot_be_a_bool_is_refused() {
        for (src, what) in [
            ("principal.principal_id", "a string"),
            ("1 + 2", "an int"),
            ("'a'", "a string"),
            ("principal.roles", "a list"),
            ("principal", "the record `principal`"),
            ("size(args)", "an int"),
            ("null", "null"),
        ] {
            let e = err(src);
            assert!(e.reason.contains(what), "{src}: {e}");
            assert!(e.reason.contains("not a bool"), "{src}: {e}");
        }
        let e = err("principal.tenant_id && true");
        assert!(e.reason.contains("operand of `&&`"), "{e}");
        let e = err("'x' in principal.principal_id");
        assert!(e.reason.contains("`in` needs a list or a map"), "{e}");
        let e = err("principal.tenant_id.size == 1");
        assert!(e.reason.contains("`.size` on a string"), "{e}");
    }

    #[test]
    fn unknown_functions_and_bad_patterns_are_refused() {
        let e = err("matchs(args.text, 'x')");
        assert!(e.reason.contains("unknown function `matchs`"), "{e}");
        let e = err("args.text.matches('(unclosed')");
        assert_eq!(e.reason, "not a valid regular expression: unclosed group");
        assert_eq!(e.column, 19, "{e}");
    }

    #[test]
    fn literal_patterns_are_compiled_once() {
        let c = Condition::compile("args.a.matches('x+') || matches(args.b, 'y')")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.patterns.len(), 2);
        assert_eq!(c.patterns[0].1.0.as_str(), "x+");
        let c = Condition::compile("args.anyStringMatches('z')").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.patterns.len(), 1);
        let e = err("args.anyStringMatches('[')");
        assert!(e.reason.contains("not a valid regular expression"), "{e}");
        // A pattern that is not a literal is left to the standard `matches`.
        let c = Condition::compile("args.a.matches(args.p)").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.patterns.is_empty());
    }
}

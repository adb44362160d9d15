//! ADM (ALTAR Data Model) support: the host's tool manifest and argument validation.
//!
//! * [`parse_manifest`] reads a manifest of trusted contracts (YAML, or the same document as
//!   JSON) into ADM [`FunctionDeclaration`]s and checks every ADM rule on them.
//! * [`validate_declaration`] checks one declaration that did not come from a manifest file
//!   (for example one submitted through a management API).
//! * [`validate_args`] checks a call's `args` against a declaration's `parameters`.
//! * [`json_to_struct`], [`json_to_value`], [`value_to_json`], [`struct_to_json`] convert
//!   between JSON and the `google.protobuf.Struct`/`Value` that carry ADM values on the wire.
//!
//! Error texts name the contract, the field path and what was expected, e.g.
//! `contracts[2] (add): parameters.properties.b.type: expected one of STRING, NUMBER, INTEGER,
//! BOOLEAN, ARRAY, OBJECT, got "FLOAT"` or `args.items[2].name: expected STRING, got number`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use prost_types::value::Kind;
use serde::Deserialize;

use crate::proto::adm::{FunctionDeclaration, Schema, SchemaType};

/// The example manifest with the demo tools (`echo`, `add`, `count`, `fail`, `get_weather`).
pub const EXAMPLE_MANIFEST: &str = include_str!("../policies/grid-manifest.yaml");

/// Deepest nesting accepted in a schema and in call arguments (the `args` object is level 1).
pub const MAX_DEPTH: usize = 32;

/// Deepest nesting [`json_to_value`] converts (guards the recursion, not an ADM rule).
const MAX_CONVERT_DEPTH: usize = 128;

const TYPE_NAMES: &str = "STRING, NUMBER, INTEGER, BOOLEAN, ARRAY, OBJECT";

// ------------------------------------------------------------------------------------ errors

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// The file could not be read.
    Io { path: String, message: String },
    /// The text is not YAML/JSON of the manifest's shape (syntax, unknown or missing key, wrong
    /// value type). The message carries serde's field path and the line and column.
    Syntax(String),
    /// The document has the right shape but breaks an ADM rule.
    Invalid {
        /// Index and name of the offending contract; `None` for manifest-level problems.
        contract: Option<(usize, String)>,
        /// Field path inside the contract (or the manifest), e.g. `parameters.properties.b.type`.
        path: String,
        /// What was expected and what was found.
        message: String,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Io { path, message } => {
                write!(f, "cannot read manifest {path}: {message}")
            }
            ManifestError::Syntax(message) => write!(f, "{message}"),
            ManifestError::Invalid {
                contract,
                path,
                message,
            } => {
                if let Some((index, name)) = contract {
                    write!(f, "contracts[{index}] ({name}): ")?;
                }
                if path.is_empty() {
                    write!(f, "{message}")
                } else {
                    write!(f, "{path}: {message}")
                }
            }
        }
    }
}

impl std::error::Error for ManifestError {}

/// A declaration that breaks an ADM rule: `path` inside the declaration, e.g. `parameters.type`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DeclarationError {
    pub path: String,
    pub message: String,
}

/// Call arguments that do not conform to the contract: `path` like `args.items[2].name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ArgError {
    pub path: String,
    pub message: String,
}

fn decl_err(path: &str, message: impl Into<String>) -> DeclarationError {
    DeclarationError {
        path: path.to_string(),
        message: message.into(),
    }
}

// ------------------------------------------------------------------------------------ manifest

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestDoc {
    manifest_version: String,
    contracts: Vec<ContractDoc>,
    /// ADM ToolManifest's free-form metadata; accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    global_metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractDoc {
    name: String,
    description: String,
    /// Omitted means "no parameters" (an empty OBJECT).
    #[serde(default)]
    parameters: Option<SchemaDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaDoc {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    properties: Option<UniqueMap>,
    #[serde(default)]
    required: Option<Vec<String>>,
    #[serde(default)]
    items: Option<Box<SchemaDoc>>,
    #[serde(default, rename = "enum")]
    enum_values: Option<Vec<String>>,
}

/// A mapping that refuses duplicate keys (a plain map would keep the last one silently).
#[derive(Debug)]
struct UniqueMap(BTreeMap<String, SchemaDoc>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of property names to schemas")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate property {key:?}"
                        )));
                    }
                    let value: SchemaDoc = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Parses and validates a manifest (YAML, or JSON) into the host's trusted declarations, in
/// file order.
pub fn parse_manifest(text: &str) -> Result<Vec<FunctionDeclaration>, ManifestError> {
    let doc: ManifestDoc = match serde_norway::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            return Err(ManifestError::Syntax(name_contract_in(
                text,
                &e.to_string(),
            )));
        }
    };

    if !is_semver_core(&doc.manifest_version) {
        return Err(ManifestError::Invalid {
            contract: None,
            path: "manifest_version".into(),
            message: format!(
                "expected MAJOR.MINOR.PATCH (digits only, e.g. \"1.0.0\"), got {:?}",
                doc.manifest_version
            ),
        });
    }
    if doc.contracts.is_empty() {
        return Err(ManifestError::Invalid {
            contract: None,
            path: "contracts".into(),
            message: "expected at least one contract, got none".into(),
        });
    }

    let mut out = Vec::with_capacity(doc.contracts.len());
    for (index, contract) in doc.contracts.iter().enumerate() {
        let in_contract = |e: DeclarationError| ManifestError::Invalid {
            contract: Some((index, contract.name.clone())),
            path: e.path,
            message: e.message,
        };
        let parameters = match &contract.parameters {
            Some(schema) => schema_from_doc(schema, "parameters", 1).map_err(in_contract)?,
            None => empty_object_schema(),
        };
        let decl = FunctionDeclaration {
            name: contract.name.clone(),
            description: contract.description.clone(),
            parameters: Some(parameters),
        };
        validate_declaration(&decl).map_err(in_contract)?;
        out.push(decl);
    }
    check_unique_names(&out)?;
    Ok(out)
}

/// Reads and parses a manifest file (see [`parse_manifest`]).
pub fn load_manifest(path: &Path) -> Result<Vec<FunctionDeclaration>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse_manifest(&text)
}

/// The declarations of [`EXAMPLE_MANIFEST`].
pub fn example_manifest() -> Vec<FunctionDeclaration> {
    // The example is compiled in and covered by a unit test; an empty list is never served
    // because the host refuses an empty manifest.
    parse_manifest(EXAMPLE_MANIFEST).unwrap_or_default()
}

/// Validates a set of declarations that did not come through [`parse_manifest`]: at least one,
/// each valid, names unique.
pub fn validate_declarations(decls: &[FunctionDeclaration]) -> Result<(), ManifestError> {
    if decls.is_empty() {
        return Err(ManifestError::Invalid {
            contract: None,
            path: "contracts".into(),
            message: "expected at least one contract, got none".into(),
        });
    }
    for (index, decl) in decls.iter().enumerate() {
        validate_declaration(decl).map_err(|e| ManifestError::Invalid {
            contract: Some((index, decl.name.clone())),
            path: e.path,
            message: e.message,
        })?;
    }
    check_unique_names(decls)
}

fn check_unique_names(decls: &[FunctionDeclaration]) -> Result<(), ManifestError> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, decl) in decls.iter().enumerate() {
        if let Some(first) = seen.insert(decl.name.as_str(), index) {
            return Err(ManifestError::Invalid {
                contract: Some((index, decl.name.clone())),
                path: "name".into(),
                message: format!(
                    "expected a unique contract name, got {:?} again (first at contracts[{first}])",
                    decl.name
                ),
            });
        }
    }
    Ok(())
}

/// serde's messages start with the path (`contracts[2].parameters...: ...`); add the contract's
/// name when the document is readable generically, so every error names its contract.
fn name_contract_in(text: &str, message: &str) -> String {
    let Some(rest) = message.strip_prefix("contracts[") else {
        return message.to_string();
    };
    let Some(close) = rest.find(']') else {
        return message.to_string();
    };
    let Ok(index) = rest[..close].parse::<usize>() else {
        return message.to_string();
    };
    let name = serde_norway::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            v.get("contracts")?
                .get(index)?
                .get("name")?
                .as_str()
                .map(str::to_string)
        });
    match name {
        Some(name) => {
            let tail = &rest[close + 1..];
            let tail = tail
                .strip_prefix('.')
                .or_else(|| tail.strip_prefix(": "))
                .unwrap_or(tail);
            format!("contracts[{index}] ({name}): {tail}")
        }
        None => message.to_string(),
    }
}

fn is_semver_core(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn empty_object_schema() -> Schema {
    Schema {
        r#type: SchemaType::Object as i32,
        ..Default::default()
    }
}

/// Converts one YAML schema, checking what only the document can show (the type's spelling and
/// keys that are present but empty); everything else is left to [`validate_declaration`].
fn schema_from_doc(doc: &SchemaDoc, path: &str, depth: usize) -> Result<Schema, DeclarationError> {
    if depth > MAX_DEPTH {
        return Err(decl_err(
            path,
            format!("schema nesting exceeds the maximum depth of {MAX_DEPTH}"),
        ));
    }
    let ty = SchemaType::from_str_name(&doc.ty)
        .filter(|t| *t != SchemaType::Unspecified)
        .ok_or_else(|| {
            decl_err(
                &format!("{path}.type"),
                format!("expected one of {TYPE_NAMES}, got {:?}", doc.ty),
            )
        })?;
    if ty != SchemaType::Object {
        if doc.properties.is_some() {
            return Err(decl_err(
                &format!("{path}.properties"),
                format!("only allowed when type is OBJECT, got type {}", doc.ty),
            ));
        }
        if doc.required.is_some() {
            return Err(decl_err(
                &format!("{path}.required"),
                format!("only allowed when type is OBJECT, got type {}", doc.ty),
            ));
        }
    }
    if ty != SchemaType::Array && doc.items.is_some() {
        return Err(decl_err(
            &format!("{path}.items"),
            format!("only allowed when type is ARRAY, got type {}", doc.ty),
        ));
    }
    if let Some(values) = &doc.enum_values {
        if ty != SchemaType::String {
            return Err(decl_err(
                &format!("{path}.enum"),
                format!("only allowed when type is STRING, got type {}", doc.ty),
            ));
        }
        if values.is_empty() {
            return Err(decl_err(
                &format!("{path}.enum"),
                "expected at least one allowed value, got an empty list",
            ));
        }
    }

    let mut properties = std::collections::BTreeMap::new();
    if let Some(UniqueMap(props)) = &doc.properties {
        for (key, sub) in props {
            let sub_path = format!("{path}.properties.{key}");
            properties.insert(key.clone(), schema_from_doc(sub, &sub_path, depth + 1)?);
        }
    }
    let items = match &doc.items {
        Some(sub) => Some(Box::new(schema_from_doc(
            sub,
            &format!("{path}.items"),
            depth + 1,
        )?)),
        None => None,
    };
    Ok(Schema {
        r#type: ty as i32,
        description: doc.description.clone().unwrap_or_default(),
        properties,
        required: doc.required.clone().unwrap_or_default(),
        items,
        enum_values: doc.enum_values.clone().unwrap_or_default(),
    })
}

/// Checks one declaration against the ADM rules: name pattern, non-blank description, and a
/// parameter schema that is an OBJECT whose every nested schema is well formed.
pub fn validate_declaration(decl: &FunctionDeclaration) -> Result<(), DeclarationError> {
    if !is_valid_name(&decl.name) {
        return Err(decl_err(
            "name",
            format!(
                "expected a name matching ^[a-zA-Z_][a-zA-Z0-9_-]{{0,63}}$, got {:?}",
                decl.name
            ),
        ));
    }
    if decl.description.trim().is_empty() {
        return Err(decl_err(
            "description",
            "expected a non-blank description, got a blank one",
        ));
    }
    if let Some(params) = &decl.parameters {
        if params.r#type != SchemaType::Object as i32 {
            return Err(decl_err(
                "parameters.type",
                format!(
                    "expected OBJECT (a function's parameters are an object), got {}",
                    type_name(params.r#type)
                ),
            ));
        }
        validate_schema(params, "parameters", 1)?;
    }
    Ok(())
}

/// The ADM name rule `^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$` (declarations and calls).
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphabetic() || *first == b'_' => {}
        _ => return false,
    }
    bytes.len() <= 64
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

fn type_name(t: i32) -> String {
    match SchemaType::try_from(t) {
        Ok(SchemaType::Unspecified) => "no type (SCHEMA_TYPE_UNSPECIFIED)".to_string(),
        Ok(t) => t.as_str_name().to_string(),
        Err(_) => format!("unknown type number {t}"),
    }
}

fn validate_schema(schema: &Schema, path: &str, depth: usize) -> Result<(), DeclarationError> {
    if depth > MAX_DEPTH {
        return Err(decl_err(
            path,
            format!("schema nesting exceeds the maximum depth of {MAX_DEPTH}"),
        ));
    }
    let ty = match SchemaType::try_from(schema.r#type) {
        Ok(SchemaType::Unspecified) | Err(_) => {
            return Err(decl_err(
                &format!("{path}.type"),
                format!(
                    "expected one of {TYPE_NAMES}, got {}",
                    type_name(schema.r#type)
                ),
            ));
        }
        Ok(t) => t,
    };
    let tn = ty.as_str_name();
    if ty != SchemaType::Object {
        if !schema.properties.is_empty() {
            return Err(decl_err(
                &format!("{path}.properties"),
                format!("only allowed when type is OBJECT, got type {tn}"),
            ));
        }
        if !schema.required.is_empty() {
            return Err(decl_err(
                &format!("{path}.required"),
                format!("only allowed when type is OBJECT, got type {tn}"),
            ));
        }
    }
    if ty != SchemaType::String && !schema.enum_values.is_empty() {
        return Err(decl_err(
            &format!("{path}.enum"),
            format!("only allowed when type is STRING, got type {tn}"),
        ));
    }
    match (ty, &schema.items) {
        (SchemaType::Array, None) => {
            return Err(decl_err(
                &format!("{path}.items"),
                "expected a schema for the elements (ARRAY requires items), got none",
            ));
        }
        (SchemaType::Array, Some(_)) | (_, None) => {}
        (_, Some(_)) => {
            return Err(decl_err(
                &format!("{path}.items"),
                format!("only allowed when type is ARRAY, got type {tn}"),
            ));
        }
    }

    let mut seen = HashSet::new();
    for (i, value) in schema.enum_values.iter().enumerate() {
        if !seen.insert(value.as_str()) {
            return Err(decl_err(
                &format!("{path}.enum[{i}]"),
                format!("expected unique values, got {value:?} twice"),
            ));
        }
    }
    let mut seen = HashSet::new();
    for (i, key) in schema.required.iter().enumerate() {
        if !seen.insert(key.as_str()) {
            return Err(decl_err(
                &format!("{path}.required[{i}]"),
                format!("expected unique names, got {key:?} twice"),
            ));
        }
        if !schema.properties.contains_key(key) {
            let known: Vec<&str> = sorted_keys(&schema.properties);
            return Err(decl_err(
                &format!("{path}.required[{i}]"),
                format!(
                    "expected a key of properties ({}), got {key:?}",
                    if known.is_empty() {
                        "none declared".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    for key in sorted_keys(&schema.properties) {
        if key.is_empty() {
            return Err(decl_err(
                &format!("{path}.properties"),
                "expected non-empty property names, got \"\"",
            ));
        }
        if let Some(sub) = schema.properties.get(key) {
            validate_schema(sub, &format!("{path}.properties.{key}"), depth + 1)?;
        }
    }
    if let Some(items) = &schema.items {
        validate_schema(items, &format!("{path}.items"), depth + 1)?;
    }
    Ok(())
}

fn sorted_keys<V>(map: &std::collections::BTreeMap<String, V>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

// ------------------------------------------------------------------------------------ args

/// Validates a call's `args` against the declaration's `parameters` (missing args = `{}`).
///
/// STRING (exact `enum` match when set), NUMBER any finite number, INTEGER a whole number in
/// the i64 range (`5.0` accepted), BOOLEAN, ARRAY elements against `items`, OBJECT non-null with
/// `required` present and known keys checked recursively (extra keys accepted). `null` fails
/// every type. Nesting deeper than [`MAX_DEPTH`] is an error.
pub fn validate_args(
    decl: &FunctionDeclaration,
    args: Option<&prost_types::Struct>,
) -> Result<(), ArgError> {
    validate(decl, args, Extra::Accept)
}

/// [`validate_args`] as the sidecar applies it to a governed contract: the same rules, and a
/// key an OBJECT's `properties` do not declare is refused, at every depth (the approved
/// declaration is the whole of what may reach the host).
pub fn validate_args_strict(
    decl: &FunctionDeclaration,
    args: Option<&prost_types::Struct>,
) -> Result<(), ArgError> {
    validate(decl, args, Extra::Refuse)
}

/// What an OBJECT does with a key its `properties` do not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    Accept,
    Refuse,
}

fn validate(
    decl: &FunctionDeclaration,
    args: Option<&prost_types::Struct>,
    extra: Extra,
) -> Result<(), ArgError> {
    let empty = prost_types::Struct::default();
    let args = args.unwrap_or(&empty);
    match &decl.parameters {
        Some(schema) => check_object(schema, &args.fields, "args", 1, extra),
        // No declared parameters: an empty OBJECT; it accepts any keys unless strict.
        None => match (extra, args.fields.keys().next()) {
            (Extra::Refuse, Some(key)) => Err(arg_err(
                &child_path("args", key),
                "the contract declares no parameters",
            )),
            _ => Ok(()),
        },
    }
}

fn arg_err(path: &str, message: impl Into<String>) -> ArgError {
    ArgError {
        path: path.to_string(),
        message: message.into(),
    }
}

fn child_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !key.as_bytes()[0].is_ascii_digit();
    if plain {
        format!("{path}.{key}")
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""));
        format!("{path}[{quoted}]")
    }
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None | Some(Kind::NullValue(_)) => "null",
        Some(Kind::BoolValue(_)) => "boolean",
        Some(Kind::NumberValue(_)) => "number",
        Some(Kind::StringValue(_)) => "string",
        Some(Kind::ListValue(_)) => "array",
        Some(Kind::StructValue(_)) => "object",
    }
}

fn check_value(
    schema: &Schema,
    value: &prost_types::Value,
    path: &str,
    depth: usize,
    extra: Extra,
) -> Result<(), ArgError> {
    if depth > MAX_DEPTH {
        return Err(arg_err(
            path,
            format!("nesting exceeds the maximum depth of {MAX_DEPTH}"),
        ));
    }
    let kind = value.kind.as_ref();
    let ty = match SchemaType::try_from(schema.r#type) {
        Ok(SchemaType::Unspecified) | Err(_) => {
            // Fail closed on a contract that was never validated.
            return Err(arg_err(
                path,
                format!(
                    "the contract's schema has {}, nothing can match it",
                    type_name(schema.r#type)
                ),
            ));
        }
        Ok(t) => t,
    };
    let mismatch = || {
        arg_err(
            path,
            format!("expected {}, got {}", ty.as_str_name(), kind_name(kind)),
        )
    };
    match ty {
        SchemaType::String => {
            let Some(Kind::StringValue(s)) = kind else {
                return Err(mismatch());
            };
            if !schema.enum_values.is_empty() && !schema.enum_values.iter().any(|e| e == s) {
                let allowed: Vec<String> = schema
                    .enum_values
                    .iter()
                    .map(|e| format!("{e:?}"))
                    .collect();
                return Err(arg_err(
                    path,
                    format!("expected one of {}, got {s:?}", allowed.join(", ")),
                ));
            }
            Ok(())
        }
        SchemaType::Number => {
            let Some(Kind::NumberValue(n)) = kind else {
                return Err(mismatch());
            };
            if !n.is_finite() {
                return Err(arg_err(path, format!("expected a finite NUMBER, got {n}")));
            }
            Ok(())
        }
        SchemaType::Integer => {
            let Some(Kind::NumberValue(n)) = kind else {
                return Err(mismatch());
            };
            if !n.is_finite() || n.fract() != 0.0 {
                return Err(arg_err(
                    path,
                    format!("expected INTEGER (a whole number), got {n}"),
                ));
            }
            // [-2^63, 2^63 - 1]: 2^63 itself is the first f64 above the range.
            if *n < -9_223_372_036_854_775_808.0 || *n >= 9_223_372_036_854_775_808.0 {
                return Err(arg_err(
                    path,
                    format!("expected INTEGER within the signed 64-bit range, got {n}"),
                ));
            }
            Ok(())
        }
        SchemaType::Boolean => match kind {
            Some(Kind::BoolValue(_)) => Ok(()),
            _ => Err(mismatch()),
        },
        SchemaType::Array => {
            let Some(Kind::ListValue(list)) = kind else {
                return Err(mismatch());
            };
            if let Some(items) = &schema.items {
                for (i, element) in list.values.iter().enumerate() {
                    check_value(items, element, &format!("{path}[{i}]"), depth + 1, extra)?;
                }
            }
            Ok(())
        }
        SchemaType::Object => {
            let Some(Kind::StructValue(object)) = kind else {
                return Err(mismatch());
            };
            check_object(schema, &object.fields, path, depth, extra)
        }
        SchemaType::Unspecified => Err(mismatch()),
    }
}

fn check_object(
    schema: &Schema,
    fields: &BTreeMap<String, prost_types::Value>,
    path: &str,
    depth: usize,
    extra: Extra,
) -> Result<(), ArgError> {
    if depth > MAX_DEPTH {
        return Err(arg_err(
            path,
            format!("nesting exceeds the maximum depth of {MAX_DEPTH}"),
        ));
    }
    if schema.r#type != SchemaType::Object as i32 {
        return Err(arg_err(
            path,
            format!("expected {}, got object", type_name(schema.r#type)),
        ));
    }
    for key in &schema.required {
        if !fields.contains_key(key) {
            return Err(arg_err(
                &child_path(path, key),
                "required property is missing",
            ));
        }
    }
    // BTreeMap: deterministic order, so the first error reported is stable.
    for (key, value) in fields {
        match schema.properties.get(key) {
            Some(sub) => check_value(sub, value, &child_path(path, key), depth + 1, extra)?,
            None if extra == Extra::Refuse => {
                let known = sorted_keys(&schema.properties);
                return Err(arg_err(
                    &child_path(path, key),
                    if known.is_empty() {
                        "not declared: this object declares no properties".to_string()
                    } else {
                        format!("not declared: expected one of {}", known.join(", "))
                    },
                ));
            }
            None => {}
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ JSON

/// JSON object → `google.protobuf.Struct`. Anything but an object is refused.
pub fn json_to_struct(v: &serde_json::Value) -> Result<prost_types::Struct, String> {
    match v {
        serde_json::Value::Object(map) => object_to_struct(map, 1),
        other => Err(format!(
            "expected a JSON object, got {}",
            json_kind_name(other)
        )),
    }
}

/// JSON value → `google.protobuf.Value` (numbers become doubles).
pub fn json_to_value(v: &serde_json::Value) -> Result<prost_types::Value, String> {
    json_to_value_at(v, 1)
}

fn json_kind_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn object_to_struct(
    map: &serde_json::Map<String, serde_json::Value>,
    depth: usize,
) -> Result<prost_types::Struct, String> {
    let mut fields = BTreeMap::new();
    for (k, v) in map {
        fields.insert(k.clone(), json_to_value_at(v, depth + 1)?);
    }
    Ok(prost_types::Struct { fields })
}

fn json_to_value_at(v: &serde_json::Value, depth: usize) -> Result<prost_types::Value, String> {
    if depth > MAX_CONVERT_DEPTH {
        return Err(format!(
            "JSON nesting exceeds the maximum depth of {MAX_CONVERT_DEPTH}"
        ));
    }
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) => Kind::NumberValue(f),
            None => return Err(format!("number {n} cannot be represented as a double")),
        },
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                values.push(json_to_value_at(item, depth + 1)?);
            }
            Kind::ListValue(prost_types::ListValue { values })
        }
        serde_json::Value::Object(map) => Kind::StructValue(object_to_struct(map, depth)?),
    };
    Ok(prost_types::Value { kind: Some(kind) })
}

/// `google.protobuf.Value` → JSON. Whole numbers up to 2^53 become JSON integers; NaN and
/// infinities (not representable in JSON) become `null`, as does a Value with no kind.
pub fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// `google.protobuf.Struct` → JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn number_to_json(n: f64) -> serde_json::Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.is_finite() && n.fract() == 0.0 && n.abs() <= EXACT {
        // Exact: |n| <= 2^53 fits i64 without rounding.
        serde_json::Value::Number(serde_json::Number::from(n as i64))
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

// ------------------------------------------------------------------------------------ tests

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl_from(yaml_params: serde_json::Value) -> FunctionDeclaration {
        let doc = json!({
            "manifest_version": "1.0.0",
            "contracts": [{ "name": "t", "description": "test", "parameters": yaml_params }]
        });
        let decls = parse_manifest(&doc.to_string()).unwrap();
        decls.into_iter().next().unwrap()
    }

    fn args(v: serde_json::Value) -> prost_types::Struct {
        json_to_struct(&v).unwrap()
    }

    fn check(decl: &FunctionDeclaration, v: serde_json::Value) -> Result<(), ArgError> {
        validate_args(decl, Some(&args(v)))
    }

    fn manifest_err(text: &str) -> String {
        parse_manifest(text).unwrap_err().to_string()
    }

    fn one_contract(contract: serde_json::Value) -> String {
        json!({"manifest_version": "1.0.0", "contracts": [contract]}).to_string()
    }

    // ---------------------------------------------------------------- manifest

    #[test]
    fn example_manifest_parses_with_the_demo_tools() {
        let decls = parse_manifest(EXAMPLE_MANIFEST).unwrap();
        let names: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["echo", "add", "count", "fail", "get_weather"]);
        assert_eq!(example_manifest(), decls);
        let weather = &decls[4];
        let params = weather.parameters.as_ref().unwrap();
        assert_eq!(params.required, ["city"]);
        assert_eq!(
            params.properties["units"].enum_values,
            ["metric", "imperial"]
        );
        assert_eq!(params.properties["units"].r#type, SchemaType::String as i32);
        let count = &decls[2].parameters.as_ref().unwrap().properties["n"];
        assert_eq!(count.r#type, SchemaType::Integer as i32);
        let fail = decls[3].parameters.as_ref().unwrap();
        assert_eq!(fail.r#type, SchemaType::Object as i32);
        assert!(fail.properties.is_empty());
    }

    #[test]
    fn manifest_as_json_is_accepted_and_nested_schemas_convert() {
        let d = decl_from(json!({
            "type": "OBJECT",
            "properties": {
                "items": {"type": "ARRAY", "items": {"type": "OBJECT",
                    "properties": {"name": {"type": "STRING", "description": "n"}},
                    "required": ["name"]}}
            }
        }));
        let items = &d.parameters.as_ref().unwrap().properties["items"];
        assert_eq!(items.r#type, SchemaType::Array as i32);
        let el = items.items.as_ref().unwrap();
        assert_eq!(el.required, ["name"]);
        assert_eq!(el.properties["name"].description, "n");
    }

    #[test]
    fn parameters_may_be_omitted() {
        let text = one_contract(json!({"name": "noargs", "description": "x"}));
        let d = parse_manifest(&text).unwrap();
        assert_eq!(
            d[0].parameters.as_ref().unwrap().r#type,
            SchemaType::Object as i32
        );
    }

    #[test]
    fn bad_type_names_contract_path_and_choices() {
        let text = json!({"manifest_version": "1.0.0", "contracts": [
            {"name": "a", "description": "x"},
            {"name": "b", "description": "x"},
            {"name": "add", "description": "x", "parameters": {"type": "OBJECT",
                "properties": {"a": {"type": "NUMBER"}, "b": {"type": "FLOAT"}}}}
        ]})
        .to_string();
        assert_eq!(
            manifest_err(&text),
            "contracts[2] (add): parameters.properties.b.type: expected one of STRING, NUMBER, \
             INTEGER, BOOLEAN, ARRAY, OBJECT, got \"FLOAT\""
        );
    }

    #[test]
    fn lowercase_type_is_refused() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "object"}})));
        assert!(
            e.starts_with("contracts[0] (t): parameters.type: expected one of"),
            "{e}"
        );
        assert!(e.contains("got \"object\""), "{e}");
    }

    #[test]
    fn parameters_must_be_an_object() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "STRING"}})));
        assert_eq!(
            e,
            "contracts[0] (t): parameters.type: expected OBJECT (a function's parameters are an \
             object), got STRING"
        );
    }

    #[test]
    fn name_pattern() {
        for good in ["a", "_x", "get_weather", "A-b_9", &"a".repeat(64)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "9abc", "-abc", "a b", "a.b", "é", &"a".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        let e = manifest_err(&one_contract(json!({"name": "9lives", "description": "x"})));
        assert!(
            e.starts_with("contracts[0] (9lives): name: expected a name matching"),
            "{e}"
        );
    }

    #[test]
    fn description_must_not_be_blank() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "  \n\t"})));
        assert_eq!(
            e,
            "contracts[0] (t): description: expected a non-blank description, got a blank one"
        );
    }

    #[test]
    fn names_must_be_unique() {
        let text = json!({"manifest_version": "1.0.0", "contracts": [
            {"name": "a", "description": "x"}, {"name": "b", "description": "x"},
            {"name": "a", "description": "y"}]})
        .to_string();
        let e = manifest_err(&text);
        assert!(
            e.starts_with("contracts[2] (a): name: expected a unique"),
            "{e}"
        );
        assert!(e.contains("contracts[0]"), "{e}");
        // Case-sensitive: "A" and "a" are different contracts.
        let text = json!({"manifest_version": "1.0.0", "contracts": [
            {"name": "a", "description": "x"}, {"name": "A", "description": "x"}]})
        .to_string();
        assert_eq!(parse_manifest(&text).unwrap().len(), 2);
    }

    #[test]
    fn at_least_one_contract() {
        let e = manifest_err(r#"{"manifest_version": "1.0.0", "contracts": []}"#);
        assert_eq!(e, "contracts: expected at least one contract, got none");
        assert!(validate_declarations(&[]).is_err());
    }

    #[test]
    fn manifest_version_is_checked() {
        let e = manifest_err(r#"{"manifest_version": "1.0", "contracts": []}"#);
        assert!(
            e.starts_with("manifest_version: expected MAJOR.MINOR.PATCH"),
            "{e}"
        );
        let e = manifest_err(r#"{"contracts": [{"name": "a", "description": "x"}]}"#);
        assert!(e.contains("manifest_version"), "{e}");
    }

    #[test]
    fn required_must_name_properties() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}},
                           "required": ["a", "b"]}})));
        assert_eq!(
            e,
            "contracts[0] (t): parameters.required[1]: expected a key of properties (a), got \"b\""
        );
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}},
                           "required": ["a", "a"]}})));
        assert!(
            e.contains("parameters.required[1]: expected unique names"),
            "{e}"
        );
    }

    #[test]
    fn array_needs_items() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"l": {"type": "ARRAY"}}}})));
        assert!(
            e.starts_with("contracts[0] (t): parameters.properties.l.items: expected a schema"),
            "{e}"
        );
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"l": {"type": "STRING",
                "items": {"type": "STRING"}}}}})));
        assert!(
            e.contains("parameters.properties.l.items: only allowed when type is ARRAY"),
            "{e}"
        );
    }

    #[test]
    fn enum_rules() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"n": {"type": "INTEGER",
                "enum": ["1"]}}}})));
        assert!(
            e.contains(
                "parameters.properties.n.enum: only allowed when type is STRING, got type INTEGER"
            ),
            "{e}"
        );
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"u": {"type": "STRING",
                "enum": []}}}})));
        assert!(
            e.contains("parameters.properties.u.enum: expected at least one allowed value"),
            "{e}"
        );
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"u": {"type": "STRING",
                "enum": ["a", "b", "a"]}}}})));
        assert!(
            e.contains("parameters.properties.u.enum[2]: expected unique values, got \"a\" twice"),
            "{e}"
        );
    }

    #[test]
    fn properties_and_required_only_on_object() {
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"s": {"type": "STRING",
                "properties": {}}}}})));
        assert!(
            e.contains("parameters.properties.s.properties: only allowed when type is OBJECT"),
            "{e}"
        );
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"s": {"type": "STRING",
                "required": []}}}})));
        assert!(
            e.contains("parameters.properties.s.required: only allowed when type is OBJECT"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let text = "manifest_version: \"1.0.0\"\ncontracts:\n  - name: echo\n    description: d\n    parameters:\n      type: OBJECT\n      properties:\n        text: { type: STRING, fromat: x }\n";
        let e = manifest_err(text);
        assert!(
            e.starts_with(
                "contracts[0] (echo): parameters.properties.text: unknown field `fromat`"
            ),
            "{e}"
        );
        let e = manifest_err("manifest_version: \"1.0.0\"\nextra: 1\ncontracts: []\n");
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = manifest_err(&one_contract(
            json!({"name": "t", "description": "x", "returns": {}}),
        ));
        assert!(
            e.starts_with("contracts[0] (t): unknown field `returns`"),
            "{e}"
        );
    }

    #[test]
    fn shape_errors_are_syntax_errors_with_a_path() {
        let e = parse_manifest("manifest_version: \"1.0.0\"\ncontracts:\n  - name: t\n    description: x\n    parameters: { type: OBJECT, required: text }\n")
            .unwrap_err();
        assert!(matches!(e, ManifestError::Syntax(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with("contracts[0] (t): parameters.required: invalid type"),
            "{e}"
        );
        let e = manifest_err("contracts: [unterminated");
        assert!(!e.is_empty());
        let e = manifest_err(&one_contract(json!({"name": "t"})));
        assert!(e.contains("missing field `description`"), "{e}");
    }

    #[test]
    fn duplicate_property_keys_are_refused() {
        let e = manifest_err(
            "manifest_version: \"1.0.0\"\ncontracts:\n  - name: t\n    description: x\n    parameters: { type: OBJECT, properties: {a: {type: STRING}, a: {type: NUMBER}} }\n",
        );
        assert!(
            e.starts_with("contracts[0] (t): parameters.properties: duplicate property \"a\""),
            "{e}"
        );
    }

    #[test]
    fn schema_depth_is_limited() {
        let mut schema = json!({"type": "STRING"});
        for _ in 0..40 {
            schema = json!({"type": "ARRAY", "items": schema});
        }
        let e = manifest_err(&one_contract(json!({"name": "t", "description": "x",
            "parameters": {"type": "OBJECT", "properties": {"deep": schema}}})));
        assert!(
            e.contains("schema nesting exceeds the maximum depth of 32"),
            "{e}"
        );
    }

    #[test]
    fn validate_declaration_catches_unvalidated_protos() {
        let mut d = example_manifest().remove(0);
        assert!(validate_declaration(&d).is_ok());
        d.parameters
            .as_mut()
            .unwrap()
            .properties
            .get_mut("text")
            .unwrap()
            .r#type = 0;
        let e = validate_declaration(&d).unwrap_err();
        assert_eq!(e.path, "parameters.properties.text.type");
        assert!(
            e.message.contains("SCHEMA_TYPE_UNSPECIFIED"),
            "{}",
            e.message
        );
        let mut decls = example_manifest();
        decls[1].name = "echo".into();
        let e = validate_declarations(&decls).unwrap_err().to_string();
        assert!(
            e.starts_with("contracts[1] (echo): name: expected a unique"),
            "{e}"
        );
    }

    #[test]
    fn load_manifest_reports_io_errors() {
        let e = load_manifest(Path::new("/nonexistent/grid-manifest.yaml")).unwrap_err();
        assert!(matches!(e, ManifestError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/grid-manifest.yaml"));
    }

    // ---------------------------------------------------------------- args

    #[test]
    fn string_and_enum() {
        let weather = &example_manifest()[4];
        assert!(check(weather, json!({"city": "Oslo"})).is_ok());
        assert!(check(weather, json!({"city": "Oslo", "units": "imperial"})).is_ok());
        let e = check(weather, json!({"city": "Oslo", "units": "kelvin"})).unwrap_err();
        assert_eq!(e.path, "args.units");
        assert_eq!(
            e.message,
            "expected one of \"metric\", \"imperial\", got \"kelvin\""
        );
        // Exact match: case matters.
        assert!(check(weather, json!({"city": "Oslo", "units": "Metric"})).is_err());
        let e = check(weather, json!({"city": 5})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("args.city", "expected STRING, got number")
        );
    }

    #[test]
    fn required_and_missing_args() {
        let echo = &example_manifest()[0];
        let e = validate_args(echo, None).unwrap_err();
        assert_eq!(e.path, "args.text");
        assert_eq!(e.message, "required property is missing");
        let e = check(echo, json!({})).unwrap_err();
        assert_eq!(e.path, "args.text");
        // No parameters at all: missing args are an empty object and fine.
        let fail = &example_manifest()[3];
        assert!(validate_args(fail, None).is_ok());
        let bare = FunctionDeclaration {
            name: "bare".into(),
            description: "x".into(),
            parameters: None,
        };
        assert!(validate_args(&bare, Some(&args(json!({"any": 1})))).is_ok());
    }

    #[test]
    fn extra_keys_are_accepted() {
        let echo = &example_manifest()[0];
        assert!(check(echo, json!({"text": "hi", "extra": [1, 2, {"x": null}]})).is_ok());
    }

    #[test]
    fn number_rules() {
        let add = &example_manifest()[1];
        assert!(check(add, json!({"a": 1, "b": 2.5})).is_ok());
        assert!(check(add, json!({"a": -1e300, "b": 0})).is_ok());
        let e = check(add, json!({"a": "1", "b": 2})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("args.a", "expected NUMBER, got string")
        );
        let mut s = args(json!({"a": 1, "b": 2}));
        s.fields.insert(
            "b".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let e = validate_args(add, Some(&s)).unwrap_err();
        assert_eq!(e.path, "args.b");
        assert!(e.message.contains("finite"), "{}", e.message);
        s.fields.insert(
            "b".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::INFINITY)),
            },
        );
        assert!(validate_args(add, Some(&s)).is_err());
    }

    #[test]
    fn integer_rules() {
        let count = &example_manifest()[2];
        assert!(check(count, json!({"n": 5})).is_ok());
        assert!(check(count, json!({"n": 5.0})).is_ok());
        assert!(check(count, json!({"n": -9_223_372_036_854_775_808i64})).is_ok());
        let e = check(count, json!({"n": 2.5})).unwrap_err();
        assert_eq!(e.path, "args.n");
        assert_eq!(e.message, "expected INTEGER (a whole number), got 2.5");
        let e = check(count, json!({"n": 1e19})).unwrap_err();
        assert!(e.message.contains("signed 64-bit range"), "{}", e.message);
        // 2^63 is the first double above i64::MAX.
        assert!(check(count, json!({"n": 9_223_372_036_854_775_808.0})).is_err());
        let e = check(count, json!({"n": true})).unwrap_err();
        assert_eq!(e.message, "expected INTEGER, got boolean");
    }

    #[test]
    fn boolean_rules() {
        let d = decl_from(json!({"type": "OBJECT", "properties": {"f": {"type": "BOOLEAN"}}}));
        assert!(check(&d, json!({"f": false})).is_ok());
        let e = check(&d, json!({"f": "true"})).unwrap_err();
        assert_eq!(e.message, "expected BOOLEAN, got string");
        assert!(check(&d, json!({"f": 1})).is_err());
    }

    #[test]
    fn null_fails_every_type() {
        for ty in ["STRING", "NUMBER", "INTEGER", "BOOLEAN", "OBJECT"] {
            let d = decl_from(json!({"type": "OBJECT", "properties": {"v": {"type": ty}}}));
            let e = check(&d, json!({"v": null})).unwrap_err();
            assert_eq!(e.path, "args.v");
            assert_eq!(e.message, format!("expected {ty}, got null"));
        }
        let d = decl_from(json!({"type": "OBJECT",
            "properties": {"v": {"type": "ARRAY", "items": {"type": "STRING"}}}}));
        assert_eq!(
            check(&d, json!({"v": null})).unwrap_err().message,
            "expected ARRAY, got null"
        );
        // A Value without a kind counts as null.
        let mut s = prost_types::Struct::default();
        s.fields
            .insert("v".into(), prost_types::Value { kind: None });
        assert!(validate_args(&d, Some(&s)).is_err());
    }

    #[test]
    fn arrays_and_nested_objects_report_paths() {
        let d = decl_from(json!({"type": "OBJECT", "properties": {
            "items": {"type": "ARRAY", "items": {"type": "OBJECT",
                "properties": {"name": {"type": "STRING"}, "tags": {"type": "ARRAY",
                    "items": {"type": "STRING"}}},
                "required": ["name"]}}}}));
        assert!(check(&d, json!({"items": []})).is_ok());
        assert!(check(&d, json!({"items": [{"name": "a", "tags": ["x"]}]})).is_ok());
        let e = check(
            &d,
            json!({"items": [{"name": "a"}, {"name": "b"}, {"name": 3}]}),
        )
        .unwrap_err();
        assert_eq!(e.path, "args.items[2].name");
        assert_eq!(e.message, "expected STRING, got number");
        let e = check(&d, json!({"items": [{"name": "a"}, {}]})).unwrap_err();
        assert_eq!(e.path, "args.items[1].name");
        assert_eq!(e.message, "required property is missing");
        let e = check(&d, json!({"items": [{"name": "a", "tags": ["ok", false]}]})).unwrap_err();
        assert_eq!(e.path, "args.items[0].tags[1]");
        let e = check(&d, json!({"items": {"name": "a"}})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("args.items", "expected ARRAY, got object")
        );
        let e = check(&d, json!({"items": ["a"]})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("args.items[0]", "expected OBJECT, got string")
        );
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        let mut props = serde_json::Map::new();
        props.insert("a b".into(), json!({"type": "STRING"}));
        let d = decl_from(json!({"type": "OBJECT", "properties": props}));
        let e = check(&d, json!({"a b": 1})).unwrap_err();
        assert_eq!(e.path, "args[\"a b\"]");
    }

    #[test]
    fn depth_limit_is_an_error_not_a_crash() {
        // Schema: OBJECT { next: OBJECT { next: ... } } 31 levels deep (within the limit).
        let mut schema = json!({"type": "OBJECT"});
        for _ in 0..30 {
            schema = json!({"type": "OBJECT", "properties": {"next": schema}});
        }
        let d = decl_from(schema);
        let mut ok = json!({});
        for _ in 0..30 {
            ok = json!({"next": ok});
        }
        assert!(check(&d, ok).is_ok());

        // An array schema that nests deeper than the limit can only come from an unvalidated
        // proto; the validator must stop with an error.
        let mut deep_schema = Schema {
            r#type: SchemaType::String as i32,
            ..Default::default()
        };
        for _ in 0..200 {
            deep_schema = Schema {
                r#type: SchemaType::Array as i32,
                items: Some(Box::new(deep_schema)),
                ..Default::default()
            };
        }
        let mut params = empty_object_schema();
        params.properties.insert("v".into(), deep_schema);
        let d = FunctionDeclaration {
            name: "deep".into(),
            description: "x".into(),
            parameters: Some(params),
        };
        let mut value = prost_types::Value {
            kind: Some(Kind::StringValue("x".into())),
        };
        for _ in 0..200 {
            value = prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![value],
                })),
            };
        }
        let mut s = prost_types::Struct::default();
        s.fields.insert("v".into(), value);
        let e = validate_args(&d, Some(&s)).unwrap_err();
        assert!(e.message.contains("maximum depth of 32"), "{}", e.message);
        assert!(e.path.starts_with("args.v[0][0]"), "{}", e.path);
    }

    #[test]
    fn unspecified_schema_type_fails_closed() {
        let mut params = empty_object_schema();
        params.properties.insert("v".into(), Schema::default());
        let d = FunctionDeclaration {
            name: "x".into(),
            description: "x".into(),
            parameters: Some(params),
        };
        assert!(validate_args(&d, Some(&args(json!({"v": 1})))).is_err());
        assert!(validate_args(&d, Some(&args(json!({})))).is_ok());
    }

    // ---------------------------------------------------------------- JSON

    #[test]
    fn json_round_trip() {
        let v = json!({"s": "x", "n": 3, "f": 2.5, "b": true, "z": null,
                       "l": [1, "two", [false]], "o": {"k": {"deep": -7}}});
        let s = json_to_struct(&v).unwrap();
        assert_eq!(struct_to_json(&s), v);
        assert_eq!(value_to_json(&json_to_value(&v).unwrap()), v);
        assert!(matches!(
            s.fields["n"].kind,
            Some(Kind::NumberValue(n)) if n == 3.0
        ));
    }

    #[test]
    fn json_to_struct_needs_an_object() {
        assert_eq!(
            json_to_struct(&json!([1])).unwrap_err(),
            "expected a JSON object, got array"
        );
        assert!(json_to_struct(&json!("x")).is_err());
        assert!(json_to_struct(&json!(null)).is_err());
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let v = prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(value_to_json(&v), serde_json::Value::Null);
        let v = prost_types::Value {
            kind: Some(Kind::NumberValue(1e300)),
        };
        assert_eq!(value_to_json(&v), json!(1e300));
        assert_eq!(
            value_to_json(&prost_types::Value { kind: None }),
            json!(null)
        );
    }

    #[test]
    fn json_depth_is_limited() {
        let mut v = json!(1);
        for _ in 0..200 {
            v = json!([v]);
        }
        assert!(json_to_value(&v).unwrap_err().contains("maximum depth"));
    }
}

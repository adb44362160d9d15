//! The RBAC engine: roles with inheritance, permissions, and bindings of subjects to roles
//! per tenant. Deny unless a binding allows. The file format is documented in `docs/rbac.md`;
//! the shipped example is `policies/rbac.yaml`.
//!
//! Invariants, established when a snapshot is made ([`Rbac::parse`], [`Rbac::with_binding`])
//! and relied on afterwards:
//!
//! - Every role name is unique and valid; every `includes` and every binding names a known
//!   role; the inclusion graph has no cycle. A file that breaks one of these is refused
//!   whole, with an [`RbacError`] naming the file, the field and the problem.
//! - Each role's closure (itself and everything it includes, at any depth) is computed
//!   once, as a bit set. Each binding key (tenant or `*`, scope, subject) maps to the union
//!   of its roles' closures. So [`Rbac::grants`] is a few hash lookups and bit-set unions,
//!   never a graph walk.
//! - A [`Grants`] holds its permissions as a hash set of exact strings plus a short list of
//!   pre-split globs; [`Grants::allows`] is one hash lookup and, if that misses, a scan of
//!   the globs, without allocating.
//!
//! Tenancy: a binding whose `tenant` is a tenant id applies to subjects of that tenant;
//! `"*"` applies to the subjects of every tenant. Either way the roles hold in the subject's
//! own tenant only, unless the binding has `scope: platform`: then they hold on every
//! tenant. Nobody acts on another tenant than their own without a platform binding.

use crate::ids::{PeerKind, PrincipalId, TenantId, valid_segment};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `file` of errors about bindings added through [`Rbac::with_binding`].
pub const ASSIGNED: &str = "(assigned binding)";

/// Longest permission string accepted.
const MAX_PERMISSION_LEN: usize = 256;
/// Longest IdP group name accepted.
const MAX_GROUP_LEN: usize = 256;

// ------------------------------------------------------------------------------ errors

/// Why a policy (or a binding added to it) is refused. Every variant names the file and the
/// field (`roles[3].includes[0]`, `bindings[2].roles[1]`); `Display` reads
/// `FILE: FIELD: PROBLEM`.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, or not the documented shape (an unknown field, a wrong type).
    #[error("{file}: {field}: {problem}")]
    Syntax {
        file: String,
        field: String,
        problem: String,
    },
    /// A value is malformed: a role name, a permission, a subject, a tenant, a scope.
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: String,
        field: String,
        problem: String,
    },
    /// `includes` or a binding names a role that is not defined.
    #[error("{file}: {field}: unknown role {role:?} (defined: {known})")]
    UnknownRole {
        file: String,
        field: String,
        role: String,
        known: String,
    },
    /// Roles include each other in a circle; `cycle` starts and ends with the same role.
    #[error("{file}: roles: cycle {}", .cycle.join(" -> "))]
    Cycle { file: String, cycle: Vec<String> },
    /// The same role defined twice, or the same subject bound to the same role twice in the
    /// same tenant and scope. `field` is the second occurrence, `first` the first.
    #[error("{file}: {field}: {problem} (first at {first})")]
    Duplicate {
        file: String,
        field: String,
        first: String,
        problem: String,
    },
}

impl RbacError {
    /// The file named (or [`ASSIGNED`]).
    pub fn file(&self) -> &str {
        match self {
            RbacError::Read { file, .. }
            | RbacError::Syntax { file, .. }
            | RbacError::Invalid { file, .. }
            | RbacError::UnknownRole { file, .. }
            | RbacError::Cycle { file, .. }
            | RbacError::Duplicate { file, .. } => file,
        }
    }

    /// The field path (`(file)` for a read error, `roles` for a cycle).
    pub fn field(&self) -> &str {
        match self {
            RbacError::Read { .. } => "(file)",
            RbacError::Cycle { .. } => "roles",
            RbacError::Syntax { field, .. }
            | RbacError::Invalid { field, .. }
            | RbacError::UnknownRole { field, .. }
            | RbacError::Duplicate { field, .. } => field,
        }
    }
}

// ------------------------------------------------------------------ bindings and subjects

/// Who a binding is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BindingSubject {
    /// One principal (`alice`), of the binding's tenant.
    Principal(PrincipalId),
    /// Everyone whose verified token (or claim mapping) puts them in this IdP group.
    Group(String),
    /// Every certificate of this peer kind (`runtime`, `client`, `admin`, ...).
    Kind(PeerKind),
}

impl BindingSubject {
    fn key(&self) -> (&'static str, &str) {
        match self {
            BindingSubject::Principal(p) => ("principal", p.as_str()),
            BindingSubject::Group(g) => ("group", g),
            BindingSubject::Kind(k) => ("kind", k.as_str()),
        }
    }
}

impl fmt::Display for BindingSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, name) = self.key();
        write!(f, "{what} {name:?}")
    }
}

/// Whose subjects a binding is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BindingTenant {
    /// The subjects of this tenant.
    Tenant(TenantId),
    /// `"*"`: the subjects of every tenant (each in its own tenant unless the scope is
    /// platform, which `"*"` may not have).
    Every,
}

impl BindingTenant {
    fn key(&self) -> &str {
        match self {
            BindingTenant::Tenant(t) => t.as_str(),
            BindingTenant::Every => "*",
        }
    }
}

impl fmt::Display for BindingTenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindingTenant::Tenant(t) => write!(f, "tenant {t}"),
            BindingTenant::Every => f.write_str("every tenant"),
        }
    }
}

/// Where a binding's roles hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// In the subject's own tenant (the default).
    #[default]
    Tenant,
    /// On every tenant: platform administrators, platform auditors.
    Platform,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Platform => "platform",
        }
    }
}

/// One binding: `subject` of `tenant` holds `roles`, in its own tenant or (platform scope)
/// on every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub subject: BindingSubject,
    pub tenant: BindingTenant,
    pub scope: Scope,
    pub roles: Vec<String>,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.subject, self.tenant)?;
        if self.scope == Scope::Platform {
            f.write_str(" (platform scope)")?;
        }
        Ok(())
    }
}

/// The caller whose grants are asked for: its verified identity, the IdP groups its token
/// put it in, and roles asserted directly (a token's claim mapping).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub tenant: &'a TenantId,
    pub principal: &'a PrincipalId,
    pub kind: &'a PeerKind,
    pub groups: &'a [String],
    /// Roles asserted directly; they hold in the subject's own tenant. Unknown ones are
    /// ignored (see [`Grants::ignored_roles`]).
    pub roles: &'a [String],
}

// ---------------------------------------------------------------------- permissions

/// A permission as granted: an exact string or a glob (`*` matches any run of characters,
/// the empty one included).
#[derive(Debug, Clone)]
enum Perm {
    Exact(Arc<str>),
    Glob(Arc<Glob>),
}

/// A glob split at its `*`s once, so matching is a prefix test, a suffix test and an
/// in-order search of the pieces between.
#[derive(Debug)]
struct Glob {
    text: Arc<str>,
    prefix: Box<str>,
    middles: Box<[Box<str>]>,
    suffix: Box<str>,
}

impl Glob {
    fn new(text: &str) -> Glob {
        let mut pieces = text.split('*');
        let prefix = pieces.next().unwrap_or_default();
        let mut rest: Vec<&str> = pieces.collect();
        let suffix = rest.pop().unwrap_or_default();
        Glob {
            text: Arc::from(text),
            prefix: prefix.into(),
            middles: rest
                .into_iter()
                .filter(|m| !m.is_empty())
                .map(Box::from)
                .collect(),
            suffix: suffix.into(),
        }
    }

    /// Leftmost-first search of each middle piece is exact for `*`-only globs: taking the
    /// earliest occurrence leaves the most room for the pieces after it.
    fn matches(&self, s: &str) -> bool {
        if s.len() < self.prefix.len() + self.suffix.len()
            || !s.starts_with(&*self.prefix)
            || !s.ends_with(&*self.suffix)
        {
            return false;
        }
        // Both bounds are char boundaries: right after a matched prefix, right before a
        // matched suffix, and the length test keeps them in order.
        let mut rest = &s[self.prefix.len()..s.len() - self.suffix.len()];
        for m in self.middles.iter() {
            match rest.find(&**m) {
                Some(i) => rest = &rest[i + m.len()..],
                None => return false,
            }
        }
        true
    }
}

/// `None` if `p` is a valid permission, else what is wrong with it.
fn permission_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("expected a permission like grid.session.create or tool:echo:execute, got an empty string".into());
    }
    if p.len() > MAX_PERMISSION_LEN {
        return Some(format!(
            "expected at most {MAX_PERMISSION_LEN} characters, got {}",
            p.len()
        ));
    }
    if let Some((i, c)) = p
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '*')))
    {
        return Some(format!(
            "{c:?} at position {i} of {p:?} is not allowed: a permission is letters, digits, '.', '_', '-', ':' and '*' (a glob)"
        ));
    }
    None
}

fn parse_perm(p: &str) -> Perm {
    if p.contains('*') {
        Perm::Glob(Arc::new(Glob::new(p)))
    } else {
        Perm::Exact(Arc::from(p))
    }
}

/// `None` if `g` is a usable IdP group name, else what is wrong with it.
fn group_problem(g: &str) -> Option<String> {
    if g.is_empty() || g.len() > MAX_GROUP_LEN {
        return Some(format!(
            "expected a group name of 1 to {MAX_GROUP_LEN} characters, got {} characters",
            g.len()
        ));
    }
    if g.trim() != g || g.chars().any(char::is_control) {
        return Some(format!(
            "expected no leading or trailing spaces and no control characters, got {g:?}"
        ));
    }
    None
}

const SEGMENT_RULE: &str =
    "expected 1 to 128 letters, digits, '.', '-' or '_', the first a letter or digit";

// -------------------------------------------------------------------------- role sets

/// A set of role indexes, one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RoleSet(Vec<u64>);

impl RoleSet {
    fn empty(roles: usize) -> RoleSet {
        RoleSet(vec![0; roles.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn union_with(&mut self, other: &RoleSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

// ----------------------------------------------------------------------- the snapshot

/// One role as defined.
#[derive(Debug)]
struct Role {
    name: String,
    includes: Vec<String>,
    permissions: Vec<Perm>,
}

/// The roles and their closures; shared by every snapshot made from the same file.
#[derive(Debug, Default)]
struct RoleTable {
    roles: Vec<Role>,
    by_name: HashMap<String, usize>,
    /// `closure[i]`: role `i` and every role it includes, at any depth.
    closure: Vec<RoleSet>,
}

impl RoleTable {
    fn known(&self) -> String {
        const SHOWN: usize = 20;
        if self.roles.is_empty() {
            return "none".into();
        }
        let mut names: Vec<&str> = self.roles.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(SHOWN);
        names.truncate(SHOWN);
        let mut s = names.join(", ");
        if more > 0 {
            s.push_str(&format!(", and {more} more"));
        }
        s
    }
}

/// Role sets (closures already unioned) per subject, for one tenant key and scope.
#[derive(Debug, Default)]
struct SubjectIndex {
    principals: HashMap<String, RoleSet>,
    groups: HashMap<String, RoleSet>,
    kinds: HashMap<String, RoleSet>,
}

impl SubjectIndex {
    fn entry(&mut self, subject: &BindingSubject, roles: usize) -> &mut RoleSet {
        let (map, name) = match subject {
            BindingSubject::Principal(p) => (&mut self.principals, p.as_str()),
            BindingSubject::Group(g) => (&mut self.groups, g.as_str()),
            BindingSubject::Kind(k) => (&mut self.kinds, k.as_str()),
        };
        map.entry(name.to_string())
            .or_insert_with(|| RoleSet::empty(roles))
    }

    fn collect(&self, who: &Subject<'_>, into: &mut RoleSet) {
        if let Some(s) = self.principals.get(who.principal.as_str()) {
            into.union_with(s);
        }
        if let Some(s) = self.kinds.get(who.kind.as_str()) {
            into.union_with(s);
        }
        for g in who.groups {
            if let Some(s) = self.groups.get(g.as_str()) {
                into.union_with(s);
            }
        }
    }
}

/// Bindings resolved: tenant key (a tenant id, or `*`) → subject → role set, per scope.
#[derive(Debug, Default)]
struct Index {
    tenant: HashMap<String, SubjectIndex>,
    platform: HashMap<String, SubjectIndex>,
}

/// An immutable, resolved RBAC state. Make a new one to change it; swap it atomically.
#[derive(Debug, Default)]
pub struct Rbac {
    source: PathBuf,
    roles: Arc<RoleTable>,
    bindings: Vec<Binding>,
    index: Index,
}

impl Rbac {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Rbac, RbacError> {
        let text = std::fs::read_to_string(path).map_err(|source| RbacError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Rbac::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Rbac, RbacError> {
        let file = path.display().to_string();
        let raw: RawPolicy = serde_norway::from_str(text).map_err(|e| {
            // serde_norway reports "field.path: problem at line L column C".
            let msg = e.to_string();
            let (field, problem) = match msg.split_once(": ") {
                Some((f, p)) if !f.contains(' ') => (f.to_string(), p.to_string()),
                _ => ("(document)".to_string(), msg),
            };
            RbacError::Syntax {
                file: file.clone(),
                field,
                problem,
            }
        })?;
        let roles = Arc::new(build_roles(&file, raw.roles)?);
        let bindings = raw
            .bindings
            .into_iter()
            .enumerate()
            .map(|(i, b)| b.validate(&file, i))
            .collect::<Result<Vec<_>, _>>()?;
        let index = build_index(&file, &roles, &bindings)?;
        Ok(Rbac {
            source: path.to_path_buf(),
            roles,
            bindings,
            index,
        })
    }

    /// The file this snapshot was seeded from (empty for [`Rbac::default`], which denies
    /// everything).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The effective grants of `who`, in its own tenant and on other tenants. Not the hot
    /// path: cache the result per connection or per verified token.
    pub fn grants(&self, who: &Subject<'_>) -> Arc<Grants> {
        let n = self.roles.roles.len();
        let mut own = RoleSet::empty(n);
        let mut platform = RoleSet::empty(n);
        for key in [who.tenant.as_str(), "*"] {
            if let Some(s) = self.index.tenant.get(key) {
                s.collect(who, &mut own);
            }
            if let Some(s) = self.index.platform.get(key) {
                s.collect(who, &mut platform);
            }
        }
        let mut ignored_roles = Vec::new();
        for r in who.roles {
            match self.roles.by_name.get(r.as_str()) {
                Some(&i) => own.union_with(&self.roles.closure[i]),
                None => ignored_roles.push(r.clone()),
            }
        }
        own.union_with(&platform);
        let mut roles: Vec<String> = own
            .iter()
            .map(|i| self.roles.roles[i].name.clone())
            .collect();
        roles.sort_unstable();
        Arc::new(Grants {
            roles,
            own: PermSet::of(&self.roles, &own),
            platform: PermSet::of(&self.roles, &platform),
            ignored_roles,
        })
    }

    /// A new snapshot with one more binding (`AssignRole`), validated like a binding of the
    /// file; errors name the file [`ASSIGNED`] and the field `bindings[N]`, N being its
    /// position in [`Rbac::bindings`] of the new snapshot.
    pub fn with_binding(&self, b: Binding) -> Result<Rbac, RbacError> {
        self.with_bindings([b])
    }

    /// [`Rbac::with_binding`] for several at once (bindings restored from the control
    /// store), resolved once.
    pub fn with_bindings(
        &self,
        added: impl IntoIterator<Item = Binding>,
    ) -> Result<Rbac, RbacError> {
        let first_new = self.bindings.len();
        let mut bindings = self.bindings.clone();
        bindings.extend(added);
        for (i, b) in bindings.iter().enumerate().skip(first_new) {
            check_binding(ASSIGNED, i, b)?;
        }
        let index = build_index(ASSIGNED, &self.roles, &bindings)?;
        Ok(Rbac {
            source: self.source.clone(),
            roles: Arc::clone(&self.roles),
            bindings,
            index,
        })
    }

    /// Every binding: the file's, in file order, then the assigned ones.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// The defined roles, in file order.
    pub fn role_names(&self) -> impl Iterator<Item = &str> {
        self.roles.roles.iter().map(|r| r.name.as_str())
    }
}

// ---------------------------------------------------------------------------- grants

/// Permissions as checked: exact strings hashed, globs listed.
#[derive(Debug, Default)]
struct PermSet {
    exact: HashSet<Arc<str>>,
    globs: Vec<Arc<Glob>>,
}

impl PermSet {
    fn of(table: &RoleTable, roles: &RoleSet) -> PermSet {
        let mut set = PermSet::default();
        let mut globs_seen = HashSet::new();
        for i in roles.iter() {
            for p in &table.roles[i].permissions {
                match p {
                    Perm::Exact(s) => {
                        set.exact.insert(Arc::clone(s));
                    }
                    Perm::Glob(g) => {
                        if globs_seen.insert(Arc::clone(&g.text)) {
                            set.globs.push(Arc::clone(g));
                        }
                    }
                }
            }
        }
        set
    }

    fn allows(&self, permission: &str) -> bool {
        !permission.is_empty()
            && (self.exact.contains(permission) || self.globs.iter().any(|g| g.matches(permission)))
    }

    fn sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .exact
            .iter()
            .map(|s| s.to_string())
            .chain(self.globs.iter().map(|g| g.text.to_string()))
            .collect();
        v.sort_unstable();
        v
    }
}

/// What one subject may do, resolved. Cheap to check, immutable, shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct Grants {
    /// Effective role names (inherited ones and platform ones included), sorted.
    roles: Vec<String>,
    /// Permissions in the subject's own tenant (platform ones included).
    own: PermSet,
    /// Permissions on every tenant.
    platform: PermSet,
    /// Directly asserted roles that are not defined.
    ignored_roles: Vec<String>,
}

impl Grants {
    /// Whether `permission` (exact, e.g. `tool:echo:execute`) is granted on
    /// `target_tenant` to a subject of `own_tenant`: in its own tenant by its own or its
    /// platform permissions, on another tenant by its platform permissions only.
    ///
    /// One hash lookup, then (on a miss) each glob in turn: a prefix and a suffix
    /// comparison and a substring search per further `*`. No allocation.
    pub fn allows(
        &self,
        permission: &str,
        target_tenant: &TenantId,
        own_tenant: &TenantId,
    ) -> bool {
        if target_tenant == own_tenant {
            self.own.allows(permission)
        } else {
            self.platform.allows(permission)
        }
    }

    /// Effective role names, inherited and platform ones included, sorted.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// Effective permissions in the subject's own tenant, sorted, globs as written.
    pub fn permissions(&self) -> Vec<String> {
        self.own.sorted()
    }

    /// Permissions that hold on every tenant (from platform bindings), sorted.
    pub fn platform_permissions(&self) -> Vec<String> {
        self.platform.sorted()
    }

    /// The first of `required` the subject does not hold, if any (all are required).
    pub fn missing_role<'r>(&self, required: &'r [String]) -> Option<&'r str> {
        required
            .iter()
            .find(|r| self.roles.binary_search(r).is_err())
            .map(String::as_str)
    }

    /// Directly asserted roles ([`Subject::roles`]) that no role definition matches; they
    /// grant nothing.
    pub fn ignored_roles(&self) -> &[String] {
        &self.ignored_roles
    }
}

// ----------------------------------------------------------------- the file as written

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    roles: Vec<RawRole>,
    #[serde(default)]
    bindings: Vec<RawBinding>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: String,
    /// For people reading the file; not used.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    includes: Vec<String>,
    #[serde(default)]
    permissions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    tenant: String,
    #[serde(default)]
    scope: Option<String>,
    roles: Vec<String>,
    /// For people reading the file; not used.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

impl RawBinding {
    fn validate(self, file: &str, i: usize) -> Result<Binding, RbacError> {
        let field = |name: &str| format!("bindings[{i}].{name}");
        let invalid = |name: &str, problem: String| RbacError::Invalid {
            file: file.to_string(),
            field: field(name),
            problem,
        };
        let subject = match (self.principal, self.group, self.kind) {
            (Some(p), None, None) => BindingSubject::Principal(
                PrincipalId::new(&p)
                    .ok_or_else(|| invalid("principal", format!("{SEGMENT_RULE}, got {p:?}")))?,
            ),
            (None, Some(g), None) => BindingSubject::Group(g),
            (None, None, Some(k)) => BindingSubject::Kind(
                PeerKind::new(&k)
                    .ok_or_else(|| invalid("kind", format!("{SEGMENT_RULE}, got {k:?}")))?,
            ),
            _ => {
                return Err(RbacError::Invalid {
                    file: file.to_string(),
                    field: format!("bindings[{i}]"),
                    problem: "expected exactly one of principal, group or kind".into(),
                });
            }
        };
        let tenant = if self.tenant == "*" {
            BindingTenant::Every
        } else {
            BindingTenant::Tenant(TenantId::new(&self.tenant).ok_or_else(|| {
                invalid(
                    "tenant",
                    format!(
                        "expected a tenant id ({SEGMENT_RULE}) or \"*\", got {:?}",
                        self.tenant
                    ),
                )
            })?)
        };
        let scope = match self.scope.as_deref() {
            None | Some("tenant") => Scope::Tenant,
            Some("platform") => Scope::Platform,
            Some(other) => {
                return Err(invalid(
                    "scope",
                    format!("expected tenant or platform, got {other:?}"),
                ));
            }
        };
        let b = Binding {
            subject,
            tenant,
            scope,
            roles: self.roles,
        };
        check_binding(file, i, &b)?;
        Ok(b)
    }
}

// ------------------------------------------------------------------------- validation

fn build_roles(file: &str, raw: Vec<RawRole>) -> Result<RoleTable, RbacError> {
    let invalid = |field: String, problem: String| RbacError::Invalid {
        file: file.to_string(),
        field,
        problem,
    };
    let mut table = RoleTable::default();
    for (i, r) in raw.into_iter().enumerate() {
        if !valid_segment(&r.name) {
            return Err(invalid(
                format!("roles[{i}].name"),
                format!("{SEGMENT_RULE}, got {:?}", r.name),
            ));
        }
        if let Some(&first) = table.by_name.get(&r.name) {
            return Err(RbacError::Duplicate {
                file: file.to_string(),
                field: format!("roles[{i}].name"),
                first: format!("roles[{first}]"),
                problem: format!("role {:?} is defined twice", r.name),
            });
        }
        let mut permissions = Vec::with_capacity(r.permissions.len());
        for (j, p) in r.permissions.iter().enumerate() {
            if let Some(problem) = permission_problem(p) {
                return Err(invalid(format!("roles[{i}].permissions[{j}]"), problem));
            }
            permissions.push(parse_perm(p));
        }
        table.by_name.insert(r.name.clone(), i);
        table.roles.push(Role {
            name: r.name,
            includes: r.includes,
            permissions,
        });
    }
    // Every include names a defined role (checked before any walk of the graph).
    let mut edges = Vec::with_capacity(table.roles.len());
    for (i, r) in table.roles.iter().enumerate() {
        let mut out = Vec::with_capacity(r.includes.len());
        for (j, inc) in r.includes.iter().enumerate() {
            match table.by_name.get(inc) {
                Some(&k) => out.push(k),
                None => {
                    return Err(RbacError::UnknownRole {
                        file: file.to_string(),
                        field: format!("roles[{i}].includes[{j}]"),
                        role: inc.clone(),
                        known: table.known(),
                    });
                }
            }
        }
        edges.push(out);
    }
    table.closure = closures(file, &table, &edges)?;
    Ok(table)
}

/// Each role's closure, by an iterative depth-first walk (a deep chain of roles cannot
/// overflow the stack); a role met again while still on the walk's path closes a cycle.
fn closures(
    file: &str,
    table: &RoleTable,
    edges: &[Vec<usize>],
) -> Result<Vec<RoleSet>, RbacError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let n = edges.len();
    let mut mark = vec![Mark::New; n];
    let mut closure: Vec<RoleSet> = vec![RoleSet::empty(n); n];
    for root in 0..n {
        if mark[root] != Mark::New {
            continue;
        }
        // (role, index of the next include to visit)
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(top) = path.last_mut() {
            let (v, next) = *top;
            if let Some(&w) = edges[v].get(next) {
                top.1 += 1;
                match mark[w] {
                    Mark::New => {
                        mark[w] = Mark::OnPath;
                        path.push((w, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|&(u, _)| u == w).unwrap_or(0);
                        let mut cycle: Vec<String> = path[start..]
                            .iter()
                            .map(|&(u, _)| table.roles[u].name.clone())
                            .collect();
                        cycle.push(table.roles[w].name.clone());
                        return Err(RbacError::Cycle {
                            file: file.to_string(),
                            cycle,
                        });
                    }
                    Mark::Done => {}
                }
            } else {
                let mut c = RoleSet::empty(n);
                c.insert(v);
                for &w in &edges[v] {
                    c.union_with(&closure[w]);
                }
                closure[v] = c;
                mark[v] = Mark::Done;
                path.pop();
            }
        }
    }
    Ok(closure)
}

/// What a binding must satisfy wherever it comes from (the file or `AssignRole`), apart
/// from naming known roles and not repeating another (see [`build_index`]).
fn check_binding(file: &str, i: usize, b: &Binding) -> Result<(), RbacError> {
    let invalid = |field: String, problem: String| RbacError::Invalid {
        file: file.to_string(),
        field,
        problem,
    };
    if let BindingSubject::Group(g) = &b.subject
        && let Some(problem) = group_problem(g)
    {
        return Err(invalid(format!("bindings[{i}].group"), problem));
    }
    if b.roles.is_empty() {
        return Err(invalid(
            format!("bindings[{i}].roles"),
            "expected at least one role".into(),
        ));
    }
    if b.scope == Scope::Platform && b.tenant == BindingTenant::Every {
        return Err(invalid(
            format!("bindings[{i}].scope"),
            "a platform binding must name the tenant of its subject: with tenant \"*\" it would give the subjects of every tenant power over all the others".into(),
        ));
    }
    Ok(())
}

/// Resolves `bindings` into role sets per (scope, tenant key, subject), refusing unknown
/// roles and a subject bound to the same role twice in the same tenant and scope.
fn build_index(file: &str, table: &RoleTable, bindings: &[Binding]) -> Result<Index, RbacError> {
    let n = table.roles.len();
    let mut index = Index::default();
    // (scope, tenant key, subject kind, subject name, role) -> (binding, role position)
    let mut seen: HashMap<(Scope, &str, &str, &str, usize), (usize, usize)> = HashMap::new();
    for (i, b) in bindings.iter().enumerate() {
        let tenant_key = b.tenant.key();
        let (what, name) = b.subject.key();
        let by_tenant = match b.scope {
            Scope::Tenant => &mut index.tenant,
            Scope::Platform => &mut index.platform,
        };
        let set = by_tenant
            .entry(tenant_key.to_string())
            .or_default()
            .entry(&b.subject, n);
        for (j, role) in b.roles.iter().enumerate() {
            let field = format!("bindings[{i}].roles[{j}]");
            let Some(&r) = table.by_name.get(role) else {
                return Err(RbacError::UnknownRole {
                    file: file.to_string(),
                    field,
                    role: role.clone(),
                    known: table.known(),
                });
            };
            if let Some(&(fi, fj)) = seen.get(&(b.scope, tenant_key, what, name, r)) {
                return Err(RbacError::Duplicate {
                    file: file.to_string(),
                    field,
                    first: format!("bindings[{fi}].roles[{fj}]"),
                    problem: format!("{b} is bound to role {role:?} twice"),
                });
            }
            seen.insert((b.scope, tenant_key, what, name, r), (i, j));
            set.union_with(&table.closure[r]);
        }
    }
    Ok(index)
}

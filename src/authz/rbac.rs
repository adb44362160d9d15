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
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '*')))
    {
        return Some(format!(
            "{c:?} (character {} of {p:?}) is not allowed: a permission is letters, digits, '.', '_', '-', ':' and '*' (a glob)",
            i + 1
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

/// What a role name, a principal, a peer kind and a tenant id are made of.
const SEGMENT: &str = "1 to 128 letters, digits, '.', '-' or '_', the first a letter or digit";

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

    /// Whether `permission` holds on every tenant (a platform binding grants it).
    pub fn platform_allows(&self, permission: &str) -> bool {
        self.platform.allows(permission)
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
            (Some(p), None, None) => {
                BindingSubject::Principal(PrincipalId::new(&p).ok_or_else(|| {
                    invalid("principal", format!("expected {SEGMENT}, got {p:?}"))
                })?)
            }
            (None, Some(g), None) => BindingSubject::Group(g),
            (None, None, Some(k)) => BindingSubject::Kind(
                PeerKind::new(&k)
                    .ok_or_else(|| invalid("kind", format!("expected {SEGMENT}, got {k:?}")))?,
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
                        "expected a tenant id ({SEGMENT}) or \"*\", got {:?}",
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
                format!("expected {SEGMENT}, got {:?}", r.name),
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
    /// (scope, tenant key, (subject kind, subject name), role)
    type Key<'b> = (Scope, &'b str, (&'static str, &'b str), usize);
    // Each key -> where it was first bound: (binding, role position).
    let mut seen: HashMap<Key<'_>, (usize, usize)> = HashMap::new();
    for (i, b) in bindings.iter().enumerate() {
        let tenant_key = b.tenant.key();
        let subject = b.subject.key();
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
            if let Some(&(fi, fj)) = seen.get(&(b.scope, tenant_key, subject, r)) {
                return Err(RbacError::Duplicate {
                    file: file.to_string(),
                    field,
                    first: format!("bindings[{fi}].roles[{fj}]"),
                    problem: format!("{b} is bound to role {role:?} twice"),
                });
            }
            seen.insert((b.scope, tenant_key, subject, r), (i, j));
            set.union_with(&table.closure[r]);
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/aesp/rbac.yaml";

    fn parse(text: &str) -> Result<Rbac, RbacError> {
        Rbac::parse(text, Path::new(FILE))
    }

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// An identity to ask grants for; `groups` and `roles` as a token would give them.
    struct Who {
        tenant: TenantId,
        principal: PrincipalId,
        kind: PeerKind,
        groups: Vec<String>,
        roles: Vec<String>,
    }

    fn who(tenant: &str, principal: &str, kind: &str) -> Who {
        Who {
            tenant: t(tenant),
            principal: PrincipalId::new(principal).unwrap(),
            kind: PeerKind::new(kind).unwrap(),
            groups: Vec::new(),
            roles: Vec::new(),
        }
    }

    impl Who {
        fn groups(mut self, g: &[&str]) -> Who {
            self.groups = strings(g);
            self
        }
        fn roles(mut self, r: &[&str]) -> Who {
            self.roles = strings(r);
            self
        }
        fn subject(&self) -> Subject<'_> {
            Subject {
                tenant: &self.tenant,
                principal: &self.principal,
                kind: &self.kind,
                groups: &self.groups,
                roles: &self.roles,
            }
        }
        fn grants(&self, rbac: &Rbac) -> Arc<Grants> {
            rbac.grants(&self.subject())
        }
        /// `permission` on `target` (a tenant id).
        fn may(&self, rbac: &Rbac, permission: &str, target: &str) -> bool {
            self.grants(rbac)
                .allows(permission, &t(target), &self.tenant)
        }
    }

    #[test]
    fn roles_inherit_permissions_several_levels_deep() {
        let rbac = parse(
            "roles:
  - { name: d, includes: [c], permissions: [p.d] }
  - { name: c, includes: [b, b2], permissions: [p.c] }
  - { name: b, includes: [a], permissions: [p.b] }
  - { name: b2, includes: [a], permissions: [p.b2] }
  - { name: a, permissions: [p.a, \"tool:*:execute\"] }
  - { name: unrelated, permissions: [p.x] }
bindings:
  - { principal: alice, tenant: acme, roles: [d] }
  - { principal: carol, tenant: acme, roles: [b] }
",
        )
        .unwrap();
        // (principal, effective roles, permissions)
        let cases: [(&str, &[&str], &[&str]); 3] = [
            (
                "alice",
                &["a", "b", "b2", "c", "d"],
                &["p.a", "p.b", "p.b2", "p.c", "p.d", "tool:*:execute"],
            ),
            ("carol", &["a", "b"], &["p.a", "p.b", "tool:*:execute"]),
            ("dave", &[], &[]),
        ];
        for (principal, roles, perms) in cases {
            let w = who("acme", principal, "client");
            let g = w.grants(&rbac);
            assert_eq!(g.roles(), strings(roles), "{principal}");
            assert_eq!(g.permissions(), strings(perms), "{principal}");
            for p in perms {
                let concrete = p.replace('*', "echo");
                assert!(g.allows(&concrete, &w.tenant, &w.tenant), "{principal} {p}");
            }
            assert!(!g.allows("p.x", &w.tenant, &w.tenant), "{principal}");
        }
    }

    #[test]
    fn cycles_are_refused_with_the_cycle_named() {
        let cases = [
            ("[{ name: a, includes: [a] }]", "a -> a"),
            (
                "[{ name: a, includes: [b] }, { name: b, includes: [a] }]",
                "a -> b -> a",
            ),
            (
                "[{ name: a, includes: [b] }, { name: b, includes: [c] }, { name: c, includes: [a] }]",
                "a -> b -> c -> a",
            ),
            (
                "[{ name: x, includes: [y] }, { name: y, includes: [a] }, { name: a, includes: [b] }, { name: b, includes: [a] }]",
                "a -> b -> a",
            ),
            (
                "[{ name: ok, includes: [leaf] }, { name: leaf }, { name: p, includes: [leaf, q] }, { name: q, includes: [p] }]",
                "p -> q -> p",
            ),
        ];
        for (roles, cycle) in cases {
            let e = parse(&format!("roles: {roles}\n")).unwrap_err();
            assert!(matches!(e, RbacError::Cycle { .. }), "{e}");
            assert_eq!(e.to_string(), format!("{FILE}: roles: cycle {cycle}"));
            assert_eq!(e.field(), "roles");
        }
    }

    #[test]
    fn unknown_roles_are_refused_with_their_field_path() {
        let roles = "roles:\n  - { name: a }\n  - { name: b, includes: [a] }\n";
        let cases = [
            (
                "roles:\n  - { name: a }\n  - { name: b, includes: [a, nope] }\n".to_string(),
                "roles[1].includes[1]",
            ),
            (
                format!(
                    "{roles}bindings:\n  - {{ principal: alice, tenant: acme, roles: [b, nope] }}\n"
                ),
                "bindings[0].roles[1]",
            ),
            (
                format!(
                    "{roles}bindings:\n  - {{ kind: runtime, tenant: \"*\", roles: [a] }}\n  - {{ group: g, tenant: acme, roles: [nope] }}\n"
                ),
                "bindings[1].roles[0]",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).unwrap_err();
            match &e {
                RbacError::UnknownRole { role, .. } => assert_eq!(role, "nope"),
                other => panic!("{field}: {other}"),
            }
            assert_eq!(e.field(), field);
            assert_eq!(e.file(), FILE);
            assert!(
                e.to_string()
                    .starts_with(&format!("{FILE}: {field}: unknown role \"nope\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn duplicate_roles_and_bindings_are_refused_naming_both_positions() {
        let roles = "roles: [{ name: a }, { name: b }]\nbindings:\n";
        // (text, field of the second occurrence, first occurrence); `None`: accepted.
        let cases = [
            (
                "roles: [{ name: a }, { name: b }, { name: a }]\n".to_string(),
                Some(("roles[2].name", "roles[0]")),
            ),
            (
                format!("{roles}  - {{ principal: alice, tenant: acme, roles: [a, b, a] }}\n"),
                Some(("bindings[0].roles[2]", "bindings[0].roles[0]")),
            ),
            (
                format!(
                    "{roles}  - {{ principal: alice, tenant: acme, roles: [a] }}\n  - {{ group: alice, tenant: acme, roles: [a] }}\n  - {{ principal: alice, tenant: acme, roles: [b, a] }}\n"
                ),
                Some(("bindings[2].roles[1]", "bindings[0].roles[0]")),
            ),
            (
                format!(
                    "{roles}  - {{ kind: runtime, tenant: \"*\", roles: [a] }}\n  - {{ kind: runtime, tenant: \"*\", roles: [a] }}\n"
                ),
                Some(("bindings[1].roles[0]", "bindings[0].roles[0]")),
            ),
            // The same subject and role elsewhere is another binding: another tenant, "*",
            // platform scope, or another role in the same tenant.
            (
                format!(
                    "{roles}  - {{ principal: alice, tenant: acme, roles: [a] }}\n  - {{ principal: alice, tenant: globex, roles: [a] }}\n  - {{ principal: alice, tenant: \"*\", roles: [a] }}\n  - {{ principal: alice, tenant: acme, scope: platform, roles: [a] }}\n  - {{ principal: alice, tenant: acme, roles: [b] }}\n"
                ),
                None,
            ),
        ];
        for (text, want) in cases {
            match (parse(&text), want) {
                (Ok(_), None) => {}
                (Err(e @ RbacError::Duplicate { .. }), Some((field, first))) => {
                    assert_eq!(e.field(), field, "{e}");
                    assert!(
                        e.to_string().contains(&format!("(first at {first})")),
                        "{e}"
                    );
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn malformed_values_are_refused_saying_what_is_wrong() {
        let role = "roles: [{ name: a }]\n";
        let bind = |b: &str| format!("{role}bindings:\n  - {{ {b} }}\n");
        // (text, field, words the problem must contain)
        let cases = [
            (
                "roles: [{ name: \"\" }]\n".to_string(),
                "roles[0].name",
                "expected 1 to 128",
            ),
            (
                "roles: [{ name: \"a b\" }]\n".to_string(),
                "roles[0].name",
                "got \"a b\"",
            ),
            (
                "roles: [{ name: a, permissions: [ok.x, \"\"] }]\n".to_string(),
                "roles[0].permissions[1]",
                "empty string",
            ),
            (
                "roles: [{ name: a, permissions: [\"grid session\"] }]\n".to_string(),
                "roles[0].permissions[0]",
                "' ' (character 5 of \"grid session\")",
            ),
            (
                "roles: [{ name: a, permissions: [\"tool:é:execute\"] }]\n".to_string(),
                "roles[0].permissions[0]",
                "is not allowed",
            ),
            (
                format!(
                    "roles: [{{ name: a, permissions: [{}] }}]\n",
                    "x".repeat(300)
                ),
                "roles[0].permissions[0]",
                "at most 256",
            ),
            (
                "roles: [{ name: a, permisions: [x] }]\n".to_string(),
                "roles[0]",
                "unknown field `permisions`",
            ),
            (
                "rolez: []\n".to_string(),
                "(document)",
                "unknown field `rolez`",
            ),
            (
                bind("principal: alice, group: g, tenant: acme, roles: [a]"),
                "bindings[0]",
                "exactly one of principal, group or kind",
            ),
            (
                bind("tenant: acme, roles: [a]"),
                "bindings[0]",
                "exactly one of",
            ),
            (
                bind("principal: \"al ice\", tenant: acme, roles: [a]"),
                "bindings[0].principal",
                "expected 1 to 128",
            ),
            (
                bind("kind: \"-x\", tenant: acme, roles: [a]"),
                "bindings[0].kind",
                "got \"-x\"",
            ),
            (
                bind("group: \" g\", tenant: acme, roles: [a]"),
                "bindings[0].group",
                "leading or trailing spaces",
            ),
            (
                bind("group: \"\", tenant: acme, roles: [a]"),
                "bindings[0].group",
                "1 to 256",
            ),
            (
                bind("principal: alice, tenant: \"ac/me\", roles: [a]"),
                "bindings[0].tenant",
                "or \"*\"",
            ),
            (
                bind("principal: alice, tenant: acme, scope: global, roles: [a]"),
                "bindings[0].scope",
                "tenant or platform",
            ),
            (
                bind("principal: alice, tenant: \"*\", scope: platform, roles: [a]"),
                "bindings[0].scope",
                "must name the tenant",
            ),
            (
                bind("principal: alice, tenant: acme, roles: []"),
                "bindings[0].roles",
                "at least one role",
            ),
            (
                bind("principal: alice, roles: [a]"),
                "bindings[0]",
                "missing field `tenant`",
            ),
        ];
        for (text, field, words) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.file(), FILE, "{e}");
            assert_eq!(e.field(), field, "{e}");
            assert!(e.to_string().contains(words), "{e}");
            assert!(
                e.to_string().starts_with(&format!("{FILE}: {field}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        // (glob, permission, matches)
        let cases = [
            ("aesp.*", "aesp.audit.read", true),
            ("aesp.*", "aesp.", true),
            ("aesp.*", "aesp", false),
            ("aesp.*", "grid.session.create", false),
            ("tool:*:execute", "tool:echo:execute", true),
            ("tool:*:execute", "tool::execute", true),
            ("tool:*:execute", "tool:echo:read", false),
            ("tool:*:execute", "tool:execute", false),
            (
                "tool:billing_*:execute",
                "tool:billing_refund:execute",
                true,
            ),
            ("tool:billing_*:execute", "tool:echo:execute", false),
            ("tool:billing_*:execute", "tool:billing:execute", false),
            ("*.read", "aesp.audit.read", true),
            ("*.read", "aesp.audit.write", false),
            ("*", "anything:at.all", true),
            ("*", "", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "acb", false),
            ("a*b*c", "abcb", false),
            ("a**c", "ac", true),
            ("a*b*b", "ab", false),
            ("a*b*b", "abb", true),
            ("x*yz*yz", "xyz", false),
            ("*ab*ab*", "abab", true),
            ("*ab*ab*", "aba", false),
            ("grid.session.create", "grid.session.create", true),
            ("grid.session.create", "grid.session.creat", false),
            ("grid.session.create", "grid.session.created", false),
        ];
        for (glob, permission, want) in cases {
            let rbac = parse(&format!(
                "roles: [{{ name: r, permissions: [\"{glob}\"] }}]\nbindings: [{{ principal: alice, tenant: acme, roles: [r] }}]\n"
            ))
            .unwrap();
            let alice = who("acme", "alice", "client");
            assert_eq!(
                alice.may(&rbac, permission, "acme"),
                want,
                "{glob} ~ {permission:?}"
            );
            assert_eq!(
                reference_match(glob, permission),
                want || permission.is_empty() && glob == "*",
                "{glob} ~ {permission:?}"
            );
        }
    }

    const TENANCY: &str = "roles:
  - { name: user, permissions: [grid.session.create, \"tool:*:execute\"] }
  - { name: runtime, permissions: [grid.runtime.connect] }
  - { name: tenant-admin, includes: [user], permissions: [aesp.identity.admin, aesp.policy.write] }
  - { name: platform-admin, includes: [tenant-admin], permissions: [\"aesp.*\"] }
  - { name: platform-auditor, permissions: [aesp.audit.read] }
  - { name: engineer, permissions: [\"tool:deploy_*:execute\"] }
bindings:
  - { kind: runtime, tenant: \"*\", roles: [runtime] }
  - { principal: alice, tenant: acme, roles: [user] }
  - { principal: acme-admin, tenant: acme, roles: [tenant-admin] }
  - { principal: root, tenant: platform, scope: platform, roles: [platform-admin] }
  - { group: auditors, tenant: platform, scope: platform, roles: [platform-auditor] }
  - { group: engineers, tenant: acme, roles: [engineer] }
  - { principal: bob, tenant: globex, roles: [user] }
";

    #[test]
    fn a_tenant_admin_acts_in_its_own_tenant_only_and_a_platform_admin_on_every_tenant() {
        let rbac = parse(TENANCY).unwrap();
        let acme_admin = who("acme", "acme-admin", "client");
        let root = who("platform", "root", "admin");
        let auditor = who("platform", "eve", "client").groups(&["auditors"]);
        let auditor_of_acme = who("acme", "eve", "client").groups(&["auditors"]);
        // (who, permission, target tenant, allowed)
        let cases = [
            (&acme_admin, "aesp.identity.admin", "acme", true),
            (&acme_admin, "tool:echo:execute", "acme", true),
            (&acme_admin, "aesp.identity.admin", "globex", false),
            (&acme_admin, "grid.session.create", "globex", false),
            (&acme_admin, "aesp.audit.read", "acme", false),
            (&root, "aesp.identity.admin", "acme", true),
            (&root, "aesp.identity.admin", "globex", true),
            (&root, "aesp.cost.admin", "globex", true),
            (&root, "tool:echo:execute", "globex", true),
            (&root, "aesp.policy.write", "platform", true),
            (&root, "grid.runtime.connect", "acme", false),
            (&auditor, "aesp.audit.read", "globex", true),
            (&auditor, "aesp.identity.admin", "globex", false),
            // A group bound with platform scope in tenant platform: not for acme's "eve".
            (&auditor_of_acme, "aesp.audit.read", "globex", false),
            (&auditor_of_acme, "aesp.audit.read", "acme", false),
        ];
        for (w, permission, target, want) in cases {
            assert_eq!(
                w.may(&rbac, permission, target),
                want,
                "{} of {} {permission} on {target}",
                w.principal,
                w.tenant
            );
        }
        let g = root.grants(&rbac);
        assert_eq!(
            g.roles(),
            strings(&["platform-admin", "tenant-admin", "user"])
        );
        assert!(g.platform_permissions().contains(&"aesp.*".to_string()));
        assert!(acme_admin.grants(&rbac).platform_permissions().is_empty());
    }

    #[test]
    fn star_tenant_bindings_apply_to_each_tenant_own_subjects_only() {
        let rbac = parse(TENANCY).unwrap();
        // (tenant, principal, kind, target, allowed to connect)
        let cases = [
            ("acme", "acme-runtime-1", "runtime", "acme", true),
            ("globex", "globex-runtime-1", "runtime", "globex", true),
            ("acme", "acme-runtime-1", "runtime", "globex", false),
            ("globex", "globex-runtime-1", "runtime", "acme", false),
            ("acme", "alice", "client", "acme", false),
            ("platform", "root", "admin", "platform", false),
        ];
        for (tenant, principal, kind, target, want) in cases {
            let w = who(tenant, principal, kind);
            assert_eq!(
                w.may(&rbac, "grid.runtime.connect", target),
                want,
                "{kind} {principal} of {tenant} on {target}"
            );
        }
    }

    #[test]
    fn groups_and_direct_roles_grant_their_roles_in_the_own_tenant_and_unknown_direct_roles_are_reported()
     {
        let rbac = parse(TENANCY).unwrap();
        // Groups are bound per tenant: "engineers" means something in acme only.
        let eng = who("acme", "carol", "client").groups(&["engineers", "nobody-binds-this"]);
        assert!(eng.may(&rbac, "tool:deploy_prod:execute", "acme"));
        assert!(!eng.may(&rbac, "tool:echo:execute", "acme"));
        let eng_globex = who("globex", "carol", "client").groups(&["engineers"]);
        assert!(!eng_globex.may(&rbac, "tool:deploy_prod:execute", "globex"));

        // Directly asserted roles hold in the own tenant only, even a platform role's name.
        let direct =
            who("globex", "dan", "client").roles(&["tenant-admin", "ghost", "platform-admin"]);
        let g = direct.grants(&rbac);
        assert_eq!(g.ignored_roles(), strings(&["ghost"]));
        assert_eq!(
            g.roles(),
            strings(&["platform-admin", "tenant-admin", "user"])
        );
        assert!(g.allows("aesp.identity.admin", &t("globex"), &t("globex")));
        assert!(!g.allows("aesp.identity.admin", &t("acme"), &t("globex")));
        assert!(g.platform_permissions().is_empty());

        // Bindings, groups and direct roles add up.
        let all = who("acme", "alice", "client")
            .groups(&["engineers"])
            .roles(&["runtime"]);
        let g = all.grants(&rbac);
        assert_eq!(g.roles(), strings(&["engineer", "runtime", "user"]));
        assert!(g.ignored_roles().is_empty());
    }

    #[test]
    fn missing_role_names_the_first_required_role_not_held() {
        let rbac = parse(TENANCY).unwrap();
        let g = who("acme", "acme-admin", "client").grants(&rbac);
        // (required, missing)
        let cases: [(&[&str], Option<&str>); 4] = [
            (&[], None),
            (&["user"], None),
            (&["tenant-admin", "user"], None),
            (
                &["user", "platform-admin", "runtime"],
                Some("platform-admin"),
            ),
        ];
        for (required, missing) in cases {
            assert_eq!(g.missing_role(&strings(required)), missing, "{required:?}");
        }
    }

    #[test]
    fn assigned_bindings_are_validated_like_the_file_and_leave_the_old_snapshot_alone() {
        let rbac = parse(TENANCY).unwrap();
        let n = rbac.bindings().len();
        let carol = who("acme", "carol", "client");
        let bind = |roles: &[&str]| Binding {
            subject: BindingSubject::Principal(carol.principal.clone()),
            tenant: BindingTenant::Tenant(t("acme")),
            scope: Scope::Tenant,
            roles: strings(roles),
        };

        let next = rbac.with_binding(bind(&["tenant-admin"])).unwrap();
        assert!(carol.may(&next, "aesp.identity.admin", "acme"));
        assert!(!carol.may(&rbac, "aesp.identity.admin", "acme"));
        assert_eq!(next.bindings().len(), n + 1);
        assert_eq!(
            next.role_names().collect::<Vec<_>>(),
            rbac.role_names().collect::<Vec<_>>()
        );

        let e = next
            .with_binding(bind(&["user", "tenant-admin"]))
            .unwrap_err();
        assert!(matches!(e, RbacError::Duplicate { .. }), "{e}");
        assert_eq!(e.file(), ASSIGNED);
        assert_eq!(e.field(), format!("bindings[{}].roles[1]", n + 1));
        assert!(
            e.to_string()
                .contains(&format!("(first at bindings[{n}].roles[0])")),
            "{e}"
        );

        let e = rbac.with_binding(bind(&["ghost"])).unwrap_err();
        assert!(matches!(e, RbacError::UnknownRole { .. }), "{e}");
        assert_eq!(e.field(), format!("bindings[{n}].roles[0]"));

        let e = rbac.with_binding(bind(&[])).unwrap_err();
        assert_eq!(e.field(), format!("bindings[{n}].roles"));

        let e = rbac
            .with_binding(Binding {
                subject: BindingSubject::Group("bad\ngroup".into()),
                ..bind(&["user"])
            })
            .unwrap_err();
        assert_eq!(e.field(), format!("bindings[{n}].group"));

        let e = rbac
            .with_binding(Binding {
                tenant: BindingTenant::Every,
                scope: Scope::Platform,
                ..bind(&["user"])
            })
            .unwrap_err();
        assert_eq!(e.field(), format!("bindings[{n}].scope"));
    }

    #[test]
    fn unreadable_files_and_bad_yaml_are_reported_with_the_file() {
        let e = Rbac::load(Path::new("/nonexistent/rbac.yaml")).unwrap_err();
        assert!(matches!(e, RbacError::Read { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/rbac.yaml: cannot read: "),
            "{e}"
        );
        assert_eq!(e.field(), "(file)");

        let e = parse("roles: [{ name: a\n").unwrap_err();
        assert!(matches!(e, RbacError::Syntax { .. }), "{e}");
        assert!(e.to_string().starts_with(FILE), "{e}");

        // An empty policy denies everything, and so does the default one.
        for rbac in [parse("{}").unwrap(), Rbac::default()] {
            let alice = who("acme", "alice", "client").roles(&["user"]);
            assert!(!alice.may(&rbac, "grid.session.create", "acme"));
            assert_eq!(alice.grants(&rbac).ignored_roles(), strings(&["user"]));
        }
    }

    #[test]
    fn the_shipped_policy_gives_the_demo_identities_their_rights() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/rbac.yaml");
        let rbac = Rbac::load(&path).unwrap();
        let alice = who("acme", "alice", "client");
        let bob = who("globex", "bob", "client");
        let runtime = who("acme", "acme-runtime-1", "runtime");
        let root = who("platform", "root", "admin");
        let acme_admin = who("acme", "acme-admin", "client");
        let engineer = who("acme", "erin", "client").groups(&["acme-engineers"]);

        let mut client_rights = strings(&[
            "grid.session.create",
            "grid.session.destroy",
            "grid.tool.execute",
        ]);
        for tool in ["echo", "add", "count", "fail", "get_weather"] {
            client_rights.push(format!("tool:{tool}:execute"));
        }
        for (w, home, away) in [(&alice, "acme", "globex"), (&bob, "globex", "acme")] {
            for p in &client_rights {
                assert!(w.may(&rbac, p, home), "{} {p} in {home}", w.principal);
                assert!(!w.may(&rbac, p, away), "{} {p} in {away}", w.principal);
            }
            for p in [
                "grid.runtime.connect",
                "tool:deploy:execute",
                "aesp.identity.admin",
                "aesp.audit.read",
            ] {
                assert!(!w.may(&rbac, p, home), "{} {p}", w.principal);
            }
        }

        assert!(runtime.may(&rbac, "grid.runtime.connect", "acme"));
        assert!(!runtime.may(&rbac, "grid.runtime.connect", "globex"));
        assert!(!runtime.may(&rbac, "grid.session.create", "acme"));
        assert!(who("globex", "globex-runtime-1", "runtime").may(
            &rbac,
            "grid.runtime.connect",
            "globex"
        ));

        for target in ["acme", "globex", "platform"] {
            for p in [
                "aesp.identity.admin",
                "aesp.policy.write",
                "aesp.audit.read",
                "aesp.governance.approve",
                "aesp.cost.admin",
                "grid.session.create",
                "tool:echo:execute",
            ] {
                assert!(root.may(&rbac, p, target), "root {p} on {target}");
            }
            assert!(
                !root.may(&rbac, "grid.runtime.connect", target),
                "root connect on {target}"
            );
        }
        assert!(
            root.grants(&rbac)
                .roles()
                .contains(&"platform-admin".to_string())
        );

        assert!(acme_admin.may(&rbac, "aesp.identity.admin", "acme"));
        assert!(!acme_admin.may(&rbac, "aesp.identity.admin", "globex"));
        assert!(engineer.may(&rbac, "tool:anything:execute", "acme"));
        assert!(!engineer.may(&rbac, "tool:anything:execute", "globex"));
        assert!(who("acme", "fred", "client").groups(&["acme-finance"]).may(
            &rbac,
            "tool:billing_refund:execute",
            "acme"
        ));
    }

    #[test]
    fn the_worked_example_of_the_docs_answers_as_its_table_says() {
        let doc = include_str!("../../docs/rbac.md");
        let example = doc
            .split_once("## A worked example")
            .and_then(|(_, rest)| rest.split_once("```yaml\n"))
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(yaml, _)| yaml)
            .expect("docs/rbac.md has a worked example");
        let rbac = parse(example).unwrap();
        let alice = who("acme", "alice", "client");
        let erin = who("acme", "erin", "client").groups(&["acme-engineers"]);
        let erin_globex = who("globex", "erin", "client").groups(&["acme-engineers"]);
        let runtime = who("acme", "acme-runtime-1", "runtime");
        let admin = who("acme", "acme-admin", "client");
        let root = who("platform", "root", "admin");
        // The table of docs/rbac.md, row by row: (who, permission, target, allowed).
        let rows = [
            (&alice, "tool:echo:execute", "acme", true),
            (&alice, "tool:deploy:execute", "acme", false),
            (&alice, "grid.session.create", "globex", false),
            (&alice, "grid.runtime.connect", "acme", false),
            (&erin, "tool:deploy:execute", "acme", true),
            (&erin_globex, "tool:echo:execute", "globex", false),
            (&runtime, "grid.runtime.connect", "acme", true),
            (&runtime, "grid.runtime.connect", "globex", false),
            (&admin, "aesp.identity.admin", "acme", true),
            (&admin, "aesp.identity.admin", "globex", false),
            (&root, "aesp.identity.admin", "globex", true),
            (&root, "grid.runtime.connect", "acme", false),
        ];
        for (w, permission, target, want) in rows {
            assert_eq!(
                w.may(&rbac, permission, target),
                want,
                "{} {permission} in {target}",
                w.principal
            );
        }
        assert_eq!(
            alice.grants(&rbac).roles(),
            strings(&["client-user", "demo-tools", "session-user"])
        );
        assert!(erin_globex.grants(&rbac).roles().is_empty());
        assert_eq!(runtime.grants(&rbac).roles(), strings(&["runtime"]));
    }

    // ------------------------------------------------------------- generated policies

    /// The obvious glob matcher, to check the fast one against: `*` matches any run.
    fn reference_match(glob: &str, s: &str) -> bool {
        fn go(g: &[u8], s: &[u8]) -> bool {
            match g.split_first() {
                None => s.is_empty(),
                Some((b'*', rest)) => (0..=s.len()).any(|k| go(rest, &s[k..])),
                Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        go(glob.as_bytes(), s.as_bytes())
    }

    /// splitmix64: small, deterministic, good enough to pick test cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
        fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
            v[self.below(v.len())]
        }
    }

    const GRANTED: &[&str] = &[
        "grid.session.create",
        "grid.session.destroy",
        "grid.tool.execute",
        "grid.runtime.connect",
        "aesp.identity.admin",
        "aesp.policy.write",
        "aesp.audit.read",
        "aesp.cost.admin",
        "tool:echo:execute",
        "tool:billing_pay:execute",
        "tool:*:execute",
        "tool:billing_*:execute",
        "aesp.*",
        "grid.session.*",
        "*.read",
        "*e*o*",
        "*",
    ];
    const ASKED: &[&str] = &[
        "grid.session.create",
        "grid.session.destroy",
        "grid.tool.execute",
        "grid.runtime.connect",
        "aesp.identity.admin",
        "aesp.policy.write",
        "aesp.audit.read",
        "aesp.cost.admin",
        "aesp.governance.approve",
        "tool:echo:execute",
        "tool:add:execute",
        "tool:get_weather:execute",
        "tool:billing_pay:execute",
        "tool:billing_refund:execute",
        "tool:billing:execute",
        "grid.session.created",
        "tool:echo:read",
    ];
    const TENANTS: &[&str] = &["t0", "t1", "t2"];
    const PRINCIPALS: &[&str] = &["p0", "p1", "p2", "p3"];
    const GROUPS: &[&str] = &["g0", "g1", "g2"];
    const KINDS: &[&str] = &["client", "runtime", "admin"];

    /// A generated policy, kept as data for the reference model and written as YAML.
    struct Generated {
        /// (includes, permissions) of role `r{i}`; includes point at lower indexes only.
        roles: Vec<(Vec<usize>, Vec<&'static str>)>,
        /// (subject kind, subject name, tenant or "*", platform scope, roles)
        bindings: Vec<(&'static str, &'static str, &'static str, bool, Vec<usize>)>,
    }

    impl Generated {
        fn new(rng: &mut Rng) -> Generated {
            let n = 1 + rng.below(10);
            let roles = (0..n)
                .map(|i| {
                    let includes = (0..i).filter(|_| rng.chance(25)).collect();
                    let perms = (0..rng.below(4))
                        .map(|_| {
                            // `*` alone would allow everything; keep it rare.
                            let p = rng.pick(GRANTED);
                            if p == "*" && !rng.chance(10) {
                                "grid.tool.execute"
                            } else {
                                p
                            }
                        })
                        .collect();
                    (includes, perms)
                })
                .collect();
            let mut used = HashSet::new();
            let mut bindings = Vec::new();
            for _ in 0..rng.below(14) {
                let (what, name) = match rng.below(3) {
                    0 => ("principal", rng.pick(PRINCIPALS)),
                    1 => ("group", rng.pick(GROUPS)),
                    _ => ("kind", rng.pick(KINDS)),
                };
                let every = rng.chance(25);
                let tenant = if every { "*" } else { rng.pick(TENANTS) };
                let platform = !every && rng.chance(20);
                let mut rs = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    let r = rng.below(n);
                    if !rs.contains(&r) && used.insert((what, name, tenant, platform, r)) {
                        rs.push(r);
                    }
                }
                if !rs.is_empty() {
                    bindings.push((what, name, tenant, platform, rs));
                }
            }
            Generated { roles, bindings }
        }

        fn yaml(&self) -> String {
            let mut y = String::from("roles:\n");
            for (i, (inc, perms)) in self.roles.iter().enumerate() {
                let inc: Vec<String> = inc.iter().map(|j| format!("r{j}")).collect();
                let perms: Vec<String> = perms.iter().map(|p| format!("{p:?}")).collect();
                y += &format!(
                    "  - {{ name: r{i}, includes: [{}], permissions: [{}] }}\n",
                    inc.join(", "),
                    perms.join(", ")
                );
            }
            y += "bindings:\n";
            for (what, name, tenant, platform, rs) in &self.bindings {
                let rs: Vec<String> = rs.iter().map(|j| format!("r{j}")).collect();
                let scope = if *platform { "platform" } else { "tenant" };
                y += &format!(
                    "  - {{ {what}: {name}, tenant: {tenant:?}, scope: {scope}, roles: [{}] }}\n",
                    rs.join(", ")
                );
            }
            y
        }

        fn closure(
            &self,
            start: impl IntoIterator<Item = usize>,
        ) -> std::collections::BTreeSet<usize> {
            let mut seen = std::collections::BTreeSet::new();
            let mut todo: Vec<usize> = start.into_iter().collect();
            while let Some(r) = todo.pop() {
                if seen.insert(r) {
                    todo.extend(&self.roles[r].0);
                }
            }
            seen
        }

        /// (own-tenant roles, platform roles) of a subject, by walking the bindings.
        fn expected(
            &self,
            tenant: &str,
            principal: &str,
            kind: &str,
            groups: &[&str],
            direct: &[usize],
        ) -> (Vec<usize>, Vec<usize>) {
            let mut own = direct.to_vec();
            let mut platform = Vec::new();
            for (what, name, t, p, rs) in &self.bindings {
                let me = match *what {
                    "principal" => *name == principal,
                    "group" => groups.contains(name),
                    _ => *name == kind,
                };
                if me && *p && *t == tenant {
                    platform.extend(rs);
                } else if me && !*p && (*t == tenant || *t == "*") {
                    own.extend(rs);
                }
            }
            let platform = self.closure(platform);
            let own = self.closure(own.into_iter().chain(platform.iter().copied()));
            (own.into_iter().collect(), platform.into_iter().collect())
        }

        fn perms(&self, roles: &[usize]) -> Vec<String> {
            let set: std::collections::BTreeSet<&str> = roles
                .iter()
                .flat_map(|&r| self.roles[r].1.iter().copied())
                .collect();
            set.into_iter().map(str::to_string).collect()
        }
    }

    #[test]
    fn generated_policies_allow_exactly_what_their_listed_permissions_say() {
        let mut rng = Rng(0x5eed);
        let mut checks = 0;
        for case in 0..300 {
            let g = Generated::new(&mut rng);
            let yaml = g.yaml();
            let rbac = parse(&yaml).unwrap_or_else(|e| panic!("case {case}: {e}\n{yaml}"));
            for _ in 0..12 {
                let tenant = rng.pick(TENANTS);
                let principal = rng.pick(PRINCIPALS);
                let kind = rng.pick(KINDS);
                let groups: Vec<&str> = GROUPS.iter().copied().filter(|_| rng.chance(30)).collect();
                let direct: Vec<usize> = (0..rng.below(3))
                    .map(|_| rng.below(g.roles.len() + 2))
                    .collect();
                // Indexes past the last role stand for roles nobody defined.
                let n = g.roles.len();
                let w = Who {
                    tenant: t(tenant),
                    principal: PrincipalId::new(principal).unwrap(),
                    kind: PeerKind::new(kind).unwrap(),
                    groups: strings(&groups),
                    roles: direct
                        .iter()
                        .map(|&r| {
                            if r < n {
                                format!("r{r}")
                            } else {
                                format!("undefined{r}")
                            }
                        })
                        .collect(),
                };
                let known: Vec<usize> = direct
                    .iter()
                    .copied()
                    .filter(|&r| r < g.roles.len())
                    .collect();
                let (own, platform) = g.expected(tenant, principal, kind, &groups, &known);
                let grants = w.grants(&rbac);
                let ctx = || {
                    format!(
                        "case {case}: {principal} ({kind}) of {tenant}, groups {groups:?}, roles {:?}\n{yaml}",
                        w.roles
                    )
                };

                let mut names: Vec<String> = own.iter().map(|r| format!("r{r}")).collect();
                names.sort();
                assert_eq!(grants.roles(), names, "{}", ctx());
                assert_eq!(grants.permissions(), g.perms(&own), "{}", ctx());
                assert_eq!(
                    grants.platform_permissions(),
                    g.perms(&platform),
                    "{}",
                    ctx()
                );
                assert_eq!(
                    grants.ignored_roles().len(),
                    direct.len() - known.len(),
                    "{}",
                    ctx()
                );

                let own_perms = grants.permissions();
                let platform_perms = grants.platform_permissions();
                let other = TENANTS
                    .iter()
                    .find(|o| **o != tenant)
                    .map(|o| t(o))
                    .unwrap();
                for asked in ASKED {
                    let listed = |ps: &[String]| ps.iter().any(|p| reference_match(p, asked));
                    assert_eq!(
                        grants.allows(asked, &w.tenant, &w.tenant),
                        listed(&own_perms),
                        "{asked} in own tenant, {}",
                        ctx()
                    );
                    assert_eq!(
                        grants.allows(asked, &other, &w.tenant),
                        listed(&platform_perms),
                        "{asked} on {other}, {}",
                        ctx()
                    );
                    checks += 2;
                }
            }
        }
        assert!(checks > 100_000, "{checks}");
    }

    /// Run with `cargo test --release --lib authz -- --ignored --nocapture` to see what a
    /// check costs; not a benchmark, a sanity figure.
    #[test]
    #[ignore]
    fn allows_cost_is_printed() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/rbac.yaml");
        let rbac = Rbac::load(&path).unwrap();
        let acme = t("acme");
        let root = who("platform", "root", "admin");
        let alice = who("acme", "alice", "client");
        let engineer = who("acme", "erin", "client").groups(&["acme-engineers"]);
        for (label, w, permission) in [
            ("exact hit", &alice, "tool:echo:execute"),
            ("exact miss, globs scanned", &alice, "tool:deploy:execute"),
            ("glob hit", &engineer, "tool:deploy:execute"),
            ("platform glob hit", &root, "aesp.identity.admin"),
        ] {
            let g = w.grants(&rbac);
            let n = 2_000_000u32;
            let start = std::time::Instant::now();
            let mut yes = 0u32;
            for _ in 0..n {
                yes += u32::from(g.allows(std::hint::black_box(permission), &acme, &w.tenant));
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
            println!("allows, {label}: {ns:.1} ns ({yes} of {n} allowed)");
        }
        let start = std::time::Instant::now();
        for _ in 0..100_000 {
            std::hint::black_box(engineer.grants(&rbac));
        }
        println!(
            "grants: {:.2} µs",
            start.elapsed().as_secs_f64() * 1e6 / 100_000.0
        );
    }
}

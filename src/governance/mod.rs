//! Governed tool contracts (docs/governance.md): the registry of `EnterpriseToolContract`s,
//! per tenant or shared by all, and their approval workflow. Only an APPROVED revision runs:
//! the pipeline asks [`Registry::in_force`] on every tool invocation.
//!
//! The registry is the seed file (`governance.contracts`, the operator's reviewed contracts)
//! with the changes made through `EnterpriseGovernanceService` on top, per (tenant, tool):
//! once a contract has been submitted through the API, its API history is what counts. The
//! API's state is persisted in the control store (table `tool_contracts`) before it takes
//! effect. Readers see an immutable snapshot swapped whole on every change, so the hot path
//! is two hash lookups and never takes a lock.
//!
//! Revisions: every submission bumps `revision` and starts PENDING with the digest of its
//! declaration pinned (`declaration_sha256`, SHA-256 of the declaration's protobuf encoding,
//! whose map entries are in key order). The revision in force stays the last APPROVED one
//! until a newer one is approved; a rejected revision changes nothing in force. A principal
//! never reviews its own submission (separation of duties).

pub mod seed;

use crate::proto::adm::FunctionDeclaration;
use crate::proto::aesp::EnterpriseToolContract;
use crate::store::{ControlStore, StoreError};
use arc_swap::ArcSwap;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const PENDING: &str = "PENDING";
pub const APPROVED: &str = "APPROVED";
pub const REJECTED: &str = "REJECTED";
/// The values of `risk_assessment`.
pub const RISKS: [&str; 3] = ["LOW", "MEDIUM", "HIGH"];

/// SHA-256 of the declaration's protobuf encoding (canonical: fields in number order, the
/// `properties` map in key order), the digest an approval pins.
pub fn digest(decl: &FunctionDeclaration) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(decl.encode_to_vec());
    h.finalize().into()
}

/// Lower-case hex of a digest (for errors and listings).
pub fn hex(bytes: &[u8]) -> String {
    crate::audit::record::hex(bytes)
}

/// `governance:` of the configuration.
#[derive(Debug, Clone, Default)]
pub struct GovernanceConfig {
    /// The seed file (approved contracts); `None`: the registry starts empty and every tool
    /// call is `TOOL_NOT_APPROVED` until a contract is approved through the API.
    pub contracts: Option<PathBuf>,
    /// The host's manifest: a declaration that no longer matches its approved digest is
    /// refused until the new revision is approved.
    pub host_manifest: Option<PathBuf>,
    /// How often the seed file and the host manifest are read again (0 = never).
    pub reload: std::time::Duration,
}

/// One (tenant, tool): the revision in force and the newest one.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The last APPROVED revision: calls run against it. `None` until one is approved.
    pub approved: Option<Arc<EnterpriseToolContract>>,
    /// The newest revision: the approved one, or a PENDING or REJECTED one after it.
    pub latest: Arc<EnterpriseToolContract>,
}

impl Entry {
    fn from_seed(c: &EnterpriseToolContract) -> Entry {
        let latest = Arc::new(c.clone());
        Entry {
            approved: (c.approval_status == APPROVED).then(|| latest.clone()),
            latest,
        }
    }
}

/// The registry as one immutable snapshot: tenant (`""` = shared) → tool → entry.
#[derive(Debug, Default)]
pub struct Contracts {
    by_tenant: HashMap<String, HashMap<String, Entry>>,
    /// The host manifest's digests by tool name, when one is configured.
    host: Option<HashMap<String, [u8; 32]>>,
}

/// Why no contract is in force for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInForce {
    /// No contract for the tool, in the tenant or shared.
    Unknown,
    /// Known, but no revision was ever approved: the newest is `status` at `revision`, in
    /// the entry of `tenant` (`""`: the shared one).
    NotApproved {
        revision: u64,
        status: String,
        tenant: String,
    },
    /// The host's manifest declares it differently from the approved revision.
    Drifted {
        revision: u64,
        approved: String,
        host: String,
    },
    /// The host's manifest does not declare it at all.
    NotDeclared { revision: u64 },
}

impl Contracts {
    /// The entry of `tool` for `tenant` exactly (`""`: the shared one).
    pub fn entry(&self, tenant: &str, tool: &str) -> Option<&Entry> {
        self.by_tenant.get(tenant)?.get(tool)
    }

    /// The approved revision a call of `tenant` to `tool` runs against: the tenant's own
    /// approved revision, else the shared one; then checked against the host's manifest.
    pub fn in_force(
        &self,
        tenant: &str,
        tool: &str,
    ) -> Result<&Arc<EnterpriseToolContract>, NotInForce> {
        let own = self.entry(tenant, tool);
        let shared = self.entry("", tool);
        let approved = own
            .and_then(|e| e.approved.as_ref())
            .or_else(|| shared.and_then(|e| e.approved.as_ref()));
        let Some(c) = approved else {
            return Err(match own.or(shared) {
                None => NotInForce::Unknown,
                Some(e) => NotInForce::NotApproved {
                    revision: e.latest.revision,
                    status: e.latest.approval_status.clone(),
                    tenant: e.latest.tenant_id.clone(),
                },
            });
        };
        if let Some(host) = &self.host {
            match host.get(tool) {
                None => {
                    return Err(NotInForce::NotDeclared {
                        revision: c.revision,
                    });
                }
                Some(d) if d.as_slice() != c.declaration_sha256.as_slice() => {
                    return Err(NotInForce::Drifted {
                        revision: c.revision,
                        approved: hex(&c.declaration_sha256),
                        host: hex(d),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(c)
    }

    /// Every entry, `(tenant, tool)` in order.
    pub fn entries(&self) -> Vec<(&str, &str, &Entry)> {
        let mut v: Vec<_> = self
            .by_tenant
            .iter()
            .flat_map(|(t, m)| m.iter().map(move |(n, e)| (t.as_str(), n.as_str(), e)))
            .collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v
    }

    /// The names of the tools approved for `tenant` (its own and shared ones), in force
    /// against the host manifest, sorted: what a runtime of `tenant` may list and fulfil.
    pub fn approved_names(&self, tenant: &str) -> Vec<&str> {
        let mut names: Vec<&str> = [tenant, ""]
            .iter()
            .filter_map(|t| self.by_tenant.get(*t))
            .flat_map(|m| m.keys().map(String::as_str))
            .filter(|n| self.in_force(tenant, n).is_ok())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// A refused change of the registry.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    /// The contract is not acceptable: `field` and why.
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("no contract for tool {tool:?} {scope}")]
    NotFound { tool: String, scope: String },
    /// The revision reviewed is not the pending one.
    #[error(
        "revision {given} of {tool:?} is not pending review: the newest is revision {current}, {status}"
    )]
    NotPending {
        tool: String,
        given: u64,
        current: u64,
        status: String,
    },
    /// Separation of duties.
    #[error(
        "{principal} submitted revision {revision} of {tool:?} and cannot review it: another principal holding aesp.governance.approve must"
    )]
    OwnSubmission {
        principal: String,
        tool: String,
        revision: u64,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The contract registry: the snapshot in force, and the writer's state behind a lock.
#[derive(Debug)]
pub struct Registry {
    snapshot: ArcSwap<Contracts>,
    inner: Mutex<Inner>,
    store: Option<Arc<ControlStore>>,
    config: GovernanceConfig,
}

#[derive(Debug, Default)]
struct Inner {
    seed: seed::SeedContracts,
    /// (tenant, tool) → entry, as stored in the control store.
    api: HashMap<(String, String), Entry>,
    host: Option<HashMap<String, [u8; 32]>>,
}

impl Inner {
    fn build(&self) -> Contracts {
        let mut by_tenant: HashMap<String, HashMap<String, Entry>> = HashMap::new();
        for ((t, n), c) in &self.seed {
            by_tenant
                .entry(t.clone())
                .or_default()
                .insert(n.clone(), Entry::from_seed(c));
        }
        for ((t, n), e) in &self.api {
            by_tenant
                .entry(t.clone())
                .or_default()
                .insert(n.clone(), e.clone());
        }
        Contracts {
            by_tenant,
            host: self.host.clone(),
        }
    }

    /// The current entry of (tenant, tool): the API's, else the seed's.
    fn current(&self, key: &(String, String)) -> Option<Entry> {
        self.api
            .get(key)
            .cloned()
            .or_else(|| self.seed.get(key).map(Entry::from_seed))
    }
}

/// The control store's record of one (tenant, tool).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredEntryV1 {
    #[prost(message, optional, tag = "1")]
    latest: Option<EnterpriseToolContract>,
    #[prost(message, optional, tag = "2")]
    approved: Option<EnterpriseToolContract>,
}

/// The control store's table of contracts.
pub const TABLE: &str = "tool_contracts";

fn store_key(tenant: &str, tool: &str) -> Vec<u8> {
    format!("{tenant}\n{tool}").into_bytes()
}

fn host_digests(path: &Path) -> Result<HashMap<String, [u8; 32]>, String> {
    let decls = crate::adm::load_manifest(path)
        .map_err(|e| format!("governance.host_manifest: {}: {e}", path.display()))?;
    Ok(decls.iter().map(|d| (d.name.clone(), digest(d))).collect())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    /// Loads the seed file, the host manifest and the API's contracts from `store`. Any
    /// error names the file and what is wrong.
    pub fn open(
        config: GovernanceConfig,
        store: Option<Arc<ControlStore>>,
    ) -> Result<Registry, String> {
        let mut inner = Inner::default();
        if let Some(p) = &config.contracts {
            inner.seed = seed::load(p).map_err(|e| format!("governance.contracts: {e}"))?;
        }
        if let Some(p) = &config.host_manifest {
            inner.host = Some(host_digests(p)?);
        }
        if let Some(s) = &store {
            for (key, value) in s.read_table(TABLE).map_err(|e| e.to_string())? {
                let text = String::from_utf8_lossy(&key).into_owned();
                let (t, n) = text.split_once('\n').ok_or_else(|| {
                    format!("{}: table {TABLE}: bad key {text:?}", s.path().display())
                })?;
                let rec = StoredEntryV1::decode(value.as_slice()).map_err(|e| {
                    format!("{}: table {TABLE}, key {text:?}: {e}", s.path().display())
                })?;
                let latest = rec.latest.ok_or_else(|| {
                    format!(
                        "{}: table {TABLE}, key {text:?}: no latest revision",
                        s.path().display()
                    )
                })?;
                inner.api.insert(
                    (t.to_string(), n.to_string()),
                    Entry {
                        approved: rec.approved.map(Arc::new),
                        latest: Arc::new(latest),
                    },
                );
            }
        }
        Ok(Registry {
            snapshot: ArcSwap::from_pointee(inner.build()),
            inner: Mutex::new(inner),
            store,
            config,
        })
    }

    /// An empty registry (every tool call refused), for tests and tools.
    pub fn empty() -> Registry {
        Registry {
            snapshot: ArcSwap::from_pointee(Contracts::default()),
            inner: Mutex::new(Inner::default()),
            store: None,
            config: GovernanceConfig::default(),
        }
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Contracts>> {
        self.snapshot.load()
    }

    pub fn config(&self) -> &GovernanceConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it left `Inner` as it was before the change began (every
        // change is computed first, then stored, then applied).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the seed file and the host manifest again, each on its own (a seed file that
    /// does not load does not keep a changed host manifest from being checked). `Ok(true)`
    /// when something changed and the new snapshot is in force; an error names the file that
    /// did not load, which keeps its previous content in force.
    pub fn reload(&self) -> Result<bool, String> {
        let seed = match &self.config.contracts {
            Some(p) => seed::load(p).map_err(|e| format!("governance.contracts: {e}")),
            None => Ok(Default::default()),
        };
        let host = match &self.config.host_manifest {
            Some(p) => host_digests(p).map(Some),
            None => Ok(None),
        };
        let mut inner = self.lock();
        let mut changed = false;
        let mut errors = Vec::new();
        match seed {
            Ok(s) if s != inner.seed => {
                inner.seed = s;
                changed = true;
            }
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        match host {
            Ok(h) if h != inner.host => {
                inner.host = h;
                changed = true;
            }
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        if changed {
            self.snapshot.store(Arc::new(inner.build()));
        }
        if errors.is_empty() {
            Ok(changed)
        } else {
            Err(errors.join("; "))
        }
    }

    /// `SubmitToolContract`: a new PENDING revision of `c`'s (tenant, tool), submitted by
    /// `by`. Returns it (and the entry before, for the record).
    pub fn submit(
        &self,
        mut c: EnterpriseToolContract,
        by: &str,
    ) -> Result<(EnterpriseToolContract, Option<Entry>), GovernanceError> {
        seed::check_fields(&c).map_err(|(field, why)| GovernanceError::Invalid { field, why })?;
        let Some(decl) = &c.declaration else {
            return Err(GovernanceError::Invalid {
                field: "declaration",
                why: "required".into(),
            });
        };
        let key = (c.tenant_id.clone(), decl.name.clone());
        c.declaration_sha256 = digest(decl).to_vec();
        c.approval_status = PENDING.into();
        c.approved_by.clear();
        c.approved_at = 0;
        c.review_comment.clear();
        c.submitted_by = by.to_string();
        c.submitted_at = now();
        let mut inner = self.lock();
        let before = inner.current(&key);
        c.revision = before.as_ref().map_or(0, |e| e.latest.revision) + 1;
        let entry = Entry {
            approved: before.as_ref().and_then(|e| e.approved.clone()),
            latest: Arc::new(c.clone()),
        };
        self.put(&mut inner, key, entry)?;
        Ok((c, before))
    }

    /// `ApproveToolContract` / `RejectToolContract` of `revision` of (tenant, tool) by `by`.
    /// Returns the reviewed revision and the entry before.
    pub fn review(
        &self,
        tenant: &str,
        tool: &str,
        revision: u64,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<(EnterpriseToolContract, Entry), GovernanceError> {
        let key = (tenant.to_string(), tool.to_string());
        let mut inner = self.lock();
        let Some(before) = inner.current(&key) else {
            return Err(GovernanceError::NotFound {
                tool: tool.into(),
                scope: scope(tenant),
            });
        };
        let latest = &before.latest;
        if latest.revision != revision || latest.approval_status != PENDING {
            return Err(GovernanceError::NotPending {
                tool: tool.into(),
                given: revision,
                current: latest.revision,
                status: latest.approval_status.clone(),
            });
        }
        if latest.submitted_by == by {
            return Err(GovernanceError::OwnSubmission {
                principal: by.into(),
                tool: tool.into(),
                revision,
            });
        }
        let mut c = (**latest).clone();
        c.review_comment = comment.to_string();
        let entry = if approve {
            c.approval_status = APPROVED.into();
            c.approved_by = by.to_string();
            c.approved_at = now();
            let c = Arc::new(c);
            Entry {
                approved: Some(c.clone()),
                latest: c,
            }
        } else {
            c.approval_status = REJECTED.into();
            c.review_comment = format!("rejected by {by}: {comment}");
            Entry {
                approved: before.approved.clone(),
                latest: Arc::new(c),
            }
        };
        let reviewed = (*entry.latest).clone();
        self.put(&mut inner, key, entry)?;
        Ok((reviewed, before))
    }

    /// Stores `entry` (control store first, when there is one), then puts it in force.
    fn put(
        &self,
        inner: &mut Inner,
        key: (String, String),
        entry: Entry,
    ) -> Result<(), GovernanceError> {
        if let Some(s) = &self.store {
            let rec = StoredEntryV1 {
                latest: Some((*entry.latest).clone()),
                approved: entry.approved.as_deref().cloned(),
            };
            s.put_in(TABLE, &store_key(&key.0, &key.1), &rec.encode_to_vec())?;
        }
        inner.api.insert(key, entry);
        self.snapshot.store(Arc::new(inner.build()));
        Ok(())
    }
}

/// "for tenant acme" / "shared by every tenant".
pub fn scope(tenant: &str) -> String {
    if tenant.is_empty() {
        "shared by every tenant".into()
    } else {
        format!("for tenant {tenant}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, description: &str) -> FunctionDeclaration {
        FunctionDeclaration {
            name: name.into(),
            description: description.into(),
            parameters: None,
        }
    }

    fn contract(tenant: &str, name: &str, description: &str) -> EnterpriseToolContract {
        EnterpriseToolContract {
            declaration: Some(decl(name, description)),
            risk_assessment: "LOW".into(),
            tenant_id: tenant.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_revision_runs_only_once_approved_by_another_principal_and_the_approved_one_stays_until_then()
     {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ControlStore::open(dir.path()).unwrap());
        let r = Registry::open(GovernanceConfig::default(), Some(store.clone())).unwrap();
        assert_eq!(r.snapshot().in_force("acme", "t"), Err(NotInForce::Unknown));

        let (c, before) = r.submit(contract("acme", "t", "one"), "alice").unwrap();
        assert!(before.is_none());
        assert_eq!((c.revision, c.approval_status.as_str()), (1, PENDING));
        assert_eq!(
            r.snapshot().in_force("acme", "t"),
            Err(NotInForce::NotApproved {
                revision: 1,
                status: PENDING.into(),
                tenant: "acme".into(),
            })
        );
        assert!(matches!(
            r.review("acme", "t", 1, true, "alice", "mine"),
            Err(GovernanceError::OwnSubmission { .. })
        ));
        assert!(matches!(
            r.review("acme", "t", 2, true, "bob", "ok"),
            Err(GovernanceError::NotPending { current: 1, .. })
        ));
        let (c, _) = r.review("acme", "t", 1, true, "bob", "reviewed").unwrap();
        assert_eq!(c.approved_by, "bob");
        assert_eq!(r.snapshot().in_force("acme", "t").unwrap().revision, 1);
        // Other tenants do not see it.
        assert_eq!(
            r.snapshot().in_force("globex", "t"),
            Err(NotInForce::Unknown)
        );

        // Revision 2 pending, then rejected: revision 1 stays in force throughout.
        let (c2, _) = r.submit(contract("acme", "t", "two"), "carol").unwrap();
        assert_eq!(c2.revision, 2);
        assert_eq!(r.snapshot().in_force("acme", "t").unwrap().revision, 1);
        let (rej, _) = r.review("acme", "t", 2, false, "bob", "no").unwrap();
        assert_eq!(rej.approval_status, REJECTED);
        assert_eq!(r.snapshot().in_force("acme", "t").unwrap().revision, 1);
        assert!(matches!(
            r.review("acme", "t", 2, true, "dave", "late"),
            Err(GovernanceError::NotPending { .. })
        ));

        // Persisted: a new registry over the same store sees the same state.
        drop(r);
        let r = Registry::open(GovernanceConfig::default(), Some(store)).unwrap();
        let s = r.snapshot();
        let e = s.entry("acme", "t").unwrap();
        assert_eq!(e.latest.revision, 2);
        assert_eq!(e.latest.approval_status, REJECTED);
        assert_eq!(e.approved.as_ref().unwrap().revision, 1);
        assert_eq!(s.approved_names("acme"), vec!["t"]);
        assert!(s.approved_names("globex").is_empty());
    }

    #[test]
    fn a_tenant_contract_comes_before_the_shared_one_and_the_host_manifest_must_match() {
        let r = Registry::empty();
        r.submit(contract("", "t", "shared"), "a").unwrap();
        r.review("", "t", 1, true, "b", "ok").unwrap();
        r.submit(contract("acme", "t", "acme's"), "a").unwrap();
        // acme's own is pending: the shared approved one applies meanwhile.
        let s = r.snapshot();
        let c = s.in_force("acme", "t").unwrap();
        assert_eq!(c.tenant_id, "");
        drop(s);
        r.review("acme", "t", 1, true, "b", "ok").unwrap();
        assert_eq!(
            r.snapshot().in_force("acme", "t").unwrap().tenant_id,
            "acme"
        );
        assert_eq!(r.snapshot().in_force("globex", "t").unwrap().tenant_id, "");

        let mut inner = r.lock();
        inner.host = Some(HashMap::from([(
            "t".to_string(),
            digest(&decl("t", "shared")),
        )]));
        let s = inner.build();
        drop(inner);
        assert!(s.in_force("globex", "t").is_ok());
        assert!(matches!(
            s.in_force("acme", "t"),
            Err(NotInForce::Drifted { revision: 1, .. })
        ));
        let mut inner = r.lock();
        inner.host = Some(HashMap::new());
        let s = inner.build();
        assert_eq!(
            s.in_force("globex", "t"),
            Err(NotInForce::NotDeclared { revision: 1 })
        );
    }

    #[test]
    fn the_digest_does_not_depend_on_the_order_properties_were_written_in() {
        let m1 = crate::adm::parse_manifest(
            "manifest_version: '1.0.0'\ncontracts:\n  - {name: t, description: d, parameters: {type: OBJECT, properties: {a: {type: STRING}, b: {type: NUMBER}, c: {type: BOOLEAN}}}}\n",
        )
        .unwrap();
        let m2 = crate::adm::parse_manifest(
            "manifest_version: '1.0.0'\ncontracts:\n  - {name: t, description: d, parameters: {type: OBJECT, properties: {c: {type: BOOLEAN}, b: {type: NUMBER}, a: {type: STRING}}}}\n",
        )
        .unwrap();
        assert_eq!(digest(&m1[0]), digest(&m2[0]));
        let mut changed = m1[0].clone();
        changed.description = "e".into();
        assert_ne!(digest(&m1[0]), digest(&changed));
    }

    #[test]
    fn invalid_submissions_are_refused_naming_the_field() {
        let r = Registry::empty();
        let mut c = contract("acme", "t", "d");
        c.risk_assessment = "huge".into();
        let e = r.submit(c, "a").unwrap_err().to_string();
        assert!(e.starts_with("risk_assessment: expected one of LOW"), "{e}");
        let e = r
            .submit(contract("acme", "bad name", "d"), "a")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("declaration: name: expected a name"), "{e}");
        let mut c = contract("acme", "t", "d");
        c.declaration = None;
        assert!(
            r.submit(c, "a")
                .unwrap_err()
                .to_string()
                .starts_with("declaration: required")
        );
        assert!(r.snapshot().entries().is_empty());
    }
}

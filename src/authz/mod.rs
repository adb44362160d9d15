//! Authorization: who may do what. Today the RBAC engine ([`rbac`]): roles with
//! inheritance, permissions on operations and tools, bindings of principals, IdP groups and
//! certificate kinds to roles per tenant, resolved into per-subject permission sets so a
//! check on the hot path is a lookup. The CEL policy engine, governance and budgets join it
//! here, one file per concern, each called from the one pipeline in `decision`.
//!
//! [`Authz`] holds the RBAC snapshot the hot path reads (swapped atomically on change, with
//! a generation number); [`GrantsCache`] keeps a subject's resolved grants (per connection,
//! or per verified token) for as long as the snapshot they came from is current.

pub mod rbac;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use rbac::{Grants, Rbac, Subject};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The current RBAC snapshot and its generation.
#[derive(Debug)]
pub struct Authz {
    rbac: ArcSwap<Rbac>,
    generation: AtomicU64,
}

/// A subject's grants, resolved from one RBAC generation, with its effective roles encoded
/// once as `EnterpriseSecurityContext.roles` records (appended to each call's context).
#[derive(Debug)]
pub struct Resolved {
    pub generation: u64,
    pub grants: Arc<Grants>,
    pub roles_context: Bytes,
}

impl Authz {
    pub fn new(rbac: Rbac) -> Authz {
        Authz {
            rbac: ArcSwap::from_pointee(rbac),
            generation: AtomicU64::new(1),
        }
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Rbac> {
        self.rbac.load_full()
    }

    /// Puts `rbac` in force for every call that starts from now on.
    pub fn replace(&self, rbac: Rbac) {
        self.rbac.store(Arc::new(rbac));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The grants of `who`, from `cache` while its snapshot is current.
    pub fn grants(&self, cache: &GrantsCache, who: &Subject<'_>) -> Arc<Resolved> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(r) = cache.0.load_full()
            && r.generation == generation
        {
            return r;
        }
        let grants = self.rbac.load().grants(who);
        let roles_context = roles_context(grants.roles());
        let r = Arc::new(Resolved {
            generation,
            grants,
            roles_context,
        });
        cache.0.store(Some(r.clone()));
        r
    }
}

/// `repeated string roles = 5` records of an `EnterpriseSecurityContext`.
fn roles_context(roles: &[String]) -> Bytes {
    let mut out = bytes::BytesMut::new();
    for r in roles {
        crate::grid::wire::put_len_field(&mut out, 5, r.as_bytes());
    }
    out.freeze()
}

/// One subject's resolved grants, kept while their RBAC generation is current.
#[derive(Debug, Default)]
pub struct GrantsCache(ArcSwapOption<Resolved>);

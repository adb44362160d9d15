//! Tenant isolation of GRID sessions (docs/tenancy.md). A session belongs to the principal
//! and tenant that created it: the sidecar learns every session from the `CreateSessionAck`
//! it forwards, with its expiry, and refuses a call, a destroy or a fulfilment of a session
//! of another tenant (or of another principal, unless a role allows it), and a session it
//! has never seen, before anything reaches the host.
//!
//! The table is in memory (sharded by session id, so creating and checking sessions on
//! different connections rarely meet on a lock) and written behind to the control store
//! (table `sessions`) every second and at shutdown, so sessions survive a restart. What a
//! crash can lose: the sessions created in the last second before it; their calls are then
//! refused (the table fails closed), and the client creates a new session.

use crate::ids::{PrincipalId, TenantId};
use crate::store::ControlStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// The control store's table of sessions.
pub const TABLE: &str = "sessions";
const SHARDS: usize = 16;
/// A session with no expiry in its ack is kept this long (seconds).
const DEFAULT_TTL: u64 = 3600;

/// Who a session belongs to, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub tenant: TenantId,
    pub principal: PrincipalId,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Why a session may not be used by a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The sidecar never saw this session created (or it was destroyed).
    Unknown,
    /// It expired at this time.
    Expired(u64),
    /// It belongs to another tenant.
    OtherTenant,
    /// It belongs to another principal of the same tenant.
    OtherPrincipal(PrincipalId),
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredSessionV1 {
    #[prost(string, tag = "1")]
    tenant: String,
    #[prost(string, tag = "2")]
    principal: String,
    #[prost(uint64, tag = "3")]
    expires_at: u64,
}

/// The sessions the sidecar has seen created.
#[derive(Debug)]
pub struct Sessions {
    shards: Vec<RwLock<HashMap<String, Owner>>>,
    /// Changes not yet in the control store: id → owner (`None`: removed).
    pending: Mutex<HashMap<String, Option<Owner>>>,
    store: Option<Arc<ControlStore>>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn shard(id: &str) -> usize {
    // FNV-1a: cheap, and the id is the host's, not chosen per shard by a peer it could hurt.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

impl Sessions {
    /// An empty table (no store).
    pub fn new() -> Sessions {
        Sessions {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            pending: Mutex::new(HashMap::new()),
            store: None,
        }
    }

    /// The table of `store`: the sessions stored there that have not expired.
    pub fn open(store: Arc<ControlStore>) -> Result<Sessions, String> {
        let mut s = Sessions::new();
        let t = now();
        for (k, v) in store.read_table(TABLE).map_err(|e| e.to_string())? {
            let id = String::from_utf8_lossy(&k).into_owned();
            let rec = <StoredSessionV1 as prost::Message>::decode(v.as_slice()).map_err(|e| {
                format!("{}: table {TABLE}, key {id:?}: {e}", store.path().display())
            })?;
            if rec.expires_at <= t {
                continue;
            }
            let (Some(tenant), Some(principal)) =
                (TenantId::new(&rec.tenant), PrincipalId::new(&rec.principal))
            else {
                return Err(format!(
                    "{}: table {TABLE}, key {id:?}: not a tenant and principal id",
                    store.path().display()
                ));
            };
            s.write(&id).insert(
                id.clone(),
                Owner {
                    tenant,
                    principal,
                    expires_at: rec.expires_at,
                },
            );
        }
        s.store = Some(store);
        Ok(s)
    }

    fn write(&self, id: &str) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Owner>> {
        self.shards[shard(id)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Owner>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session the host created for `tenant`/`principal`, expiring at `expires_at` (unix
    /// seconds; 0: in an hour).
    pub fn created(&self, id: &str, tenant: TenantId, principal: PrincipalId, expires_at: u64) {
        let expires_at = if expires_at == 0 {
            now() + DEFAULT_TTL
        } else {
            expires_at
        };
        let owner = Owner {
            tenant,
            principal,
            expires_at,
        };
        self.write(id).insert(id.to_string(), owner.clone());
        if self.store.is_some() {
            self.pending().insert(id.to_string(), Some(owner));
        }
    }

    /// The session is gone (destroyed).
    pub fn destroyed(&self, id: &str) {
        self.write(id).remove(id);
        if self.store.is_some() {
            self.pending().insert(id.to_string(), None);
        }
    }

    /// The owner of `id`, if the sidecar knows it.
    pub fn owner(&self, id: &str) -> Option<Owner> {
        self.shards[shard(id)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Whether session `id` belongs to `tenant` (`None`: the sidecar does not know it). No
    /// copy: for the per-call check on `Connect`.
    pub fn tenant_is(&self, id: &str, tenant: &TenantId) -> Option<bool> {
        self.shards[shard(id)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|o| o.tenant == *tenant)
    }

    /// Whether `tenant`/`principal` may use session `id`; `any_principal`: a role lets the
    /// caller use the sessions of other principals of its tenant.
    pub fn check(
        &self,
        id: &str,
        tenant: &TenantId,
        principal: &PrincipalId,
        any_principal: bool,
    ) -> Result<(), Refusal> {
        // Under the read lock, copying nothing unless refusing.
        let shard = self.shards[shard(id)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let o = shard.get(id).ok_or(Refusal::Unknown)?;
        if o.tenant != *tenant {
            return Err(Refusal::OtherTenant);
        }
        if o.expires_at <= now() {
            return Err(Refusal::Expired(o.expires_at));
        }
        if o.principal != *principal && !any_principal {
            return Err(Refusal::OtherPrincipal(o.principal.clone()));
        }
        Ok(())
    }

    /// Writes the changes since the last flush to the control store (one transaction), and
    /// forgets expired sessions. On a store error the changes stay pending.
    pub fn flush(&self) -> Result<usize, crate::store::StoreError> {
        let t = now();
        for s in &self.shards {
            s.write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, o| o.expires_at > t);
        }
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let batch: Vec<(String, Option<Owner>)> = self.pending().drain().collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = batch
            .iter()
            .map(|(id, o)| {
                let v = o.as_ref().map(|o| {
                    prost::Message::encode_to_vec(&StoredSessionV1 {
                        tenant: o.tenant.to_string(),
                        principal: o.principal.to_string(),
                        expires_at: o.expires_at,
                    })
                });
                (id.as_bytes().to_vec(), v)
            })
            .collect();
        match store.write_many(TABLE, &entries) {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                let mut p = self.pending();
                for (id, o) in batch {
                    p.entry(id).or_insert(o);
                }
                Err(e)
            }
        }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(t: &str, p: &str) -> (TenantId, PrincipalId) {
        (TenantId::new(t).unwrap(), PrincipalId::new(p).unwrap())
    }

    #[test]
    fn a_session_is_its_creators_and_survives_a_restart_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ControlStore::open(dir.path()).unwrap());
        let s = Sessions::open(store.clone()).unwrap();
        let (acme, alice) = ids("acme", "alice");
        let (globex, bob) = ids("globex", "bob");
        let (_, carol) = ids("acme", "carol");
        s.created("s1", acme.clone(), alice.clone(), now() + 60);
        s.created("old", acme.clone(), alice.clone(), now() - 1);
        s.created("gone", acme.clone(), alice.clone(), now() + 60);
        assert!(s.check("s1", &acme, &alice, false).is_ok());
        assert_eq!(
            s.check("s1", &globex, &bob, true),
            Err(Refusal::OtherTenant)
        );
        assert_eq!(
            s.check("s1", &acme, &carol, false),
            Err(Refusal::OtherPrincipal(alice.clone()))
        );
        assert!(s.check("s1", &acme, &carol, true).is_ok());
        assert_eq!(s.check("nope", &acme, &alice, false), Err(Refusal::Unknown));
        assert!(matches!(
            s.check("old", &acme, &alice, false),
            Err(Refusal::Expired(_))
        ));
        s.destroyed("gone");
        assert_eq!(s.flush().unwrap(), 3);
        assert_eq!(s.flush().unwrap(), 0, "nothing new");
        let again = Sessions::open(store).unwrap();
        assert!(again.check("s1", &acme, &alice, false).is_ok());
        assert_eq!(
            again.check("gone", &acme, &alice, false),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            again.check("old", &acme, &alice, false),
            Err(Refusal::Unknown)
        );
    }
}

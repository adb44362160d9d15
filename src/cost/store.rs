//! Budgets and usage in the control store (`control.redb`), in two tables of their own
//! (read and written through `ControlStore::read_table` / `put_in`, no schema change):
//!
//! | table | key | value |
//! |---|---|---|
//! | `cost_budgets` | `tenant` `\n` `principal` (empty for the tenant's budget) | `altar.aesp.v1.Budget` (protobuf) |
//! | `cost_usage` | `tenant` | every account of the tenant: `repeated altar.aesp.v1.Usage` (field 1), charged usage of the window `window_started_at` |
//!
//! A budget is written before it takes effect (`SetBudget` fails with nothing changed when
//! the write fails). Usage is written in the background, every `cost.persist_seconds` for
//! the tenants whose charged usage changed, and once more at shutdown: a crash loses at
//! most the calls charged since the last write (and every reservation in flight, which is
//! never persisted: a restarted sidecar has none).

use super::{Limits, Meter, lock, read};
use crate::ids::{PrincipalId, TenantId};
use crate::proto::aesp;
use crate::store::{ControlStore, StoreError};
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub const BUDGETS: &str = "cost_budgets";
pub const USAGE: &str = "cost_usage";

/// The value of a `cost_usage` entry.
#[derive(Clone, PartialEq, prost::Message)]
struct TenantUsage {
    #[prost(message, repeated, tag = "1")]
    accounts: Vec<aesp::Usage>,
}

fn budget_key(tenant: &str, principal: &str) -> Vec<u8> {
    format!("{tenant}\n{principal}").into_bytes()
}

/// Why the cost state could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{path}: table {table}: entry {key:?} does not decode: {why}; move control.redb aside and restore a backup, or remove the sidecar's cost state"
    )]
    Damaged {
        path: String,
        table: &'static str,
        key: String,
        why: String,
    },
}

impl Meter {
    /// The meter of a running sidecar: the configured budgets, the budgets set through the
    /// API on top (they win for their account), and the usage of windows still current.
    pub fn open(
        cfg: super::CostConfig,
        metrics: crate::metrics::CostMetrics,
        store: Arc<ControlStore>,
        now: u64,
    ) -> Result<Meter, OpenError> {
        let mut m = Meter::new(cfg, metrics);
        let damaged = |table: &'static str, key: &[u8], why: String| OpenError::Damaged {
            path: store.path().display().to_string(),
            table,
            key: String::from_utf8_lossy(key).into_owned(),
            why,
        };
        for (k, v) in store.read_table(BUDGETS)? {
            let b = aesp::Budget::decode(v.as_slice())
                .map_err(|e| damaged(BUDGETS, &k, e.to_string()))?;
            let ok = TenantId::new(&b.tenant_id).is_some()
                && (b.principal_id.is_empty() || PrincipalId::new(&b.principal_id).is_some())
                && k == budget_key(&b.tenant_id, &b.principal_id);
            if !ok {
                return Err(damaged(BUDGETS, &k, "not a budget of this key".into()));
            }
            let limits = Limits::from_budget(&b);
            super::write(&m.budgets).insert((b.tenant_id, b.principal_id), limits);
        }
        for (k, v) in store.read_table(USAGE)? {
            let tu =
                TenantUsage::decode(v.as_slice()).map_err(|e| damaged(USAGE, &k, e.to_string()))?;
            let tenant = std::str::from_utf8(&k)
                .ok()
                .and_then(TenantId::new)
                .ok_or_else(|| damaged(USAGE, &k, "not a tenant id".into()))?;
            for u in tu.accounts {
                m.restore(&tenant, &u, now)
                    .map_err(|why| damaged(USAGE, &k, why))?;
            }
        }
        m.store = Some(store);
        Ok(m)
    }

    /// Puts a persisted account's usage back, if its window is still the current one.
    fn restore(&self, tenant: &TenantId, u: &aesp::Usage, now: u64) -> Result<(), String> {
        let t = self.tenant(tenant, now);
        let acc;
        let window = if u.principal_id.is_empty() {
            &t.account.window
        } else {
            let p = PrincipalId::new(&u.principal_id)
                .ok_or_else(|| format!("not a principal id: {:?}", u.principal_id))?;
            acc = self.principal(&t, p.as_str(), now);
            &acc.window
        };
        let mut w = lock(window);
        w.roll(now);
        if w.started_at != u.window_started_at {
            return Ok(());
        }
        w.invocations = u.invocations;
        w.cost_units = u.cost_units;
        w.request_bytes = u.request_bytes;
        w.response_bytes = u.response_bytes;
        w.duration_us = u.duration_ms.saturating_mul(1000);
        w.by_tool = u
            .invocations_by_tool
            .iter()
            .map(|(tool, n)| {
                let units = u.cost_units_by_tool.get(tool).copied().unwrap_or(0);
                (Arc::from(tool.as_str()), (*n, units))
            })
            .collect();
        Ok(())
    }

    /// Writes the budget of an account (`principal` `None`: the tenant's) to the store,
    /// then puts it in force; returns the budget it replaced. Unlimited limits remove the
    /// budget (and override a configured one). Blocking: call from `spawn_blocking`.
    pub fn set_budget(
        &self,
        tenant: &TenantId,
        principal: Option<&PrincipalId>,
        limits: Limits,
        now: u64,
    ) -> Result<Option<Limits>, StoreError> {
        let _one_at_a_time = lock(&self.admin);
        let p = principal.map_or("", |p| p.as_str());
        let before = self.budget_of(tenant.as_str(), p);
        if let Some(store) = &self.store {
            store.put_in(
                BUDGETS,
                &budget_key(tenant.as_str(), p),
                &limits.to_budget(tenant.as_str(), p).encode_to_vec(),
            )?;
        }
        self.apply_budget(tenant, principal, limits, now);
        Ok(before)
    }

    /// Writes the charged usage of every tenant that changed since the last write; returns
    /// how many tenants were written. A tenant whose write fails stays to be written.
    /// Blocking: call from `spawn_blocking`.
    pub fn persist(&self) -> Result<usize, StoreError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let _one_at_a_time = lock(&self.persisting);
        let tenants: Vec<_> = self
            .shards
            .iter()
            .flat_map(|s| read(s).values().cloned().collect::<Vec<_>>())
            .filter(|t| t.dirty.swap(false, Ordering::AcqRel))
            .collect();
        let mut written = 0;
        for (i, t) in tenants.iter().enumerate() {
            let mut accounts = vec![super::usage_of(t.id.as_str(), "", &lock(&t.account.window))];
            let principals: Vec<_> = read(&t.principals)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (p, a) in principals {
                accounts.push(super::usage_of(t.id.as_str(), &p, &lock(&a.window)));
            }
            for a in &mut accounts {
                a.in_flight = 0;
                a.window_resets_at = 0;
            }
            let value = TenantUsage { accounts }.encode_to_vec();
            if let Err(e) = store.put_in(USAGE, t.id.as_str().as_bytes(), &value) {
                for t in &tenants[i..] {
                    t.dirty.store(true, Ordering::Release);
                }
                self.metrics.persist_failures.inc();
                return Err(e);
            }
            written += 1;
        }
        Ok(written)
    }
}

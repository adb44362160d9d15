//! Metering and budgets of tool calls (docs/cost.md).
//!
//! Every tool call the pipeline allows **reserves** its cost before it is forwarded: one
//! invocation and the tool's cost units (`cost.tools`, else `cost.default_units`), in the
//! caller's principal account and in its tenant's account at once, atomically against both
//! budgets: the two accounts' locks are taken (always principal, then tenant), both limits
//! checked, both counters raised, the locks released. Concurrent calls therefore cannot
//! overshoot a budget. A call that would exceed one is refused (`BUDGET_EXCEEDED`, built in
//! `decision/budget.rs`) and reserves nothing.
//!
//! The [`Reservation`] travels with the allowed call (in its `Facts`) and is **settled**
//! when the call's outcome is known (`proxy/hooks.rs`, `Outcome`): charged when the host
//! answered with a result (an in-band tool error included), released otherwise (refused
//! after the pipeline, the host unreachable or resetting the stream, no response message).
//! A reservation dropped without being settled is released, so no path can leak one.
//!
//! The hot path takes no global lock: tenants live in a sharded map (a shard's read lock,
//! a write lock only the first time a tenant, principal or tool is seen), and each account
//! has its own mutex held for a few counter updates.
//!
//! Per-tool cost comes from the configuration today; a contract metadata source
//! (`EnterpriseToolContract`) can take its place later without changing the accounts.
//!
//! Usage and budgets survive a restart: budgets set through `SetBudget` are written to the
//! control store before they take effect; charged usage is written in the background every
//! `cost.persist_seconds` and at shutdown ([`store`]), never on a call's path.

pub mod config;
pub mod store;

pub use config::{CostConfig, RawCost};

use crate::ids::{PrincipalId, TenantId};
use crate::metrics::CostMetrics;
use crate::proto::aesp;
use prometheus::{Counter, IntCounter};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

const SHARDS: usize = 16;

/// A budget's limits over its window; 0 = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_invocations: u64,
    pub max_cost_units: u64,
    pub window_seconds: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.max_invocations == 0 && self.max_cost_units == 0
    }

    pub fn from_budget(b: &aesp::Budget) -> Limits {
        Limits {
            max_invocations: b.max_invocations,
            max_cost_units: b.max_cost_units,
            window_seconds: b.window_seconds,
        }
    }

    pub fn to_budget(self, tenant: &str, principal: &str) -> aesp::Budget {
        aesp::Budget {
            tenant_id: tenant.to_string(),
            principal_id: principal.to_string(),
            max_invocations: self.max_invocations,
            max_cost_units: self.max_cost_units,
            window_seconds: self.window_seconds,
        }
    }
}

/// The start of the window of `seconds` that holds `now`: windows are aligned to the Unix
/// epoch (a day's window resets at 00:00 UTC), so they do not depend on when the sidecar
/// started.
pub fn window_start(now: u64, seconds: u64) -> u64 {
    now - now % seconds.max(1)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counters: a panic elsewhere leaves nothing half-done worth refusing over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// One account's counters in its current window.
#[derive(Debug, Default, Clone)]
struct Window {
    /// The budget; `None` = metered only.
    limits: Option<Limits>,
    /// The budget's window, else `cost.window_seconds`.
    seconds: u64,
    started_at: u64,
    /// Charged in this window.
    invocations: u64,
    cost_units: u64,
    /// Reserved in this window, not settled yet.
    reserved_invocations: u64,
    reserved_units: u64,
    request_bytes: u64,
    response_bytes: u64,
    duration_us: u64,
    /// Charged invocations and cost units by tool.
    by_tool: HashMap<Arc<str>, (u64, u64)>,
}

impl Window {
    fn new(limits: Option<Limits>, default_seconds: u64, now: u64) -> Window {
        let seconds = window_seconds(limits, default_seconds);
        Window {
            limits,
            seconds,
            started_at: window_start(now, seconds),
            ..Default::default()
        }
    }

    /// Moves to the window holding `now` (never backwards: a clock stepped back stays in
    /// the current window).
    fn roll(&mut self, now: u64) {
        let start = window_start(now, self.seconds);
        if start > self.started_at {
            *self = Window {
                limits: self.limits,
                seconds: self.seconds,
                started_at: start,
                ..Default::default()
            };
        }
    }

    fn resets_at(&self) -> u64 {
        self.started_at.saturating_add(self.seconds)
    }

    /// Which limit one more call of `units` would break.
    fn exceeds(&self, units: u64) -> Option<Limit> {
        let l = self.limits?;
        if l.max_invocations > 0
            && self.invocations + self.reserved_invocations + 1 > l.max_invocations
        {
            return Some(Limit::Invocations);
        }
        if l.max_cost_units > 0 && self.cost_units + self.reserved_units + units > l.max_cost_units
        {
            return Some(Limit::CostUnits);
        }
        None
    }

    /// The highest fraction of a limit used (reservations included); 0 without a budget.
    fn fraction(&self) -> f64 {
        let Some(l) = self.limits else { return 0.0 };
        let f = |used: u64, max: u64| {
            if max == 0 {
                0.0
            } else {
                used as f64 / max as f64
            }
        };
        f(
            self.invocations + self.reserved_invocations,
            l.max_invocations,
        )
        .max(f(self.cost_units + self.reserved_units, l.max_cost_units))
    }

    /// Puts `limits` in force; a new window length starts a window at `now` that carries
    /// what was used (changing the window never resets usage).
    fn set_limits(&mut self, limits: Option<Limits>, default_seconds: u64, now: u64) {
        self.roll(now);
        let seconds = window_seconds(limits, default_seconds);
        if seconds != self.seconds {
            self.seconds = seconds;
            self.started_at = window_start(now, seconds);
        }
        self.limits = limits;
    }
}

fn window_seconds(limits: Option<Limits>, default_seconds: u64) -> u64 {
    match limits {
        Some(l) if l.window_seconds > 0 => l.window_seconds,
        _ => default_seconds.max(1),
    }
}

/// What the policies read of an account.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    invocations: u64,
    cost_units: u64,
    in_flight: u64,
    fraction: f64,
}

/// Which limit a call would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Invocations,
    CostUnits,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Invocations => "max_invocations",
            Limit::CostUnits => "max_cost_units",
        }
    }
}

/// A call refused by a budget: which one, and where it stands.
#[derive(Debug, Clone)]
pub struct Exceeded {
    pub tenant: TenantId,
    /// `Some`: the principal's budget; `None`: the tenant's.
    pub principal: Option<PrincipalId>,
    pub limit: Limit,
    pub limits: Limits,
    /// Charged plus reserved in the window.
    pub used_invocations: u64,
    pub used_cost_units: u64,
    pub call_cost_units: u64,
    pub window_started_at: u64,
    pub window_resets_at: u64,
}

impl Exceeded {
    fn new(
        tenant: &TenantId,
        principal: Option<&PrincipalId>,
        w: &Window,
        limit: Limit,
        units: u64,
    ) -> Self {
        Exceeded {
            tenant: tenant.clone(),
            principal: principal.cloned(),
            limit,
            limits: w.limits.unwrap_or_default(),
            used_invocations: w.invocations + w.reserved_invocations,
            used_cost_units: w.cost_units + w.reserved_units,
            call_cost_units: units,
            window_started_at: w.started_at,
            window_resets_at: w.resets_at(),
        }
    }

    /// What is left of a limit (`None`: unlimited).
    pub fn remaining_invocations(&self) -> Option<u64> {
        (self.limits.max_invocations > 0).then(|| {
            self.limits
                .max_invocations
                .saturating_sub(self.used_invocations)
        })
    }

    pub fn remaining_cost_units(&self) -> Option<u64> {
        (self.limits.max_cost_units > 0).then(|| {
            self.limits
                .max_cost_units
                .saturating_sub(self.used_cost_units)
        })
    }
}

/// A tenant's or a principal's account.
#[derive(Debug)]
struct Account {
    window: Mutex<Window>,
}

/// The Prometheus series of one (tenant, tool), resolved once.
#[derive(Debug)]
struct ToolSeries {
    name: Arc<str>,
    units: u64,
    charged: IntCounter,
    released: IntCounter,
    cost_units: IntCounter,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    duration: Counter,
}

/// A tenant: its account, its principals' accounts, its tools' series.
#[derive(Debug)]
struct Tenant {
    id: TenantId,
    account: Account,
    principals: RwLock<HashMap<Arc<str>, Arc<Account>>>,
    tools: RwLock<HashMap<Arc<str>, Arc<ToolSeries>>>,
    exceeded_tenant: IntCounter,
    exceeded_principal: IntCounter,
    /// Charged usage changed since it was last written to the store.
    dirty: AtomicBool,
}

/// The meter: every account, the budgets in force, the store they persist to.
pub struct Meter {
    cfg: CostConfig,
    shards: Vec<RwLock<HashMap<Arc<str>, Arc<Tenant>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// The budgets in force by (tenant, principal or ""): what a new account starts with.
    budgets: RwLock<HashMap<(String, String), Limits>>,
    metrics: CostMetrics,
    store: Option<Arc<crate::store::ControlStore>>,
    /// `SetBudget`s one at a time (the store's order is the order in force).
    admin: Mutex<()>,
    /// Writes of usage one at a time.
    persisting: Mutex<()>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").finish_non_exhaustive()
    }
}

/// What became of a reserved call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settlement {
    /// The host answered with a result: the reservation is kept as a charge.
    pub charged: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration: Duration,
}

/// A call's reserved cost; settled once, released if dropped unsettled.
pub struct Reservation {
    tenant: Arc<Tenant>,
    principal: Arc<Account>,
    tool: Arc<ToolSeries>,
    units: u64,
    tenant_window: u64,
    principal_window: u64,
    done: AtomicBool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("tenant", &self.tenant.id)
            .field("tool", &self.tool.name)
            .field("units", &self.units)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// The cost units reserved.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Settles the call: charged (kept, with its bytes and duration) or released. Only the
    /// first settlement counts.
    pub fn settle(&self, s: Settlement) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let t = &self.tool;
        if !s.charged {
            t.released.inc();
            for (acc, started) in [
                (&*self.principal, self.principal_window),
                (&self.tenant.account, self.tenant_window),
            ] {
                let mut w = lock(&acc.window);
                if w.started_at == started {
                    w.reserved_invocations = w.reserved_invocations.saturating_sub(1);
                    w.reserved_units = w.reserved_units.saturating_sub(self.units);
                }
            }
            return;
        }
        t.charged.inc();
        t.cost_units.inc_by(self.units);
        t.request_bytes.inc_by(s.request_bytes);
        t.response_bytes.inc_by(s.response_bytes);
        t.duration.inc_by(s.duration.as_secs_f64());
        let us = u64::try_from(s.duration.as_micros()).unwrap_or(u64::MAX);
        for (acc, started) in [
            (&*self.principal, self.principal_window),
            (&self.tenant.account, self.tenant_window),
        ] {
            let mut w = lock(&acc.window);
            // A call reserved in a window that has ended counted there; the new window
            // owes it nothing.
            if w.started_at != started {
                continue;
            }
            w.reserved_invocations = w.reserved_invocations.saturating_sub(1);
            w.reserved_units = w.reserved_units.saturating_sub(self.units);
            w.invocations += 1;
            w.cost_units += self.units;
            w.request_bytes += s.request_bytes;
            w.response_bytes += s.response_bytes;
            w.duration_us = w.duration_us.saturating_add(us);
            match w.by_tool.get_mut(&*t.name) {
                Some(e) => {
                    e.0 += 1;
                    e.1 += self.units;
                }
                None => {
                    w.by_tool.insert(t.name.clone(), (1, self.units));
                }
            }
        }
        self.tenant.dirty.store(true, Ordering::Release);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle(Settlement::default());
    }
}

impl Meter {
    /// A meter with the configured budgets and no store (nothing persists).
    pub fn new(cfg: CostConfig, metrics: CostMetrics) -> Meter {
        let budgets = cfg
            .budgets
            .iter()
            .map(|(t, p, l)| {
                (
                    (
                        t.to_string(),
                        p.as_ref().map_or_else(String::new, |p| p.to_string()),
                    ),
                    *l,
                )
            })
            .collect();
        Meter {
            cfg,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            budgets: RwLock::new(budgets),
            metrics,
            store: None,
            admin: Mutex::new(()),
            persisting: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &CostConfig {
        &self.cfg
    }

    /// The cost units of one call to `tool`.
    pub fn units_of(&self, tool: &str) -> u64 {
        self.cfg
            .tools
            .get(tool)
            .copied()
            .unwrap_or(self.cfg.default_units)
    }

    fn shard(&self, tenant: &str) -> &RwLock<HashMap<Arc<str>, Arc<Tenant>>> {
        &self.shards[(self.hasher.hash_one(tenant) as usize) % SHARDS]
    }

    fn budget_of(&self, tenant: &str, principal: &str) -> Option<Limits> {
        read(&self.budgets)
            .get(&(tenant.to_string(), principal.to_string()))
            .copied()
            .filter(|l| !l.is_unlimited())
    }

    fn find_tenant(&self, tenant: &str) -> Option<Arc<Tenant>> {
        read(self.shard(tenant)).get(tenant).cloned()
    }

    fn tenant(&self, tenant: &TenantId, now: u64) -> Arc<Tenant> {
        if let Some(t) = self.find_tenant(tenant.as_str()) {
            return t;
        }
        let mut shard = write(self.shard(tenant.as_str()));
        shard
            .entry(Arc::from(tenant.as_str()))
            .or_insert_with(|| {
                let ex = &self.metrics.budget_exceeded;
                Arc::new(Tenant {
                    id: tenant.clone(),
                    account: Account {
                        window: Mutex::new(Window::new(
                            self.budget_of(tenant.as_str(), ""),
                            self.cfg.window_seconds,
                            now,
                        )),
                    },
                    principals: RwLock::new(HashMap::new()),
                    tools: RwLock::new(HashMap::new()),
                    exceeded_tenant: ex.with_label_values(&[tenant.as_str(), "tenant"]),
                    exceeded_principal: ex.with_label_values(&[tenant.as_str(), "principal"]),
                    dirty: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn principal(&self, t: &Tenant, principal: &str, now: u64) -> Arc<Account> {
        if let Some(a) = read(&t.principals).get(principal) {
            return a.clone();
        }
        write(&t.principals)
            .entry(Arc::from(principal))
            .or_insert_with(|| {
                Arc::new(Account {
                    window: Mutex::new(Window::new(
                        self.budget_of(t.id.as_str(), principal),
                        self.cfg.window_seconds,
                        now,
                    )),
                })
            })
            .clone()
    }

    fn series(&self, t: &Tenant, tool: &str) -> Arc<ToolSeries> {
        if let Some(s) = read(&t.tools).get(tool) {
            return s.clone();
        }
        let m = &self.metrics;
        let tt = [t.id.as_str(), tool];
        write(&t.tools)
            .entry(Arc::from(tool))
            .or_insert_with(|| {
                Arc::new(ToolSeries {
                    name: Arc::from(tool),
                    units: self.units_of(tool),
                    charged: m
                        .invocations
                        .with_label_values(&[t.id.as_str(), tool, "charged"]),
                    released: m
                        .invocations
                        .with_label_values(&[t.id.as_str(), tool, "released"]),
                    cost_units: m.cost_units.with_label_values(&tt),
                    request_bytes: m.request_bytes.with_label_values(&tt),
                    response_bytes: m.response_bytes.with_label_values(&tt),
                    duration: m.duration_seconds.with_label_values(&tt),
                })
            })
            .clone()
    }

    /// Reserves one call of `tool` for `principal` of `tenant` at `now` (Unix seconds),
    /// atomically against the principal's and the tenant's budgets.
    pub fn reserve(
        &self,
        tenant: &TenantId,
        principal: &PrincipalId,
        tool: &str,
        now: u64,
    ) -> Result<Reservation, Exceeded> {
        let t = self.tenant(tenant, now);
        let p = self.principal(&t, principal.as_str(), now);
        let series = self.series(&t, tool);
        let units = series.units;
        // Always the principal's lock first, then the tenant's.
        let mut pw = lock(&p.window);
        let mut tw = lock(&t.account.window);
        pw.roll(now);
        tw.roll(now);
        if let Some(limit) = pw.exceeds(units) {
            t.exceeded_principal.inc();
            return Err(Exceeded::new(tenant, Some(principal), &pw, limit, units));
        }
        if let Some(limit) = tw.exceeds(units) {
            t.exceeded_tenant.inc();
            return Err(Exceeded::new(tenant, None, &tw, limit, units));
        }
        for w in [&mut *pw, &mut *tw] {
            w.reserved_invocations += 1;
            w.reserved_units += units;
        }
        let (principal_window, tenant_window) = (pw.started_at, tw.started_at);
        drop(tw);
        drop(pw);
        Ok(Reservation {
            tenant: t.clone(),
            principal: p,
            tool: series,
            units,
            tenant_window,
            principal_window,
            done: AtomicBool::new(false),
        })
    }

    /// A copy of an account's window at `now` (rolled), or `None` if never seen.
    fn peek(&self, tenant: &str, principal: Option<&str>, now: u64) -> Option<Window> {
        let t = self.find_tenant(tenant)?;
        let mut w = match principal {
            None => lock(&t.account.window).clone(),
            Some(p) => {
                let a = read(&t.principals).get(p).cloned()?;
                lock(&a.window).clone()
            }
        };
        w.roll(now);
        Some(w)
    }

    /// An account's counters at `now` (rolled) without copying its per-tool figures: what
    /// the policies read on every call.
    fn figures(&self, tenant: &str, principal: Option<&str>, now: u64) -> Option<Figures> {
        let t = self.find_tenant(tenant)?;
        let of = |w: &mut Window| {
            w.roll(now);
            Figures {
                invocations: w.invocations,
                cost_units: w.cost_units,
                in_flight: w.reserved_invocations,
                fraction: w.fraction(),
            }
        };
        match principal {
            None => Some(of(&mut lock(&t.account.window))),
            Some(p) => {
                let a = read(&t.principals).get(p).cloned()?;
                Some(of(&mut lock(&a.window)))
            }
        }
    }

    /// The `usage` variable of the CEL policies for a call of `tool` by `principal` of
    /// `tenant` (docs/cost.md): the principal's and the tenant's window so far (before
    /// this call), the fraction of the tightest budget used, this call's cost.
    pub fn policy_usage(
        &self,
        tenant: &TenantId,
        principal: &PrincipalId,
        tool: &str,
        now: u64,
    ) -> HashMap<String, f64> {
        // An account never seen has used nothing: 0 everywhere.
        let pw = self
            .figures(tenant.as_str(), Some(principal.as_str()), now)
            .unwrap_or_default();
        let tw = self.figures(tenant.as_str(), None, now).unwrap_or_default();
        HashMap::from([
            ("invocations".to_string(), pw.invocations as f64),
            ("cost_units".to_string(), pw.cost_units as f64),
            ("in_flight".to_string(), pw.in_flight as f64),
            ("tenant_invocations".to_string(), tw.invocations as f64),
            ("tenant_cost_units".to_string(), tw.cost_units as f64),
            ("budget_fraction".to_string(), pw.fraction.max(tw.fraction)),
            ("call_cost_units".to_string(), self.units_of(tool) as f64),
        ])
    }

    /// The usage of an account (`principal` `None`: the tenant's) in its current window.
    pub fn usage(
        &self,
        tenant: &TenantId,
        principal: Option<&PrincipalId>,
        now: u64,
    ) -> aesp::Usage {
        let p = principal.map(|p| p.as_str());
        let w = self.peek(tenant.as_str(), p, now).unwrap_or_else(|| {
            Window::new(
                self.budget_of(tenant.as_str(), p.unwrap_or("")),
                self.cfg.window_seconds,
                now,
            )
        });
        let mut u = usage_of(tenant.as_str(), p.unwrap_or(""), &w);
        u.budget = w
            .limits
            .map(|l| l.to_budget(tenant.as_str(), p.unwrap_or("")));
        u
    }

    /// The budget in force for an account, if any.
    pub fn budget(&self, tenant: &TenantId, principal: Option<&PrincipalId>) -> Option<Limits> {
        self.budget_of(tenant.as_str(), principal.map_or("", |p| p.as_str()))
    }

    /// Puts `limits` in force for an account (unlimited ones remove the budget) without
    /// writing anything: [`Meter::set_budget`] writes first.
    fn apply_budget(
        &self,
        tenant: &TenantId,
        principal: Option<&PrincipalId>,
        limits: Limits,
        now: u64,
    ) {
        let p = principal.map_or("", |p| p.as_str());
        write(&self.budgets).insert((tenant.to_string(), p.to_string()), limits);
        let in_force = (!limits.is_unlimited()).then_some(limits);
        let t = self.tenant(tenant, now);
        let acc = principal.map(|p| self.principal(&t, p.as_str(), now));
        let window = acc.as_ref().map_or(&t.account.window, |a| &a.window);
        lock(window).set_limits(in_force, self.cfg.window_seconds, now);
        t.dirty.store(true, Ordering::Release);
    }
}

/// An account's window as the `Usage` message (without its budget).
fn usage_of(tenant: &str, principal: &str, w: &Window) -> aesp::Usage {
    aesp::Usage {
        tenant_id: tenant.to_string(),
        principal_id: principal.to_string(),
        invocations: w.invocations,
        cost_units: w.cost_units,
        request_bytes: w.request_bytes,
        response_bytes: w.response_bytes,
        window_started_at: w.started_at,
        invocations_by_tool: w
            .by_tool
            .iter()
            .map(|(k, v)| (k.to_string(), v.0))
            .collect(),
        in_flight: w.reserved_invocations,
        budget: None,
        window_resets_at: w.resets_at(),
        duration_ms: w.duration_us / 1000,
        cost_units_by_tool: w
            .by_tool
            .iter()
            .map(|(k, v)| (k.to_string(), v.1))
            .collect(),
    }
}

#[cfg(test)]
mod tests;

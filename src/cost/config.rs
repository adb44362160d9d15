//! The `cost:` section of the configuration (docs/cost.md).
//!
//! ```yaml
//! cost:
//!   default_units: 1            # cost units of a call to a tool cost.tools does not name
//!   tools: {billing_refund: 5}  # cost units per call, by tool
//!   window_seconds: 86400       # metering window of an account without a budget
//!   persist_seconds: 5          # how often metered usage is written to control.redb
//!   budgets:                    # seeds; a budget set through SetBudget wins for its account
//!     - {tenant: acme, max_invocations: 1000, max_cost_units: 0, window_seconds: 3600}
//!     - {tenant: acme, principal: alice, max_invocations: 100, window_seconds: 3600}
//! ```

use super::Limits;
use crate::ids::{PrincipalId, TenantId};
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

/// The longest window a budget may have: 366 days.
pub const MAX_WINDOW_SECONDS: u64 = 366 * 86_400;

/// The validated `cost:` section.
#[derive(Debug, Clone)]
pub struct CostConfig {
    /// Cost units of a call to a tool `tools` does not name (default 1).
    pub default_units: u64,
    /// Cost units per call, by tool name.
    pub tools: HashMap<String, u64>,
    /// The metering window of an account without a budget (default one day).
    pub window_seconds: u64,
    /// How often metered usage is written to the control store (default 5 s).
    pub persist_every: Duration,
    /// Budgets seeded from the file, by (tenant, principal; `None` = the whole tenant).
    pub budgets: Vec<(TenantId, Option<PrincipalId>, Limits)>,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            default_units: 1,
            tools: HashMap::new(),
            window_seconds: 86_400,
            persist_every: Duration::from_secs(5),
            budgets: Vec::new(),
        }
    }
}

/// The section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCost {
    default_units: Option<u64>,
    #[serde(default)]
    tools: HashMap<String, u64>,
    window_seconds: Option<u64>,
    persist_seconds: Option<u64>,
    #[serde(default)]
    budgets: Vec<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    tenant: String,
    principal: Option<String>,
    #[serde(default)]
    max_invocations: u64,
    #[serde(default)]
    max_cost_units: u64,
    window_seconds: Option<u64>,
}

/// Checks the limits of a budget: a budget that limits something has a window of 1 s to
/// [`MAX_WINDOW_SECONDS`]; `Err` is the problem, for the field `window_seconds`.
pub fn check_limits(l: &Limits) -> Result<(), String> {
    if l.is_unlimited() && l.window_seconds == 0 {
        return Ok(());
    }
    if l.window_seconds == 0 || l.window_seconds > MAX_WINDOW_SECONDS {
        return Err(format!(
            "expected 1 to {MAX_WINDOW_SECONDS} seconds (366 days), got {}",
            l.window_seconds
        ));
    }
    Ok(())
}

impl RawCost {
    /// The validated section; `Err` is (field, problem).
    pub fn validate(self) -> Result<CostConfig, (String, String)> {
        let d = CostConfig::default();
        let positive = |field: &str, v: Option<u64>, default: u64| match v {
            None => Ok(default),
            Some(0) => Err((
                field.to_string(),
                "expected a positive number, got 0".into(),
            )),
            Some(n) => Ok(n),
        };
        let window_seconds =
            positive("cost.window_seconds", self.window_seconds, d.window_seconds)?;
        if window_seconds > MAX_WINDOW_SECONDS {
            return Err((
                "cost.window_seconds".into(),
                format!("expected at most {MAX_WINDOW_SECONDS} (366 days), got {window_seconds}"),
            ));
        }
        let persist = positive(
            "cost.persist_seconds",
            self.persist_seconds,
            d.persist_every.as_secs(),
        )?;
        for name in self.tools.keys() {
            if name.trim().is_empty() {
                return Err(("cost.tools".into(), "a tool name is empty".into()));
            }
        }
        let mut budgets = Vec::with_capacity(self.budgets.len());
        for (i, b) in self.budgets.into_iter().enumerate() {
            let field = |f: &str| format!("cost.budgets[{i}].{f}");
            let tenant = TenantId::new(&b.tenant).ok_or_else(|| {
                (
                    field("tenant"),
                    format!("expected a tenant id, got {:?}", b.tenant),
                )
            })?;
            let principal = match b.principal.as_deref() {
                None | Some("") => None,
                Some(p) => Some(PrincipalId::new(p).ok_or_else(|| {
                    (
                        field("principal"),
                        format!("expected a principal id, got {p:?}"),
                    )
                })?),
            };
            let limits = Limits {
                max_invocations: b.max_invocations,
                max_cost_units: b.max_cost_units,
                window_seconds: b.window_seconds.unwrap_or(0),
            };
            check_limits(&limits).map_err(|p| (field("window_seconds"), p))?;
            if budgets
                .iter()
                .any(|(t, p, _)| *t == tenant && *p == principal)
            {
                return Err((
                    field("tenant"),
                    format!(
                        "a second budget for {}{}",
                        principal
                            .as_ref()
                            .map_or_else(String::new, |p| format!("principal {p} of ")),
                        format_args!("tenant {tenant}")
                    ),
                ));
            }
            budgets.push((tenant, principal, limits));
        }
        Ok(CostConfig {
            default_units: self.default_units.unwrap_or(d.default_units),
            tools: self.tools,
            window_seconds,
            persist_every: Duration::from_secs(persist),
            budgets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<CostConfig, (String, String)> {
        serde_norway::from_str::<RawCost>(y)
            .map_err(|e| ("yaml".to_string(), e.to_string()))?
            .validate()
    }

    #[test]
    fn defaults_and_a_full_section() {
        let d = parse("{}").unwrap();
        assert_eq!((d.default_units, d.window_seconds), (1, 86_400));
        let c = parse(
            "default_units: 2\ntools: {billing_refund: 5}\nbudgets:\n  - {tenant: acme, max_invocations: 3, window_seconds: 60}\n  - {tenant: acme, principal: alice, max_cost_units: 9, window_seconds: 10}\n",
        )
        .unwrap();
        assert_eq!(c.default_units, 2);
        assert_eq!(c.tools.get("billing_refund"), Some(&5));
        assert_eq!(c.budgets.len(), 2);
        assert_eq!(c.budgets[1].1.as_ref().map(|p| p.as_str()), Some("alice"));
        assert_eq!(c.budgets[1].2.max_cost_units, 9);
    }

    #[test]
    fn bad_budgets_name_their_field() {
        let cases = [
            (
                "budgets: [{tenant: 'a b', max_invocations: 1, window_seconds: 1}]",
                "cost.budgets[0].tenant",
            ),
            (
                "budgets: [{tenant: acme, max_invocations: 1}]",
                "cost.budgets[0].window_seconds",
            ),
            (
                "budgets: [{tenant: acme, max_invocations: 1, window_seconds: 99999999}]",
                "cost.budgets[0].window_seconds",
            ),
            (
                "budgets: [{tenant: acme, principal: 'x/y', max_invocations: 1, window_seconds: 1}]",
                "cost.budgets[0].principal",
            ),
            (
                "budgets: [{tenant: acme, max_invocations: 1, window_seconds: 1}, {tenant: acme, max_invocations: 2, window_seconds: 1}]",
                "cost.budgets[1].tenant",
            ),
            ("window_seconds: 0", "cost.window_seconds"),
            ("persist_seconds: 0", "cost.persist_seconds"),
        ];
        for (y, field) in cases {
            let (f, problem) = parse(y).unwrap_err();
            assert_eq!(f, field, "{y}: {problem}");
        }
        assert!(parse("budget: []").is_err(), "unknown fields are refused");
    }
}

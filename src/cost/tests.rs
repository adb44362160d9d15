use super::*;

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn p(s: &str) -> PrincipalId {
    PrincipalId::new(s).unwrap()
}

fn limits(inv: u64, units: u64, w: u64) -> Limits {
    Limits {
        max_invocations: inv,
        max_cost_units: units,
        window_seconds: w,
    }
}

fn meter(budgets: Vec<(TenantId, Option<PrincipalId>, Limits)>) -> Meter {
    let cfg = CostConfig {
        tools: HashMap::from([("pricey".to_string(), 5)]),
        budgets,
        ..Default::default()
    };
    Meter::new(cfg, CostMetrics::unregistered().unwrap())
}

const NOW: u64 = 1_700_000_000;

fn charged() -> Settlement {
    Settlement {
        charged: true,
        request_bytes: 10,
        response_bytes: 20,
        duration: Duration::from_millis(3),
    }
}

#[test]
fn a_budget_admits_up_to_its_limit_and_releases_give_back() {
    let m = meter(vec![(t("acme"), Some(p("alice")), limits(2, 0, 60))]);
    let a = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap();
    let b = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap();
    let e = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap_err();
    assert_eq!(e.limit, Limit::Invocations);
    assert_eq!(e.principal.as_ref().map(|p| p.as_str()), Some("alice"));
    assert_eq!(e.remaining_invocations(), Some(0));
    assert_eq!(e.remaining_cost_units(), None);
    assert_eq!(e.window_resets_at, window_start(NOW, 60) + 60);
    // bob of the same tenant has no budget of his own and the tenant none either.
    assert!(m.reserve(&t("acme"), &p("bob"), "echo", NOW).is_ok());
    // A release (or a drop) gives the reservation back; a charge keeps it.
    a.settle(Settlement::default());
    drop(b);
    let c = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap();
    c.settle(charged());
    let u = m.usage(&t("acme"), Some(&p("alice")), NOW);
    assert_eq!((u.invocations, u.in_flight, u.cost_units), (1, 0, 1));
    assert_eq!(
        (u.request_bytes, u.response_bytes, u.duration_ms),
        (10, 20, 3)
    );
    assert_eq!(u.invocations_by_tool.get("echo"), Some(&1));
    assert_eq!(u.budget.map(|b| b.max_invocations), Some(2));
    // Settling twice counts once.
    c.settle(charged());
    assert_eq!(m.usage(&t("acme"), Some(&p("alice")), NOW).invocations, 1);
}

#[test]
fn cost_units_count_per_tool_and_the_tenant_budget_binds_every_principal() {
    let m = meter(vec![(t("acme"), None, limits(0, 12, 3600))]);
    let r1 = m.reserve(&t("acme"), &p("alice"), "pricey", NOW).unwrap();
    let r2 = m.reserve(&t("acme"), &p("bob"), "pricey", NOW).unwrap();
    assert_eq!(r1.units(), 5);
    let e = m
        .reserve(&t("acme"), &p("carol"), "pricey", NOW)
        .unwrap_err();
    assert_eq!((e.limit, e.principal.is_none()), (Limit::CostUnits, true));
    assert_eq!(
        (
            e.used_cost_units,
            e.call_cost_units,
            e.remaining_cost_units()
        ),
        (10, 5, Some(2))
    );
    // A cheaper tool still fits (default 1 unit).
    let r3 = m.reserve(&t("acme"), &p("carol"), "echo", NOW).unwrap();
    r1.settle(charged());
    r2.settle(charged());
    r3.settle(charged());
    let u = m.usage(&t("acme"), None, NOW);
    assert_eq!((u.invocations, u.cost_units), (3, 11));
    assert_eq!(u.cost_units_by_tool.get("pricey"), Some(&10));
    // Another tenant is untouched.
    assert_eq!(m.usage(&t("globex"), None, NOW).invocations, 0);
}

#[test]
fn concurrent_reservations_never_overshoot() {
    let m = Arc::new(meter(vec![
        (t("acme"), None, limits(500, 0, 3600)),
        (t("acme"), Some(p("p0")), limits(100, 0, 3600)),
    ]));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                let who = p(&format!("p{}", i % 4));
                let mut held = Vec::new();
                for _ in 0..200 {
                    if let Ok(r) = m.reserve(&t("acme"), &who, "echo", NOW) {
                        held.push(r);
                    }
                }
                held
            })
        })
        .collect();
    let held: Vec<Vec<Reservation>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let total: usize = held.iter().map(Vec::len).sum();
    assert_eq!(total, 500, "exactly the tenant's limit, never more");
    let p0: usize = held.iter().step_by(4).map(Vec::len).sum();
    assert!(p0 <= 100, "threads 0 and 4 are p0: its own limit, got {p0}");
    let u = m.usage(&t("acme"), Some(&p("p0")), NOW);
    assert_eq!(u.in_flight as usize, p0);
    for r in held.iter().flatten() {
        r.settle(charged());
    }
    assert_eq!(m.usage(&t("acme"), None, NOW).invocations, 500);
}

#[test]
fn the_window_resets_and_a_call_straddling_it_counts_in_its_own() {
    let m = meter(vec![(t("acme"), Some(p("alice")), limits(1, 0, 10))]);
    let start = window_start(NOW, 10);
    let r = m
        .reserve(&t("acme"), &p("alice"), "echo", start + 9)
        .unwrap();
    assert!(
        m.reserve(&t("acme"), &p("alice"), "echo", start + 9)
            .is_err()
    );
    let next = m
        .reserve(&t("acme"), &p("alice"), "echo", start + 10)
        .unwrap();
    // The old window's call ends now: the new window owes it nothing.
    r.settle(charged());
    let u = m.usage(&t("acme"), Some(&p("alice")), start + 10);
    assert_eq!(
        (u.invocations, u.in_flight, u.window_started_at),
        (0, 1, start + 10)
    );
    next.settle(charged());
    assert_eq!(
        m.usage(&t("acme"), Some(&p("alice")), start + 10)
            .invocations,
        1
    );
    assert_eq!(
        m.usage(&t("acme"), Some(&p("alice")), start + 25)
            .invocations,
        0
    );
}

#[test]
fn policy_usage_reports_the_tightest_fraction_before_the_call() {
    let m = meter(vec![
        (t("acme"), None, limits(100, 0, 60)),
        (t("acme"), Some(p("alice")), limits(10, 0, 60)),
    ]);
    let none = m.policy_usage(&t("acme"), &p("alice"), "pricey", NOW);
    assert_eq!(none.get("budget_fraction"), Some(&0.0));
    assert_eq!(none.get("call_cost_units"), Some(&5.0));
    for _ in 0..8 {
        m.reserve(&t("acme"), &p("alice"), "echo", NOW)
            .unwrap()
            .settle(charged());
    }
    let held = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap();
    let u = m.policy_usage(&t("acme"), &p("alice"), "echo", NOW);
    assert_eq!(u.get("invocations"), Some(&8.0));
    assert_eq!(u.get("in_flight"), Some(&1.0));
    assert_eq!(u.get("tenant_invocations"), Some(&8.0));
    assert_eq!(u.get("budget_fraction"), Some(&0.9), "9 of alice's 10");
    drop(held);
    // Without any budget the keys are still there (a policy reads them without has()).
    let bob = m.policy_usage(&t("globex"), &p("bob"), "echo", NOW);
    assert_eq!(bob.len(), 7);
    assert_eq!(bob.get("budget_fraction"), Some(&0.0));
}

#[test]
fn set_budget_changes_limits_carries_usage_and_unlimited_removes() {
    let m = meter(vec![(t("acme"), None, limits(1, 0, 60))]);
    m.reserve(&t("acme"), &p("alice"), "echo", NOW)
        .unwrap()
        .settle(charged());
    assert!(m.reserve(&t("acme"), &p("alice"), "echo", NOW).is_err());
    let before = m
        .set_budget(&t("acme"), None, limits(2, 0, 3600), NOW)
        .unwrap();
    assert_eq!(before, Some(limits(1, 0, 60)));
    let u = m.usage(&t("acme"), None, NOW);
    assert_eq!(
        (u.invocations, u.window_started_at),
        (1, window_start(NOW, 3600))
    );
    m.reserve(&t("acme"), &p("alice"), "echo", NOW)
        .unwrap()
        .settle(charged());
    assert!(m.reserve(&t("acme"), &p("alice"), "echo", NOW).is_err());
    m.set_budget(&t("acme"), None, limits(0, 0, 0), NOW)
        .unwrap();
    assert!(m.budget(&t("acme"), None).is_none());
    assert!(m.reserve(&t("acme"), &p("alice"), "echo", NOW).is_ok());
}

#[test]
fn usage_and_budgets_survive_a_reopen_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(crate::store::ControlStore::open(dir.path()).unwrap());
    let cfg = CostConfig {
        budgets: vec![(t("acme"), None, limits(5, 0, 3600))],
        ..Default::default()
    };
    let m = Meter::open(
        cfg.clone(),
        CostMetrics::unregistered().unwrap(),
        store.clone(),
        NOW,
    )
    .unwrap();
    m.set_budget(&t("acme"), Some(&p("alice")), limits(3, 0, 3600), NOW)
        .unwrap();
    for _ in 0..2 {
        m.reserve(&t("acme"), &p("alice"), "echo", NOW)
            .unwrap()
            .settle(charged());
    }
    let _in_flight = m.reserve(&t("acme"), &p("alice"), "echo", NOW).unwrap();
    assert_eq!(m.persist().unwrap(), 1);
    assert_eq!(m.persist().unwrap(), 0, "nothing changed since");
    drop(m);
    drop(store);

    let store = Arc::new(crate::store::ControlStore::open(dir.path()).unwrap());
    let m = Meter::open(
        cfg.clone(),
        CostMetrics::unregistered().unwrap(),
        store.clone(),
        NOW + 1,
    )
    .unwrap();
    let u = m.usage(&t("acme"), Some(&p("alice")), NOW + 1);
    assert_eq!(
        (u.invocations, u.in_flight),
        (2, 0),
        "charged kept, the reservation in flight not"
    );
    assert_eq!(
        u.budget.map(|b| b.max_invocations),
        Some(3),
        "the API's budget"
    );
    assert_eq!(m.usage(&t("acme"), None, NOW + 1).invocations, 2);
    let third = m.reserve(&t("acme"), &p("alice"), "echo", NOW + 1);
    assert!(third.is_ok());
    assert!(m.reserve(&t("acme"), &p("alice"), "echo", NOW + 1).is_err());
    drop(third);
    // In a later window the stored usage is gone.
    let m2 = Meter::open(cfg, CostMetrics::unregistered().unwrap(), store, NOW + 7200).unwrap();
    assert_eq!(
        m2.usage(&t("acme"), Some(&p("alice")), NOW + 7200)
            .invocations,
        0
    );
}

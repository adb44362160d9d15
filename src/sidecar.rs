//! Assembles the sidecar from a validated [`Config`]: TLS, the upstream pool, the decision
//! pipeline, the data-plane and management listeners and the admin HTTP endpoint.

use crate::authz::Authz;
use crate::authz::rbac::Rbac;
use crate::config::{Config, ConfigError};
use crate::decision::{Pipeline, Recorder, TokenRules};
use crate::identity::own::OwnIssuer;
use crate::identity::token::{ClaimMapping, Issuer, Verifier, VerifyKey};
use crate::listener::accept;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Role};
use crate::store::ControlStore;
use crate::upstream::Upstream;
use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The token check's rules around `verifier` (which holds the issuers' keys).
fn token_rules(cfg: &Config, verifier: Arc<Verifier>) -> TokenRules {
    TokenRules {
        verifier: Some(verifier),
        required: cfg.auth.tokens_required.clone(),
        front_proxies: cfg.auth.trusted_front_proxies.clone(),
    }
}

/// The configured issuers plus the sidecar's own (service accounts), with its accounts.
fn verifier_with_own(
    cfg: &Config,
    own: &OwnIssuer,
    state: &crate::store::ControlState,
) -> anyhow::Result<Verifier> {
    let key = VerifyKey::from_jwk(own.jwk()).map_err(|e| anyhow::anyhow!("own issuer key: {e}"))?;
    let issuer = Issuer::new(
        own.issuer.clone(),
        vec![crate::identity::own::AUDIENCE.to_string()],
        ClaimMapping::default(),
        vec![key],
    );
    let accounts = state
        .service_accounts
        .iter()
        .map(|a| (a.principal_id.clone(), a.revoked))
        .collect();
    Ok(cfg
        .auth
        .verifier(&cfg.source.display().to_string())?
        .with_own_issuer(issuer, accounts))
}

/// The RBAC seed named by `rbac.file`.
fn load_rbac(cfg: &Config) -> Result<Rbac, ConfigError> {
    Rbac::load(&cfg.rbac_file).map_err(|e| ConfigError {
        file: cfg.source.display().to_string(),
        field: "rbac.file".into(),
        problem: e.to_string(),
    })
}

/// The control store of `state_dir`, its state, and the RBAC state: the seed file plus the
/// bindings assigned through the management API.
fn open_control(
    cfg: &Config,
) -> anyhow::Result<(Arc<ControlStore>, crate::store::ControlState, Rbac)> {
    let store = ControlStore::open(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let state = store.load()?;
    let seed = load_rbac(cfg)?;
    let rbac = seed
        .with_bindings(state.bindings.iter().map(crate::authz::rbac::Binding::from))
        .with_context(|| {
            format!(
                "the bindings assigned through the management API (in {}) no longer fit {}",
                store.path().display(),
                cfg.rbac_file.display()
            )
        })?;
    Ok((Arc::new(store), state, rbac))
}

/// The policy files of `policies.path`, loaded and compiled; an error names the file, the
/// policy and the position of a bad condition.
fn open_policies(
    cfg: &Config,
) -> Result<Option<(crate::policy::PolicySource, Arc<crate::policy::PolicySet>)>, ConfigError> {
    let Some(path) = &cfg.policies else {
        return Ok(None);
    };
    crate::policy::PolicySource::open(path)
        .map(Some)
        .map_err(|e| ConfigError {
            file: cfg.source.display().to_string(),
            field: "policies.path".into(),
            problem: e.to_string(),
        })
}

/// Puts changed policy files in force beside the API's policies, checked every
/// `policies.reload_seconds`; files that do not load, or that take an id of the API's
/// policies, keep the set in force (logged, `aesp_config_reload_failures_total`). A reload
/// put in force is audited (`POLICY_CHANGED`, the ids added, changed and removed).
async fn reload_policies(
    mut source: crate::policy::PolicySource,
    every: Duration,
    installed: Arc<crate::policy::Installed>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (r, s) = match tokio::task::spawn_blocking(move || {
            let r = source.reload();
            (r, source)
        })
        .await
        {
            Ok(x) => x,
            Err(_) => return,
        };
        source = s;
        match r {
            Ok(None) => {}
            Ok(Some(set)) => {
                let before = installed.files();
                match installed.set_files(set.clone()) {
                    Ok(()) => {
                        tracing::info!(path = %source.path().display(), policies = set.len(), "policies reloaded");
                        recorder.event(policy_files_event(source.path(), &before, &set));
                    }
                    Err(e) => {
                        source.forget();
                        metrics.config_reload_failures.inc();
                        tracing::error!(path = %source.path().display(), error = %e, "policy files not reloaded: an id of theirs is a policy managed through the API; the policies in force stay");
                    }
                }
            }
            Err(e) => {
                metrics.config_reload_failures.inc();
                tracing::error!(path = %source.path().display(), error = %e, "policy files not reloaded: the policies in force stay");
            }
        }
    }
}

/// The contract registry: the seed file, the host manifest, and the API's contracts from
/// the control store (`None` when only checking the configuration).
fn open_governance(
    cfg: &Config,
    control: Option<Arc<ControlStore>>,
) -> Result<crate::governance::Registry, ConfigError> {
    if cfg.governance.contracts.is_none() {
        tracing::warn!(
            "governance.contracts is not set: every tool call is TOOL_NOT_APPROVED until a contract is approved through EnterpriseGovernanceService (docs/governance.md)"
        );
    }
    crate::governance::Registry::open(cfg.governance.clone(), control).map_err(|problem| {
        let field = if problem.starts_with("governance.host_manifest") {
            "governance.host_manifest"
        } else {
            "governance.contracts"
        };
        ConfigError {
            file: cfg.source.display().to_string(),
            field: field.into(),
            problem: problem
                .strip_prefix(&format!("{field}: "))
                .unwrap_or(&problem)
                .to_string(),
        }
    })
}

/// Reads the contract seed file and the host manifest again every
/// `governance.reload_seconds`; a file that does not load keeps what is in force (logged,
/// `aesp_config_reload_failures_total`).
async fn reload_governance(
    registry: Arc<crate::governance::Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let every = registry.config().reload;
    // A file that stays broken is reported (and counted) once, not on every check.
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let r = registry.clone();
        let outcome = match tokio::task::spawn_blocking(move || r.reload()).await {
            Ok(o) => o,
            Err(_) => return,
        };
        match outcome {
            Ok(true) => tracing::info!("governance files reloaded"),
            Ok(false) => {}
            Err(e) if last_error.as_ref() != Some(&e) => {
                metrics.config_reload_failures.inc();
                tracing::error!(error = %e, "governance file not reloaded: what it held stays in force");
                last_error = Some(e);
                continue;
            }
            Err(_) => continue,
        }
        last_error = None;
    }
}

/// The audit event of a policy file reload: which ids were added, changed, removed.
fn policy_files_event(
    path: &std::path::Path,
    before: &crate::policy::PolicySet,
    after: &crate::policy::PolicySet,
) -> crate::proto::aesp::AuditEvent {
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for p in after.policies() {
        match before.get(p.id()) {
            None => added.push(p.id()),
            Some(b) if b.spec() != p.spec() => changed.push(p.id()),
            Some(_) => {}
        }
    }
    let removed: Vec<&str> = before
        .policies()
        .iter()
        .map(|p| p.id())
        .filter(|id| after.get(id).is_none())
        .collect();
    let mut e = crate::audit::event("POLICY_CHANGED", "INFO");
    let a = &mut e.attributes;
    a.insert("source".into(), "file".into());
    a.insert("path".into(), path.display().to_string());
    a.insert("policies".into(), after.len().to_string());
    a.insert("added".into(), added.join(","));
    a.insert("changed".into(), changed.join(","));
    a.insert("removed".into(), removed.join(","));
    e
}

/// Validates everything `serve` would need (config and every TLS and key file) without
/// serving.
pub fn check(cfg: &Config) -> Result<(), ConfigError> {
    crate::tls::server_config(cfg)?;
    cfg.auth.verifier(&cfg.source.display().to_string())?;
    load_rbac(cfg)?;
    open_policies(cfg)?;
    open_governance(cfg, None)?;
    let up = crate::tls::upstream_client_config(cfg)?;
    Upstream::new(cfg, up)?;
    Ok(())
}

/// A running sidecar.
pub struct Sidecar {
    pub data_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub management_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// The audit trail (`None` when `audit.enabled` is false).
    pub audit: Option<crate::audit::Audit>,
    /// Makes every write to `audit.redb` fail while on: a disk-failure drill for the
    /// fail-closed path (tests use it; nothing in the sidecar turns it on).
    pub audit_faults: crate::store::audit::FaultSwitch,
    /// Makes every write to `control.redb` fail while on (a disk-failure drill).
    pub control_faults: crate::store::audit::FaultSwitch,
    /// Metering and budgets; its usage is written once more at shutdown.
    meter: Arc<crate::cost::Meter>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

impl Sidecar {
    /// Binds every listener (port 0 picks a free one) and starts serving.
    pub async fn start(cfg: Config) -> anyhow::Result<Sidecar> {
        crate::tls::install_default_provider();
        let cfg = Arc::new(cfg);
        let tls = Arc::new(crate::tls::ServerTls::load(&cfg)?);
        let upstream = Arc::new(Upstream::new(
            &cfg,
            crate::tls::upstream_client_config(&cfg)?,
        )?);
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let (control, state, rbac) = open_control(&cfg)?;
        let own = Arc::new(OwnIssuer::load_or_create(
            &cfg.state_dir,
            &format!("aesp-sidecar:{}", cfg.identity.trust_domain),
        )?);
        let verifier = Arc::new(verifier_with_own(&cfg, &own, &state)?);
        let audit_faults = crate::store::audit::FaultSwitch::default();
        let control_faults = control.fault_switch();
        let audit = if cfg.audit.enabled {
            let a = crate::audit::Audit::start(
                &cfg.audit,
                &cfg.state_dir,
                audit_faults.clone(),
                Some(metrics.clone()),
            )
            .with_context(|| format!("audit trail in state_dir {}", cfg.state_dir.display()))?;
            let mut e = crate::audit::event("SIDECAR_STARTED", "INFO");
            e.attributes
                .insert("version".into(), env!("CARGO_PKG_VERSION").into());
            e.attributes
                .insert("config".into(), cfg.source.display().to_string());
            e.attributes.insert(
                "audit_mode".into(),
                match cfg.audit.mode {
                    crate::audit::Mode::Sync => "sync",
                    crate::audit::Mode::Async => "async",
                }
                .into(),
            );
            a.log(e);
            Some(a)
        } else {
            tracing::warn!(
                "audit.enabled is false: decisions are logged and counted, not recorded in a signed trail"
            );
            None
        };
        let recorder = Recorder::new(metrics.clone(), audit.clone());
        let policies = open_policies(&cfg)?;
        let governance = Arc::new(open_governance(&cfg, Some(control.clone()))?);
        let sessions = Arc::new(
            crate::tenancy::Sessions::open(control.clone())
                .map_err(|e| anyhow::anyhow!("the sessions in the control store: {e}"))?,
        );
        let api_policies = crate::admin::policy::compile_stored(&state.policies).map_err(|e| {
            anyhow::anyhow!(
                "the policies managed through the API (in {}) do not compile: {e}",
                control.path().display()
            )
        })?;
        let in_force = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::policy::PolicySet::empty(),
        ));
        let installed = Arc::new(
            crate::policy::Installed::new(
                policies
                    .as_ref()
                    .map_or_else(Default::default, |(_, set)| set.clone()),
                Arc::new(api_policies),
                in_force.clone(),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "a policy id is both in policies.path and managed through the API (in {}); rename or remove one of them: {e}",
                    control.path().display()
                )
            })?,
        );
        let meter = Arc::new(
            crate::cost::Meter::open(
                cfg.cost.clone(),
                metrics.cost.clone(),
                control.clone(),
                unix_now(),
            )
            .context("the metered usage and budgets (docs/cost.md)")?,
        );
        let pipeline = Pipeline {
            overwrite_identity_fields: cfg.identity.overwrite_identity_fields,
            tokens: token_rules(&cfg, verifier.clone()),
            authz: Arc::new(Authz::new(rbac)),
            policies: in_force,
            organization_id: Arc::from(cfg.identity.organization_id.as_str()),
            governance: governance.clone(),
            sessions: sessions.clone(),
            cost: Some(meter.clone()),
        };
        let buffered_total = crate::proxy::budget::Total {
            semaphore: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_buffered_bytes)),
            gauge: metrics.buffered_bytes.clone(),
        };
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if !cfg.tls.reload.is_zero() {
            tasks.spawn(reload_tls(
                cfg.clone(),
                tls.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if !cfg.rbac_reload.is_zero() {
            tasks.spawn(reload_rbac(
                cfg.clone(),
                control.clone(),
                pipeline.authz.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if let Some((source, _)) = policies
            && !cfg.policies_reload.is_zero()
        {
            tasks.spawn(reload_policies(
                source,
                cfg.policies_reload,
                installed.clone(),
                recorder.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if !cfg.governance.reload.is_zero()
            && (cfg.governance.contracts.is_some() || cfg.governance.host_manifest.is_some())
        {
            tasks.spawn(reload_governance(
                governance.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(flush_sessions(sessions, shutdown.clone()));
        if cfg.auth.jwks_refresh_seconds > 0 {
            tasks.spawn(refresh_keys(
                verifier.clone(),
                Duration::from_secs(cfg.auth.jwks_refresh_seconds),
                shutdown.clone(),
            ));
        }
        fetch_remote_keys(&cfg, &verifier, &metrics, &shutdown, &mut tasks).await;
        tasks.spawn(persist_usage(meter.clone(), shutdown.clone()));

        // Everything that can fail is built before the first listener opens: once a port
        // answers, the sidecar is up (a supervisor or a test may signal it at once).
        let shared = crate::admin::Shared {
            authz: pipeline.authz.clone(),
            recorder: recorder.clone(),
            control: control.clone(),
            own: own.clone(),
            verifier: verifier.clone(),
        };
        let policy_service = crate::admin::policy::PolicyService::new(
            shared.clone(),
            installed.clone(),
            pipeline.clone(),
            cfg.policies_require_approval,
            &state,
        )?;

        let data = bind(cfg.listen, "listen").await?;
        let data_addr = data.local_addr()?;
        let proxy = Arc::new(Proxy {
            management: None,
            role: Role::DataPlane,
            cfg: cfg.clone(),
            pipeline: pipeline.clone(),
            recorder: recorder.clone(),
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            buffered_total: buffered_total.clone(),
        });
        tasks.spawn(accept::serve(
            data,
            tls.clone(),
            proxy,
            shutdown.clone(),
            cfg.shutdown_grace,
        ));

        let management_addr = match cfg.management_listen {
            Some(a) => {
                let l = bind(a, "management_listen").await?;
                let addr = l.local_addr()?;
                let mut routes = tonic::service::Routes::new(
                    crate::proto::aesp::enterprise_identity_service_server::EnterpriseIdentityServiceServer::new(
                        crate::admin::identity::IdentityService { shared: shared.clone() },
                    ),
                );
                routes = routes.add_service(
                    crate::proto::aesp::enterprise_governance_service_server::EnterpriseGovernanceServiceServer::new(
                        crate::admin::governance::GovernanceService {
                            shared: shared.clone(),
                            registry: governance.clone(),
                        },
                    ),
                );
                routes = routes.add_service(
                    crate::proto::aesp::enterprise_policy_service_server::EnterprisePolicyServiceServer::new(
                        policy_service,
                    ),
                );
                routes = routes.add_service(
                    crate::proto::aesp::enterprise_cost_service_server::EnterpriseCostServiceServer::new(
                        crate::admin::cost::CostService {
                            shared: shared.clone(),
                            meter: meter.clone(),
                        },
                    ),
                );
                if let Some(a) = &audit {
                    routes = routes.add_service(
                        crate::proto::aesp::enterprise_audit_service_server::EnterpriseAuditServiceServer::new(
                            crate::admin::audit::AuditService { shared, audit: a.clone() },
                        ),
                    );
                }
                let proxy = Arc::new(Proxy {
                    management: Some(routes),
                    role: Role::Management,
                    cfg: cfg.clone(),
                    pipeline: pipeline.clone(),
                    recorder: recorder.clone(),
                    upstream: upstream.clone(),
                    metrics: metrics.clone(),
                    buffered_total: buffered_total.clone(),
                });
                tasks.spawn(accept::serve(
                    l,
                    tls.clone(),
                    proxy,
                    shutdown.clone(),
                    cfg.shutdown_grace,
                ));
                Some(addr)
            }
            None => None,
        };

        let admin_addr = match cfg.admin_listen {
            Some(a) => {
                let l = bind(a, "admin_listen").await?;
                let addr = l.local_addr()?;
                tasks.spawn(admin(
                    l,
                    upstream.clone(),
                    audit.clone(),
                    metrics.clone(),
                    Arc::new(own.jwks_json()),
                    shutdown.clone(),
                ));
                Some(addr)
            }
            None => None,
        };

        tracing::info!(
            listen = %data_addr,
            management = ?management_addr,
            admin = ?admin_addr,
            upstream = %cfg.upstream.address,
            "aesp sidecar serving"
        );
        Ok(Sidecar {
            data_addr,
            admin_addr,
            management_addr,
            metrics,
            audit,
            audit_faults,
            control_faults,
            meter,
            shutdown,
            tasks,
        })
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, drains in-flight calls (up to the grace period) and returns.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        // Every call has drained: the usage they were charged is written once more.
        let meter = self.meter.clone();
        match tokio::task::spawn_blocking(move || meter.persist()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the metered usage could not be written at shutdown; what was charged since the last write is lost")
            }
            Err(e) => tracing::error!(error = %e, "the usage write at shutdown failed"),
        }
        if let Some(a) = &self.audit {
            a.stop(crate::audit::event("SIDECAR_STOPPED", "INFO")).await;
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        self.shutdown().await;
    }
}

/// Writes the sessions created and destroyed to the control store every second, and once
/// more at shutdown (docs/tenancy.md: a crash loses at most the last second's).
async fn flush_sessions(sessions: Arc<crate::tenancy::Sessions>, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let s = sessions.clone();
        match tokio::task::spawn_blocking(move || s.flush()).await {
            Ok(Ok(_)) => failing = false,
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::error!(error = %e, "sessions not written to the control store (kept in memory, retried every second)");
            }
            Ok(Err(_)) => {}
            Err(_) => return,
        }
        if stop {
            return;
        }
    }
}

/// Puts changed TLS files (`tls.cert`, `tls.key`, `tls.client_ca`) in force for new
/// connections, checked every `tls.reload_seconds`. Files that do not build a configuration
/// (a certificate whose new key is not there yet, a broken file) keep the one in force; the
/// error is logged and counted (`aesp_config_reload_failures_total`).
async fn reload_tls(
    cfg: Arc<Config>,
    tls: Arc<crate::tls::ServerTls>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.tls.reload) => {}
        }
        let (cfg2, tls2) = (cfg.clone(), tls.clone());
        match tokio::task::spawn_blocking(move || tls2.reload(&cfg2)).await {
            Ok(Ok(crate::tls::Reload::Unchanged)) => {}
            Ok(Ok(crate::tls::Reload::Reloaded)) => {
                tracing::info!(cert = %cfg.tls.cert.display(), client_ca = %cfg.tls.client_ca.display(), "TLS certificate, key and client CA reloaded; new connections use them");
            }
            Ok(Err(e)) => {
                metrics.config_reload_failures.inc();
                tracing::error!(error = %e, "TLS files not reloaded; the certificate, key and client CA in force stay");
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the charged usage that changed to the control store every
/// `cost.persist_seconds`, off the calls' path (docs/cost.md). A write that fails is logged,
/// counted (`aesp_cost_persist_failures_total`) and retried at the next interval; shutdown
/// writes once more after the calls drained ([`Sidecar::shutdown`]).
async fn persist_usage(meter: Arc<crate::cost::Meter>, shutdown: CancellationToken) {
    let every = meter.config().persist_every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let m = meter.clone();
        match tokio::task::spawn_blocking(move || m.persist()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the metered usage could not be written; kept in memory, retried at the next interval")
            }
            Err(_) => return,
        }
    }
}

/// Puts a changed `rbac.file` in force (with the bindings assigned through the management
/// API on top), checked every `rbac.reload_seconds`. A file that does not load keeps the
/// state in force; the error is logged and counted (`aesp_config_reload_failures_total`).
async fn reload_rbac(
    cfg: Arc<Config>,
    control: Arc<ControlStore>,
    authz: Arc<Authz>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = stamp(&cfg.rbac_file);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.rbac_reload) => {}
        }
        let now = stamp(&cfg.rbac_file);
        if now == seen {
            continue;
        }
        seen = now;
        let (cfg2, control2) = (cfg.clone(), control.clone());
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<Rbac> {
            let state = control2.load()?;
            let seed = load_rbac(&cfg2)?;
            Ok(seed.with_bindings(state.bindings.iter().map(crate::authz::rbac::Binding::from))?)
        })
        .await;
        match loaded {
            Ok(Ok(rbac)) => {
                authz.replace(rbac);
                tracing::info!(file = %cfg.rbac_file.display(), "RBAC file reloaded");
            }
            Ok(Err(e)) => {
                metrics.config_reload_failures.inc();
                tracing::error!(file = %cfg.rbac_file.display(), error = %format!("{e:#}"), "RBAC file not reloaded; the previous state stays in force");
            }
            Err(e) => tracing::error!(error = %e, "RBAC reload task failed"),
        }
    }
}

/// Starts keeping the keys of every issuer whose keys are fetched over HTTPS, and waits for
/// each one's first fetch (bounded by `auth.fetch_timeout_seconds` per request): an IdP that
/// answers has its keys in force before the listeners open; one that does not is retried in
/// the background while the sidecar serves (its tokens are refused until its keys arrive).
async fn fetch_remote_keys(
    cfg: &Config,
    verifier: &Arc<Verifier>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let mut first = Vec::new();
    for (index, issuer) in verifier.issuers().iter().enumerate() {
        if issuer.remote().is_none() {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        first.push(rx);
        tasks.spawn(crate::identity::remote::keep_fresh(
            verifier.clone(),
            index,
            Duration::from_secs(cfg.auth.jwks_refresh_seconds),
            metrics.clone(),
            tx,
            shutdown.clone(),
        ));
    }
    for rx in first {
        let _ = rx.await;
    }
}

/// Reads the issuers' JWK set files again every `every`, keeping the keys in force when a
/// file cannot be read (an IdP outage is not a revocation).
async fn refresh_keys(verifier: Arc<Verifier>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = jsonwebtoken::get_current_timestamp();
        for issuer in verifier.issuers() {
            if let Err(e) = issuer.refresh(now) {
                tracing::warn!(issuer = %issuer.issuer, error = %e, "cannot read the issuer's keys again; keeping the keys in force");
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Admin HTTP/1.1: `/healthz` (alive), `/readyz` (the host is reachable and not draining),
/// `/metrics` (Prometheus text).
async fn admin(
    listener: TcpListener,
    upstream: Arc<Upstream>,
    audit: Option<crate::audit::Audit>,
    metrics: Arc<Metrics>,
    jwks: Arc<String>,
    shutdown: CancellationToken,
) {
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => { draining.store(true, Ordering::Relaxed); return; }
            r = listener.accept() => match r { Ok(x) => x, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; } },
        };
        let upstream = upstream.clone();
        let metrics = metrics.clone();
        let draining = draining.clone();
        let jwks = jwks.clone();
        let audit = audit.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let audit_ok = audit.as_ref().is_none_or(|a| a.healthy());
                let upstream = upstream.clone();
                let metrics = metrics.clone();
                let draining = draining.clone();
                let jwks = jwks.clone();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
                        "/readyz" => {
                            let host_ok = !draining.load(Ordering::Relaxed)
                                && matches!(
                                    tokio::time::timeout(Duration::from_secs(2), upstream.probe())
                                        .await,
                                    Ok(Ok(()))
                                );
                            match (host_ok, audit_ok) {
                                (true, true) => {
                                    (StatusCode::OK, "text/plain", "ready\n".to_string())
                                }
                                (false, _) => (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    "upstream unavailable\n".to_string(),
                                ),
                                (true, false) => (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    "audit trail unavailable\n".to_string(),
                                ),
                            }
                        }
                        "/metrics" => (
                            StatusCode::OK,
                            "text/plain; version=0.0.4",
                            metrics.render(),
                        ),
                        "/.well-known/jwks.json" => {
                            (StatusCode::OK, "application/json", jwks.to_string())
                        }
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found\n".to_string(),
                        ),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(ctype),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

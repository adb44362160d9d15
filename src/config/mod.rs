//! The sidecar's configuration: one YAML file, validated in one place.
//!
//! Every problem is reported as a [`ConfigError`] naming the file, the field (a dotted path
//! such as `upstream.address`) and what was expected. Relative paths in the file are resolved
//! against the directory of the file, so a config and its certificates can move together.

mod auth;

pub use auth::{AuthConfig, IssuerConfig, KeySource};

use crate::ids::{PeerKind, PrincipalId, TenantId};
use crate::listener::identity::{IdentityRules, SubjectMapping, SubjectMatch};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem: which file, which field, what is wrong and what was expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {field}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub problem: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    /// Data-plane listener (mTLS 1.3, HTTP/2).
    pub listen: SocketAddr,
    /// Admin HTTP: `/healthz`, `/readyz`, `/metrics`. `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Management gRPC (mTLS). `None` disables it.
    pub management_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub identity: IdentityConfig,
    pub auth: AuthConfig,
    /// The RBAC seed file (roles, permissions, bindings; docs/rbac.md).
    pub rbac_file: PathBuf,
    /// How often `rbac_file` is checked for a change (0: never, read at start only).
    pub rbac_reload: Duration,
    /// Where the sidecar keeps its state (`control.redb`, its issuer key); created 0700.
    pub state_dir: PathBuf,
    /// The audit trail (`state_dir/audit.redb`; docs/audit-format.md).
    pub audit: crate::audit::AuditConfig,
    /// CEL policies on tool invocations (a file or a directory; docs/policies.md); `None`:
    /// RBAC alone decides.
    pub policies: Option<PathBuf>,
    /// How often the policy files are checked for a change (0: read at start only).
    pub policies_reload: Duration,
    /// Governed tool contracts (docs/governance.md).
    pub governance: crate::governance::GovernanceConfig,
    /// `policies.require_approval`: a change made through `EnterprisePolicyService` waits
    /// as a pending revision until a second principal approves it (default false).
    pub policies_require_approval: bool,
    /// Metering and budgets of tool calls (docs/cost.md).
    pub cost: crate::cost::CostConfig,
    pub runtime: RuntimeConfig,
    pub limits: Limits,
    /// gRPC method paths (`/pkg.Service/Method`) forwarded without inspection.
    pub passthrough: HashSet<String>,
    /// How long in-flight calls may run after SIGTERM before connections are closed.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub handshake_timeout: Duration,
    /// TLS 1.3 session resumption (tickets). Off by default: every connection then runs a
    /// full handshake that checks the client certificate. When on, a resumed session whose
    /// certificate has expired since is refused all the same (its identity is re-checked).
    pub session_resumption: bool,
    /// How often `cert`, `key` and `client_ca` are read again (a change is put in force for
    /// new connections); zero: read at start only.
    pub reload: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// As written, e.g. `http://127.0.0.1:50051`.
    pub address: String,
    pub uri_scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// `Some` for an `https://` upstream.
    pub tls: Option<UpstreamTls>,
    pub connections: usize,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// CA bundle for the host's certificate (required for `https://`).
    pub ca: PathBuf,
    /// Client certificate and key when the host wants mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    pub organization_id: String,
    /// Overwrite disagreeing identity fields instead of refusing with `IDENTITY_MISMATCH`.
    pub overwrite_identity_fields: bool,
    /// Identities for certificates without a SPIFFE ID.
    pub subjects: Vec<SubjectMapping>,
    /// The peer kinds accepted (default `client`, `runtime`, `admin`); a certificate of any
    /// other kind has no usable identity.
    pub peer_kinds: Vec<PeerKind>,
}

impl IdentityConfig {
    /// The rules the acceptor identifies certificates by.
    pub fn rules(&self) -> IdentityRules<'_> {
        IdentityRules {
            trust_domain: &self.trust_domain,
            subjects: &self.subjects,
            peer_kinds: &self.peer_kinds,
        }
    }
}

/// A `identity.subjects` entry as written; validated into a [`SubjectMapping`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubjectMapping {
    #[serde(default)]
    subject_cn: Option<String>,
    #[serde(default)]
    dns_san: Option<String>,
    principal: String,
    tenant: String,
    #[serde(default = "default_kind")]
    kind: String,
}

fn default_kind() -> String {
    "client".to_string()
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub security_zone: String,
    pub deployment_environment: String,
}

/// Limits of the data plane; the HTTP/2 ones are the first line of defence.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub max_header_list_size: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    pub max_send_buf_size: usize,
    pub keep_alive_interval: Option<Duration>,
    pub keep_alive_timeout: Duration,
    /// Established connections; further ones are closed after their handshake.
    pub max_connections: usize,
    /// Connections still in their TLS handshake; further ones are closed at accept.
    pub max_handshakes: usize,
    /// A connection with no call in flight for this long is closed (GOAWAY), whether or not
    /// it ever sent the HTTP/2 preface.
    pub idle_timeout: Duration,
    /// How long a unary request may take to arrive whole.
    pub request_read_timeout: Duration,
    /// Bytes of messages being assembled for inspection, per connection (both directions).
    pub max_buffered_bytes_per_connection: usize,
    /// The same, over all connections.
    pub max_buffered_bytes: usize,
    /// How long a message of a stream may take from its first byte to its last (waiting for
    /// buffer budget included).
    pub message_timeout: Duration,
    /// How long the host may take to send the response headers of a call once it was
    /// forwarded (on `Connect` too, until its headers arrive; never after).
    pub upstream_response_timeout: Duration,
    /// Calls per second one connection may make, with its burst; `None`: no limit.
    pub request_rate: Option<RequestRate>,
}

/// `limits.max_requests_per_second_per_connection` and `limits.request_burst_per_connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            max_header_list_size: 16 * 1024,
            initial_stream_window_size: 1024 * 1024,
            initial_connection_window_size: 4 * 1024 * 1024,
            max_send_buf_size: 1024 * 1024,
            keep_alive_interval: Some(Duration::from_secs(30)),
            keep_alive_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_handshakes: 1024,
            idle_timeout: Duration::from_secs(300),
            request_read_timeout: Duration::from_secs(30),
            max_buffered_bytes_per_connection: 16 * 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            message_timeout: Duration::from_secs(30),
            upstream_response_timeout: Duration::from_secs(30),
            request_rate: Some(RequestRate {
                per_second: 10_000,
                burst: 20_000,
            }),
        }
    }
}

// ------------------------------------------------------------------ the file as written

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    management_listen: Option<String>,
    tls: Option<RawTls>,
    upstream: Option<RawUpstream>,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    auth: auth::RawAuth,
    rbac: Option<RawRbac>,
    state_dir: Option<String>,
    #[serde(default)]
    audit: RawAudit,
    policies: Option<RawPolicies>,
    #[serde(default)]
    governance: RawGovernance,
    #[serde(default)]
    cost: crate::cost::RawCost,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    passthrough: Vec<String>,
    shutdown_grace_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicies {
    path: Option<String>,
    reload_seconds: Option<u64>,
    require_approval: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGovernance {
    contracts: Option<String>,
    host_manifest: Option<String>,
    reload_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    mode: Option<String>,
    key_file: Option<String>,
    batch_max_records: Option<u64>,
    batch_max_delay_ms: Option<u64>,
    background_delay_ms: Option<u64>,
    apply_delay_ms: Option<u64>,
    checkpoint_every_records: Option<u64>,
    checkpoint_every_seconds: Option<u64>,
    queue: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRbac {
    file: Option<String>,
    reload_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    handshake_timeout_ms: Option<u64>,
    #[serde(default)]
    session_resumption: bool,
    reload_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Option<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
    connections: Option<usize>,
    connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    trust_domain: Option<String>,
    organization_id: Option<String>,
    #[serde(default)]
    overwrite_identity_fields: bool,
    #[serde(default)]
    subjects: Vec<RawSubjectMapping>,
    peer_kinds: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    security_zone: Option<String>,
    deployment_environment: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_pending_accept_reset_streams: Option<usize>,
    max_local_error_reset_streams: Option<usize>,
    max_header_list_size: Option<u32>,
    initial_stream_window_size: Option<u32>,
    initial_connection_window_size: Option<u32>,
    max_send_buf_size: Option<usize>,
    keep_alive_interval_seconds: Option<u64>,
    keep_alive_timeout_seconds: Option<u64>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    idle_timeout_seconds: Option<u64>,
    request_read_timeout_ms: Option<u64>,
    max_buffered_bytes_per_connection: Option<usize>,
    max_buffered_bytes: Option<usize>,
    message_timeout_ms: Option<u64>,
    upstream_response_timeout_ms: Option<u64>,
    max_requests_per_second_per_connection: Option<u32>,
    request_burst_per_connection: Option<u32>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            field: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = serde_norway::from_str(text).map_err(|e| {
            // serde_norway reports "field.path: problem at line L column C".
            let msg = e.to_string();
            let (field, problem) = match msg.split_once(": ") {
                Some((f, p)) if !f.contains(' ') => (f.to_string(), p.to_string()),
                _ => ("(document)".to_string(), msg),
            };
            ConfigError {
                file: file.clone(),
                field,
                problem,
            }
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let v = Validator { file: &file, base };
        v.build(raw)
    }
}

struct Validator<'a> {
    file: &'a str,
    base: PathBuf,
}

impl Validator<'_> {
    fn err(&self, field: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    fn addr(&self, field: &str, v: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
        let s = v.unwrap_or(default);
        s.parse().map_err(|_| {
            self.err(
                field,
                format!("expected a socket address like 127.0.0.1:8443, got {s:?}"),
            )
        })
    }

    fn optional_addr(
        &self,
        field: &str,
        v: Option<&str>,
        default: &str,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        match v {
            Some("off") | Some("") => Ok(None),
            other => self.addr(field, other, default).map(Some),
        }
    }

    fn path(&self, field: &str, v: Option<&String>) -> Result<PathBuf, ConfigError> {
        let s = v.ok_or_else(|| self.err(field, "required: expected a path to a PEM file"))?;
        if s.trim().is_empty() {
            return Err(self.err(field, "expected a path to a PEM file, got an empty string"));
        }
        Ok(self.resolve(s))
    }

    fn resolve(&self, s: &str) -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = self.addr("listen", raw.listen.as_deref(), "127.0.0.1:8443")?;
        let admin_listen = self.optional_addr(
            "admin_listen",
            raw.admin_listen.as_deref(),
            "127.0.0.1:9901",
        )?;
        let management_listen = self.optional_addr(
            "management_listen",
            raw.management_listen.as_deref(),
            "127.0.0.1:9443",
        )?;

        let rt = raw.tls.ok_or_else(|| {
            self.err(
                "tls",
                "required: expected a section with cert, key and client_ca",
            )
        })?;
        let tls = TlsConfig {
            cert: self.path("tls.cert", rt.cert.as_ref())?,
            key: self.path("tls.key", rt.key.as_ref())?,
            client_ca: self.path("tls.client_ca", rt.client_ca.as_ref())?,
            handshake_timeout: Duration::from_millis(self.positive(
                "tls.handshake_timeout_ms",
                rt.handshake_timeout_ms,
                10_000,
            )?),
            session_resumption: rt.session_resumption,
            reload: Duration::from_secs(rt.reload_seconds.unwrap_or(10)),
        };

        let upstream = self.upstream(raw.upstream)?;
        let identity = self.identity(raw.identity)?;
        let auth = self.auth(raw.auth, &identity.peer_kinds)?;
        let rbac_reload = Duration::from_secs(
            raw.rbac
                .as_ref()
                .and_then(|r| r.reload_seconds)
                .unwrap_or(5),
        );
        let rbac_file = match raw.rbac.and_then(|r| r.file) {
            Some(f) if !f.trim().is_empty() => self.resolve(&f),
            _ => {
                return Err(self.err(
                    "rbac.file",
                    "required: the roles and bindings every call is authorized by (format: docs/rbac.md; the repository ships policies/rbac.yaml); every call is denied unless a binding allows",
                ));
            }
        };

        let runtime = RuntimeConfig {
            security_zone: raw
                .runtime
                .security_zone
                .unwrap_or_else(|| "default".to_string()),
            deployment_environment: match raw.runtime.deployment_environment.as_deref() {
                None => "DEV".to_string(),
                Some(e @ ("DEV" | "TEST" | "PROD")) => e.to_string(),
                Some(other) => {
                    return Err(self.err(
                        "runtime.deployment_environment",
                        format!("expected one of DEV, TEST, PROD, got {other:?}"),
                    ));
                }
            },
        };

        let limits = self.limits(raw.limits)?;
        let audit = self.audit(raw.audit)?;
        let policies_reload = Duration::from_secs(
            raw.policies
                .as_ref()
                .and_then(|p| p.reload_seconds)
                .unwrap_or(5),
        );
        let policies_require_approval = raw
            .policies
            .as_ref()
            .and_then(|p| p.require_approval)
            .unwrap_or(false);
        let policies = match raw.policies.map(|p| (p.path, p.require_approval)) {
            None => None,
            // `policies: {require_approval: true}` alone: API-managed policies only.
            Some((None, Some(_))) => None,
            Some((Some(p), _)) if !p.trim().is_empty() => Some(self.resolve(&p)),
            Some(_) => {
                return Err(self.err(
                    "policies.path",
                    "expected a policy file or a directory of them (format: docs/policies.md; the repository ships policies/cel/)",
                ));
            }
        };

        let governance = self.governance(raw.governance)?;
        let cost = raw
            .cost
            .validate()
            .map_err(|(field, problem)| self.err(&field, problem))?;

        let mut passthrough = HashSet::new();
        for (i, m) in raw.passthrough.iter().enumerate() {
            let ok = m.starts_with('/')
                && m[1..].split_once('/').is_some_and(|(svc, meth)| {
                    !svc.is_empty() && !meth.is_empty() && !meth.contains('/')
                });
            if !ok {
                return Err(self.err(
                    &format!("passthrough[{i}]"),
                    format!("expected a gRPC method path like /pkg.Service/Method, got {m:?}"),
                ));
            }
            if m.starts_with("/altar.grid.v1.") {
                return Err(self.err(
                    &format!("passthrough[{i}]"),
                    format!(
                        "{m} is a GRID method: it is always inspected and cannot be passed through"
                    ),
                ));
            }
            passthrough.insert(m.clone());
        }

        Ok(Config {
            source: PathBuf::from(self.file),
            listen,
            admin_listen,
            management_listen,
            tls,
            upstream,
            identity,
            auth,
            rbac_file,
            rbac_reload,
            state_dir: match raw.state_dir.as_deref() {
                None => self.resolve("state"),
                Some(s) if s.trim().is_empty() => {
                    return Err(self.err(
                        "state_dir",
                        "expected a directory path, got an empty string",
                    ));
                }
                Some(s) => self.resolve(s),
            },
            audit,
            policies,
            policies_reload,
            governance,
            policies_require_approval,
            cost,
            runtime,
            limits,
            passthrough,
            shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds.unwrap_or(20)),
        })
    }

    fn governance(
        &self,
        raw: RawGovernance,
    ) -> Result<crate::governance::GovernanceConfig, ConfigError> {
        let file = |field: &str, v: Option<String>, what: &str| match v {
            None => Ok(None),
            Some(p) if !p.trim().is_empty() => Ok(Some(self.resolve(&p))),
            Some(_) => Err(self.err(field, format!("expected {what}, got an empty string"))),
        };
        Ok(crate::governance::GovernanceConfig {
            contracts: file(
                "governance.contracts",
                raw.contracts,
                "the seed file of approved tool contracts (format: docs/governance.md; the repository ships policies/tool-contracts.yaml)",
            )?,
            host_manifest: file(
                "governance.host_manifest",
                raw.host_manifest,
                "the GRID host's manifest file (ADM declarations)",
            )?,
            reload: Duration::from_secs(raw.reload_seconds.unwrap_or(5)),
        })
    }

    fn audit(&self, raw: RawAudit) -> Result<crate::audit::AuditConfig, ConfigError> {
        use crate::audit::{AuditConfig, Mode};
        let d = AuditConfig::default();
        let mode = match raw.mode.as_deref() {
            None | Some("sync") => Mode::Sync,
            Some("async") => Mode::Async,
            Some(other) => {
                return Err(self.err(
                    "audit.mode",
                    format!("expected sync (a call goes on once its record is durable) or async (records written in the background), got {other:?}"),
                ));
            }
        };
        let batch = self.positive(
            "audit.batch_max_records",
            raw.batch_max_records,
            d.batch_max_records as u64,
        )?;
        if batch > 10_000 {
            return Err(self.err(
                "audit.batch_max_records",
                format!("expected at most 10000, got {batch}"),
            ));
        }
        Ok(AuditConfig {
            enabled: raw.enabled.unwrap_or(true),
            mode,
            key_file: raw.key_file.as_deref().map(|f| self.resolve(f)),
            batch_max_records: batch as usize,
            batch_max_delay: raw
                .batch_max_delay_ms
                .map_or(d.batch_max_delay, |ms| Duration::from_millis(ms.min(1000))),
            background_delay: raw
                .background_delay_ms
                .map_or(d.background_delay, |ms| Duration::from_millis(ms.min(1000))),
            apply_delay: raw
                .apply_delay_ms
                .map_or(d.apply_delay, |ms| Duration::from_millis(ms.min(10_000))),
            checkpoint_every_records: self.positive(
                "audit.checkpoint_every_records",
                raw.checkpoint_every_records,
                d.checkpoint_every_records,
            )?,
            checkpoint_every: Duration::from_secs(self.positive(
                "audit.checkpoint_every_seconds",
                raw.checkpoint_every_seconds,
                d.checkpoint_every.as_secs(),
            )?),
            queue: self.positive("audit.queue", raw.queue, d.queue as u64)? as usize,
        })
    }

    fn positive(&self, field: &str, v: Option<u64>, default: u64) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(0) => Err(self.err(field, "expected a positive number, got 0")),
            Some(n) => Ok(n),
        }
    }

    fn upstream(&self, raw: Option<RawUpstream>) -> Result<UpstreamConfig, ConfigError> {
        let raw = raw.ok_or_else(|| {
            self.err(
                "upstream",
                "required: expected a section with address (e.g. http://127.0.0.1:50051)",
            )
        })?;
        let address = raw.address.ok_or_else(|| {
            self.err(
                "upstream.address",
                "required: expected http://HOST:PORT (h2c) or https://HOST:PORT",
            )
        })?;
        let uri: http::Uri = address.parse().map_err(|_| {
            self.err(
                "upstream.address",
                format!("expected http://HOST:PORT or https://HOST:PORT, got {address:?}"),
            )
        })?;
        let scheme = uri.scheme().cloned().ok_or_else(|| {
            self.err(
                "upstream.address",
                format!("expected a scheme (http:// or https://), got {address:?}"),
            )
        })?;
        let authority = uri.authority().cloned().ok_or_else(|| {
            self.err(
                "upstream.address",
                format!("expected HOST:PORT after the scheme, got {address:?}"),
            )
        })?;
        if authority.port_u16().is_none() {
            return Err(self.err(
                "upstream.address",
                format!("expected an explicit port, got {address:?}"),
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(self.err(
                "upstream.address",
                format!("expected no path, got {:?}", uri.path()),
            ));
        }
        let tls = match scheme.as_str() {
            "http" => {
                for (f, v) in [
                    ("upstream.ca", &raw.ca),
                    ("upstream.cert", &raw.cert),
                    ("upstream.key", &raw.key),
                ] {
                    if v.is_some() {
                        return Err(self.err(f, "only valid with an https:// upstream.address"));
                    }
                }
                None
            }
            "https" => {
                let ca = self.path("upstream.ca", raw.ca.as_ref())?;
                let client_cert = match (&raw.cert, &raw.key) {
                    (Some(c), Some(k)) => Some((self.resolve(c), self.resolve(k))),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(self.err("upstream.key", "required when upstream.cert is set"));
                    }
                    (None, Some(_)) => {
                        return Err(self.err("upstream.cert", "required when upstream.key is set"));
                    }
                };
                Some(UpstreamTls {
                    ca,
                    client_cert,
                    server_name: raw
                        .server_name
                        .unwrap_or_else(|| authority.host().to_string()),
                })
            }
            other => {
                return Err(self.err(
                    "upstream.address",
                    format!("expected scheme http or https, got {other:?}"),
                ));
            }
        };
        let connections = match raw.connections {
            None => 2,
            Some(n @ 1..=64) => n,
            Some(n) => {
                return Err(self.err("upstream.connections", format!("expected 1 to 64, got {n}")));
            }
        };
        Ok(UpstreamConfig {
            address,
            uri_scheme: scheme,
            authority,
            tls,
            connections,
            connect_timeout: Duration::from_millis(self.positive(
                "upstream.connect_timeout_ms",
                raw.connect_timeout_ms,
                3000,
            )?),
        })
    }

    fn identity(&self, raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
        let trust_domain = raw.trust_domain.unwrap_or_else(|| "aesp.local".to_string());
        if trust_domain.is_empty()
            || !trust_domain.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            })
        {
            return Err(self.err(
                "identity.trust_domain",
                format!("expected a SPIFFE trust domain (lowercase letters, digits, '.', '-', '_'), got {trust_domain:?}"),
            ));
        }
        let segment_rule =
            "expected 1 to 128 letters, digits, '.', '-' or '_', the first a letter or digit";
        let peer_kinds = match raw.peer_kinds {
            None => vec![PeerKind::Client, PeerKind::Runtime, PeerKind::Admin],
            Some(kinds) if kinds.is_empty() => {
                return Err(self.err(
                    "identity.peer_kinds",
                    "expected at least one peer kind (for example [client, runtime, admin])",
                ));
            }
            Some(kinds) => kinds
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    PeerKind::new(k).ok_or_else(|| {
                        self.err(
                            &format!("identity.peer_kinds[{i}]"),
                            format!("{segment_rule}, got {k:?}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let mut subjects = Vec::with_capacity(raw.subjects.len());
        for (i, m) in raw.subjects.into_iter().enumerate() {
            let field = format!("identity.subjects[{i}]");
            let by = match (m.subject_cn, m.dns_san) {
                (Some(cn), None) => SubjectMatch::CommonName(cn),
                (None, Some(dns)) => SubjectMatch::DnsSan(dns),
                _ => return Err(self.err(&field, "expected exactly one of subject_cn or dns_san")),
            };
            let bad = |name: &str, v: &str| {
                self.err(
                    &format!("{field}.{name}"),
                    format!("{segment_rule}, got {v:?}"),
                )
            };
            subjects.push(SubjectMapping {
                by,
                principal: PrincipalId::new(&m.principal)
                    .ok_or_else(|| bad("principal", &m.principal))?,
                tenant: TenantId::new(&m.tenant).ok_or_else(|| bad("tenant", &m.tenant))?,
                kind: PeerKind::new(&m.kind).ok_or_else(|| bad("kind", &m.kind))?,
            });
            if let Some(last) = subjects.last()
                && !peer_kinds.contains(&last.kind)
            {
                return Err(self.err(
                    &format!("{field}.kind"),
                    format!(
                        "{:?} is not one of identity.peer_kinds ({})",
                        last.kind.as_str(),
                        peer_kinds
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(IdentityConfig {
            trust_domain,
            organization_id: raw.organization_id.unwrap_or_default(),
            overwrite_identity_fields: raw.overwrite_identity_fields,
            subjects,
            peer_kinds,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_message_bytes = match raw.max_message_bytes {
            None => d.max_message_bytes,
            Some(n @ 1..=0x7fff_ffff) => n,
            Some(n) => {
                return Err(self.err(
                    "limits.max_message_bytes",
                    format!("expected 1 to 2147483647, got {n}"),
                ));
            }
        };
        let per_connection = raw.max_buffered_bytes_per_connection.unwrap_or(
            d.max_buffered_bytes_per_connection
                .max(max_message_bytes + 5),
        );
        if per_connection < max_message_bytes + 5 || per_connection > u32::MAX as usize {
            return Err(self.err(
                "limits.max_buffered_bytes_per_connection",
                format!(
                    "expected at least limits.max_message_bytes + 5 ({}) and at most {}, got {per_connection}",
                    max_message_bytes + 5,
                    u32::MAX
                ),
            ));
        }
        let total = raw
            .max_buffered_bytes
            .unwrap_or(d.max_buffered_bytes.max(per_connection));
        if total < per_connection {
            return Err(self.err(
                "limits.max_buffered_bytes",
                format!(
                    "expected at least limits.max_buffered_bytes_per_connection ({per_connection}), got {total}"
                ),
            ));
        }
        let window = |f: &str, v: Option<u32>, dflt: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(dflt),
                Some(n @ 65_535..=0x7fff_ffff) => Ok(n),
                Some(n) => Err(self.err(f, format!("expected 65535 to 2147483647, got {n}"))),
            }
        };
        Ok(Limits {
            max_message_bytes,
            max_concurrent_streams: self.positive(
                "limits.max_concurrent_streams",
                raw.max_concurrent_streams.map(u64::from),
                u64::from(d.max_concurrent_streams),
            )? as u32,
            max_pending_accept_reset_streams: raw
                .max_pending_accept_reset_streams
                .unwrap_or(d.max_pending_accept_reset_streams),
            max_local_error_reset_streams: raw
                .max_local_error_reset_streams
                .unwrap_or(d.max_local_error_reset_streams),
            max_header_list_size: self.positive(
                "limits.max_header_list_size",
                raw.max_header_list_size.map(u64::from),
                u64::from(d.max_header_list_size),
            )? as u32,
            initial_stream_window_size: window(
                "limits.initial_stream_window_size",
                raw.initial_stream_window_size,
                d.initial_stream_window_size,
            )?,
            initial_connection_window_size: window(
                "limits.initial_connection_window_size",
                raw.initial_connection_window_size,
                d.initial_connection_window_size,
            )?,
            max_send_buf_size: raw.max_send_buf_size.unwrap_or(d.max_send_buf_size),
            keep_alive_interval: match raw.keep_alive_interval_seconds {
                None => d.keep_alive_interval,
                Some(0) => None,
                Some(n) => Some(Duration::from_secs(n)),
            },
            keep_alive_timeout: Duration::from_secs(self.positive(
                "limits.keep_alive_timeout_seconds",
                raw.keep_alive_timeout_seconds,
                d.keep_alive_timeout.as_secs(),
            )?),
            max_connections: self.positive(
                "limits.max_connections",
                raw.max_connections.map(|n| n as u64),
                d.max_connections as u64,
            )? as usize,
            max_handshakes: self.positive(
                "limits.max_handshakes",
                raw.max_handshakes.map(|n| n as u64),
                d.max_handshakes as u64,
            )? as usize,
            idle_timeout: Duration::from_secs(self.positive(
                "limits.idle_timeout_seconds",
                raw.idle_timeout_seconds,
                d.idle_timeout.as_secs(),
            )?),
            request_read_timeout: Duration::from_millis(self.positive(
                "limits.request_read_timeout_ms",
                raw.request_read_timeout_ms,
                d.request_read_timeout.as_millis() as u64,
            )?),
            max_buffered_bytes_per_connection: per_connection,
            max_buffered_bytes: total,
            message_timeout: Duration::from_millis(self.positive(
                "limits.message_timeout_ms",
                raw.message_timeout_ms,
                d.message_timeout.as_millis() as u64,
            )?),
            upstream_response_timeout: Duration::from_millis(self.positive(
                "limits.upstream_response_timeout_ms",
                raw.upstream_response_timeout_ms,
                d.upstream_response_timeout.as_millis() as u64,
            )?),
            request_rate: self.request_rate(&raw, d.request_rate)?,
        })
    }

    fn request_rate(
        &self,
        raw: &RawLimits,
        d: Option<RequestRate>,
    ) -> Result<Option<RequestRate>, ConfigError> {
        let d = d.unwrap_or(RequestRate {
            per_second: 10_000,
            burst: 20_000,
        });
        let per_second = match raw.max_requests_per_second_per_connection {
            Some(0) => return Ok(None),
            Some(n @ 1..=1_000_000) => n,
            Some(n) => {
                return Err(self.err(
                    "limits.max_requests_per_second_per_connection",
                    format!("expected 0 (no limit) to 1000000, got {n}"),
                ));
            }
            None => d.per_second,
        };
        let burst = match raw.request_burst_per_connection {
            Some(n @ 1..=1_000_000) => n,
            Some(n) => {
                return Err(self.err(
                    "limits.request_burst_per_connection",
                    format!("expected 1 to 1000000, got {n}"),
                ));
            }
            // Twice the rate by default, as the default pair (10000/s, 20000).
            None if raw.max_requests_per_second_per_connection.is_some() => {
                per_second.saturating_mul(2).min(1_000_000)
            }
            None => d.burst,
        };
        Ok(Some(RequestRate { per_second, burst }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "tls:\n  cert: s.crt\n  key: s.key\n  client_ca: ca.crt\nupstream:\n  address: http://127.0.0.1:50051\nrbac:\n  file: rbac.yaml\nauth:\n  tokens_required: []\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/aesp/sidecar.yaml"))
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.admin_listen, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(c.tls.cert, PathBuf::from("/etc/aesp/s.crt"));
        assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:50051");
        assert!(c.upstream.tls.is_none());
        assert_eq!(c.limits.max_message_bytes, 4 * 1024 * 1024);
        assert_eq!(c.runtime.deployment_environment, "DEV");
    }

    #[test]
    fn clients_need_a_token_issuer_unless_certificates_alone_are_configured() {
        let e = parse(&MINIMAL.replace("auth:\n  tokens_required: []\n", "")).unwrap_err();
        assert_eq!(e.field, "auth.issuers");
        assert!(e.problem.contains("tokens_required: []"), "{e}");
        let c = parse(&MINIMAL.replace(
            "  tokens_required: []\n",
            "  issuers:\n    - issuer: https://idp\n      jwks_file: idp.json\n      claims: {tenant: \"\", sensitive: [email]}\n",
        ))
        .unwrap();
        assert_eq!(c.auth.tokens_required, vec![PeerKind::Client]);
        assert_eq!(c.auth.issuers[0].mapping.tenant, None);
        assert!(
            matches!(&c.auth.issuers[0].keys, KeySource::Jwks(p) if p == Path::new("/etc/aesp/idp.json"))
        );
        for (bad, field) in [
            ("    - issuer: https://idp\n", "auth.issuers[0]"),
            ("    - jwks_file: x.json\n", "auth.issuers[0].issuer"),
            (
                "    - issuer: https://idp\n      pem_file: k.pem\n      pem_algorithm: HS256\n",
                "auth.issuers[0].pem_algorithm",
            ),
        ] {
            let e =
                parse(&MINIMAL.replace("  tokens_required: []\n", &format!("  issuers:\n{bad}")))
                    .unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let e = parse(&MINIMAL.replace("[]", "[robot]")).unwrap_err();
        assert_eq!(e.field, "auth.tokens_required[0]");
    }

    #[test]
    fn keys_over_https_need_an_https_url_and_one_source() {
        let with = |issuer: &str| {
            MINIMAL.replace(
                "  tokens_required: []\n",
                &format!(
                    "  fetch_timeout_seconds: 2\n  issuers:\n    - issuer: https://idp\n{issuer}"
                ),
            )
        };
        let c = parse(&with(
            "      discovery_url: https://idp/.well-known/openid-configuration\n      ca_file: idp-ca.pem\n",
        ))
        .unwrap();
        assert_eq!(c.auth.fetch_timeout_seconds, 2);
        match &c.auth.issuers[0].keys {
            KeySource::Remote {
                location: crate::identity::remote::Location::Discovery(u),
                ca_file: Some(ca),
            } => {
                assert_eq!(u.path(), "/.well-known/openid-configuration");
                assert_eq!(ca, Path::new("/etc/aesp/idp-ca.pem"));
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&with("      jwks_uri: https://idp:8443/keys\n")).unwrap();
        assert!(matches!(
            &c.auth.issuers[0].keys,
            KeySource::Remote {
                location: crate::identity::remote::Location::JwksUri(_),
                ca_file: None
            }
        ));
        for (bad, field, says) in [
            (
                "      jwks_uri: http://idp/keys\n",
                "auth.issuers[0].jwks_uri",
                "https://",
            ),
            (
                "      discovery_url: http://idp/.well-known/openid-configuration\n",
                "auth.issuers[0].discovery_url",
                "plain HTTP",
            ),
            (
                "      jwks_uri: idp/keys\n",
                "auth.issuers[0].jwks_uri",
                "https://",
            ),
            (
                "      jwks_uri: https://idp/keys\n      jwks_file: k.json\n",
                "auth.issuers[0]",
                "jwks_file, jwks_uri",
            ),
            (
                "      jwks_file: k.json\n      ca_file: ca.pem\n",
                "auth.issuers[0].ca_file",
                "only with",
            ),
        ] {
            let e = parse(&with(bad)).unwrap_err();
            assert_eq!(e.file, "/etc/aesp/sidecar.yaml", "{e}");
            assert_eq!(e.field, field, "{e}");
            assert!(e.problem.contains(says), "{e}");
        }
        let e = parse(&MINIMAL.replace(
            "  tokens_required: []\n",
            "  tokens_required: []\n  fetch_timeout_seconds: 0\n",
        ))
        .unwrap_err();
        assert_eq!(e.field, "auth.fetch_timeout_seconds");
    }

    #[test]
    fn upstream_response_timeout_and_request_rate() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.limits.upstream_response_timeout, Duration::from_secs(30));
        assert_eq!(
            c.limits.request_rate,
            Some(RequestRate {
                per_second: 10_000,
                burst: 20_000
            })
        );
        let c = parse(&format!(
            "{MINIMAL}limits:\n  upstream_response_timeout_ms: 1500\n  max_requests_per_second_per_connection: 50\n"
        ))
        .unwrap();
        assert_eq!(
            c.limits.upstream_response_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(
            c.limits.request_rate,
            Some(RequestRate {
                per_second: 50,
                burst: 100
            })
        );
        let c = parse(&format!(
            "{MINIMAL}limits:\n  max_requests_per_second_per_connection: 0\n"
        ))
        .unwrap();
        assert_eq!(c.limits.request_rate, None);
        for (bad, field) in [
            (
                "upstream_response_timeout_ms: 0",
                "limits.upstream_response_timeout_ms",
            ),
            (
                "max_requests_per_second_per_connection: 2000000",
                "limits.max_requests_per_second_per_connection",
            ),
            (
                "request_burst_per_connection: 0",
                "limits.request_burst_per_connection",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}limits:\n  {bad}\n")).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn errors_name_file_field_and_expectation() {
        let e = parse(&MINIMAL.replace("http://127.0.0.1:50051", "127.0.0.1")).unwrap_err();
        assert_eq!(e.file, "/etc/aesp/sidecar.yaml");
        assert_eq!(e.field, "upstream.address");
        assert!(e.problem.contains("expected"), "{e}");

        let e = parse(&format!("{MINIMAL}limits:\n  max_mesage_bytes: 3\n")).unwrap_err();
        assert!(e.to_string().contains("max_mesage_bytes"), "{e}");
        assert!(e.to_string().starts_with("/etc/aesp/sidecar.yaml: "), "{e}");

        let e = parse(&format!("{MINIMAL}listen: nowhere\n")).unwrap_err();
        assert_eq!(e.field, "listen");

        let e = parse("upstream:\n  address: http://127.0.0.1:1\n").unwrap_err();
        assert_eq!(e.field, "tls");

        let e = parse(&format!(
            "{MINIMAL}passthrough: [\"/altar.grid.v1.GridHost/ExecuteTool\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "passthrough[0]");

        let e = parse(&format!(
            "{MINIMAL}runtime:\n  deployment_environment: STAGING\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "runtime.deployment_environment");

        let e = parse(&MINIMAL.replace("http://", "https://")).unwrap_err();
        assert_eq!(e.field, "upstream.ca");
    }
}

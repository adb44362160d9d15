//! The `auth:` section: which peers must present a bearer token, the trusted issuers (their
//! keys, audiences and claim mapping), and the front proxies that may carry callers of any
//! tenant.
//!
//! ```yaml
//! auth:
//!   tokens_required: [client]        # peer kinds that must present a token (default [client])
//!   leeway_seconds: 30               # clock skew allowed on exp / nbf (default 30)
//!   jwks_refresh_seconds: 300        # keys read / fetched again this often (and on an unknown kid)
//!   fetch_timeout_seconds: 5         # each HTTPS request for keys (discovery, JWK set) (default 5)
//!   trusted_front_proxies: []        # SPIFFE IDs whose calls may carry callers of any tenant
//!   issuers:
//!     - issuer: https://idp.example.com
//!       audiences: [aesp]
//!       # exactly one of:
//!       discovery_url: https://idp.example.com/.well-known/openid-configuration
//!       # jwks_uri: https://idp.example.com/keys     # the JWK set itself
//!       # jwks_file: idp.jwks.json                   # a JWK set file
//!       # pem_file: idp.pem                          # with pem_algorithm (+ pem_kid)
//!       ca_file: idp-ca.pem          # discovery_url / jwks_uri only; default: the system's roots
//!       claims:                      # all optional; defaults shown
//!         principal: sub
//!         tenant: tenant             # "" = the certificate's tenant applies
//!         organization: null
//!         clearance: null
//!         roles: roles
//!         groups: null
//!         group_roles: {}            # IdP group -> [roles]
//!         sensitive: []              # claims never copied into the security context
//! ```
//!
//! Keys over HTTPS (`discovery_url` or `jwks_uri`, see [`crate::identity::remote`]): the
//! URL must be `https://` (`http://` is refused here, at load). With `discovery_url` the
//! sidecar reads the OpenID Connect discovery document, requires its `issuer` to equal
//! `issuer` exactly, and follows its `jwks_uri` (which must be `https://` too). The IdP's
//! certificate must chain to `ca_file` when set (it replaces the system's roots for that
//! issuer), else to the system's roots. Keys are fetched at start; when the IdP cannot be
//! reached the sidecar starts anyway, logs a warning and keeps retrying (1 s, doubling up to
//! a minute), and that issuer's tokens are refused (`INVALID_CREDENTIALS`) until its keys
//! arrive. Afterwards they are fetched again every `jwks_refresh_seconds` and when a token
//! names an unknown `kid` (at most once every 10 s); a failed or bad answer is logged and
//! counted (`aesp_jwks_fetches_total{outcome="error"}`) and the last good keys stay.

use super::{ConfigError, Validator};
use crate::identity::remote::{Location, RemoteKeys};
use crate::identity::token::{ClaimMapping, Issuer, KeyError, Verifier, VerifyKey};
use crate::ids::PeerKind;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// The validated `auth:` section.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub tokens_required: Vec<PeerKind>,
    pub leeway_seconds: u64,
    /// How often the issuers' JWK set files are read again and their keys over HTTPS
    /// fetched again (rotation); 0 = only on an unknown `kid`.
    pub jwks_refresh_seconds: u64,
    /// The timeout of each HTTPS request for an issuer's keys.
    pub fetch_timeout_seconds: u64,
    pub trusted_front_proxies: Vec<String>,
    pub issuers: Vec<IssuerConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens_required: vec![PeerKind::Client],
            leeway_seconds: 30,
            jwks_refresh_seconds: 300,
            fetch_timeout_seconds: DEFAULT_FETCH_TIMEOUT,
            trusted_front_proxies: Vec::new(),
            issuers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub mapping: ClaimMapping,
}

/// `auth.fetch_timeout_seconds` when not set.
pub const DEFAULT_FETCH_TIMEOUT: u64 = 5;

#[derive(Debug, Clone)]
pub enum KeySource {
    Jwks(PathBuf),
    /// Fetched over HTTPS; `ca_file` replaces the system's roots for this IdP.
    Remote {
        location: Location,
        ca_file: Option<PathBuf>,
    },
    Pem {
        path: PathBuf,
        algorithm: jsonwebtoken::Algorithm,
        kid: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    tokens_required: Option<Vec<String>>,
    leeway_seconds: Option<u64>,
    jwks_refresh_seconds: Option<u64>,
    fetch_timeout_seconds: Option<u64>,
    #[serde(default)]
    trusted_front_proxies: Vec<String>,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    jwks_file: Option<String>,
    pem_file: Option<String>,
    pem_algorithm: Option<String>,
    pem_kid: Option<String>,
    jwks_uri: Option<String>,
    discovery_url: Option<String>,
    ca_file: Option<String>,
    #[serde(default)]
    claims: RawClaims,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaims {
    principal: Option<String>,
    tenant: Option<String>,
    organization: Option<String>,
    clearance: Option<String>,
    roles: Option<String>,
    groups: Option<String>,
    #[serde(default)]
    group_roles: HashMap<String, Vec<String>>,
    #[serde(default)]
    sensitive: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn auth(
        &self,
        raw: RawAuth,
        peer_kinds: &[PeerKind],
    ) -> Result<AuthConfig, ConfigError> {
        let tokens_required = match raw.tokens_required {
            None => vec![PeerKind::Client],
            Some(kinds) => kinds
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    PeerKind::new(k)
                        .filter(|k| peer_kinds.contains(k))
                        .ok_or_else(|| {
                            self.err(
                                &format!("auth.tokens_required[{i}]"),
                                format!("expected one of identity.peer_kinds, got {k:?}"),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let mut issuers = Vec::with_capacity(raw.issuers.len());
        for (i, ri) in raw.issuers.into_iter().enumerate() {
            let f = |name: &str| format!("auth.issuers[{i}].{name}");
            let issuer = ri
                .issuer
                .filter(|s| !s.is_empty())
                .ok_or_else(|| self.err(&f("issuer"), "required: the exact `iss` of its tokens"))?;
            if issuers.iter().any(|x: &IssuerConfig| x.issuer == issuer) {
                return Err(self.err(&f("issuer"), format!("{issuer:?} is listed twice")));
            }
            let given: Vec<&str> = [
                ("jwks_file", ri.jwks_file.is_some()),
                ("pem_file", ri.pem_file.is_some()),
                ("jwks_uri", ri.jwks_uri.is_some()),
                ("discovery_url", ri.discovery_url.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if given.len() != 1 {
                return Err(self.err(
                    &format!("auth.issuers[{i}]"),
                    format!(
                        "expected exactly one of jwks_file, pem_file, jwks_uri or discovery_url, got {}",
                        if given.is_empty() {
                            "none".to_string()
                        } else {
                            given.join(", ")
                        }
                    ),
                ));
            }
            if ri.ca_file.is_some() && ri.jwks_uri.is_none() && ri.discovery_url.is_none() {
                return Err(self.err(
                    &f("ca_file"),
                    "only with jwks_uri or discovery_url: it is the CA bundle of the IdP the keys are fetched from",
                ));
            }
            let remote = |field: &str, url: &str| -> Result<http::Uri, ConfigError> {
                crate::identity::remote::check_url(url).map_err(|why| self.err(&f(field), why))
            };
            let keys = if let Some(j) = ri.jwks_file {
                KeySource::Jwks(self.resolve(&j))
            } else if let Some(u) = &ri.jwks_uri {
                KeySource::Remote {
                    location: Location::JwksUri(remote("jwks_uri", u)?),
                    ca_file: ri.ca_file.as_deref().map(|c| self.resolve(c)),
                }
            } else if let Some(u) = &ri.discovery_url {
                KeySource::Remote {
                    location: Location::Discovery(remote("discovery_url", u)?),
                    ca_file: ri.ca_file.as_deref().map(|c| self.resolve(c)),
                }
            } else {
                let p = ri.pem_file.unwrap_or_default();
                let alg = ri.pem_algorithm.as_deref().unwrap_or("");
                let algorithm = match alg {
                    "RS256" => jsonwebtoken::Algorithm::RS256,
                    "RS384" => jsonwebtoken::Algorithm::RS384,
                    "RS512" => jsonwebtoken::Algorithm::RS512,
                    "PS256" => jsonwebtoken::Algorithm::PS256,
                    "ES256" => jsonwebtoken::Algorithm::ES256,
                    "ES384" => jsonwebtoken::Algorithm::ES384,
                    "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
                    other => {
                        return Err(self.err(
                            &f("pem_algorithm"),
                            format!("expected RS256, RS384, RS512, PS256, ES256, ES384 or EdDSA, got {other:?}"),
                        ));
                    }
                };
                KeySource::Pem {
                    path: self.resolve(&p),
                    algorithm,
                    kid: ri.pem_kid,
                }
            };
            let c = ri.claims;
            let defaults = ClaimMapping::default();
            let mapping = ClaimMapping {
                principal: c.principal.unwrap_or(defaults.principal),
                tenant: match c.tenant {
                    None => defaults.tenant,
                    Some(t) if t.is_empty() => None,
                    Some(t) => Some(t),
                },
                organization: c.organization,
                clearance: c.clearance,
                roles: c.roles.or(defaults.roles),
                groups: c.groups,
                group_roles: c.group_roles,
                sensitive: c.sensitive,
            };
            issuers.push(IssuerConfig {
                issuer,
                audiences: ri.audiences,
                keys,
                mapping,
            });
        }
        if issuers.is_empty() && !tokens_required.is_empty() {
            return Err(self.err(
                "auth.issuers",
                format!(
                    "required: peers of kind {} must present a bearer token (auth.tokens_required); configure a token issuer, or set auth.tokens_required: [] to authenticate by certificate alone",
                    tokens_required.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let fetch_timeout_seconds = raw.fetch_timeout_seconds.unwrap_or(DEFAULT_FETCH_TIMEOUT);
        if !(1..=300).contains(&fetch_timeout_seconds) {
            return Err(self.err(
                "auth.fetch_timeout_seconds",
                format!("expected 1 to 300, got {fetch_timeout_seconds}"),
            ));
        }
        Ok(AuthConfig {
            tokens_required,
            leeway_seconds: raw.leeway_seconds.unwrap_or(30),
            jwks_refresh_seconds: raw.jwks_refresh_seconds.unwrap_or(300),
            fetch_timeout_seconds,
            trusted_front_proxies: raw.trusted_front_proxies,
            issuers,
        })
    }
}

impl AuthConfig {
    /// Loads every issuer's keys from files; issuers whose keys are fetched over HTTPS start
    /// with none (their CA bundle is read here), see [`crate::identity::remote::keep_fresh`].
    /// `file` names the config in errors.
    pub fn verifier(&self, file: &str) -> Result<Verifier, ConfigError> {
        let mut issuers = Vec::with_capacity(self.issuers.len());
        let timeout = std::time::Duration::from_secs(self.fetch_timeout_seconds);
        let mut system_roots = None;
        for (i, ic) in self.issuers.iter().enumerate() {
            let err = |field: &str, problem: String| ConfigError {
                file: file.to_string(),
                field: format!("auth.issuers[{i}]{field}"),
                problem,
            };
            let (field, keys) = match &ic.keys {
                KeySource::Jwks(p) => ("jwks_file", VerifyKey::load_jwks(p)),
                KeySource::Pem {
                    path,
                    algorithm,
                    kid,
                } => (
                    "pem_file",
                    VerifyKey::load_pem(path, *algorithm, kid.clone()).map(|k| vec![k]),
                ),
                KeySource::Remote { .. } => ("", Ok(Vec::new())),
            };
            let keys = keys.map_err(|e: KeyError| err(&format!(".{field}"), e.to_string()))?;
            let issuer = Issuer::new(
                ic.issuer.clone(),
                ic.audiences.clone(),
                ic.mapping.clone(),
                keys,
            );
            issuers.push(match &ic.keys {
                KeySource::Jwks(p) => issuer.from_jwks_file(p.clone()),
                KeySource::Pem { .. } => issuer,
                KeySource::Remote { location, ca_file } => {
                    let tls = match ca_file {
                        Some(ca) => crate::tls::idp_client_config(Some(ca))
                            .map_err(|e| err(".ca_file", e))?,
                        None => match &system_roots {
                            Some(t) => std::sync::Arc::clone(t),
                            None => {
                                let t = crate::tls::idp_client_config(None)
                                    .map_err(|e| err(".ca_file", e))?;
                                system_roots = Some(t.clone());
                                t
                            }
                        },
                    };
                    issuer.from_remote(RemoteKeys::new(location.clone(), tls, timeout))
                }
            });
        }
        Ok(Verifier::new(issuers, self.leeway_seconds))
    }
}

//! The `auth:` section: which peers must present a bearer token, the trusted issuers (their
//! keys, audiences and claim mapping), and the front proxies that may carry callers of any
//! tenant.
//!
//! ```yaml
//! auth:
//!   tokens_required: [client]        # peer kinds that must present a token (default [client])
//!   leeway_seconds: 30               # clock skew allowed on exp / nbf (default 30)
//!   jwks_refresh_seconds: 300        # JWK set files read again this often (and on an unknown kid)
//!   trusted_front_proxies: []        # SPIFFE IDs whose calls may carry callers of any tenant
//!   issuers:
//!     - issuer: https://idp.example.com
//!       audiences: [aesp]
//!       jwks_file: idp.jwks.json     # or pem_file + pem_algorithm (+ pem_kid)
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

use super::{ConfigError, Validator};
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
    /// How often the issuers' JWK set files are read again (rotation); 0 = only on an
    /// unknown `kid`.
    pub jwks_refresh_seconds: u64,
    pub trusted_front_proxies: Vec<String>,
    pub issuers: Vec<IssuerConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens_required: vec![PeerKind::Client],
            leeway_seconds: 30,
            jwks_refresh_seconds: 300,
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

#[derive(Debug, Clone)]
pub enum KeySource {
    Jwks(PathBuf),
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
            let keys = match (ri.jwks_file, ri.pem_file) {
                (Some(j), None) => KeySource::Jwks(self.resolve(&j)),
                (None, Some(p)) => {
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
                }
                _ => {
                    return Err(self.err(
                        &format!("auth.issuers[{i}]"),
                        "expected exactly one of jwks_file or pem_file",
                    ));
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
        Ok(AuthConfig {
            tokens_required,
            leeway_seconds: raw.leeway_seconds.unwrap_or(30),
            jwks_refresh_seconds: raw.jwks_refresh_seconds.unwrap_or(300),
            trusted_front_proxies: raw.trusted_front_proxies,
            issuers,
        })
    }
}

impl AuthConfig {
    /// Loads every issuer's keys; `file` names the config in errors.
    pub fn verifier(&self, file: &str) -> Result<Verifier, ConfigError> {
        let mut issuers = Vec::with_capacity(self.issuers.len());
        for (i, ic) in self.issuers.iter().enumerate() {
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
            };
            let keys = keys.map_err(|e: KeyError| ConfigError {
                file: file.to_string(),
                field: format!("auth.issuers[{i}].{field}"),
                problem: e.to_string(),
            })?;
            let issuer = Issuer::new(
                ic.issuer.clone(),
                ic.audiences.clone(),
                ic.mapping.clone(),
                keys,
            );
            issuers.push(match &ic.keys {
                KeySource::Jwks(p) => issuer.from_jwks_file(p.clone()),
                KeySource::Pem { .. } => issuer,
            });
        }
        Ok(Verifier::new(issuers, self.leeway_seconds))
    }
}

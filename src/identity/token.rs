//! Bearer tokens (JWT): verified against the keys of the trusted issuers, mapped to a
//! [`Caller`], and cached by the SHA-256 of the token until it expires, so a warm call does
//! no signature work.
//!
//! Rules, each enforced here:
//! - the issuer (`iss`) must be one of the configured issuers, and only its keys are tried;
//! - each key allows exactly one algorithm, fixed when the key is loaded (from the JWK's
//!   `alg`, else from its type: RSA → RS256, EC P-256 → ES256, EC P-384 → ES384, Ed25519 →
//!   EdDSA); a token whose `alg` is not that one is refused, so `none` and
//!   HMAC-with-a-public-key confusion cannot happen (symmetric keys are refused at load);
//! - a `kid` picks the key; a token without one is tried against every key of its issuer
//!   that allows its algorithm;
//! - `exp` is required; `exp`, `nbf`, `iss` and `aud` are checked with the configured
//!   leeway;
//! - the claim mapping must find a principal (and, where configured, a tenant) that is a
//!   valid id.
//!
//! An issuer's keys come from a JWK set file (read again on rotation), a PEM file, or an
//! IdP over HTTPS (a `jwks_uri` or a discovery document, fetched off the request path by
//! [`crate::identity::remote`]). Whatever their origin, a refresh that fails keeps the keys
//! in force, and the cached path never looks at keys at all.
//!
//! Token values are never logged nor kept: the cache is keyed by their hash.

use crate::ids::{PrincipalId, TenantId};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// A verified caller, as its token and the issuer's claim mapping say.
#[derive(Debug)]
pub struct Caller {
    pub issuer: String,
    pub principal: PrincipalId,
    /// `None` when the issuer maps no tenant claim (the certificate's tenant applies).
    pub tenant: Option<TenantId>,
    pub organization: Option<String>,
    pub clearance: Option<String>,
    /// Roles the token asserts, directly or through group mapping (sorted, unique).
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    /// The token's claims as strings, minus those marked sensitive.
    pub claims: BTreeMap<String, String>,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// Header values for the upstream request, built once per token.
    pub principal_header: http::HeaderValue,
    pub tenant_header: Option<http::HeaderValue>,
    /// The caller's part of the `EnterpriseSecurityContext`, encoded on first use.
    pub context: std::sync::OnceLock<Vec<u8>>,
    /// The caller's RBAC grants, resolved on first use (per RBAC generation).
    pub grants: crate::authz::GrantsCache,
}

/// Why a token was not accepted. Shown to the caller in `details.reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("no token issuer is configured; this connection's calls take no token")]
    NoIssuers,
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("issuer {issuer:?} has no key {kid:?}")]
    UnknownKey { issuer: String, kid: String },
    #[error("issuer {0:?} has no keys yet: its JWK set could not be fetched")]
    NoKeys(String),
    #[error("algorithm {alg} is not allowed for the key that verifies this token")]
    AlgorithmNotAllowed { alg: String },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not for this audience")]
    WrongAudience,
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    #[error("the {claim} claim is not usable: {why}")]
    BadClaim { claim: String, why: String },
    #[error("service account {0} is revoked")]
    Revoked(String),
    #[error("service account {0} does not exist")]
    UnknownAccount(String),
}

/// Which claims give what, for one issuer.
#[derive(Debug, Clone)]
pub struct ClaimMapping {
    pub principal: String,
    pub tenant: Option<String>,
    pub organization: Option<String>,
    pub clearance: Option<String>,
    pub roles: Option<String>,
    pub groups: Option<String>,
    /// IdP group → roles.
    pub group_roles: HashMap<String, Vec<String>>,
    /// Claims never copied into `Caller::claims` (nor anywhere else).
    pub sensitive: Vec<String>,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            principal: "sub".into(),
            tenant: Some("tenant".into()),
            organization: None,
            clearance: None,
            roles: Some("roles".into()),
            groups: None,
            group_roles: HashMap::new(),
            sensitive: Vec::new(),
        }
    }
}

/// A public key and the one algorithm it verifies.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// Why keys could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path} is not a JWK set: {why}")]
    NotJwks { path: String, why: String },
    #[error("key {index} ({kid}) of {path}: {why}")]
    BadKey {
        path: String,
        index: usize,
        kid: String,
        why: String,
    },
    #[error("{path} holds no usable public key")]
    Empty { path: String },
}

impl VerifyKey {
    /// The key of one JWK, with the algorithm it allows.
    pub fn from_jwk(jwk: &Jwk) -> Result<VerifyKey, String> {
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref c => return Err(format!("curve {c:?} is not supported")),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => Algorithm::EdDSA,
                ref c => return Err(format!("curve {c:?} is not supported")),
            },
            AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (oct) keys are not accepted: tokens are verified with public keys only".into());
            }
            _ => return Err("unsupported key type".into()),
        };
        let alg = match jwk.common.key_algorithm {
            None => by_type,
            Some(ka) => {
                let a = match ka {
                    KeyAlgorithm::RS256 => Algorithm::RS256,
                    KeyAlgorithm::RS384 => Algorithm::RS384,
                    KeyAlgorithm::RS512 => Algorithm::RS512,
                    KeyAlgorithm::PS256 => Algorithm::PS256,
                    KeyAlgorithm::PS384 => Algorithm::PS384,
                    KeyAlgorithm::PS512 => Algorithm::PS512,
                    KeyAlgorithm::ES256 => Algorithm::ES256,
                    KeyAlgorithm::ES384 => Algorithm::ES384,
                    KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                    other => {
                        return Err(format!(
                            "alg {other:?} is not a signature algorithm this sidecar accepts"
                        ));
                    }
                };
                let same_family = matches!(
                    (by_type, a),
                    (
                        Algorithm::RS256,
                        Algorithm::RS256
                            | Algorithm::RS384
                            | Algorithm::RS512
                            | Algorithm::PS256
                            | Algorithm::PS384
                            | Algorithm::PS512
                    ) | (Algorithm::ES256, Algorithm::ES256)
                        | (Algorithm::ES384, Algorithm::ES384)
                        | (Algorithm::EdDSA, Algorithm::EdDSA)
                );
                if !same_family {
                    return Err(format!("alg {a:?} does not fit the key type"));
                }
                a
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        Ok(VerifyKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        })
    }

    /// The keys of a JWK set file (`{"keys": [...]}`).
    pub fn load_jwks(path: &Path) -> Result<Vec<VerifyKey>, KeyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: p.clone(),
            why: e.to_string(),
        })?;
        Self::parse_jwks(&text, &p)
    }

    /// The keys of a JWK set; `origin` names it in errors.
    pub fn parse_jwks(text: &str, origin: &str) -> Result<Vec<VerifyKey>, KeyError> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| KeyError::NotJwks {
            path: origin.to_string(),
            why: e.to_string(),
        })?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for (index, jwk) in set.keys.iter().enumerate() {
            let k = Self::from_jwk(jwk).map_err(|why| KeyError::BadKey {
                path: origin.to_string(),
                index,
                kid: jwk.common.key_id.clone().unwrap_or_else(|| "no kid".into()),
                why,
            })?;
            keys.push(k);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: origin.to_string(),
            });
        }
        Ok(keys)
    }

    /// One public key in a PEM file (RSA, EC P-256 or Ed25519 `PUBLIC KEY`), with `kid`.
    pub fn load_pem(
        path: &Path,
        alg: Algorithm,
        kid: Option<String>,
    ) -> Result<VerifyKey, KeyError> {
        let p = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| KeyError::Read {
            path: p.clone(),
            why: e.to_string(),
        })?;
        let key = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => {
                return Err(KeyError::BadKey {
                    path: p,
                    index: 0,
                    kid: kid.unwrap_or_default(),
                    why: "symmetric algorithms are not accepted".into(),
                });
            }
        }
        .map_err(|e| KeyError::BadKey {
            path: p.clone(),
            index: 0,
            kid: kid.clone().unwrap_or_else(|| "no kid".into()),
            why: e.to_string(),
        })?;
        Ok(VerifyKey { kid, alg, key })
    }
}

/// A trusted issuer: its keys, audiences and claim mapping.
#[derive(Debug)]
pub struct Issuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub mapping: ClaimMapping,
    keys: arc_swap::ArcSwap<Vec<VerifyKey>>,
    /// The JWK set file the keys come from, when they can be read again (rotation).
    jwks_file: Option<std::path::PathBuf>,
    /// Where the keys are fetched over HTTPS, when they are ([`crate::identity::remote`]).
    remote: Option<crate::identity::remote::RemoteKeys>,
    /// When the keys were last read (Unix seconds), to rate-limit reads on unknown `kid`s.
    last_read: std::sync::atomic::AtomicU64,
}

/// The least time between two reads of an issuer's keys for an unknown `kid`.
const KID_REFETCH_INTERVAL: u64 = 10;

impl Issuer {
    pub fn new(
        issuer: String,
        audiences: Vec<String>,
        mapping: ClaimMapping,
        keys: Vec<VerifyKey>,
    ) -> Issuer {
        Issuer {
            issuer,
            audiences,
            mapping,
            keys: arc_swap::ArcSwap::from_pointee(keys),
            jwks_file: None,
            remote: None,
            last_read: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Keys that come from `path`, a JWK set file read again on rotation (the first unknown
    /// `kid` reads it at once, later ones at most every few seconds).
    pub fn from_jwks_file(self, path: std::path::PathBuf) -> Issuer {
        Issuer {
            jwks_file: Some(path),
            ..self
        }
    }

    /// Keys fetched over HTTPS by [`crate::identity::remote::keep_fresh`] (at start, on
    /// schedule, and when a token names an unknown `kid`).
    pub fn from_remote(self, remote: crate::identity::remote::RemoteKeys) -> Issuer {
        Issuer {
            remote: Some(remote),
            ..self
        }
    }

    /// Where the keys are fetched, when they come from an IdP over HTTPS.
    pub fn remote(&self) -> Option<&crate::identity::remote::RemoteKeys> {
        self.remote.as_ref()
    }

    /// Reads the keys again from their file. On any error the keys in force stay (an
    /// unreadable or broken file is an outage, not a revocation) and the error is returned.
    pub fn refresh(&self, now: u64) -> Result<bool, KeyError> {
        let Some(path) = &self.jwks_file else {
            return Ok(false);
        };
        self.last_read
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let keys = VerifyKey::load_jwks(path)?;
        self.set_keys(keys);
        Ok(true)
    }

    /// A `kid` this issuer does not know: read the keys again, at most every few seconds.
    /// Keys fetched over HTTPS are not fetched here (never on the request path): the fetch
    /// task is woken, and the token is refused until the new keys are in.
    fn refetch_for_unknown_kid(&self, now: u64) -> bool {
        if let Some(r) = &self.remote {
            r.wake();
            return false;
        }
        let last = self.last_read.load(std::sync::atomic::Ordering::Relaxed);
        if self.jwks_file.is_none() || now < last.saturating_add(KID_REFETCH_INTERVAL) {
            return false;
        }
        match self.refresh(now) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "cannot read the issuer's keys again; keeping the keys in force");
                false
            }
        }
    }

    /// Replaces the keys (a refresh, a rotation); calls in flight keep the old set.
    pub fn set_keys(&self, keys: Vec<VerifyKey>) {
        self.keys.store(Arc::new(keys));
    }

    pub fn keys(&self) -> Arc<Vec<VerifyKey>> {
        self.keys.load_full()
    }
}

/// Verified tokens, by the SHA-256 of the token, until they expire.
#[derive(Debug, Default)]
struct Cache {
    map: RwLock<HashMap<[u8; 32], Arc<Caller>>>,
}

/// Entries kept at most; past it, expired ones are dropped, then everything if need be.
const CACHE_MAX: usize = 100_000;

impl Cache {
    fn get(&self, h: &[u8; 32], now: u64) -> Option<Arc<Caller>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(h).filter(|c| c.expires_at > now).cloned()
    }

    fn put(&self, h: [u8; 32], c: Arc<Caller>, now: u64) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_MAX {
            map.retain(|_, c| c.expires_at > now);
            if map.len() >= CACHE_MAX {
                map.clear();
            }
        }
        map.insert(h, c);
    }
}

/// Verifies bearer tokens against the trusted issuers.
#[derive(Debug)]
pub struct Verifier {
    issuers: Vec<Issuer>,
    leeway: u64,
    cache: Cache,
    /// The sidecar's own issuer and its accounts: principal → revoked.
    own: Option<(String, arc_swap::ArcSwap<HashMap<PrincipalId, bool>>)>,
}

/// The part after `Bearer ` of an `authorization` header value.
pub fn bearer(value: &[u8]) -> Result<&str, TokenError> {
    let s = std::str::from_utf8(value).map_err(|_| TokenError::NotBearer)?;
    let (scheme, token) = s.split_once(' ').ok_or(TokenError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::NotBearer);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::NotBearer);
    }
    Ok(token)
}

impl Verifier {
    pub fn new(issuers: Vec<Issuer>, leeway: u64) -> Verifier {
        Verifier {
            issuers,
            leeway,
            cache: Cache::default(),
            own: None,
        }
    }

    /// Trusts the sidecar's own issuer, whose tokens are valid only for the accounts of
    /// `accounts` that are not revoked (see [`Verifier::set_accounts`]).
    pub fn with_own_issuer(
        mut self,
        issuer: Issuer,
        accounts: HashMap<PrincipalId, bool>,
    ) -> Verifier {
        self.own = Some((
            issuer.issuer.clone(),
            arc_swap::ArcSwap::from_pointee(accounts),
        ));
        self.issuers.push(issuer);
        self
    }

    /// The sidecar's accounts now (principal → revoked); takes effect on the next call.
    pub fn set_accounts(&self, accounts: HashMap<PrincipalId, bool>) {
        if let Some((_, a)) = &self.own {
            a.store(Arc::new(accounts));
        }
    }

    /// One account of the sidecar's issuer is now live (`revoked` false) or revoked.
    pub fn set_account(&self, principal: &PrincipalId, revoked: bool) {
        if let Some((_, a)) = &self.own {
            a.rcu(|m| {
                let mut m = (**m).clone();
                m.insert(principal.clone(), revoked);
                m
            });
        }
    }

    /// The sidecar's own accounts now.
    pub fn accounts(&self) -> HashMap<PrincipalId, bool> {
        self.own
            .as_ref()
            .map(|(_, a)| (**a.load()).clone())
            .unwrap_or_default()
    }

    /// A caller of the sidecar's own issuer must be a live account.
    fn live(&self, c: Arc<Caller>) -> Result<Arc<Caller>, TokenError> {
        match &self.own {
            Some((iss, accounts)) if *iss == c.issuer => match accounts.load().get(&c.principal) {
                Some(false) => Ok(c),
                Some(true) => Err(TokenError::Revoked(c.principal.to_string())),
                None => Err(TokenError::UnknownAccount(c.principal.to_string())),
            },
            _ => Ok(c),
        }
    }

    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers
    }

    /// The caller of `token` at `now` (Unix seconds): from the cache when it was verified
    /// before and has not expired, else verified now.
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<Caller>, TokenError> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cache.get(&h, now) {
            return self.live(c);
        }
        let c = Arc::new(self.verify_uncached(token, now)?);
        self.cache.put(h, c.clone(), now);
        self.live(c)
    }

    fn verify_uncached(&self, token: &str, now: u64) -> Result<Caller, TokenError> {
        if self.issuers.is_empty() {
            return Err(TokenError::NoIssuers);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        // The issuer decides which keys may verify: read it before verifying anything.
        let unverified: serde_json::Map<String, Value> =
            jsonwebtoken::dangerous::insecure_decode_claims(token)
                .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenError::MissingClaim("iss".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.to_string()))?;
        let mut keys = issuer.keys();
        if keys.is_empty() {
            // An IdP that could not be reached yet: ask for a fetch, refuse the token.
            issuer.refetch_for_unknown_kid(now);
            return Err(TokenError::NoKeys(iss.to_string()));
        }
        if let Some(kid) = &header.kid
            && !keys.iter().any(|k| k.kid.as_deref() == Some(kid))
            && issuer.refetch_for_unknown_kid(now)
        {
            // A new key (rotation): the issuer's keys were read again.
            keys = issuer.keys();
        }
        let candidates: Vec<&VerifyKey> = match &header.kid {
            Some(kid) => {
                let k = keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or_else(|| TokenError::UnknownKey {
                        issuer: iss.to_string(),
                        kid: kid.clone(),
                    })?;
                vec![k]
            }
            None => keys.iter().collect(),
        };
        let alg_ok: Vec<&VerifyKey> = candidates
            .into_iter()
            .filter(|k| k.alg == header.alg)
            .collect();
        if alg_ok.is_empty() {
            return Err(TokenError::AlgorithmNotAllowed {
                alg: format!("{:?}", header.alg),
            });
        }
        let mut last = TokenError::BadSignature;
        for k in alg_ok {
            let mut v = Validation::new(k.alg);
            v.leeway = self.leeway;
            v.validate_nbf = true;
            v.set_issuer(&[&issuer.issuer]);
            if issuer.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&issuer.audiences);
            }
            v.set_required_spec_claims(&["exp", "iss"]);
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &k.key, &v) {
                Ok(data) => return map_claims(issuer, &data.claims, now, self.leeway),
                Err(e) => last = classify(e),
            }
            if last != TokenError::BadSignature {
                break;
            }
        }
        Err(last)
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::BadSignature,
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::WrongAudience,
        K::InvalidIssuer => TokenError::UnknownIssuer("(issuer mismatch)".into()),
        K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        K::InvalidAlgorithm => TokenError::AlgorithmNotAllowed {
            alg: "(header)".into(),
        },
        K::InvalidClaimFormat(c) => TokenError::BadClaim {
            claim: c.clone(),
            why: "wrong type".into(),
        },
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

fn as_strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The caller the verified claims describe, per the issuer's mapping.
fn map_claims(
    issuer: &Issuer,
    claims: &serde_json::Map<String, Value>,
    now: u64,
    leeway: u64,
) -> Result<Caller, TokenError> {
    let m = &issuer.mapping;
    let bad = |claim: &str, why: &str| TokenError::BadClaim {
        claim: claim.to_string(),
        why: why.to_string(),
    };
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let principal =
        text(&m.principal).ok_or_else(|| TokenError::MissingClaim(m.principal.clone()))?;
    let principal =
        PrincipalId::new(principal).ok_or_else(|| bad(&m.principal, "not a valid principal id"))?;
    let tenant = match &m.tenant {
        None => None,
        Some(t) => {
            let v = text(t).ok_or_else(|| TokenError::MissingClaim(t.clone()))?;
            Some(TenantId::new(v).ok_or_else(|| bad(t, "not a valid tenant id"))?)
        }
    };
    let groups = m
        .groups
        .as_ref()
        .and_then(|g| claims.get(g))
        .map(as_strings)
        .unwrap_or_default();
    let mut roles: Vec<String> = m
        .roles
        .as_ref()
        .and_then(|r| claims.get(r))
        .map(as_strings)
        .unwrap_or_default();
    for g in &groups {
        if let Some(rs) = m.group_roles.get(g) {
            roles.extend(rs.iter().cloned());
        }
    }
    roles.sort();
    roles.dedup();
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| TokenError::MissingClaim("exp".into()))?;
    if expires_at.saturating_add(leeway) < now {
        return Err(TokenError::Expired);
    }
    let kept = claims
        .iter()
        .filter(|(k, _)| !m.sensitive.iter().any(|s| s == *k))
        .map(|(k, v)| (k.clone(), claim_text(v)))
        .collect();
    let header = |s: &str| {
        http::HeaderValue::from_str(s).unwrap_or_else(|_| http::HeaderValue::from_static("invalid"))
    };
    Ok(Caller {
        issuer: issuer.issuer.clone(),
        principal_header: header(principal.as_str()),
        tenant_header: tenant.as_ref().map(|t| header(t.as_str())),
        context: std::sync::OnceLock::new(),
        grants: crate::authz::GrantsCache::default(),
        principal,
        tenant,
        organization: m
            .organization
            .as_ref()
            .and_then(|o| text(o))
            .map(str::to_string),
        clearance: m
            .clearance
            .as_ref()
            .and_then(|c| text(c))
            .map(str::to_string),
        roles,
        groups,
        claims: kept,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// An Ed25519 issuer key pair from rcgen (PKCS#8), and its public JWK.
    fn ed_keys() -> (EncodingKey, Jwk) {
        use base64::Engine;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let enc = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        let jwk = serde_json::from_value(
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1"}),
        )
        .unwrap();
        (enc, jwk)
    }

    fn es_keys(kid: &str) -> (EncodingKey, Jwk) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        (enc, jwk)
    }

    fn claims(extra: &[(&str, Value)]) -> Value {
        let mut c = serde_json::json!({
            "iss": "https://idp.example", "aud": "aesp", "sub": "alice", "tenant": "acme",
            "exp": now() + 600, "roles": ["tool-user"], "email": "alice@example.com",
        });
        for (k, v) in extra {
            c[*k] = v.clone();
        }
        c
    }

    fn sign(enc: &EncodingKey, alg: Algorithm, kid: Option<&str>, c: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, c, enc).unwrap()
    }

    fn verifier(jwks: Vec<Jwk>) -> Verifier {
        let keys = jwks
            .iter()
            .map(|j| VerifyKey::from_jwk(j).unwrap())
            .collect();
        let mapping = ClaimMapping {
            sensitive: vec!["email".into()],
            groups: Some("groups".into()),
            group_roles: HashMap::from([("eng".to_string(), vec!["tool-admin".to_string()])]),
            ..Default::default()
        };
        Verifier::new(
            vec![Issuer::new(
                "https://idp.example".into(),
                vec!["aesp".into()],
                mapping,
                keys,
            )],
            30,
        )
    }

    #[test]
    fn a_good_token_maps_to_its_caller_without_sensitive_claims() {
        let (enc, jwk) = ed_keys();
        let v = verifier(vec![jwk]);
        let t = sign(
            &enc,
            Algorithm::EdDSA,
            Some("k1"),
            &claims(&[("groups", serde_json::json!(["eng"]))]),
        );
        let c = v.verify(&t, now()).unwrap();
        assert_eq!(c.principal.as_str(), "alice");
        assert_eq!(c.tenant.as_ref().unwrap().as_str(), "acme");
        assert_eq!(c.roles, ["tool-admin", "tool-user"]);
        assert!(!c.claims.contains_key("email"));
        assert_eq!(c.claims["sub"], "alice");
        // Warm: the same Arc from the cache.
        assert!(Arc::ptr_eq(&c, &v.verify(&t, now()).unwrap()));
    }

    #[test]
    fn every_bad_token_is_refused_with_its_reason() {
        let (enc, jwk) = es_keys("k1");
        let (other, _) = es_keys("k1");
        let v = verifier(vec![jwk.clone()]);
        let good = claims(&[]);
        let rsa_like_hmac = jsonwebtoken::encode(
            &Header {
                kid: Some("k1".into()),
                ..Header::new(Algorithm::HS256)
            },
            &good,
            &EncodingKey::from_secret(serde_json::to_string(&jwk).unwrap().as_bytes()).unwrap(),
        )
        .unwrap();
        let none_alg = {
            use base64::Engine;
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                e.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
                e.encode(good.to_string())
            )
        };
        type Expect = fn(&TokenError) -> bool;
        let cases: Vec<(&str, String, Expect)> = vec![
            ("garbage", "not.a.jwt".into(), |e| {
                matches!(e, TokenError::Malformed(_))
            }),
            ("none", none_alg, |e| {
                matches!(
                    e,
                    TokenError::Malformed(_) | TokenError::AlgorithmNotAllowed { .. }
                )
            }),
            ("HMAC with the public key as secret", rsa_like_hmac, |e| {
                matches!(e, TokenError::AlgorithmNotAllowed { .. })
            }),
            (
                "another key",
                sign(&other, Algorithm::ES256, Some("k1"), &good),
                |e| *e == TokenError::BadSignature,
            ),
            (
                "unknown kid",
                sign(&enc, Algorithm::ES256, Some("k9"), &good),
                |e| matches!(e, TokenError::UnknownKey { .. }),
            ),
            (
                "expired",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("exp", serde_json::json!(now() - 120))]),
                ),
                |e| *e == TokenError::Expired,
            ),
            (
                "not yet valid",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("nbf", serde_json::json!(now() + 600))]),
                ),
                |e| *e == TokenError::NotYetValid,
            ),
            (
                "wrong audience",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("aud", serde_json::json!("other"))]),
                ),
                |e| *e == TokenError::WrongAudience,
            ),
            (
                "unknown issuer",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("iss", serde_json::json!("https://evil"))]),
                ),
                |e| matches!(e, TokenError::UnknownIssuer(_)),
            ),
            (
                "no tenant",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("tenant", Value::Null)]),
                ),
                |e| matches!(e, TokenError::MissingClaim(_)),
            ),
            (
                "dot tenant",
                sign(
                    &enc,
                    Algorithm::ES256,
                    Some("k1"),
                    &claims(&[("tenant", serde_json::json!(".."))]),
                ),
                |e| matches!(e, TokenError::BadClaim { .. }),
            ),
        ];
        for (what, token, ok) in cases {
            let e = v.verify(&token, now()).unwrap_err();
            assert!(ok(&e), "{what}: {e:?}");
        }
        // Within the leeway, an expired token still passes.
        let t = sign(
            &enc,
            Algorithm::ES256,
            Some("k1"),
            &claims(&[("exp", serde_json::json!(now() - 10))]),
        );
        assert!(v.verify(&t, now()).is_ok());
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires_and_new_keys_are_picked_up() {
        let (enc, jwk) = es_keys("k1");
        let v = verifier(vec![jwk]);
        let exp = now() + 100;
        let t = sign(
            &enc,
            Algorithm::ES256,
            Some("k1"),
            &claims(&[("exp", serde_json::json!(exp))]),
        );
        assert!(v.verify(&t, now()).is_ok());
        assert!(
            v.verify(&t, exp + 1000).is_err(),
            "the cache never outlives exp"
        );
        // Rotation: a new kid verifies once the issuer's keys are replaced.
        let (enc2, jwk2) = es_keys("k2");
        let t2 = sign(&enc2, Algorithm::ES256, Some("k2"), &claims(&[]));
        assert!(matches!(
            v.verify(&t2, now()),
            Err(TokenError::UnknownKey { .. })
        ));
        v.issuers()[0].set_keys(vec![VerifyKey::from_jwk(&jwk2).unwrap()]);
        assert!(v.verify(&t2, now()).is_ok());
    }

    #[test]
    fn a_rotated_key_is_read_from_the_file_and_an_unreadable_file_keeps_the_keys_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (enc1, jwk1) = es_keys("k1");
        let (enc2, jwk2) = es_keys("k2");
        let write = |keys: &[&Jwk]| {
            std::fs::write(&path, serde_json::json!({ "keys": keys }).to_string()).unwrap()
        };
        write(&[&jwk1]);
        let issuer = Issuer::new(
            "https://idp.example".into(),
            vec!["aesp".into()],
            ClaimMapping::default(),
            VerifyKey::load_jwks(&path).unwrap(),
        )
        .from_jwks_file(path.clone());
        let v = Verifier::new(vec![issuer], 30);
        let t1 = sign(&enc1, Algorithm::ES256, Some("k1"), &claims(&[]));
        let t2 = sign(&enc2, Algorithm::ES256, Some("k2"), &claims(&[]));
        let t = now();
        assert!(v.verify(&t1, t).is_ok());
        // The IdP rotates: the file now has both keys; a token of the new kid is verified.
        write(&[&jwk1, &jwk2]);
        assert!(v.verify(&t2, t).is_ok());
        // The IdP's keys cannot be read (outage): the keys in force still verify, and an
        // unknown kid is refused, without reading again before the interval.
        std::fs::remove_file(&path).unwrap();
        let (enc3, _) = es_keys("k3");
        let t3 = sign(
            &enc3,
            Algorithm::ES256,
            Some("k3"),
            &claims(&[("jti", serde_json::json!(1))]),
        );
        assert!(matches!(
            v.verify(&t3, t + 30),
            Err(TokenError::UnknownKey { .. })
        ));
        let t1b = sign(
            &enc1,
            Algorithm::ES256,
            Some("k1"),
            &claims(&[("jti", serde_json::json!(2))]),
        );
        assert!(v.verify(&t1b, t + 31).is_ok(), "cached keys still verify");
        assert!(v.issuers()[0].refresh(t + 32).is_err());
        assert_eq!(v.issuers()[0].keys().len(), 2);
    }

    #[test]
    fn symmetric_keys_and_mismatched_algorithms_are_refused_at_load() {
        let oct: Jwk =
            serde_json::from_value(serde_json::json!({"kty":"oct","k":"c2VjcmV0","kid":"h"}))
                .unwrap();
        assert!(VerifyKey::from_jwk(&oct).unwrap_err().contains("symmetric"));
        let (_, mut jwk) = es_keys("k");
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        assert!(VerifyKey::from_jwk(&jwk).is_err());
        assert!(bearer(b"Bearer abc").is_ok());
        assert!(bearer(b"Basic abc").is_err());
        assert!(bearer(b"Bearer ").is_err());
    }
}

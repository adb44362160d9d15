//! Check 2, the caller: the bearer token of the call, where one is required or presented.
//!
//! - A peer whose kind is in `auth.tokens_required` must present `authorization: Bearer
//!   <JWT>`; without one: `AUTHENTICATION_REQUIRED`.
//! - A presented token must verify (any peer kind): otherwise `INVALID_CREDENTIALS`, with the
//!   reason in `details`.
//! - The token's tenant must be the certificate's, unless the certificate is a trusted front
//!   proxy (`auth.trusted_front_proxies`), which may carry callers of any tenant:
//!   otherwise `IDENTITY_MISMATCH`.
//!
//! The verified caller is cached by the hash of its token until it expires.

use crate::grpc::{Denial, ErrorCode};
use crate::identity::token::{self, Caller, Verifier};
use crate::ids::PeerKind;
use crate::listener::PeerIdentity;
use std::sync::Arc;

/// What the token check needs, built once from the config.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenRules {
    pub verifier: Option<Arc<Verifier>>,
    pub required: Vec<PeerKind>,
    /// SPIFFE IDs of front proxies whose calls may carry callers of any tenant.
    pub front_proxies: Vec<String>,
}

pub(super) fn caller(
    rules: &TokenRules,
    authorization: Option<&[u8]>,
    id: &PeerIdentity,
    now: u64,
) -> Result<Option<Arc<Caller>>, Denial> {
    let Some(value) = authorization else {
        if rules.required.contains(&id.kind) {
            return Err(Denial::new(
                ErrorCode::AuthenticationRequired,
                format!("a bearer token is required for peers of kind {}", id.kind),
            )
            .detail("reason", "no authorization header")
            .detail("peer_kind", id.kind.as_str()));
        }
        return Ok(None);
    };
    let invalid = |e: token::TokenError| {
        Denial::new(
            ErrorCode::InvalidCredentials,
            "the bearer token is not valid",
        )
        .detail("reason", e.to_string())
    };
    let token = token::bearer(value).map_err(invalid)?;
    let verifier = rules
        .verifier
        .as_ref()
        .ok_or_else(|| invalid(token::TokenError::NoIssuers))?;
    let caller = verifier.verify(token, now).map_err(invalid)?;
    if let Some(t) = &caller.tenant
        && *t != id.tenant_id
        && !id
            .spiffe_id
            .as_ref()
            .is_some_and(|s| rules.front_proxies.contains(s))
    {
        return Err(Denial::new(
            ErrorCode::IdentityMismatch,
            format!(
                "the token's tenant {t:?} is not the certificate's tenant {:?}",
                id.tenant_id.as_str()
            ),
        )
        .detail("field", "tenant_id")
        .detail("claimed", t.as_str())
        .detail("verified", id.tenant_id.as_str()));
    }
    Ok(Some(caller))
}

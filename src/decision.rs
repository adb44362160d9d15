//! The one decision point. Every check runs here, in order, and returns one [`Decision`]:
//! allowed or denied, with the code, the rule that decided and the context it saw. Whatever
//! is recorded about a call (logs, metrics, and the audit trail of a later release) is made
//! from this value, so nothing is decided that is not recorded.
//!
//! Order: authentication → method known → identity consistency. RBAC, tenancy, governance,
//! schema, CEL policy and budget checks slot in after these, in that order.

use crate::grid::Route;
use crate::grid::upgrade::Claims;
use crate::grpc::{Denial, ErrorCode};
use crate::listener::PeerIdentity;

/// Everything the pipeline looks at for one call (or one message of a stream).
#[derive(Debug)]
pub struct DecisionInput<'a> {
    pub method: &'a str,
    pub route: Route,
    pub identity: Result<&'a PeerIdentity, &'a str>,
    pub claims: Claims,
    pub tool_name: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub correlation_id: &'a str,
}

impl<'a> DecisionInput<'a> {
    /// A call decided on its headers alone, before any message is read.
    pub fn headers(
        method: &'a str,
        route: Route,
        identity: Result<&'a PeerIdentity, &'a str>,
        correlation_id: &'a str,
    ) -> Self {
        DecisionInput {
            method,
            route,
            identity,
            claims: Claims::default(),
            tool_name: None,
            session_id: None,
            correlation_id,
        }
    }
}

/// The outcome of the pipeline.
#[derive(Debug, Clone)]
pub struct Decision {
    pub denial: Option<Denial>,
    pub method: String,
    pub principal_id: String,
    pub tenant_id: String,
    pub correlation_id: String,
    pub tool_name: Option<String>,
    pub session_id: Option<String>,
    /// Rules that matched (policy ids, bindings); empty until policies exist.
    pub matched_policies: Vec<String>,
    /// A claimed identity field disagreed and was overwritten (config allows it).
    pub overwrote_identity: bool,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.denial.is_none()
    }

    /// A denial decided before the pipeline could run (a frame that does not decode).
    pub fn early_denial(
        method: &str,
        identity: Option<&PeerIdentity>,
        correlation_id: &str,
        denial: Denial,
    ) -> Decision {
        let d = Decision {
            denial: Some(denial),
            method: method.to_string(),
            principal_id: identity.map(|i| i.principal_id.clone()).unwrap_or_default(),
            tenant_id: identity.map(|i| i.tenant_id.clone()).unwrap_or_default(),
            correlation_id: correlation_id.to_string(),
            tool_name: None,
            session_id: None,
            matched_policies: Vec::new(),
            overwrote_identity: false,
        };
        d.log();
        d
    }

    fn log(&self) {
        match &self.denial {
            None => tracing::debug!(
                method = %self.method, principal = %self.principal_id, tenant = %self.tenant_id,
                correlation_id = %self.correlation_id, tool = self.tool_name.as_deref().unwrap_or(""),
                "allow"
            ),
            Some(d) => tracing::info!(
                method = %self.method, principal = %self.principal_id, tenant = %self.tenant_id,
                correlation_id = %self.correlation_id, tool = self.tool_name.as_deref().unwrap_or(""),
                code = d.code.as_str(), reason = %d.message,
                "deny"
            ),
        }
    }
}

/// The ordered checks, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub overwrite_identity_fields: bool,
}

impl Pipeline {
    pub fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        let mut d = Decision {
            denial: None,
            method: input.method.to_string(),
            principal_id: String::new(),
            tenant_id: String::new(),
            correlation_id: input.correlation_id.to_string(),
            tool_name: input.tool_name.map(str::to_string),
            session_id: input
                .session_id
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            matched_policies: Vec::new(),
            overwrote_identity: false,
        };
        d.denial = self.check(input, &mut d).err();
        d.log();
        d
    }

    fn check(&self, input: &DecisionInput<'_>, d: &mut Decision) -> Result<(), Denial> {
        // 1. Authentication: a verified identity from the certificate.
        let id = input.identity.map_err(|why| {
            Denial::new(
                ErrorCode::AuthenticationRequired,
                "no usable identity on this connection",
            )
            .detail("reason", why)
        })?;
        d.principal_id = id.principal_id.clone();
        d.tenant_id = id.tenant_id.clone();

        // 2. The method must be known or listed for pass-through.
        if input.route == Route::Management {
            return Err(Denial::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not served: the Enterprise*Service management APIs are not available in this release", input.method),
            )
            .detail("method", input.method));
        }
        if input.route == Route::Unknown {
            return Err(Denial::new(
                ErrorCode::MethodNotAllowed,
                format!(
                    "method {} is not a GRID method and is not listed for pass-through",
                    input.method
                ),
            )
            .detail("method", input.method));
        }

        // 3. Identity fields in the message must agree with the verified identity.
        for (field, claimed, verified) in [
            ("principal_id", &input.claims.principal_id, &id.principal_id),
            ("tenant_id", &input.claims.tenant_id, &id.tenant_id),
        ] {
            if let Some(c) = claimed
                && c != verified
            {
                if self.overwrite_identity_fields {
                    d.overwrote_identity = true;
                    continue;
                }
                return Err(Denial::new(
                    ErrorCode::IdentityMismatch,
                    format!(
                        "the message claims {field} {c:?} but the verified identity is {verified:?}"
                    ),
                )
                .detail("field", field)
                .detail("claimed", c.as_str())
                .detail("verified", verified.as_str()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::GridMethod;

    fn input<'a>(
        id: Result<&'a PeerIdentity, &'a str>,
        route: Route,
        claims: Claims,
    ) -> DecisionInput<'a> {
        DecisionInput {
            method: "/altar.grid.v1.GridHost/CreateSession",
            route,
            identity: id,
            claims,
            tool_name: None,
            session_id: None,
            correlation_id: "c",
        }
    }

    #[test]
    fn checks_in_order() {
        let alice = PeerIdentity::new("alice", "acme", "client", None, "CN=a".into()).unwrap();
        let p = Pipeline {
            overwrite_identity_fields: false,
        };
        let grid = Route::Grid(GridMethod::CreateSession);

        let d = p.decide(&input(Err("no SAN"), Route::Unknown, Claims::default()));
        assert_eq!(d.denial.unwrap().code, ErrorCode::AuthenticationRequired);

        let d = p.decide(&input(Ok(&alice), Route::Unknown, Claims::default()));
        assert_eq!(d.denial.unwrap().code, ErrorCode::MethodNotAllowed);

        let same = Claims {
            principal_id: Some("alice".into()),
            tenant_id: Some("acme".into()),
        };
        assert!(p.decide(&input(Ok(&alice), grid, same)).allowed());

        let other = Claims {
            principal_id: None,
            tenant_id: Some("globex".into()),
        };
        let d = p.decide(&input(Ok(&alice), grid, other.clone()));
        let den = d.denial.unwrap();
        assert_eq!(den.code, ErrorCode::IdentityMismatch);
        assert_eq!(den.details["field"], "tenant_id");

        let p = Pipeline {
            overwrite_identity_fields: true,
        };
        let d = p.decide(&input(Ok(&alice), grid, other));
        assert!(d.allowed() && d.overwrote_identity);
    }
}

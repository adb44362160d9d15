//! `EnterpriseAuditService`: the audit trail for authorized principals.
//!
//! | RPC | permission | scope |
//! |---|---|---|
//! | `QueryEvents` | `aesp.audit.read` | the request's `tenant_id` (empty: the caller's own tenant); a platform auditor (the permission from a platform binding) with an empty `tenant_id` sees every record, the sidecar's own (start, stop, keys) included |
//! | `GetComplianceReport` | `aesp.audit.read` | the request's `tenant_id` (empty: the caller's own) |
//!
//! `QueryEvents` streams the matching records in sequence order, each with its hash and
//! signature (so a client can verify what it receives); `limit` 0 means 1000 (at most
//! 100000); with `follow` the stream stays open and sends new records as they are committed.

use super::{Shared, caller, id_field};
use crate::audit::Audit;
use crate::audit::verify::ChainVerifier;
use crate::grpc::{Denial, ErrorCode};
use crate::ids::TenantId;
use crate::proto::aesp::enterprise_audit_service_server::EnterpriseAuditService;
use crate::proto::aesp::{
    AuditEvent, ComplianceReport, ComplianceReportRequest, QueryEventsRequest,
};
use std::collections::HashMap;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct AuditService {
    pub shared: Shared,
    pub audit: Audit,
}

const READ: &str = "aesp.audit.read";
const DEFAULT_LIMIT: u64 = 1000;
const MAX_LIMIT: u64 = 100_000;
/// Records read from the store at a time.
const CHUNK: usize = 256;

/// Which records a query may see.
#[derive(Clone)]
enum Scope {
    All,
    Tenant(String),
}

/// The request's filters.
#[derive(Clone)]
struct Filter {
    scope: Scope,
    q: QueryEventsRequest,
}

impl Filter {
    fn matches(&self, e: &AuditEvent) -> bool {
        let q = &self.q;
        let eq = |want: &str, have: &str| want.is_empty() || want == have;
        (match &self.scope {
            Scope::All => true,
            Scope::Tenant(t) => &e.tenant_id == t,
        }) && (q.since_unix_nanos == 0 || e.timestamp_unix_nanos >= q.since_unix_nanos)
            && (q.until_unix_nanos == 0 || e.timestamp_unix_nanos <= q.until_unix_nanos)
            && eq(&q.principal_id, &e.principal_id)
            && eq(&q.event_type, &e.event_type)
            && eq(&q.decision, &e.decision)
            && eq(&q.tool_name, &e.tool_name)
    }
}

fn unavailable() -> Status {
    Status::unavailable("the audit store is being reopened after a write failure; retry shortly")
}

impl AuditService {
    /// The tenant a request acts on: its `tenant_id`, or the caller's own; refused without
    /// `aesp.audit.read` there.
    fn tenant(&self, c: &super::ManagementCaller, tenant_id: &str) -> Result<TenantId, Status> {
        let tenant = if tenant_id.is_empty() {
            c.tenant.clone()
        } else {
            id_field(c, &self.shared, "tenant_id", tenant_id, TenantId::new)?
        };
        self.shared.require(c, READ, &tenant)?;
        Ok(tenant)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<AuditEvent, Status>> + Send>>;

#[tonic::async_trait]
impl EnterpriseAuditService for AuditService {
    type QueryEventsStream = EventStream;

    async fn query_events(
        &self,
        req: Request<QueryEventsRequest>,
    ) -> Result<Response<Self::QueryEventsStream>, Status> {
        let c = caller(&req)?;
        let q = req.into_inner();
        let scope = if q.tenant_id.is_empty() && c.grants.grants.platform_allows(READ) {
            Scope::All
        } else {
            Scope::Tenant(self.tenant(&c, &q.tenant_id)?.to_string())
        };
        let limit = match q.limit as u64 {
            0 if q.follow => u64::MAX,
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let filter = Filter { scope, q };
        let audit = self.audit.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<AuditEvent, Status>>(CHUNK);
        tokio::spawn(async move {
            let mut head = audit.subscribe();
            // Every record durable so far, readable (the writer moves them from its journal).
            audit.flush().await;
            let mut next = filter.q.from_sequence.max(1);
            let mut sent = 0u64;
            loop {
                let upper = match filter.q.to_sequence {
                    0 => u64::MAX,
                    n => n,
                };
                // Read what is committed from `next` on, chunk by chunk.
                loop {
                    if next > upper || sent >= limit {
                        return;
                    }
                    let Some(store) = audit.store() else {
                        let _ = tx.send(Err(unavailable())).await;
                        return;
                    };
                    let from = next;
                    let rows = tokio::task::spawn_blocking(move || store.read(from, CHUNK)).await;
                    let rows = match rows {
                        Ok(Ok(r)) => r,
                        _ => {
                            let _ = tx.send(Err(unavailable())).await;
                            return;
                        }
                    };
                    if rows.is_empty() {
                        break;
                    }
                    for row in rows {
                        next = row.key + 1;
                        if row.key > upper {
                            return;
                        }
                        let Ok(e) = row.event else { continue };
                        if filter.matches(&e) {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                            sent += 1;
                            if sent >= limit {
                                return;
                            }
                        }
                    }
                }
                if !filter.q.follow {
                    return;
                }
                // Wait for new records (or the client to go).
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_compliance_report(
        &self,
        req: Request<ComplianceReportRequest>,
    ) -> Result<Response<ComplianceReport>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let tenant = self.tenant(&c, &r.tenant_id)?;
        if r.until_unix_nanos != 0 && r.until_unix_nanos < r.since_unix_nanos {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    "until_unix_nanos is before since_unix_nanos",
                )
                .detail("field", "until_unix_nanos"),
            ));
        }
        self.audit.flush().await;
        let Some(store) = self.audit.store() else {
            return Err(unavailable());
        };
        let t = tenant.to_string();
        let built = tokio::task::spawn_blocking(move || report(&store, &t, &r)).await;
        let mut report = match built {
            Ok(Ok(rep)) => rep,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "compliance report: the audit store cannot be read");
                return Err(unavailable());
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        report.generated_at_unix_nanos = crate::audit::now_nanos();
        self.audit.sign_report(&mut report);
        Ok(Response::new(report))
    }
}

/// Walks the whole chain (verifying it) and counts what falls in the report's range.
fn report(
    store: &crate::store::audit::AuditStore,
    tenant: &str,
    r: &ComplianceReportRequest,
) -> Result<ComplianceReport, crate::store::StoreError> {
    let until = if r.until_unix_nanos == 0 {
        u64::MAX
    } else {
        r.until_unix_nanos
    };
    let mut v = ChainVerifier::new(&[], store.checkpoints()?);
    let mut fault = None;
    let mut out = ComplianceReport {
        tenant_id: tenant.to_string(),
        since_unix_nanos: r.since_unix_nanos,
        until_unix_nanos: r.until_unix_nanos,
        ..Default::default()
    };
    let mut by_rule: HashMap<String, u64> = HashMap::new();
    let (mut unapproved, mut rotations, mut outages, mut tool_errors) = (0u64, 0u64, 0u64, 0u64);
    let mut from = 1;
    loop {
        let rows = store.read(from, 1024)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            from = row.key + 1;
            if fault.is_none()
                && let Err(f) = v.push(Some(row.key), row.event.as_ref().map_err(String::as_str))
            {
                fault = Some(f);
            }
            let Ok(e) = row.event else { continue };
            if e.timestamp_unix_nanos < r.since_unix_nanos || e.timestamp_unix_nanos > until {
                continue;
            }
            match e.event_type.as_str() {
                "AUDIT_KEY_ROTATED" => rotations += 1,
                "AUDIT_RECOVERED" => outages += 1,
                _ => {}
            }
            if e.tenant_id != tenant {
                continue;
            }
            if !r.compliance_tag.is_empty()
                && !e
                    .attributes
                    .get("compliance_tags")
                    .is_some_and(|tags| tags.split(',').any(|t| t == r.compliance_tag))
            {
                continue;
            }
            out.total_events += 1;
            if out.first_sequence == 0 {
                out.first_sequence = e.sequence;
            }
            out.last_sequence = e.sequence;
            *out.events_by_type.entry(e.event_type.clone()).or_default() += 1;
            *out.events_by_decision
                .entry(e.decision.clone())
                .or_default() += 1;
            if e.decision == "DENY" {
                *out.denials_by_reason
                    .entry(e.reason_code.clone())
                    .or_default() += 1;
                let rule = e
                    .attributes
                    .get("detail.permission")
                    .map(|p| format!("permission {p}"))
                    .or_else(|| e.matched_policies.first().map(|p| format!("policy {p}")))
                    .unwrap_or_else(|| e.reason_code.clone());
                *by_rule.entry(rule).or_default() += 1;
                if e.reason_code == "TOOL_NOT_APPROVED" {
                    unapproved += 1;
                }
            }
            if e.event_type == "TOOL_RESULT" && e.decision == "ERROR" {
                tool_errors += 1;
            }
        }
    }
    let verified = match fault {
        None => v.finish().map(|s| (s.head_hash, s.head_sequence)),
        Some(f) => Err(f),
    };
    let f = &mut out.findings;
    match &verified {
        Ok((head, seq)) => {
            out.chain_verified = true;
            out.head_hash.clone_from(head);
            f.push(format!("the whole chain (sequence 1..{seq}) verified: hashes, signatures, sequence and checkpoints"));
        }
        Err(fault) => f.push(format!("CHAIN FAULT: {fault}")),
    }
    let mut rules: Vec<_> = by_rule.into_iter().collect();
    rules.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (rule, n) in rules {
        f.push(format!("{n} denial(s) by {rule}"));
    }
    f.push(format!("{unapproved} call(s) to unapproved tools refused"));
    f.push(format!(
        "{tool_errors} tool invocation(s) ended in an error"
    ));
    f.push(format!("{rotations} audit key rotation(s) in the period"));
    if outages > 0 {
        f.push(format!(
            "{outages} audit store outage(s) in the period (traffic was refused during each)"
        ));
    }
    if !r.compliance_tag.is_empty() {
        f.push(format!(
            "compliance_tag {:?}: the counts cover the decisions and results of calls to tools whose approved contract carries this tag",
            r.compliance_tag
        ));
    }
    Ok(out)
}

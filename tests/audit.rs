//! The signed audit trail, checked from outside: records of real calls through the sidecar,
//! the offline verifier against a tampered `audit.redb` (opened directly with redb), exports,
//! and failing closed when the store cannot be written.

mod common;

use aesp_sidecar::audit::offline;
use aesp_sidecar::audit::verify::FaultKind;
use aesp_sidecar::audit::{self, Audit, AuditConfig};
use aesp_sidecar::proto::aesp::AuditEvent;
use aesp_sidecar::store::audit::{AuditReader, FaultSwitch};
use common::Stack;
use prost::Message;
use redb::ReadableTable;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");

fn records(db: &Path) -> Vec<AuditEvent> {
    let r = AuditReader::open(db).unwrap();
    let mut out = Vec::new();
    r.scan(0, |s| {
        out.push(s.event.unwrap());
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

async fn create(
    c: &aesp_sidecar::client::AespGridClient,
    id: &str,
) -> Result<aesp_sidecar::proto::aesp::EnterpriseCreateSessionAck, tonic::Status> {
    c.create_session(aesp_sidecar::proto::grid::CreateSession {
        suggested_session_id: id.into(),
        ttl_seconds: 60,
        ..Default::default()
    })
    .await
}

fn aesp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aesp"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_recorded_with_the_clients_correlation_id_and_the_chain_verifies() {
    let stack = Stack::start().await;
    let db = stack.dir.path().join("state/audit.redb");
    let acme = aesp_sidecar::client::AespGridClient::with_token(stack.channel("acme").await);
    let session = create(&acme, "s-audit").await.unwrap();
    assert!(session.error.is_none(), "{session:?}");
    let call =
        aesp_sidecar::client::tool_call("s-audit", "echo", &serde_json::json!({"text": "hi"}))
            .unwrap();
    let ok = acme.execute_tool(call).await.unwrap();
    assert!(ok.error_details.is_none(), "{ok:?}");
    // A call RBAC refuses: its EnterpriseError's correlation id is the record's.
    let refund = aesp_sidecar::client::tool_call(
        "s-audit",
        "billing_refund",
        &serde_json::json!({"amount": 5}),
    )
    .unwrap();
    let status = acme.execute_tool(refund).await.unwrap_err();
    let ee = aesp_sidecar::client::enterprise_error(&status).expect("an EnterpriseError");
    assert_eq!(ee.code, "AUTHORIZATION_DENIED");

    // The live file verifies while the sidecar runs (read-only, beside the writer).
    let out = aesp()
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: "));
    // And so does a copy of it taken while the sidecar runs (a file not closed cleanly: read
    // from a repaired private copy, the copy itself left as it is).
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("audit.redb");
    std::fs::copy(&db, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let out = aesp()
        .args(["audit", "verify", "--db"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("OK: "), "{text}");
    assert!(text.contains("repaired private copy"), "{text}");
    assert_eq!(std::fs::read(&copy).unwrap(), before);

    let _dir = stack.stop().await;
    let summary = offline::verify_db(&db, None).unwrap().unwrap();
    let recs = records(&db);
    assert_eq!(summary.count as usize, recs.len());
    assert_eq!(recs[0].event_type, "AUDIT_KEY_ADDED");
    assert_eq!(recs[1].event_type, "SIDECAR_STARTED");
    assert_eq!(recs.last().unwrap().event_type, "SIDECAR_STOPPED");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.sequence, i as u64 + 1);
    }
    let denied = recs
        .iter()
        .find(|r| r.correlation_id == ee.correlation_id)
        .expect("the denial's record, by the client's correlation id");
    assert_eq!(denied.decision, "DENY");
    assert_eq!(denied.event_type, "TOOL_INVOCATION");
    assert_eq!(denied.reason_code, "AUTHORIZATION_DENIED");
    assert_eq!(denied.tool_name, "billing_refund");
    assert_eq!(denied.tenant_id, "acme");
    assert!(
        denied.attributes.contains_key("detail.permission"),
        "{denied:?}"
    );
    assert!(recs.iter().any(|r| r.event_type == "TOOL_INVOCATION"
        && r.decision == "ALLOW"
        && r.tool_name == "echo"));
    assert!(
        recs.iter()
            .any(|r| r.event_type == "SESSION_CREATE" && r.decision == "ALLOW")
    );
    assert!(recs.iter().any(|r| r.event_type == "SESSION_CREATED"
        && r.decision == "INFO"
        && r.session_id == "s-audit"));
    let result = recs
        .iter()
        .find(|r| r.event_type == "TOOL_RESULT" && r.tool_name == "echo")
        .expect("the tool result, its own record");
    assert_eq!(
        result.attributes.get("status").map(String::as_str),
        Some("SUCCESS")
    );
    assert!(
        result.attributes.contains_key("duration_us")
            && result
                .attributes
                .get("response_bytes")
                .is_some_and(|b| b != "0")
    );
    let decision = recs
        .iter()
        .find(|r| r.event_type == "TOOL_INVOCATION" && r.tool_name == "echo")
        .unwrap();
    assert_eq!(
        result.correlation_id, decision.correlation_id,
        "linked by correlation id"
    );
    assert!(decision.sequence < result.sequence);
    assert!(
        recs.iter().any(|r| r.event_type == "RUNTIME_DISCONNECTED"),
        "the runtime's stream ended at stop"
    );
    assert!(
        recs.iter()
            .any(|r| r.event_type == "RUNTIME_ANNOUNCE" && r.decision == "ALLOW")
    );
    // No record holds a token.
    let token = stack_token_fragment();
    for r in &recs {
        let bytes = r.encode_to_vec();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "{r:?}"
        );
    }
}

/// "eyJ": the start of every JWT's base64url header.
fn stack_token_fragment() -> String {
    "eyJ".to_string()
}

/// A chain of `n` records written by the real writer, with a checkpoint every 5 records.
async fn chain(dir: &Path, n: usize) -> PathBuf {
    let cfg = AuditConfig {
        checkpoint_every_records: 5,
        ..Default::default()
    };
    let a = Audit::start(&cfg, dir, FaultSwitch::default(), None).unwrap();
    for i in 0..n {
        let mut e = audit::event("TOOL_INVOCATION", "ALLOW");
        e.principal_id = "alice".into();
        e.tenant_id = "acme".into();
        e.tool_name = format!("tool{i}");
        a.commit(e).await.unwrap();
    }
    a.stop(audit::event("SIDECAR_STOPPED", "INFO")).await;
    drop(a);
    dir.join("audit.redb")
}

/// Copies the chain at `db` into a fresh directory, changes it with `f` on redb's own
/// tables, and returns the verdict of the verifier (and of the CLI) on the copy.
fn tampered(db: &Path, f: impl FnOnce(&mut redb::Table<u64, &[u8]>)) -> (u64, FaultKind, String) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("audit.redb");
    std::fs::copy(db, &copy).unwrap();
    {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        let rdb = b.create(&copy).unwrap();
        let txn = rdb.begin_write().unwrap();
        {
            let mut t = txn.open_table(EVENTS).unwrap();
            f(&mut t);
        }
        txn.commit().unwrap();
    }
    let fault = offline::verify_db(&copy, None).unwrap().unwrap_err();
    let out = aesp()
        .args(["audit", "verify", "--db"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "verify must fail on {fault}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&format!("sequence {}", fault.sequence)),
        "{text}"
    );
    assert!(text.contains(fault.kind.as_str()), "{text}");
    (fault.sequence, fault.kind, text)
}

fn get(t: &redb::Table<u64, &[u8]>, k: u64) -> AuditEvent {
    AuditEvent::decode(t.get(k).unwrap().unwrap().value()).unwrap()
}

fn put(t: &mut redb::Table<u64, &[u8]>, k: u64, e: &AuditEvent) {
    t.insert(k, e.encode_to_vec().as_slice()).unwrap();
}

#[tokio::test]
async fn the_verifier_names_the_sequence_and_the_kind_of_every_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let db = chain(dir.path(), 20).await;
    // Untouched: OK, 1 key record + 20 + the stop = 22, checkpoints included.
    let ok = offline::verify_db(&db, None).unwrap().unwrap();
    assert_eq!(ok.count, 22);
    assert!(ok.checkpoints >= 4, "{ok}");

    // One byte of a field changed in place (the stored bytes, not re-encoded).
    let (seq, kind, _) = tampered(&db, |t| {
        let mut raw = t.get(7).unwrap().unwrap().value().to_vec();
        let at = raw.windows(5).position(|w| w == b"alice").unwrap();
        raw[at + 4] = b'x';
        t.insert(7, raw.as_slice()).unwrap();
    });
    assert_eq!((seq, kind), (7, FaultKind::Modified));

    // A record deleted.
    let (seq, kind, _) = tampered(&db, |t| {
        t.remove(9).unwrap();
    });
    assert_eq!((seq, kind), (9, FaultKind::Gap));

    // Two records swapped.
    let (seq, kind, _) = tampered(&db, |t| {
        let (a, b) = (get(t, 11), get(t, 12));
        put(t, 11, &b);
        put(t, 12, &a);
    });
    assert_eq!((seq, kind), (11, FaultKind::Reordered));

    // The tail cut below a checkpoint.
    let (seq, kind, text) = tampered(&db, |t| {
        for k in 18..=22 {
            t.remove(k).unwrap();
        }
    });
    assert_eq!((seq, kind), (18, FaultKind::TailTruncated), "{text}");

    // A record changed and re-signed with another key under that key's id.
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let other_id = aesp_sidecar::audit::key::key_id(&other.verifying_key());
    let (seq, kind, _) = tampered(&db, |t| {
        let mut e = get(t, 13);
        e.decision = "DENY".into();
        e.key_id = other_id.clone();
        let prev: [u8; 32] = e.prev_hash.clone().try_into().unwrap();
        aesp_sidecar::audit::record::seal(&mut e, prev, &other);
        put(t, 13, &e);
    });
    assert_eq!((seq, kind), (13, FaultKind::UnknownKey));

    // The same, keeping the genuine key id: the signature does not verify.
    let (seq, kind, _) = tampered(&db, |t| {
        let mut e = get(t, 14);
        e.decision = "DENY".into();
        let prev: [u8; 32] = e.prev_hash.clone().try_into().unwrap();
        aesp_sidecar::audit::record::seal(&mut e, prev, &other);
        put(t, 14, &e);
    });
    assert_eq!((seq, kind), (14, FaultKind::BadSignature));

    // A record changed and re-hashed with the real chain but not re-signable: the next
    // record's link breaks if only the hash is fixed up.
    let (seq, kind, _) = tampered(&db, |t| {
        let mut e = get(t, 15);
        e.tenant_id = "globex".into();
        e.hash = aesp_sidecar::audit::record::chain_hash(
            &e.prev_hash,
            &aesp_sidecar::audit::record::canonical(&e),
        )
        .to_vec();
        put(t, 15, &e);
    });
    assert_eq!((seq, kind), (15, FaultKind::BadSignature));
}

#[tokio::test]
async fn an_export_verifies_line_by_line_with_the_pinned_key_and_a_changed_line_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let db = chain(dir.path(), 12).await;
    let export = dir.path().join("audit.jsonl");
    let out = aesp()
        .args(["audit", "export", "--format", "jsonl", "--db"])
        .arg(&db)
        .arg("--out")
        .arg(&export)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&export).unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("\"type\":\"record\""))
            .count(),
        14
    );
    assert!(text.lines().any(|l| l.contains("\"type\":\"checkpoint\"")));

    // The public key, as an operator gets it.
    let out = aesp()
        .args(["audit", "pubkey", "--key"])
        .arg(dir.path().join("audit.key"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("-----BEGIN PUBLIC KEY-----") && printed.contains("key id: ed25519:"));
    let pubkey = dir.path().join("audit.pub");
    std::fs::write(&pubkey, &printed).unwrap();

    let out = aesp()
        .args(["audit", "verify", "--export"])
        .arg(&export)
        .arg("--pubkey")
        .arg(&pubkey)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(pinned)"));

    // Pinned to another key: the chain's own key is refused.
    let other = dir.path().join("other.pub");
    std::fs::write(
        &other,
        aesp_sidecar::audit::key::public_pem(
            &ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key(),
        )
        .unwrap(),
    )
    .unwrap();
    let fault = offline::verify_export(&export, Some(&other))
        .unwrap()
        .unwrap_err();
    assert_eq!((fault.sequence, fault.kind), (1, FaultKind::UnknownKey));

    // One field of one line changed.
    let changed = dir.path().join("changed.jsonl");
    std::fs::write(
        &changed,
        text.replacen("\"tool_name\":\"tool4\"", "\"tool_name\":\"tool5\"", 1),
    )
    .unwrap();
    let fault = offline::verify_export(&changed, Some(&pubkey))
        .unwrap()
        .unwrap_err();
    assert_eq!((fault.sequence, fault.kind), (6, FaultKind::Modified));
    // A line dropped.
    let dropped: String = text
        .lines()
        .filter(|l| !l.contains("\"tool_name\":\"tool2\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&changed, dropped).unwrap();
    let fault = offline::verify_export(&changed, Some(&pubkey))
        .unwrap()
        .unwrap_err();
    assert_eq!((fault.sequence, fault.kind), (4, FaultKind::Gap));
}

#[tokio::test]
async fn the_chain_resumes_after_a_restart_and_a_new_key_is_a_recorded_rotation() {
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path(), 3).await;
    // Same key: the chain goes on from sequence 6.
    let db = chain(dir.path(), 2).await;
    let recs = records(&db);
    assert_eq!(recs.len(), 5 + 3);
    assert_eq!(recs[5].sequence, 6);
    assert_eq!(recs[5].event_type, "TOOL_INVOCATION");
    // A new key file: rotation recorded, signed by the new key; old records still verify.
    std::fs::remove_file(dir.path().join("audit.key")).unwrap();
    let db = chain(dir.path(), 1).await;
    let recs = records(&db);
    let rot = &recs[8];
    assert_eq!(rot.event_type, "AUDIT_KEY_ROTATED");
    assert_eq!(rot.attributes.get("previous_key_id"), Some(&recs[0].key_id));
    assert_ne!(rot.key_id, recs[0].key_id);
    let ok = offline::verify_db(&db, None).unwrap().unwrap();
    assert_eq!(ok.keys.len(), 2, "{ok}");
    assert_eq!(ok.count, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_refuses_traffic_and_readiness_until_it_recovers() {
    refused_until_it_recovers(|f, on| f.set(on)).await;
}

/// The journal takes the group (into the page cache) but the sync fails: the call is
/// refused all the same, and its record is written once, refused, after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_syncs_fail_refuses_traffic_and_keeps_one_record_per_call() {
    refused_until_it_recovers(|f, on| f.set_syncs(on)).await;
}

async fn refused_until_it_recovers(fault: impl Fn(&aesp_sidecar::store::audit::FaultSwitch, bool)) {
    let stack = Stack::start().await;
    let admin = stack.sidecar.admin_addr.unwrap();
    let acme = aesp_sidecar::client::AespGridClient::with_token(stack.channel("acme").await);
    assert!(create(&acme, "s-ok").await.unwrap().error.is_none());
    let sessions = stack.host.state.session_count();
    assert_eq!(common::http_get(admin, "/readyz").await.0, 200);

    fault(&stack.sidecar.audit_faults, true);
    let status = create(&acme, "s-refused").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let ee = aesp_sidecar::client::enterprise_error(&status).unwrap();
    assert_eq!(ee.code, "AUDIT_UNAVAILABLE");
    let refused_cid = ee.correlation_id.clone();
    // The host never saw the refused session.
    assert_eq!(stack.host.state.session_count(), sessions);
    assert_eq!(common::http_get(admin, "/readyz").await.0, 503);
    // Still refused while failing, immediately.
    let again = create(&acme, "s-refused-2").await.unwrap_err();
    assert_eq!(
        aesp_sidecar::client::enterprise_error(&again).unwrap().code,
        "AUDIT_UNAVAILABLE"
    );

    fault(&stack.sidecar.audit_faults, false);
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if create(&acme, "s-back")
            .await
            .is_ok_and(|a| a.error.is_none())
        {
            back = true;
            break;
        }
    }
    assert!(back, "traffic resumes once the store is writable");
    assert_eq!(common::http_get(admin, "/readyz").await.0, 200);
    let db = stack.dir.path().join("state/audit.redb");
    let _dir = stack.stop().await;
    offline::verify_db(&db, None).unwrap().unwrap();
    let recs = records(&db);
    let refused = recs
        .iter()
        .find(|r| r.correlation_id == refused_cid && r.event_type == "SESSION_CREATE")
        .expect("the refused call's record, kept through the outage");
    assert_eq!(refused.decision, "DENY");
    assert_eq!(refused.reason_code, "AUDIT_UNAVAILABLE");
    assert!(recs.iter().any(|r| r.event_type == "AUDIT_RECOVERED"));
    // One decision per call: none written before the failure survives beside its kept copy.
    let mut decisions: Vec<&str> = recs
        .iter()
        .filter(|r| r.event_type == "SESSION_CREATE")
        .map(|r| r.correlation_id.as_str())
        .collect();
    let n = decisions.len();
    decisions.sort_unstable();
    decisions.dedup();
    assert_eq!(decisions.len(), n, "a call recorded twice");
    assert!(
        !recs
            .iter()
            .any(|r| r.correlation_id == refused_cid && r.decision == "ALLOW"),
        "the refused call recorded as allowed"
    );
}

type AuditClient =
    aesp_sidecar::proto::aesp::enterprise_audit_service_client::EnterpriseAuditServiceClient<
        aesp_sidecar::client::GridChannel,
    >;

async fn audit_client(stack: &Stack, stem: &str, token: Option<String>) -> AuditClient {
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = aesp_sidecar::client::channel(&ep, Some(&stack.tls(stem)))
        .await
        .unwrap();
    AuditClient::new(aesp_sidecar::client::with_token(ch, token.as_deref()).unwrap())
}

async fn collect(
    c: &mut AuditClient,
    q: aesp_sidecar::proto::aesp::QueryEventsRequest,
) -> Result<Vec<AuditEvent>, tonic::Status> {
    let mut s = c.query_events(q).await?.into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await? {
        out.push(e);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_follow_tenant_scoping_and_a_signed_report() {
    use aesp_sidecar::proto::aesp::{ComplianceReportRequest, QueryEventsRequest};
    let stack = Stack::start().await;
    let acme = aesp_sidecar::client::AespGridClient::with_token(stack.channel("acme").await);
    let globex = aesp_sidecar::client::AespGridClient::with_token(stack.channel("globex").await);
    create(&acme, "s-acme").await.unwrap();
    create(&globex, "s-globex").await.unwrap();
    let refund =
        aesp_sidecar::client::tool_call("s-acme", "billing_refund", &serde_json::json!({}))
            .unwrap();
    acme.execute_tool(refund).await.unwrap_err();

    // The platform administrator sees every tenant's records, and the sidecar's own.
    let mut admin = audit_client(&stack, "admin", stack.token("admin")).await;
    let all = collect(&mut admin, QueryEventsRequest::default())
        .await
        .unwrap();
    assert!(all.iter().any(|e| e.tenant_id == "acme"));
    assert!(all.iter().any(|e| e.tenant_id == "globex"));
    assert!(all.iter().any(|e| e.event_type == "SIDECAR_STARTED"));
    for w in all.windows(2) {
        assert_eq!(
            w[1].sequence,
            w[0].sequence + 1,
            "unfiltered: every record, in order"
        );
    }
    // Filters.
    let denies = collect(
        &mut admin,
        QueryEventsRequest {
            tenant_id: "acme".into(),
            decision: "DENY".into(),
            event_type: "TOOL_INVOCATION".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(denies.len(), 1, "{denies:?}");
    assert_eq!(denies[0].tool_name, "billing_refund");
    let limited = collect(
        &mut admin,
        QueryEventsRequest {
            limit: 2,
            from_sequence: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        limited.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![3, 4]
    );

    // A client without aesp.audit.read: refused.
    let mut alice = audit_client(&stack, "acme", stack.token("acme")).await;
    let s = collect(&mut alice, QueryEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        aesp_sidecar::client::enterprise_error(&s).unwrap().code,
        "AUTHORIZATION_DENIED"
    );

    // A tenant administrator sees its own tenant only, and cannot ask for another.
    let issuer = aesp_sidecar::demo::tokens::DemoIssuer::ensure(&stack.files.dir).unwrap();
    let t = issuer
        .mint("acme-admin", "acme", &[], 600, serde_json::json!({}))
        .unwrap();
    let mut acme_admin = audit_client(&stack, "acme", Some(t)).await;
    let own = collect(&mut acme_admin, QueryEventsRequest::default())
        .await
        .unwrap();
    assert!(
        !own.is_empty() && own.iter().all(|e| e.tenant_id == "acme"),
        "{own:?}"
    );
    let s = collect(
        &mut acme_admin,
        QueryEventsRequest {
            tenant_id: "globex".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        aesp_sidecar::client::enterprise_error(&s).unwrap().code,
        "AUTHORIZATION_DENIED"
    );

    // follow: the stream stays open and brings a record committed later.
    let head = all.last().unwrap().sequence;
    let mut follow = admin
        .query_events(QueryEventsRequest {
            from_sequence: head + 1,
            tenant_id: "globex".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    create(&globex, "s-later").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), follow.message())
        .await
        .expect("a new record within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.tenant_id, "globex");
    assert!(next.sequence > head);

    // A change through the management API is recorded with before and after.
    let ep = format!(
        "https://127.0.0.1:{}",
        stack.sidecar.management_addr.unwrap().port()
    );
    let ch = aesp_sidecar::client::channel(&ep, Some(&stack.tls("admin")))
        .await
        .unwrap();
    let mut ids = aesp_sidecar::proto::aesp::enterprise_identity_service_client::EnterpriseIdentityServiceClient::new(
        aesp_sidecar::client::with_token(ch, stack.token("admin").as_deref()).unwrap(),
    );
    ids.assign_role(aesp_sidecar::proto::aesp::AssignRoleRequest {
        principal_id: "bob".into(),
        tenant_id: "globex".into(),
        role: "auditor".into(),
    })
    .await
    .unwrap();
    let changes = collect(
        &mut admin,
        QueryEventsRequest {
            event_type: "MANAGEMENT_CHANGE".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = changes.last().expect("the role assignment's record");
    assert_eq!(
        c.attributes.get("change").map(String::as_str),
        Some("role_assigned")
    );
    assert_eq!(
        c.attributes.get("target_tenant").map(String::as_str),
        Some("globex")
    );
    assert!(
        c.attributes["before"].contains("client-user")
            && !c.attributes["before"].contains("auditor")
    );
    assert!(c.attributes["after"].contains("auditor"), "{c:?}");

    // An allowed call to a tool tagged PUBLIC (echo, in the demo's contracts).
    let echo = aesp_sidecar::client::tool_call("s-acme", "echo", &serde_json::json!({"text": "t"}))
        .unwrap();
    acme.execute_tool(echo).await.unwrap();

    // A signed report.
    let report = admin
        .get_compliance_report(ComplianceReportRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.chain_verified, "{report:?}");
    assert!(report.events_by_decision.get("DENY").copied().unwrap_or(0) >= 1);
    // The refund, alice's query and the tenant admin's query of globex.
    assert_eq!(
        report.denials_by_reason.get("AUTHORIZATION_DENIED"),
        Some(&3)
    );
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.contains("permission tool:billing_refund:execute")),
        "{:?}",
        report.findings
    );
    // Narrowed to a compliance tag: only the records of calls to tools tagged with it
    // (echo is PUBLIC in the demo's contracts; nothing is tagged NO-SUCH-TAG).
    let tagged = |tag: &str| ComplianceReportRequest {
        tenant_id: "acme".into(),
        compliance_tag: tag.into(),
        ..Default::default()
    };
    // (The result's record is queued when the response ends: wait for it.)
    let mut public = Default::default();
    for _ in 0..50 {
        public = admin
            .get_compliance_report(tagged("PUBLIC"))
            .await
            .unwrap()
            .into_inner();
        if public.events_by_type.contains_key("TOOL_RESULT") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let public: aesp_sidecar::proto::aesp::ComplianceReport = public;
    assert!(
        public.total_events >= 2,
        "the echo decision and its result: {public:?}"
    );
    assert!(
        public
            .events_by_type
            .keys()
            .all(|k| k == "TOOL_INVOCATION" || k == "TOOL_RESULT"),
        "only records of tagged tool calls: {public:?}"
    );
    assert_eq!(
        public.events_by_type.get("TOOL_INVOCATION"),
        public.events_by_type.get("TOOL_RESULT")
    );
    let none = admin
        .get_compliance_report(tagged("NO-SUCH-TAG"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.total_events, 0, "{none:?}");
    let pem = stack.dir.path().join("audit.pub");
    let key = stack.sidecar.audit.as_ref().unwrap().public_key;
    std::fs::write(&pem, aesp_sidecar::audit::key::public_pem(&key).unwrap()).unwrap();
    assert!(offline::check_report(&report, &pem).unwrap());
    let mut forged = report.clone();
    forged.total_events += 1;
    assert!(
        !offline::check_report(&forged, &pem).unwrap(),
        "a changed report fails its signature"
    );
    // Through the CLI, rendered for people, the signature checked.
    let out = aesp()
        .args(["audit", "report", "--tenant", "acme", "--endpoint"])
        .arg(format!(
            "https://127.0.0.1:{}",
            stack.sidecar.management_addr.unwrap().port()
        ))
        .arg("--ca")
        .arg(stack.files.path("ca.crt"))
        .arg("--cert")
        .arg(stack.files.path("admin.crt"))
        .arg("--key")
        .arg(stack.files.path("admin.key"))
        .arg("--pubkey")
        .arg(&pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("signature valid") && text.contains("chain verified: yes"),
        "{text}"
    );
    drop(follow);
    stack.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `aesp serve` as a process of its own, on `port`, until it answers. The caller waits for
/// the child it gets.
#[allow(clippy::zombie_processes)]
async fn serve(cfg: &Path, port: u16) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_aesp"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("aesp serve did not start");
}

/// 8 clients call `endpoint` back to back (two `CreateSession`s, then an `ExecuteTool` RBAC
/// refuses) for `load`, then the sidecar `child` is killed with SIGKILL under them. Returns
/// every call answered (correlation id, allowed), the ids prefixed with `round`.
async fn load_then_kill_9(
    endpoint: &str,
    tls: &ClientTlsFiles,
    round: usize,
    load: Duration,
    mut child: std::process::Child,
) -> Vec<(String, bool)> {
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..8 {
        let (endpoint, tls, answered, stop) = (
            endpoint.to_string(),
            tls.clone(),
            answered.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let ch = aesp_sidecar::client::channel(&endpoint, Some(&tls.tls))
                .await
                .unwrap();
            let c = aesp_sidecar::client::AespGridClient::with_token(
                aesp_sidecar::client::with_token(ch, Some(&tls.token)).unwrap(),
            );
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let cid = format!("r{round}-w{w}-{i}");
                let mut req =
                    tonic::Request::new(aesp_sidecar::proto::grid::CreateSession::default());
                req.metadata_mut()
                    .insert("x-aesp-correlation-id", cid.parse().unwrap());
                // Every third call is refused by RBAC: denials must be durable too.
                let r = if i.is_multiple_of(3) {
                    let call = aesp_sidecar::client::tool_call(
                        "x",
                        "billing_refund",
                        &serde_json::json!({}),
                    )
                    .unwrap();
                    let mut d = tonic::Request::new(call);
                    d.metadata_mut()
                        .insert("x-aesp-correlation-id", cid.parse().unwrap());
                    c.execute_tool(d).await.map(|_| ())
                } else {
                    c.create_session(req).await.map(|_| ())
                };
                match r {
                    Ok(()) => answered.lock().unwrap().push((cid, true)),
                    Err(s) if aesp_sidecar::client::enterprise_error(&s).is_some() => {
                        answered.lock().unwrap().push((cid, false))
                    }
                    Err(_) => break, // the sidecar is gone
                }
            }
        }));
    }
    tokio::time::sleep(load).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    answered.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_under_load_every_answered_call_has_its_record_and_the_chain_resumes() {
    use aesp_sidecar::demo::{certs, host};
    /// kill -9 under load, then restart on the same state, this many times.
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = certs::ensure(dir.path()).unwrap();
    let h = host::spawn(host::HostOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let cfg = dir.path().join("sidecar.yaml");
    let text = aesp_sidecar::demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9443", &format!("127.0.0.1:{}", free_port()))
        .replace(
            "http://127.0.0.1:50051",
            &format!("http://{}", h.local_addr),
        );
    std::fs::write(&cfg, text).unwrap();
    let db = dir.path().join("state/audit.redb");

    let endpoint = format!("https://127.0.0.1:{port}");
    let tls = ClientTlsFiles::of(&files);
    let mut answered = Vec::new();
    for round in 0..ROUNDS {
        // Each start (a restart after the first) serves again, on the state the kill left:
        // the sidecar resumes the chain after the last record it finds, or refuses to start.
        let child = serve(&cfg, port).await;
        let got = load_then_kill_9(&endpoint, &tls, round, Duration::from_millis(600), child).await;
        assert!(
            got.len() > 20,
            "round {round}: the sidecar served only {} calls",
            got.len()
        );
        if round == 0 {
            // Before any restart, the files as the kill left them verify offline (redb's
            // repair on a private copy, the journal's records not yet moved read beside
            // it), every answered call's record among them, and nothing is written.
            let before = std::fs::read(&db).unwrap();
            let summary = offline::verify_db(&db, None).unwrap().unwrap();
            let recs = records(&db);
            assert_eq!(summary.count as usize, recs.len());
            let ids: std::collections::HashSet<&str> =
                recs.iter().map(|r| r.correlation_id.as_str()).collect();
            for (cid, _) in &got {
                assert!(
                    ids.contains(cid.as_str()),
                    "before the restart, answered call {cid} has no record"
                );
            }
            assert_eq!(std::fs::read(&db).unwrap(), before, "the file was written");
        }
        answered.extend(got);
    }

    // A last restart on the same state, stopped cleanly. The chain, through every kill and
    // restart, verifies (verifying it after each round would verify the same records again:
    // a debug build checks signatures slowly).
    let mut child = serve(&cfg, port).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    h.shutdown().await;

    let summary = offline::verify_db(&db, None).unwrap().unwrap();
    let recs = records(&db);
    assert_eq!(summary.count as usize, recs.len());
    assert_eq!(
        recs.iter()
            .filter(|r| r.event_type == "SIDECAR_STARTED")
            .count(),
        ROUNDS + 1
    );
    let recorded: std::collections::HashMap<&str, &AuditEvent> = recs
        .iter()
        .filter(|r| r.event_type == "SESSION_CREATE" || r.event_type == "TOOL_INVOCATION")
        .map(|r| (r.correlation_id.as_str(), r))
        .collect();
    let mut denied = vec![0usize; ROUNDS];
    for (cid, allowed) in &answered {
        let r = recorded
            .get(cid.as_str())
            .unwrap_or_else(|| panic!("answered call {cid} has no decision record"));
        assert_eq!(r.decision == "ALLOW", *allowed, "{r:?}");
        if !allowed {
            let round: usize = cid[1..cid.find('-').unwrap()].parse().unwrap();
            denied[round] += 1;
        }
    }
    assert!(
        denied.iter().all(|d| *d > 5),
        "denials under load, per round: {denied:?}"
    );
}

#[derive(Clone)]
struct ClientTlsFiles {
    tls: aesp_sidecar::client::ClientTls,
    token: String,
}

impl ClientTlsFiles {
    fn of(files: &aesp_sidecar::demo::certs::DevFiles) -> ClientTlsFiles {
        ClientTlsFiles {
            tls: aesp_sidecar::client::ClientTls::from_files(
                &files.path("ca.crt"),
                &files.path("acme.crt"),
                &files.path("acme.key"),
                "localhost",
            )
            .unwrap(),
            token: std::fs::read_to_string(files.path("acme.jwt"))
                .unwrap()
                .trim()
                .to_string(),
        }
    }
}

/// The writer under load while the disk flips between refusing syncs, refusing writes and
/// working: every commit answered Ok has exactly one record, as allowed; every one refused
/// has exactly one, refused (kept through the outage and written after it); the chain
/// verifies; nothing is recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_with_failing_syncs_and_writes_every_answer_matches_exactly_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        // Small groups, so a batch is split and several groups are in flight at once.
        batch_max_records: 4,
        checkpoint_every_records: 7,
        ..Default::default()
    };
    let faults = FaultSwitch::default();
    let a = Audit::start(&cfg, dir.path(), faults.clone(), None).unwrap();
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut callers = Vec::new();
    for t in 0..8 {
        let (a, running) = (a.clone(), running.clone());
        callers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                let mut e = audit::event("TOOL_INVOCATION", "ALLOW");
                e.correlation_id = format!("c{t}-{n}");
                // A record nobody waits for beside each call, as a tool's result is.
                let mut r = audit::event("TOOL_RESULT", "INFO");
                r.correlation_id = format!("r{t}-{n}");
                a.log(r);
                let ok = a.commit(e).await.is_ok();
                answers.push((format!("c{t}-{n}"), ok));
                n += 1;
                // ~150 calls a second each: enough to keep groups in flight, few enough
                // for the verifier of a debug build (refused calls come back at once).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }
    // Working; syncs refused; working until recovered; writes refused; working until
    // recovered (the store is reopened every second while failing).
    let healthy = async |a: &Audit| {
        for _ in 0..50 {
            if a.healthy() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    for drill in [FaultSwitch::set_syncs, FaultSwitch::set] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        drill(&faults, true);
        tokio::time::sleep(Duration::from_millis(150)).await;
        drill(&faults, false);
        assert!(healthy(&a).await, "the trail recovers once the disk works");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Vec::new();
    for c in callers {
        answers.extend(c.await.unwrap());
    }
    a.stop(audit::event("SIDECAR_STOPPED", "INFO")).await;
    drop(a);

    let db = dir.path().join("audit.redb");
    offline::verify_db(&db, None).unwrap().unwrap();
    let recs = records(&db);
    let mut by_cid: std::collections::HashMap<&str, Vec<&AuditEvent>> = Default::default();
    for r in &recs {
        if !r.correlation_id.is_empty() {
            by_cid.entry(r.correlation_id.as_str()).or_default().push(r);
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for (cid, answered) in &answers {
        let found = by_cid.get(cid.as_str()).map_or(&[][..], |v| v.as_slice());
        assert_eq!(
            found.len(),
            1,
            "{cid} (answered ok: {answered}) has {} records",
            found.len()
        );
        if *answered {
            ok += 1;
            assert_eq!(found[0].decision, "ALLOW", "{cid} was answered ok");
        } else {
            refused += 1;
            assert_eq!(found[0].decision, "DENY", "{cid} was refused");
            assert_eq!(found[0].reason_code, "AUDIT_UNAVAILABLE");
        }
    }
    assert!(
        ok > 0 && refused > 0,
        "both answers seen: {ok} ok, {refused} refused"
    );
    // Records nobody waited for are kept too, each once.
    assert!(
        by_cid
            .iter()
            .filter(|(c, _)| c.starts_with('r'))
            .all(|(_, v)| v.len() == 1)
    );
    assert!(
        recs.iter()
            .filter(|r| r.event_type == "AUDIT_RECOVERED")
            .count()
            >= 2
    );
}

/// After an outage, the trail resumes only from a last record it can link to: a head whose
/// hash is not 32 bytes (the file changed while it was closed) keeps traffic refused, as it
/// keeps the sidecar from starting, rather than beginning a new chain from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_a_last_record_that_cannot_be_linked_to_keeps_the_trail_refused() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    let a = Audit::start(&AuditConfig::default(), dir.path(), faults.clone(), None).unwrap();
    a.commit(audit::event("TOOL_INVOCATION", "ALLOW"))
        .await
        .unwrap();
    assert!(a.flush().await, "moved into audit.redb");
    faults.set(true);
    a.commit(audit::event("TOOL_INVOCATION", "ALLOW"))
        .await
        .unwrap_err();
    assert!(!a.healthy());

    // While the writer has the file closed (it cannot reopen it with the disk failing),
    // a record whose hash is not 32 bytes becomes its last.
    let db = dir.path().join("audit.redb");
    let mut opened = None;
    for _ in 0..100 {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        if let Ok(rdb) = b.create(&db) {
            opened = Some(rdb);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rdb = opened.expect("the writer closed audit.redb during the outage");
    let txn = rdb.begin_write().unwrap();
    {
        let mut t = txn.open_table(EVENTS).unwrap();
        let (k, mut last) = {
            let (k, v) = t.last().unwrap().unwrap();
            (k.value(), AuditEvent::decode(v.value()).unwrap())
        };
        last.sequence = k + 1;
        last.hash = vec![1; 16];
        put(&mut t, k + 1, &last);
    }
    txn.commit().unwrap();
    drop(rdb);

    faults.set(false);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!a.healthy(), "resumed from a head it cannot link to");
    }
    let refused = a.commit(audit::event("TOOL_INVOCATION", "ALLOW")).await;
    assert!(refused.is_err(), "traffic is still refused");
    // The journal, evidence of what was durable, is left as it is (not reset for a chain
    // that does not resume).
    let journal = std::fs::read(dir.path().join("audit.wal")).unwrap();
    assert!(journal.iter().any(|b| *b != 0), "the journal was wiped");
}

/// A file damaged below the records (its pages, not its records through redb) makes the
/// offline tools fail with a clear error, never crash, whether it was closed cleanly or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_damaged_below_the_records_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db = chain(dir.path(), 40).await;
    let bytes = std::fs::read(&db).unwrap();
    let copies = tempfile::tempdir().unwrap();
    for (i, at) in [4096usize, bytes.len() / 2].into_iter().enumerate() {
        let copy = copies.path().join(format!("damaged-{i}.redb"));
        let mut b = bytes.clone();
        for x in b.iter_mut().skip(at) {
            *x = 0xa5;
        }
        std::fs::write(&copy, &b).unwrap();
        for args in [
            vec!["audit", "verify", "--db"],
            vec![
                "audit",
                "export",
                "--format",
                "jsonl",
                "--out",
                "/dev/null",
                "--db",
            ],
        ] {
            let out = aesp().args(&args).arg(&copy).output().unwrap();
            let code = out.status.code();
            assert!(
                code == Some(1) || code == Some(2),
                "{args:?} on a damaged file: {code:?}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Nor does the sidecar's trail start on it: it refuses, saying the file is damaged.
        let state = tempfile::tempdir().unwrap();
        std::fs::copy(&copy, state.path().join("audit.redb")).unwrap();
        let started = Audit::start(
            &AuditConfig::default(),
            state.path(),
            FaultSwitch::default(),
            None,
        );
        let Err(e) = started else {
            panic!("no trail starts on a damaged file");
        };
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
    }
}

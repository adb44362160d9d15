//! The protobuf wire walker and every base → enterprise upgrade, on the input as a message.
//!
//! The whole input is the message (so seeds are plain encoded GRID messages). Checks:
//! - `wire::fields`: no panic; records are contiguous, in bounds, and after an error the
//!   iterator ends; a fully valid walk covers the whole buffer and is also valid protobuf for
//!   prost (skipping unknown fields);
//! - `wire::rewrite`: succeeds iff the walk does; the result holds no dropped field, keeps the
//!   others byte for byte, and ends with the appended records;
//! - `ErrorPatch::apply` (every method's error field) and `apply_nested` (the `HostMessage`
//!   acks, chosen with `wire::oneof_member` like the proxy's `HostHook`): a message that
//!   decodes as its base or enterprise type still decodes as that type after the upgrade,
//!   an error is patched iff the decoded message carries one, and the patched error keeps its
//!   code and message and gains the correlation id;
//! - `upgrade::decode_request` for every `GridMethod` (and the `Request` accessors);
//! - `upgrade_create_session`: for a request that decoded, the output decodes, carries exactly
//!   the sidecar's security context and keeps the other fields;
//! - `wire::oneof_member` against prost: same member, and its merged records decode to the
//!   same content;
//! - `upgrade_announce` with the raw announce picked as the proxy's `RuntimeHook` does (the
//!   merged records of the envelope's oneof member, once the whole envelope decodes): for a
//!   runtime message the hook would accept, the hook's view equals prost's, the output decodes,
//!   carries the sidecar's facts and keeps what the runtime announced.
#![no_main]

use aesp_sidecar::grid::GridMethod;
use aesp_sidecar::grid::upgrade::{self, ErrorPatch, RuntimeFacts};
use aesp_sidecar::grid::wire;
use aesp_sidecar::proto::{aesp, grid};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const CID: &str = "cid-fuzz";

fn esc() -> Vec<u8> {
    let mut policy_context = std::collections::HashMap::new();
    policy_context.insert("method".to_string(), "/m".to_string());
    policy_context.insert("source".to_string(), "127.0.0.1:1".to_string());
    aesp::EnterpriseSecurityContext {
        principal_id: "alice".into(),
        tenant_id: "acme".into(),
        organization_id: "org".into(),
        policy_context,
        ..Default::default()
    }
    .encode_to_vec()
}

fn facts() -> RuntimeFacts {
    RuntimeFacts {
        runtime_id_fallback: "rt-fallback".into(),
        tenant_id: "acme".into(),
        security_zone: "pci".into(),
        deployment_environment: "PROD".into(),
    }
}

/// A run of 10+ varint bytes, which wire.rs and prost treat differently (wire.rs drops the
/// bits past 64, prost refuses them); excluded from the prost cross-check only.
fn has_overlong_varint(b: &[u8]) -> bool {
    b.windows(9).any(|w| w.iter().all(|x| *x >= 0x80))
}

/// The oneof members of both Connect envelopes (`RuntimeMessage.kind`, `HostMessage.kind`),
/// as the proxy's hooks use them.
const ENVELOPE_KINDS: [u32; 4] = [1, 2, 3, 4];

/// wire.rs refuses groups (wire types 3 and 4) on purpose; prost skips them as unknown fields.
fn is_group(e: &wire::WireError) -> bool {
    e.what.contains("wire type")
}

fn check_fields(buf: &[u8]) -> bool {
    let mut it = wire::fields(buf);
    let mut expect_start = 0;
    let mut ok = true;
    while let Some(f) = it.next() {
        match f {
            Ok(f) => {
                assert_eq!(f.start, expect_start, "records are contiguous");
                assert!(f.start < f.end && f.end <= buf.len());
                assert!(f.number >= 1 && f.number <= 0x1fff_ffff);
                assert!(matches!(f.wire_type, 0 | 1 | 2 | 5));
                let vs = f.value.as_ptr() as usize - buf.as_ptr() as usize;
                assert!(vs > f.start && vs + f.value.len() == f.end);
                match f.wire_type {
                    1 => assert_eq!(f.value.len(), 8),
                    5 => assert_eq!(f.value.len(), 4),
                    _ => {}
                }
                expect_start = f.end;
            }
            Err(e) => {
                assert!(e.offset <= buf.len());
                assert!(it.next().is_none(), "the walk ends after an error");
                ok = false;
                break;
            }
        }
    }
    if ok {
        assert_eq!(expect_start, buf.len(), "a valid walk covers the buffer");
        if !has_overlong_varint(buf) {
            // Valid framing for wire.rs is valid framing for prost (unknown fields skipped).
            assert!(
                <() as Message>::decode(buf).is_ok(),
                "wire.rs accepts what prost refuses"
            );
        }
    }
    // has_len_field / first_field agree with the walk.
    match wire::first_field(buf) {
        Ok(Some(f)) => assert_eq!(f.start, 0),
        Ok(None) => assert!(buf.is_empty()),
        Err(_) => assert!(!ok),
    }
    ok
}

fn check_rewrite(buf: &[u8], drop: &[u32], append: &[u8], ok: bool) {
    match wire::rewrite(buf, drop, append) {
        Ok(out) => {
            assert!(ok, "rewrite succeeded on a malformed message");
            assert!(out.ends_with(append));
            let kept = &out[..out.len() - append.len()];
            let mut expect = Vec::new();
            for f in wire::fields(buf) {
                let f = f.unwrap();
                if !drop.contains(&f.number) {
                    expect.extend_from_slice(&buf[f.start..f.end]);
                }
            }
            assert_eq!(kept, &expect[..]);
            for f in wire::fields(kept) {
                assert!(!drop.contains(&f.unwrap().number));
            }
        }
        Err(_) => assert!(!ok, "rewrite failed on a valid message"),
    }
}

/// The error of a decoded message, as (code, message, correlation_id, origin detail).
type ErrView = (String, String, String, Option<String>);

fn view(e: &aesp::EnterpriseError) -> ErrView {
    (
        e.code.clone(),
        e.message.clone(),
        e.correlation_id.clone(),
        e.details.get("origin").cloned(),
    )
}

fn base_view(e: &grid::Error) -> (String, String) {
    (e.code.clone(), e.message.clone())
}

/// `apply` on one top-level error field, checked against base type `B` and enterprise type `E`.
fn check_apply<B, E>(
    p: &ErrorPatch,
    buf: &[u8],
    field: u32,
    base_err: fn(&B) -> Option<&grid::Error>,
    ent_err: fn(&E) -> Option<&aesp::EnterpriseError>,
) where
    B: Message + Default,
    E: Message + Default,
{
    let r = p.apply(buf, field);
    let base_in = B::decode(buf).ok();
    let ent_in = E::decode(buf).ok();
    let out = match r {
        Ok(Some(out)) => {
            assert!(out.starts_with(buf), "a patch only appends");
            out
        }
        Ok(None) => {
            if let Some(b) = &base_in {
                assert!(base_err(b).is_none(), "field {field}: error not patched");
            }
            return;
        }
        Err(e) => {
            assert!(
                is_group(&e) || (base_in.is_none() && ent_in.is_none()),
                "valid message refused: {e}"
            );
            return;
        }
    };
    if let Some(b) = &base_in {
        let e = base_err(b).map(base_view);
        assert!(
            e.is_some(),
            "field {field}: patched a message without an error"
        );
        let b2 = B::decode(&out[..]).expect("upgraded message no longer decodes (base type)");
        assert_eq!(base_err(&b2).map(base_view), e, "base error changed");
    }
    if let Some(ei) = &ent_in {
        let before = ent_err(ei).map(view).expect("patched without an error");
        let eo = E::decode(&out[..]).expect("upgraded message no longer decodes (enterprise type)");
        let after = ent_err(&eo).map(view).unwrap();
        assert_eq!(
            (&after.0, &after.1),
            (&before.0, &before.1),
            "code/message kept"
        );
        assert_eq!(after.2, CID);
        assert_eq!(after.3.as_deref(), Some("grid-host"));
    }
}

/// `wire::oneof_member` against prost: the member it picks is the variant prost decodes, and
/// its merged records decode to that variant's content.
fn check_oneof_member(buf: &[u8]) {
    let m = wire::oneof_member(buf, &ENVELOPE_KINDS);
    if let Ok(hm) = grid::HostMessage::decode(buf) {
        use grid::host_message::Kind as K;
        let m = match m {
            Ok(m) => m,
            Err(e) if is_group(&e) => return,
            Err(e) => panic!("a HostMessage that decodes has a readable oneof: {e}"),
        };
        let got = m.as_ref().map(|m| m.number);
        let want = hm.kind.as_ref().map(|k| match k {
            K::AnnounceAck(_) => 1,
            K::RequestFulfillment(_) => 2,
            K::FulfillAck(_) => 3,
            K::Call(_) => 4,
        });
        assert_eq!(got, want, "oneof_member picks another member than prost");
        if let Some(m) = m {
            let merged = m.merged();
            let same = match hm.kind.unwrap() {
                K::AnnounceAck(a) => grid::AnnounceAck::decode(&merged[..]).ok() == Some(a),
                K::RequestFulfillment(a) => {
                    grid::RequestFulfillment::decode(&merged[..]).ok() == Some(a)
                }
                K::FulfillAck(a) => grid::FulfillAck::decode(&merged[..]).ok() == Some(a),
                K::Call(a) => grid::ToolCall::decode(&merged[..]).ok() == Some(a),
            };
            assert!(same, "merged records differ from prost's merge");
        }
    } else if let Ok(Some(m)) = &m {
        let _ = (m.merged(), m.has_len_field(3));
    }
}

fn check_host_message(p: &ErrorPatch, buf: &[u8]) {
    // As `HostHook`: the kind is the oneof member a decoder would see.
    let Ok(member) = wire::oneof_member(buf, &ENVELOPE_KINDS) else {
        return;
    };
    let Some(outer) = member.map(|m| m.number) else {
        return;
    };
    if outer != 1 && outer != 3 {
        // Exercise the walker on other pairs too, without semantic checks.
        let _ = p.apply_nested(buf, &ENVELOPE_KINDS, outer, 3);
        let _ = p.apply_nested(buf, &[outer], outer, 1);
        return;
    }
    let r = p.apply_nested(buf, &ENVELOPE_KINDS, outer, 3);
    let base_in = grid::HostMessage::decode(buf).ok();
    let ent_in = aesp::EnterpriseHostMessage::decode(buf).ok();
    use aesp::enterprise_host_message::Kind as EK;
    use grid::host_message::Kind as BK;
    let base_error = |m: &grid::HostMessage| -> Option<(String, String)> {
        match (&m.kind, outer) {
            (Some(BK::AnnounceAck(a)), 1) => a.error.as_ref().map(base_view),
            (Some(BK::FulfillAck(a)), 3) => a.error.as_ref().map(base_view),
            _ => None,
        }
    };
    let ent_error = |m: &aesp::EnterpriseHostMessage| -> Option<ErrView> {
        match (&m.kind, outer) {
            (Some(EK::AnnounceAck(a)), 1) => a.error.as_ref().map(view),
            (Some(EK::FulfillAck(a)), 3) => a.error.as_ref().map(view),
            _ => None,
        }
    };
    match r {
        Err(e) => assert!(
            is_group(&e) || (base_in.is_none() && ent_in.is_none()),
            "valid HostMessage refused: {e}"
        ),
        Ok(None) => {
            if let Some(b) = &base_in {
                assert!(base_error(b).is_none(), "HostMessage error not patched");
            }
        }
        Ok(Some(out)) => {
            assert!(out.starts_with(buf));
            if let Some(b) = &base_in {
                let before = base_error(b);
                let b2 = grid::HostMessage::decode(&out[..])
                    .expect("upgraded HostMessage no longer decodes (base type)");
                assert!(
                    before.is_some(),
                    "HostMessage: an error was added to an ack that had none: {b:?} -> {b2:?}"
                );
                assert_eq!(base_error(&b2), before, "base error changed");
            }
            if let Some(ei) = &ent_in {
                let before = ent_error(ei);
                let eo = aesp::EnterpriseHostMessage::decode(&out[..])
                    .expect("upgraded HostMessage no longer decodes (enterprise type)");
                if let Some(before) = before {
                    let after = ent_error(&eo).unwrap();
                    assert_eq!((&after.0, &after.1), (&before.0, &before.1));
                    assert_eq!(after.2, CID);
                }
            }
        }
    }
}

fn check_requests(payload: &Bytes, esc: &[u8]) {
    for m in GridMethod::ALL {
        if let Ok(r) = upgrade::decode_request(m, payload) {
            let _ = (
                r.claims(),
                r.tool_name(),
                r.session_id(),
                r.correlation_id(),
            );
            if let upgrade::Request::CreateSession(cs) = &r {
                let out = match upgrade::upgrade_create_session(payload, esc) {
                    Ok(out) => out,
                    // Refused on purpose (a group in an unknown field): see `is_group`.
                    Err(e) if is_group(&e) => continue,
                    Err(e) => panic!("a decoded CreateSession must upgrade: {e}"),
                };
                let up = aesp::EnterpriseCreateSession::decode(out.clone())
                    .expect("upgraded CreateSession no longer decodes");
                let want = aesp::EnterpriseSecurityContext::decode(esc).unwrap();
                assert_eq!(
                    up.security_context.as_ref(),
                    Some(&want),
                    "context replaced"
                );
                assert_eq!(up.suggested_session_id, cs.suggested_session_id);
                assert_eq!(up.ttl_seconds, cs.ttl_seconds);
                grid::CreateSession::decode(out).expect("not a base CreateSession any more");
            }
        }
    }
    // Arbitrary bytes too (errors, not panics).
    let _ = upgrade::upgrade_create_session(payload, esc);
    let _ = upgrade::set_tool_call_correlation(payload, CID);
}

fn check_announce(buf: &[u8]) {
    let f = facts();
    // Arbitrary combinations first: any bytes as envelope and as announcement.
    let _ = upgrade::upgrade_announce(buf, buf, "", &f);
    let _ = upgrade::upgrade_announce(&[], buf, "x", &f);

    // As `RuntimeHook`: every top-level field is a length-delimited envelope member, the whole
    // envelope decodes (F3), the kind is the member a decoder would see, and only an announce
    // is upgraded, from its merged records.
    for fl in wire::fields(buf) {
        let Ok(fl) = fl else { return };
        if fl.wire_type != 2 || !ENVELOPE_KINDS.contains(&fl.number) {
            return;
        }
    }
    let Ok(msg) = aesp::EnterpriseRuntimeMessage::decode(buf) else {
        return;
    };
    let kind = match wire::oneof_member(buf, &ENVELOPE_KINDS) {
        Ok(Some(kind)) => kind,
        Ok(None) => {
            assert_eq!(msg.kind, None, "oneof_member found no member, prost did");
            return;
        }
        Err(e) => panic!("an envelope that decodes has a readable oneof: {e}"),
    };
    if kind.number != 1 {
        return;
    }
    let raw = kind.merged();
    let a = aesp::EnterpriseRuntimeAnnouncement::decode(&raw[..])
        .expect("the merged records of a decoded announce decode");
    use aesp::enterprise_runtime_message::Kind;
    // The hook's view is the decoder's view.
    assert_eq!(
        msg.kind,
        Some(Kind::Announce(a.clone())),
        "hook and decoder disagree"
    );
    let out = match upgrade::upgrade_announce(buf, &raw, &a.runtime_id, &f) {
        Ok(out) => out,
        Err(e) if is_group(&e) => return,
        Err(e) => panic!("an announce that decoded must upgrade: {e}"),
    };
    let m = aesp::EnterpriseRuntimeMessage::decode(out.clone())
        .expect("upgraded RuntimeMessage no longer decodes (enterprise type)");
    grid::RuntimeMessage::decode(out).expect("upgraded RuntimeMessage no longer decodes (base)");
    let Some(Kind::Announce(b)) = m.kind else {
        panic!("upgrade lost the announcement")
    };
    assert_eq!(
        (
            b.tenant_id.as_str(),
            b.security_zone.as_str(),
            b.deployment_environment.as_str()
        ),
        ("acme", "pci", "PROD"),
        "sidecar facts"
    );
    let want_id = if a.runtime_id.is_empty() {
        f.runtime_id_fallback.as_str()
    } else {
        a.runtime_id.as_str()
    };
    assert_eq!(
        (&b.runtime_id[..], &b.language, &b.version, &b.capabilities),
        (want_id, &a.language, &a.version, &a.capabilities),
        "the upgrade changed what the runtime announced"
    );
}

fuzz_target!(|data: &[u8]| {
    let ok = check_fields(data);
    let _ = wire::has_len_field(data, 1);

    let mut app = bytes::BytesMut::new();
    wire::put_len_field(&mut app, 3, b"appended");
    wire::put_varint(&mut app, u64::MAX);
    for drop in [&[][..], &[1][..], &[3][..], &[5, 6, 7][..]] {
        check_rewrite(data, drop, &app, ok);
    }
    let merged = wire::merge(data, &app);
    assert_eq!(merged.len(), data.len() + app.len());

    let p = ErrorPatch::new(CID);
    check_apply::<grid::CreateSessionAck, aesp::EnterpriseCreateSessionAck>(
        &p,
        data,
        GridMethod::CreateSession.response_error_field(),
        |m| m.error.as_ref(),
        |m| m.error.as_ref(),
    );
    check_apply::<grid::DestroySessionAck, aesp::EnterpriseDestroySessionAck>(
        &p,
        data,
        GridMethod::DestroySession.response_error_field(),
        |m| m.error.as_ref(),
        |m| m.error.as_ref(),
    );
    check_apply::<grid::ToolResult, aesp::EnterpriseToolResult>(
        &p,
        data,
        GridMethod::ExecuteTool.response_error_field(),
        |m| m.error_details.as_ref(),
        |m| m.error_details.as_ref(),
    );
    check_apply::<grid::StreamChunk, aesp::EnterpriseStreamChunk>(
        &p,
        data,
        GridMethod::ExecuteToolStream.response_error_field(),
        |m| m.error_details.as_ref(),
        |m| m.error_details.as_ref(),
    );
    check_oneof_member(data);
    check_host_message(&p, data);

    let payload = Bytes::copy_from_slice(data);
    check_requests(&payload, &esc());
    check_announce(data);
});

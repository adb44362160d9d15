//! Every refusal is recorded, wherever the proxy makes it: before the pipeline (encoding,
//! framing, protobuf), by the pipeline, after it (an upgrade that cannot be written), and
//! mid-stream on `Connect` (first message not `announce`, a second `announce`, a message
//! that does not decode, an announcement for another tenant). Each case is mounted from
//! outside on the real listener and must move `aesp_denials_total` for its code by exactly
//! one and answer the peer with that code.

mod common;

use aesp_sidecar::proto::{aesp, grid};
use common::{RawH2, Stack, counter, denials, frame};
use prost::Message;

const CREATE: &str = "/altar.grid.v1.GridHost/CreateSession";
const CONNECT: &str = "/altar.grid.v1.GridRuntime/Connect";

fn announce(runtime_id: &str, tenant: &str) -> Vec<u8> {
    aesp::EnterpriseRuntimeMessage {
        kind: Some(aesp::enterprise_runtime_message::Kind::Announce(
            aesp::EnterpriseRuntimeAnnouncement {
                runtime_id: runtime_id.into(),
                tenant_id: tenant.into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec()
}

struct Case {
    what: &'static str,
    stem: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Each element is one DATA frame.
    body: Vec<Vec<u8>>,
    code: &'static str,
}

#[tokio::test]
async fn every_refusal_path_moves_the_denial_counter_and_answers_with_its_code() {
    let stack = Stack::start_with("", false).await;
    let claims_globex = grid::CreateSession {
        security_context: Some(grid::SecurityContext {
            principal_id: String::new(),
            tenant_id: "globex".into(),
        }),
        ..Default::default()
    }
    .encode_to_vec();
    // A CreateSession carrying an unknown field as a (deprecated) group: protobuf decoders
    // skip it, so the pipeline allows, but the upgrade cannot splice it.
    let mut with_group = vec![0x0a, 0x01, b's'];
    with_group.extend_from_slice(&[0x9b, 0x06, 0x9c, 0x06]);
    let mut truncated = frame(&grid::CreateSession::default().encode_to_vec());
    truncated[4] = 9; // the prefix promises 9 bytes that never come

    let cases = vec![
        Case {
            what: "an unsupported grpc-encoding",
            stem: "acme",
            path: CREATE,
            headers: &[("grpc-encoding", "snappy")],
            body: vec![frame(b"")],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "a truncated frame",
            stem: "acme",
            path: CREATE,
            headers: &[],
            body: vec![truncated],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "a protobuf that does not decode",
            stem: "acme",
            path: CREATE,
            headers: &[],
            body: vec![frame(&[0xff])],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "an unknown method",
            stem: "acme",
            path: "/x.Y/Z",
            headers: &[],
            body: vec![frame(b"")],
            code: "METHOD_NOT_ALLOWED",
        },
        Case {
            what: "a claim of another tenant",
            stem: "acme",
            path: CREATE,
            headers: &[],
            body: vec![frame(&claims_globex)],
            code: "IDENTITY_MISMATCH",
        },
        Case {
            what: "an upgrade that fails after the pipeline allowed",
            stem: "acme",
            path: CREATE,
            headers: &[],
            body: vec![frame(&with_group)],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "Connect whose first message is not announce",
            stem: "runtime",
            path: CONNECT,
            headers: &[],
            body: vec![frame(&[0x12, 0x00])],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "Connect with a second announce",
            stem: "runtime",
            path: CONNECT,
            headers: &[],
            body: vec![frame(&announce("rt-a", "")), frame(&announce("rt-b", ""))],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "Connect with a message that does not decode",
            stem: "runtime",
            path: CONNECT,
            headers: &[],
            body: vec![frame(&[0x1a, 0x01, 0x00, 0x0a, 0x00])],
            code: "MALFORMED_MESSAGE",
        },
        Case {
            what: "Connect announcing for another tenant",
            stem: "runtime",
            path: CONNECT,
            headers: &[],
            body: vec![frame(&announce("rt-c", "globex"))],
            code: "IDENTITY_MISMATCH",
        },
    ];

    for case in cases {
        let before = denials(&stack.sidecar, case.code);
        let mut raw: RawH2 = stack.raw(case.stem).await;
        let r = raw.call(case.path, case.headers, case.body).await;
        let ee = r
            .enterprise_error()
            .unwrap_or_else(|| panic!("{}: no EnterpriseError in {r:?}", case.what));
        assert_eq!(ee.code, case.code, "{}: {ee:?}", case.what);
        assert_eq!(
            denials(&stack.sidecar, case.code),
            before + 1,
            "{}: aesp_denials_total{{code={:?}}} must move by one",
            case.what,
            case.code
        );
    }
    // None of the refused CreateSessions reached the host.
    assert!(stack.host.state.security_contexts().is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn an_upgrade_that_fails_after_an_allow_is_counted_as_a_denial_not_an_allow() {
    let stack = Stack::start_with("", false).await;
    let calls = |outcome| {
        counter(
            &stack.sidecar,
            "aesp_calls_total",
            &[("method", CREATE), ("outcome", outcome)],
        )
    };
    let (allow0, deny0) = (calls("allow"), calls("deny"));
    let mut with_group = vec![0x0a, 0x01, b's'];
    with_group.extend_from_slice(&[0x9b, 0x06, 0x9c, 0x06]);
    let r = stack
        .raw("acme")
        .await
        .call(CREATE, &[], vec![frame(&with_group)])
        .await;
    assert_eq!(r.enterprise_error().unwrap().code, "MALFORMED_MESSAGE");
    assert_eq!((calls("allow"), calls("deny")), (allow0, deny0 + 1));
    stack.stop().await;
}

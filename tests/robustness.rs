//! Whatever a peer sends, the parsers return an error instead of panicking: random bytes and
//! bit-flipped valid messages through the framing decoder, the wire walker and every upgrade.
//! (A deterministic generator, so a failure reproduces.)

use aesp_sidecar::grid::upgrade::{self, ErrorPatch, RuntimeFacts};
use aesp_sidecar::grid::{GridMethod, wire};
use aesp_sidecar::grpc::frame::{Encoding, FrameDecoder, GrpcMessage, message_payload};
use aesp_sidecar::proto::{adm, aesp, grid};
use bytes::Bytes;
use prost::Message;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn samples() -> Vec<Vec<u8>> {
    let args =
        aesp_sidecar::adm::json_to_struct(&serde_json::json!({"text": "x", "n": [1, {"a": true}]}))
            .unwrap();
    vec![
        grid::CreateSession {
            suggested_session_id: "s".into(),
            ttl_seconds: 9,
            security_context: Some(grid::SecurityContext {
                principal_id: "p".into(),
                tenant_id: "t".into(),
            }),
        }
        .encode_to_vec(),
        grid::ToolCall {
            invocation_id: "i".into(),
            session_id: "s".into(),
            function_call: Some(adm::FunctionCall {
                name: "echo".into(),
                args: Some(args),
                call_id: "c".into(),
            }),
            correlation_id: "cid".into(),
        }
        .encode_to_vec(),
        grid::ToolResult {
            error_details: Some(grid::Error {
                code: "E".into(),
                message: "m".into(),
            }),
            ..Default::default()
        }
        .encode_to_vec(),
        grid::HostMessage {
            kind: Some(grid::host_message::Kind::FulfillAck(grid::FulfillAck {
                session_id: "s".into(),
                accepted: vec!["a".into()],
                error: Some(grid::Error::default()),
            })),
        }
        .encode_to_vec(),
        grid::RuntimeMessage {
            kind: Some(grid::runtime_message::Kind::Announce(
                grid::AnnounceRuntime {
                    runtime_id: "r".into(),
                    capabilities: vec!["x".into()],
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
    ]
}

fn exercise(buf: &[u8]) {
    let _ = wire::fields(buf).count();
    let _ = wire::first_field(buf);
    let _ = wire::rewrite(buf, &[1, 3], b"\x0a\x00");
    let p = ErrorPatch::new("cid");
    for f in 1..6 {
        let _ = p.apply(buf, f);
        let _ = p.apply_nested(buf, &[1, 2, 3, 4], f, 3);
    }
    let b = Bytes::copy_from_slice(buf);
    for m in GridMethod::ALL {
        let _ = upgrade::decode_request(m, &b);
    }
    if let Ok(env) = aesp::EnterpriseRuntimeMessage::decode(b.clone())
        && let Some(aesp::enterprise_runtime_message::Kind::Announce(a)) = env.kind
    {
        let raw = wire::fields(buf)
            .filter_map(Result::ok)
            .find(|f| f.number == 1)
            .map(|f| f.value)
            .unwrap_or(&[]);
        let facts = RuntimeFacts {
            runtime_id_fallback: "x".into(),
            tenant_id: "t".into(),
            security_zone: "z".into(),
            deployment_environment: "DEV".into(),
        };
        if let Ok(up) = upgrade::upgrade_announce(buf, raw, &a.runtime_id, &facts) {
            // An upgrade of a valid message is itself valid.
            aesp::EnterpriseRuntimeMessage::decode(up).unwrap();
        }
    }
    if let Ok(up) = upgrade::upgrade_create_session(buf, b"\x0a\x01p") {
        let _ = aesp::EnterpriseCreateSession::decode(up);
    }
}

#[test]
fn random_and_mutated_messages_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let samples = samples();
    for i in 0..20_000 {
        let buf: Vec<u8> = if i % 2 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            let mut b = samples[rng.below(samples.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len());
                match rng.below(3) {
                    0 => b[at] ^= 1 << rng.below(8),
                    1 => b.truncate(at),
                    _ => b.insert(at, rng.next() as u8),
                }
                if b.is_empty() {
                    break;
                }
            }
            b
        };
        exercise(&buf);
    }
}

#[test]
fn random_framing_never_panics_and_respects_the_limit() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..5_000 {
        let mut d = FrameDecoder::new(64);
        let mut out = Vec::new();
        let len = rng.below(300);
        let stream: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    0
                }
            })
            .collect();
        let mut at = 0;
        let mut failed = false;
        while at < stream.len() {
            let n = 1 + rng.below(40);
            let end = (at + n).min(stream.len());
            if d.push(Bytes::copy_from_slice(&stream[at..end]), &mut out)
                .is_err()
            {
                failed = true;
                break;
            }
            at = end;
        }
        if !failed {
            let _ = d.finish();
        }
        for m in &out {
            assert!(m.payload().len() <= 64);
            for enc in [Encoding::Identity, Encoding::Gzip, Encoding::Deflate] {
                let _ = message_payload(m, enc, 64);
            }
        }
        // Compressed garbage never panics either.
        let mut f = vec![1u8];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend_from_slice(&stream);
        let msg = GrpcMessage {
            compressed: true,
            frame: Bytes::from(f),
        };
        let _ = message_payload(&msg, Encoding::Gzip, 1024);
        let _ = message_payload(&msg, Encoding::Deflate, 1024);
    }
}

/// Found by the fuzzer (fuzz/ wire_and_upgrades): an envelope whose earlier `fulfill_ack` had
/// an error, superseded by later members, got an error added by the upgrade.
#[test]
fn connect_error_patches_follow_oneof_semantics() {
    use aesp_sidecar::proto::grid::host_message::Kind;
    let crash: &[u8] = &[
        0x0a, 0x00, 0x1a, 0x00, 0x12, 0x02, 0x0a, 0x00, 0x1a, 0x00, 0x12, 0x02, 0x0a, 0x00, 0x22,
        0x00, 0x1a, 0x02, 0x1a, 0x00, 0x1a, 0x00, 0x0a, 0x00, 0x22, 0x00, 0x1a, 0x02, 0x3a, 0x00,
        0x1a, 0x00,
    ];
    let mut rng = Rng(0x5151_2323_7777_1111);
    let samples = samples();
    let mut inputs = vec![crash.to_vec()];
    for _ in 0..20_000 {
        let mut b = samples[3].clone();
        b.extend_from_slice(&samples[rng.below(samples.len())]);
        for _ in 0..rng.below(4) {
            let at = rng.below(b.len());
            b.insert(at, [0x0a, 0x1a, 0x12, 0x22, 0x00, 0x02][rng.below(6)]);
        }
        inputs.push(b);
    }
    let error_of = |m: &grid::HostMessage| match &m.kind {
        Some(Kind::AnnounceAck(a)) => a.error.is_some(),
        Some(Kind::FulfillAck(a)) => a.error.is_some(),
        _ => false,
    };
    let p = ErrorPatch::new("cid");
    for buf in inputs {
        let Ok(before) = grid::HostMessage::decode(&buf[..]) else {
            continue;
        };
        for outer in [1, 3] {
            if let Ok(Some(up)) = p.apply_nested(&buf, &[1, 2, 3, 4], outer, 3) {
                let after = grid::HostMessage::decode(up).unwrap();
                assert!(error_of(&before), "an error was added to {before:?}");
                assert!(error_of(&after));
                assert_eq!(
                    std::mem::discriminant(before.kind.as_ref().unwrap()),
                    std::mem::discriminant(after.kind.as_ref().unwrap())
                );
            }
        }
    }
}

//! Writes the seed corpora of the fuzz targets: valid encoded GRID messages built with the
//! crate's own prost types, framed and cut the way each target reads its input.
//!
//! Run from `fuzz/` after `cargo fuzz build` (the binary is built with the targets):
//! `target/x86_64-unknown-linux-gnu/release/seed corpus` (argument: the corpus root).

use aesp_sidecar::grpc::frame::encode_frame;
use aesp_sidecar::proto::{adm, aesp, grid};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn err(code: &str) -> grid::Error {
    grid::Error {
        code: code.into(),
        message: format!("{code} happened"),
    }
}

/// (name, encoded) of valid GRID messages of every type the sidecar reads.
fn messages() -> Vec<(&'static str, Vec<u8>)> {
    let args = prost_types::Struct {
        fields: [(
            "text".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("hi".into())),
            },
        )]
        .into_iter()
        .collect(),
    };
    let tool_call = grid::ToolCall {
        invocation_id: "inv-1".into(),
        session_id: "s-1".into(),
        function_call: Some(adm::FunctionCall {
            name: "echo".into(),
            args: Some(args),
            call_id: "c-1".into(),
        }),
        correlation_id: "cid-1".into(),
    };
    let announce = grid::AnnounceRuntime {
        runtime_id: "rt-1".into(),
        language: "python".into(),
        version: "3.12".into(),
        capabilities: vec!["stream".into(), "fulfill".into()],
    };
    let tool_result = grid::ToolResult {
        invocation_id: "inv-1".into(),
        status: grid::ResultStatus::Error as i32,
        payload: None,
        error_details: Some(err("TOOL_ERROR")),
        correlation_id: "cid-1".into(),
    };
    let chunk = grid::StreamChunk {
        invocation_id: "inv-1".into(),
        chunk_id: 3,
        payload: br#"{"i": 3}"#.to_vec(),
        is_final: true,
        error_details: Some(err("STREAM_ERROR")),
    };
    let mut unknown = grid::CreateSession {
        suggested_session_id: "s".into(),
        ttl_seconds: 60,
        security_context: None,
    }
    .encode_to_vec();
    unknown.extend_from_slice(&[0x9a, 0x06, 4, b'k', b'e', b'e', b'p']); // field 99 "keep"

    vec![
        (
            "create_session",
            grid::CreateSession {
                suggested_session_id: "s-1".into(),
                ttl_seconds: 300,
                security_context: Some(grid::SecurityContext {
                    principal_id: "mallory".into(),
                    tenant_id: "evil".into(),
                }),
            }
            .encode_to_vec(),
        ),
        ("create_session_unknown_field", unknown),
        (
            "create_session_ack_error",
            grid::CreateSessionAck {
                session_id: "s-1".into(),
                expires_at_unix_seconds: 1_800_000_000,
                error: Some(err("SESSION_LIMIT")),
            }
            .encode_to_vec(),
        ),
        (
            "create_session_ack_ok",
            grid::CreateSessionAck {
                session_id: "s-1".into(),
                expires_at_unix_seconds: 1_800_000_000,
                error: None,
            }
            .encode_to_vec(),
        ),
        (
            "destroy_session",
            grid::DestroySession {
                session_id: "s-1".into(),
            }
            .encode_to_vec(),
        ),
        (
            "destroy_session_ack_error",
            grid::DestroySessionAck {
                destroyed: false,
                error: Some(err("NO_SUCH_SESSION")),
            }
            .encode_to_vec(),
        ),
        ("tool_call", tool_call.encode_to_vec()),
        ("tool_result_error", tool_result.encode_to_vec()),
        ("stream_chunk_error", chunk.encode_to_vec()),
        (
            "runtime_announce",
            grid::RuntimeMessage {
                kind: Some(grid::runtime_message::Kind::Announce(announce.clone())),
            }
            .encode_to_vec(),
        ),
        (
            "runtime_announce_no_id",
            grid::RuntimeMessage {
                kind: Some(grid::runtime_message::Kind::Announce(
                    grid::AnnounceRuntime {
                        runtime_id: String::new(),
                        ..announce
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            "runtime_result",
            grid::RuntimeMessage {
                kind: Some(grid::runtime_message::Kind::Result(tool_result)),
            }
            .encode_to_vec(),
        ),
        (
            "runtime_fulfill",
            grid::RuntimeMessage {
                kind: Some(grid::runtime_message::Kind::Fulfill(grid::FulfillTools {
                    session_id: "s-1".into(),
                    tool_contract_names: vec!["echo".into(), "add".into()],
                })),
            }
            .encode_to_vec(),
        ),
        (
            "host_announce_ack_error",
            grid::HostMessage {
                kind: Some(grid::host_message::Kind::AnnounceAck(grid::AnnounceAck {
                    accepted: false,
                    available_contracts: vec!["echo".into()],
                    error: Some(err("REJECTED")),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "host_fulfill_ack_error",
            grid::HostMessage {
                kind: Some(grid::host_message::Kind::FulfillAck(grid::FulfillAck {
                    session_id: "s-1".into(),
                    accepted: vec![],
                    error: Some(err("UNKNOWN_TOOL")),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "host_call",
            grid::HostMessage {
                kind: Some(grid::host_message::Kind::Call(tool_call)),
            }
            .encode_to_vec(),
        ),
        (
            "enterprise_announce",
            aesp::EnterpriseRuntimeMessage {
                kind: Some(aesp::enterprise_runtime_message::Kind::Announce(
                    aesp::EnterpriseRuntimeAnnouncement {
                        runtime_id: "rt-2".into(),
                        language: "go".into(),
                        tenant_id: "claimed".into(),
                        security_zone: "claimed".into(),
                        ..Default::default()
                    },
                )),
            }
            .encode_to_vec(),
        ),
    ]
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn zlib(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn compressed_frame(body: &[u8]) -> Vec<u8> {
    let mut f = vec![1u8];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let msgs = messages();

    // wire_and_upgrades: the messages as they are.
    for (name, m) in &msgs {
        write(&root, "wire_and_upgrades", name, m);
    }

    // A stream of every message, uncompressed.
    let mut stream = Vec::new();
    for (_, m) in &msgs {
        stream.extend_from_slice(&encode_frame(m));
    }
    let tool_call = &msgs.iter().find(|(n, _)| *n == "tool_call").unwrap().1;
    let gz = compressed_frame(&gzip(tool_call));
    let zl = compressed_frame(&zlib(tool_call));
    let bomb = compressed_frame(&gzip(&[b'a'; 4000]));

    // frame_decoder: [limit selector][k][k cuts][stream]; selector 6 = 1024 bytes.
    let fd = |sel: u8, cuts: &[u8], s: &[u8]| {
        let mut v = vec![sel, cuts.len() as u8];
        v.extend_from_slice(cuts);
        v.extend_from_slice(s);
        v
    };
    write(
        &root,
        "frame_decoder",
        "all_one_frame",
        &fd(6, &[], &stream),
    );
    write(
        &root,
        "frame_decoder",
        "all_cut_7_1_200",
        &fd(6, &[7, 1, 200], &stream),
    );
    write(
        &root,
        "frame_decoder",
        "bytewise",
        &fd(6, &[1], &stream[..120]),
    );
    write(
        &root,
        "frame_decoder",
        "gzip",
        &fd(6, &[3, 50], &[&gz[..], &zl[..]].concat()),
    );
    write(
        &root,
        "frame_decoder",
        "bomb_limit_1024",
        &fd(6, &[], &bomb),
    );
    write(
        &root,
        "frame_decoder",
        "too_large_limit_16",
        &fd(3, &[], &stream),
    );
    write(
        &root,
        "frame_decoder",
        "empty_messages",
        &fd(0, &[2], &[encode_frame(b""), encode_frame(b"")].concat()),
    );
    write(
        &root,
        "frame_decoder",
        "truncated",
        &fd(6, &[4], &stream[..stream.len() - 3]),
    );

    // intercept_body: [flags][limit selector][k][k cuts][stream]; selector 5 = 1024 bytes.
    // flags: bit0 response, bits1-2 encoding, bit3 payload-driven hook, bit4 trailers,
    // bits5-6 abort channel.
    let ib = |flags: u8, cuts: &[u8], s: &[u8]| {
        let mut v = vec![flags, 5, cuts.len() as u8];
        v.extend_from_slice(cuts);
        v.extend_from_slice(s);
        v
    };
    let small: Vec<u8> = msgs[..6]
        .iter()
        .flat_map(|(_, m)| encode_frame(m).to_vec())
        .collect();
    write(
        &root,
        "intercept_body",
        "req_forward",
        &ib(0b0000_0000, &[], &small),
    );
    write(
        &root,
        "intercept_body",
        "resp_forward_trailers",
        &ib(0b0001_0001, &[9, 100], &small),
    );
    write(
        &root,
        "intercept_body",
        "req_hook_abort_open",
        &ib(0b0010_1000, &[17], &small),
    );
    write(
        &root,
        "intercept_body",
        "resp_hook_abort_open",
        &ib(0b0011_1001, &[], &small),
    );
    write(
        &root,
        "intercept_body",
        "resp_pre_refused",
        &ib(0b0110_0001, &[], &small),
    );
    write(
        &root,
        "intercept_body",
        "req_gzip",
        &ib(0b0001_0010, &[4], &[&gz[..], &small[..40]].concat()),
    );
    write(
        &root,
        "intercept_body",
        "resp_deflate",
        &ib(0b0001_0101, &[], &[&zl[..], &small[..]].concat()),
    );
    write(
        &root,
        "intercept_body",
        "req_bomb",
        &ib(0b0000_0010, &[], &bomb),
    );
    write(
        &root,
        "intercept_body",
        "resp_truncated",
        &ib(0b0001_0001, &[3], &small[..small.len() - 2]),
    );

    // config_and_manifest: configs and manifests as an operator writes them.
    let minimal = "tls:\n  cert: s.crt\n  key: s.key\n  client_ca: ca.crt\nupstream:\n  address: http://127.0.0.1:50051\n";
    write(
        &root,
        "config_and_manifest",
        "config_minimal",
        minimal.as_bytes(),
    );
    write(
        &root,
        "config_and_manifest",
        "config_full",
        br#"listen: 0.0.0.0:8443
admin_listen: "off"
management_listen: 127.0.0.1:9443
tls:
  cert: /etc/aesp/tls/tls.crt
  key: /etc/aesp/tls/tls.key
  client_ca: ca.crt
  handshake_timeout_ms: 5000
upstream:
  address: https://host.local:50051
  ca: host-ca.crt
  cert: c.crt
  key: c.key
  server_name: host.local
  connections: 4
  connect_timeout_ms: 100
identity:
  trust_domain: aesp.local
  organization_id: org-1
  overwrite_identity_fields: true
  subjects:
    - { subject_cn: alice, principal: alice, tenant: acme }
    - { dns_san: rt.local, principal: rt1, tenant: acme, kind: runtime }
runtime:
  security_zone: pci
  deployment_environment: PROD
limits:
  max_message_bytes: 4194304
  max_concurrent_streams: 100
  max_pending_accept_reset_streams: 20
  max_local_error_reset_streams: 100
  max_header_list_size: 16384
  initial_stream_window_size: 65535
  initial_connection_window_size: 1048576
  max_send_buf_size: 1048576
  keep_alive_interval_seconds: 0
  keep_alive_timeout_seconds: 10
  max_connections: 100
  request_read_timeout_ms: 1000
passthrough: ["/grpc.health.v1.Health/Check"]
shutdown_grace_seconds: 5
"#,
    );
    write(
        &root,
        "config_and_manifest",
        "config_anchors",
        b"base: &b\n  cert: a\ntls: *b\n",
    );
    write(
        &root,
        "config_and_manifest",
        "manifest_example",
        aesp_sidecar::adm::EXAMPLE_MANIFEST.as_bytes(),
    );
    write(
        &root,
        "config_and_manifest",
        "manifest_json",
        br#"{"manifest_version":"1.0.0","contracts":[{"name":"f","description":"d","parameters":{"type":"OBJECT","properties":{"x":{"type":"ARRAY","items":{"type":"STRING","enum":["a"]}}},"required":["x"]}}]}"#,
    );
    write(
        &root,
        "config_and_manifest",
        "manifest_bad_type",
        b"manifest_version: \"1.0.0\"\ncontracts:\n  - name: add\n    description: d\n    parameters: { type: OBJECT, properties: { b: { type: FLOAT } } }\n",
    );
    certificate_identity(&root);
    println!("seeds written under {}", root.display());
}

/// certificate_identity: `[mode][...]` (see the target's header for each mode).
fn certificate_identity(root: &Path) {
    let t = "certificate_identity";
    let with_mode = |mode: u8, rest: &[u8]| [&[mode][..], rest].concat();
    // Mode 0: real certificates of the dev CA as DER.
    let ca = aesp_sidecar::demo::certs::Ca::new("seed CA").unwrap();
    let der = |pem: String| {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    };
    let leaves = [
        ("der_alice", ca.workload("acme", "client", "alice").unwrap()),
        (
            "der_runtime",
            ca.workload("acme", "runtime", "acme-runtime-1").unwrap(),
        ),
        ("der_cn_only", ca.issue("alice-cn", None, &[], &[]).unwrap()),
        (
            "der_dns",
            ca.issue("nobody", None, &["rt.local"], &[]).unwrap(),
        ),
        (
            "der_dotdot",
            ca.issue(
                "x",
                Some("spiffe://aesp.local/tenant/../client/alice"),
                &[],
                &[],
            )
            .unwrap(),
        ),
    ];
    for (name, leaf) in leaves {
        write(root, t, name, &with_mode(0, &der(leaf.cert_pem)));
    }
    // Mode 1: [td][0xff][uri].
    for (name, td, uri) in [
        (
            "uri_ok",
            "aesp.local",
            "spiffe://aesp.local/tenant/acme/client/alice",
        ),
        (
            "uri_upper_scheme",
            "aesp.local",
            "SPIFFE://aesp.local/tenant/acme/client/alice",
        ),
        (
            "uri_dotdot",
            "aesp.local",
            "spiffe://aesp.local/tenant/../client/..",
        ),
        (
            "uri_trailing_slash",
            "aesp.local",
            "spiffe://aesp.local/tenant/acme/client/alice/",
        ),
        (
            "uri_other_td",
            "aesp.local",
            "spiffe://evil.local/tenant/acme/client/alice",
        ),
        ("uri_no_path", "aesp.local", "spiffe://aesp.local"),
        (
            "uri_query",
            "aesp.local",
            "spiffe://aesp.local/tenant/acme/client/alice?x=1",
        ),
        (
            "uri_td_with_slash",
            "a/b",
            "spiffe://a/b/tenant/acme/client/alice",
        ),
    ] {
        write(
            root,
            t,
            name,
            &with_mode(1, &[td.as_bytes(), uri.as_bytes()].join(&0xff)),
        );
    }
    // Mode 2: [td][0xff][tenant][0xff][kind][0xff][name], as bytes.
    for (name, segs) in [
        (
            "segs_ok",
            &["aesp.local", "acme", "runtime", "acme-runtime-1"],
        ),
        ("segs_empty", &["aesp.local", "", "client", "alice"]),
        (
            "segs_long",
            &["aesp.local", &"x".repeat(129), "client", "alice"],
        ),
    ] {
        write(
            root,
            t,
            name,
            &with_mode(2, &segs.map(str::as_bytes).join(&0xff)),
        );
    }
    // Mode 3: [which][cut][(offset hi, lo, xor)...].
    write(root, t, "mutate_none", &with_mode(3, &[0, 0]));
    write(
        root,
        t,
        "mutate_flip",
        &with_mode(3, &[1, 0, 0x01, 0x10, 0x20]),
    );
    write(root, t, "mutate_cut", &with_mode(3, &[2, 200]));
    // Mode 4: [cn][0xff][type][string]...: 0 URI as is, 1 spiffe://…, 2 spiffe://aesp.local/tenant/…, 3 DNS.
    let made = |cn: &str, sans: &[(u8, &str)]| {
        let mut v = vec![4u8];
        v.extend_from_slice(cn.as_bytes());
        for (k, s) in sans {
            v.push(0xff);
            v.push(*k);
            v.extend_from_slice(s.as_bytes());
        }
        v
    };
    write(
        root,
        t,
        "made_spiffe",
        &made("x", &[(2, "acme/client/alice")]),
    );
    write(
        root,
        t,
        "made_two_spiffe",
        &made("x", &[(2, "acme/client/alice"), (2, "globex/client/bob")]),
    );
    write(
        root,
        t,
        "made_upper_and_lower",
        &made(
            "x",
            &[
                (0, "SPIFFE://aesp.local/tenant/globex/client/bob"),
                (2, "acme/client/alice"),
            ],
        ),
    );
    write(
        root,
        t,
        "made_cn_mapping",
        &made("alice-cn", &[(0, "https://example.com/"), (3, "x.local")]),
    );
    write(
        root,
        t,
        "made_dns_mapping",
        &made("nobody", &[(3, "rt.local")]),
    );
    write(
        root,
        t,
        "made_other_td",
        &made("x", &[(1, "evil.local/tenant/acme/client/alice")]),
    );
}

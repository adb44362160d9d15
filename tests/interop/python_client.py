"""A base GRID client in another gRPC stack (Python grpcio, C-core/BoringSSL) against the
sidecar: mTLS 1.3, unary and streaming calls, gzip, and the rich error model.

Usage: python_client.py CERT_DIR PORT   (stubs generated into the working directory)
Exits non-zero on the first failed expectation.
"""
import sys

import grpc
from google.protobuf import struct_pb2

from altar.aesp.v1 import aesp_pb2
from altar.grid.v1 import grid_pb2, grid_pb2_grpc
from google.rpc import status_pb2

ENTERPRISE_ERROR = "type.googleapis.com/altar.aesp.v1.EnterpriseError"


def enterprise_error(err):
    md = dict(err.trailing_metadata() or ())
    assert "grpc-status-details-bin" in md, f"no grpc-status-details-bin in {md}"
    st = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    assert st.details and st.details[0].type_url == ENTERPRISE_ERROR, st
    ee = aesp_pb2.EnterpriseError()
    st.details[0].Unpack(ee)
    assert ee.correlation_id, ee
    return ee


def main(cert_dir, port):
    read = lambda f: open(f"{cert_dir}/{f}", "rb").read()
    tls = grpc.ssl_channel_credentials(
        root_certificates=read("ca.crt"), private_key=read("acme.key"), certificate_chain=read("acme.crt")
    )
    # The bearer token of alice@acme, sent by grpcio's own call credentials.
    token = read("acme.jwt").decode().strip()
    creds = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))
    ch = grpc.secure_channel(f"localhost:{port}", creds)
    stub = grid_pb2_grpc.GridHostStub(ch)

    # Without a token, or with a forged one, nothing passes.
    for bad_creds, want in [
        (tls, "AUTHENTICATION_REQUIRED"),
        (grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token[:-4] + "AAAA")), "INVALID_CREDENTIALS"),
    ]:
        try:
            grid_pb2_grpc.GridHostStub(grpc.secure_channel(f"localhost:{port}", bad_creds)).CreateSession(
                grid_pb2.CreateSession(), timeout=10
            )
            raise AssertionError(f"{want}: the call was allowed")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
            assert enterprise_error(e).code == want, enterprise_error(e)

    ack = stub.CreateSession(grid_pb2.CreateSession(ttl_seconds=60), timeout=10)
    assert ack.session_id and not ack.HasField("error"), ack

    args = struct_pb2.Struct()
    args.update({"text": "from python"})
    res = stub.ExecuteTool(
        grid_pb2.ToolCall(session_id=ack.session_id, function_call={"name": "echo", "args": args}, correlation_id="py-1"),
        timeout=10,
    )
    assert res.status == grid_pb2.SUCCESS, res
    assert res.payload.content.struct_value.fields["text"].string_value == "from python", res
    assert res.correlation_id == "py-1", res

    # The same call compressed with gzip.
    res = stub.ExecuteTool(
        grid_pb2.ToolCall(session_id=ack.session_id, function_call={"name": "echo", "args": args}),
        compression=grpc.Compression.Gzip,
        timeout=10,
    )
    assert res.payload.content.struct_value.fields["text"].string_value == "from python", res

    # A tool error, read as the base Error and as the EnterpriseError view of the same bytes.
    res = stub.ExecuteTool(grid_pb2.ToolCall(session_id=ack.session_id, function_call={"name": "fail"}), timeout=10)
    assert res.status == grid_pb2.ERROR and res.error_details.code == "TOOL_ERROR", res
    as_enterprise = ch.unary_unary(
        "/altar.grid.v1.GridHost/ExecuteTool",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=aesp_pb2.EnterpriseToolResult.FromString,
    )
    er = as_enterprise(grid_pb2.ToolCall(session_id=ack.session_id, function_call={"name": "fail"}), timeout=10)
    assert er.error_details.code == "TOOL_ERROR" and er.error_details.correlation_id, er

    # Streaming.
    n = struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=3)})
    chunks = list(stub.ExecuteToolStream(grid_pb2.ToolCall(session_id=ack.session_id, function_call={"name": "count", "args": n}), timeout=10))
    assert [c.chunk_id for c in chunks] == [0, 1, 2] and chunks[-1].is_final, chunks

    # Denials made by the sidecar.
    try:
        stub.CreateSession(grid_pb2.CreateSession(security_context=grid_pb2.SecurityContext(tenant_id="globex")), timeout=10)
        raise AssertionError("identity mismatch was allowed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        assert enterprise_error(e).code == "IDENTITY_MISMATCH"
    try:
        ch.unary_unary("/altar.grid.v1.GridHost/Nope")(b"", timeout=10)
        raise AssertionError("an unknown method was allowed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
        assert enterprise_error(e).code == "METHOD_NOT_ALLOWED"
    try:
        ch.unary_unary("/altar.grid.v1.GridHost/CreateSession")(b"\x0a\x05\x01", timeout=10)
        raise AssertionError("a malformed message was allowed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert enterprise_error(e).code == "MALFORMED_MESSAGE"
    print("python grpcio interop: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Independent verifier of an aesp-sidecar audit log export (JSON lines).

Written from docs/audit-format.md alone (not from the Rust code), so that it checks the
document: canonical bytes, SHA-256 chain hash, Ed25519 signature over the hash, gap-free
sequence, prev_hash links, key introduction (AUDIT_KEY_ADDED / AUDIT_KEY_ROTATED), pinned
keys, and signed checkpoints (including "a checkpoint beyond the last record = tail cut").

Usage:
  verify_audit.py EXPORT.jsonl [--pubkey PUBKEY.pem] [--checkpoints MORE.jsonl ...]
  verify_audit.py --self-test

Output: one line.  `OK <n> records, head <hex>, ...` and exit 0; or
`FAILED at sequence N: <kind>: <detail>` and exit 1 on the first fault.  Usage or I/O
errors (unreadable file, no key in the PEM file) exit 2.

N is the sequence number at which the log stops being valid: the record's own sequence for
a fault in a record, the first missing sequence for a gap or a cut tail, the expected
sequence where records arrive out of order, the checkpoint's sequence for a bad checkpoint.

Kinds: malformed, gap, reordered, duplicated, modified record, broken link,
bad key introduction, unknown key, bad signature, bad checkpoint, tail truncated.

Only the standard library and `cryptography` are used.
"""
import argparse
import hashlib
import json
import re
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RECORD_MAGIC = b"AESP-AUDIT-RECORD-1\x00"  # 19 ASCII bytes + NUL = 20 bytes
CHECKPOINT_MAGIC = b"AESP-AUDIT-CHECKPOINT-1\x00"  # 23 ASCII bytes + NUL = 24 bytes
ZERO_HASH = bytes(32)
U64_MAX = (1 << 64) - 1

STRING_FIELDS = (
    "event_type", "decision", "principal_id", "tenant_id", "method", "tool_name",
    "session_id", "correlation_id", "invocation_id", "reason_code",
)
RECORD_FIELDS = frozenset(
    ("type", "sequence", "timestamp_unix_nanos", "matched_policies", "attributes",
     "prev_hash", "hash", "signature", "key_id") + STRING_FIELDS
)
CHECKPOINT_FIELDS = frozenset(
    ("type", "sequence", "head_hash", "timestamp_unix_nanos", "key_id", "signature")
)
KEY_EVENTS = ("AUDIT_KEY_ADDED", "AUDIT_KEY_ROTATED")
HEX_RE = re.compile(r"\A(?:[0-9a-f]{2})*\Z")
PEM_RE = re.compile(
    r"-----BEGIN PUBLIC KEY-----\r?\n.*?-----END PUBLIC KEY-----", re.DOTALL
)
KEY_ID_RE = re.compile(r"\bed25519:[0-9a-fA-F]{16}\b")


class Fault(Exception):
    def __init__(self, sequence, kind, detail):
        super().__init__(f"FAILED at sequence {sequence}: {kind}: {detail}")
        self.sequence, self.kind, self.detail = sequence, kind, detail


class Malformed(ValueError):
    pass


# ---------------------------------------------------------------- encoding (the document)

def enc_u64(n):
    return struct.pack(">Q", n)


def enc_u32(n):
    return struct.pack(">I", n)


def enc_str(s):
    b = s.encode("utf-8")  # strict: a lone surrogate is not a valid string
    return enc_u32(len(b)) + b


def key_id_of(raw_public_key):
    return "ed25519:" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def raw_public(pk):
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def record_canonical_bytes(r):
    out = [RECORD_MAGIC, enc_u64(r["sequence"]), enc_u64(r["timestamp_unix_nanos"])]
    out += [enc_str(r[f]) for f in STRING_FIELDS]
    out.append(enc_u32(len(r["matched_policies"])))
    out += [enc_str(p) for p in r["matched_policies"]]
    attrs = sorted(r["attributes"].items(), key=lambda kv: kv[0].encode("utf-8"))
    out.append(enc_u32(len(attrs)))
    for k, v in attrs:
        out += [enc_str(k), enc_str(v)]
    out.append(enc_str(r["key_id"]))
    return b"".join(out)


def record_hash(prev_hash, canonical):
    return hashlib.sha256(prev_hash + canonical).digest()


def checkpoint_signed_bytes(c):
    return b"".join([
        CHECKPOINT_MAGIC,
        enc_u64(c["sequence"]),
        enc_u32(32), c["head_hash"],
        enc_u64(c["timestamp_unix_nanos"]),
        enc_str(c["key_id"]),
    ])


def verify_sig(pk, sig, msg):
    try:
        pk.verify(sig, msg)
        return True
    except InvalidSignature:
        return False


# ---------------------------------------------------------------- parsing the export

def _no_float(s):
    raise Malformed(f"non-integer number {s!r}")


def _no_constant(s):
    raise Malformed(f"non-JSON constant {s}")


def _no_dup(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise Malformed(f"duplicate JSON key {k!r}")
        d[k] = v
    return d


def parse_json_line(line):
    try:
        return json.loads(line, parse_float=_no_float, parse_constant=_no_constant,
                          object_pairs_hook=_no_dup)
    except Malformed:
        raise
    except ValueError as e:
        raise Malformed(f"not JSON: {e}") from None


def _u64(obj, name):
    v = obj.get(name)
    if type(v) is not int or not 0 <= v <= U64_MAX:
        raise Malformed(f"{name} is not a u64: {v!r}")
    return v


def _string(obj, name):
    v = obj.get(name, "")  # an absent field is the empty string
    if type(v) is not str:
        raise Malformed(f"{name} is not a string: {v!r}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{name} is not valid UTF-8 text") from None
    return v


def _hex(obj, name, length):
    v = obj.get(name)
    if type(v) is not str or not HEX_RE.match(v):
        raise Malformed(f"{name} is not lower-case hex: {v!r}")
    b = bytes.fromhex(v)
    if len(b) != length:
        raise Malformed(f"{name} has {len(b)} bytes, not {length}")
    return b


def parse_record(obj):
    extra = set(obj) - RECORD_FIELDS
    if extra:
        raise Malformed(f"unknown (unsigned) fields in a record: {sorted(extra)}")
    r = {"sequence": _u64(obj, "sequence"),
         "timestamp_unix_nanos": _u64(obj, "timestamp_unix_nanos")}
    for f in STRING_FIELDS + ("key_id",):
        r[f] = _string(obj, f)
    mp = obj.get("matched_policies", [])
    if type(mp) is not list:
        raise Malformed(f"matched_policies is not a list: {mp!r}")
    r["matched_policies"] = [_string({"p": p}, "p") for p in mp]
    at = obj.get("attributes", {})
    if type(at) is not dict:
        raise Malformed(f"attributes is not an object: {at!r}")
    r["attributes"] = {_string({"k": k}, "k"): _string({"v": v}, "v") for k, v in at.items()}
    r["prev_hash"] = _hex(obj, "prev_hash", 32)
    r["hash"] = _hex(obj, "hash", 32)
    r["signature"] = _hex(obj, "signature", 64)
    return r


def parse_checkpoint(obj):
    extra = set(obj) - CHECKPOINT_FIELDS
    if extra:
        raise Malformed(f"unknown (unsigned) fields in a checkpoint: {sorted(extra)}")
    return {
        "sequence": _u64(obj, "sequence"),
        "head_hash": _hex(obj, "head_hash", 32),
        "timestamp_unix_nanos": _u64(obj, "timestamp_unix_nanos"),
        "key_id": _string(obj, "key_id"),
        "signature": _hex(obj, "signature", 64),
    }


def read_export(lines):
    """Returns (records, checkpoints): records is a list of (line_no, parsed record or a
    Malformed), checkpoints a list of (line_no, parsed checkpoint or a Malformed)."""
    records, checkpoints = [], []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = parse_json_line(line)
            if type(obj) is not dict:
                raise Malformed("a line is not a JSON object")
            t = obj.get("type")
        except Malformed as e:
            records.append((no, e))
            continue
        if t == "record":
            try:
                records.append((no, parse_record(obj)))
            except Malformed as e:
                records.append((no, e))
        elif t == "checkpoint":
            try:
                checkpoints.append((no, parse_checkpoint(obj)))
            except Malformed as e:
                checkpoints.append((no, e))
        else:
            records.append((no, Malformed(f"unknown line type {t!r}")))
    return records, checkpoints


# ---------------------------------------------------------------- pinned keys

def load_pinned(text):
    """All PUBLIC KEY PEM blocks of `text` -> {key_id: raw 32 bytes}.  Other text (such as
    the key id line `aesp audit pubkey` prints) is ignored, but a key id written there must
    be one of the blocks' (else a warning)."""
    pinned = {}
    for block in PEM_RE.findall(text):
        pk = serialization.load_pem_public_key(block.encode("ascii"))
        if not isinstance(pk, Ed25519PublicKey):
            raise ValueError(f"a PUBLIC KEY block is not Ed25519 but {type(pk).__name__}")
        raw = raw_public(pk)
        pinned[key_id_of(raw)] = raw
    if not pinned:
        raise ValueError("no PUBLIC KEY block")
    for kid in KEY_ID_RE.findall(PEM_RE.sub("", text)):
        if kid not in pinned:
            print(f"warning: the key file names {kid}, which is none of its PEM keys "
                  f"({', '.join(sorted(pinned))})", file=sys.stderr)
    return pinned


# ---------------------------------------------------------------- verification

def verify(records, checkpoints, pinned=None):
    """Raises Fault on the first fault; returns a summary dict on success."""
    present = {r["sequence"]: i for i, (_, r) in enumerate(records) if isinstance(r, dict)}
    seen = {}  # sequence -> hash of the verified records
    keys = {}  # key_id -> Ed25519PublicKey, as the chain introduces them
    raw_keys = {}
    expected, prev = 1, ZERO_HASH
    for idx, (line_no, r) in enumerate(records):
        if isinstance(r, Malformed):
            raise Fault(expected, "malformed", f"line {line_no}: {r}")
        seq = r["sequence"]
        # 1. sequence
        if seq > expected:
            later = present.get(expected)
            if later is not None and later > idx:
                raise Fault(expected, "reordered",
                            f"line {line_no}: record {seq} where {expected} was expected; "
                            f"record {expected} comes later (line {records[later][0]})")
            raise Fault(expected, "gap",
                        f"line {line_no}: record {seq} follows record {expected - 1}; "
                        f"record(s) {expected}..{seq - 1} missing")
        if seq < expected:
            if seen.get(seq) == r["hash"]:
                raise Fault(expected, "duplicated",
                            f"line {line_no}: record {seq} again where {expected} was expected")
            raise Fault(expected, "reordered",
                        f"line {line_no}: record {seq} where {expected} was expected")
        # 2. hash over prev_hash || canonical bytes
        try:
            canonical = record_canonical_bytes(r)
        except (UnicodeEncodeError, struct.error) as e:
            raise Fault(seq, "malformed", f"line {line_no}: {e}") from None
        h = record_hash(r["prev_hash"], canonical)
        if h != r["hash"]:
            raise Fault(seq, "modified record",
                        f"line {line_no}: SHA-256(prev_hash || canonical bytes) = {h.hex()}, "
                        f"the record says {r['hash'].hex()}")
        # 3. link
        if r["prev_hash"] != prev:
            raise Fault(seq, "broken link",
                        f"line {line_no}: prev_hash {r['prev_hash'].hex()} is not the hash "
                        f"of record {seq - 1} ({prev.hex()})")
        # 4. key introduction
        if r["event_type"] in KEY_EVENTS:
            pub_hex = r["attributes"].get("public_key")
            if pub_hex is None or not HEX_RE.match(pub_hex) or len(pub_hex) != 64:
                raise Fault(seq, "bad key introduction",
                            f"line {line_no}: {r['event_type']} without a 32-byte lower-case "
                            f"hex public_key attribute ({pub_hex!r})")
            raw = bytes.fromhex(pub_hex)
            kid = key_id_of(raw)
            if kid != r["key_id"]:
                raise Fault(seq, "bad key introduction",
                            f"line {line_no}: public_key has key id {kid}, the record's "
                            f"key_id is {r['key_id']}")
            if r["event_type"] == "AUDIT_KEY_ROTATED" and "previous_key_id" not in r["attributes"]:
                raise Fault(seq, "bad key introduction",
                            f"line {line_no}: AUDIT_KEY_ROTATED without previous_key_id")
            if kid in raw_keys and raw_keys[kid] != raw:
                raise Fault(seq, "bad key introduction",
                            f"line {line_no}: a different key with the known key id {kid}")
            if pinned is not None and pinned.get(kid) != raw:
                raise Fault(seq, "unknown key",
                            f"line {line_no}: {r['event_type']} introduces {kid}, which is not "
                            f"a pinned key ({', '.join(sorted(pinned))})")
            try:
                keys[kid] = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as e:
                raise Fault(seq, "bad key introduction", f"line {line_no}: {e}") from None
            raw_keys[kid] = raw
        # 5. signature
        pk = keys.get(r["key_id"])
        if pk is None:
            how = "no earlier record introduced it" if pinned is None or r["key_id"] in pinned \
                else "it is not pinned and no earlier record introduced it"
            raise Fault(seq, "unknown key", f"line {line_no}: signed by {r['key_id']}: {how}")
        if not verify_sig(pk, r["signature"], h):
            raise Fault(seq, "bad signature",
                        f"line {line_no}: the signature does not verify over the hash with "
                        f"{r['key_id']}")
        seen[seq] = h
        prev = h
        expected = seq + 1
    last = expected - 1

    # Checkpoints: a known key, a valid signature, within the log, over the right head.
    n_cp = 0
    for line_no, c in checkpoints:
        if isinstance(c, Malformed):
            raise Fault(last + 1, "malformed", f"checkpoint at line {line_no}: {c}")
        seq = c["sequence"]
        pk = keys.get(c["key_id"])
        if pk is None and pinned is not None and c["key_id"] in pinned:
            # a pinned key is known even if the records that introduced it were cut
            pk = Ed25519PublicKey.from_public_bytes(pinned[c["key_id"]])
        if pk is None:
            beyond = (f"; it is beyond the last record ({last}): a cut tail (that held the key's "
                      f"introduction) or a forged checkpoint; pin the keys to tell") if seq > last else ""
            raise Fault(seq, "bad checkpoint",
                        f"line {line_no}: signed by the unknown key {c['key_id']}{beyond}")
        if not verify_sig(pk, c["signature"], checkpoint_signed_bytes(c)):
            raise Fault(seq, "bad checkpoint",
                        f"line {line_no}: the signature does not verify with {c['key_id']}")
        if seq > last:
            raise Fault(last + 1, "tail truncated",
                        f"line {line_no}: a valid checkpoint of sequence {seq} (head "
                        f"{c['head_hash'].hex()}) but the last record is {last}: "
                        f"record(s) {last + 1}..{seq} cut")
        if seq not in seen or seen[seq] != c["head_hash"]:
            raise Fault(seq, "bad checkpoint",
                        f"line {line_no}: head_hash {c['head_hash'].hex()} is not the hash of "
                        f"record {seq} ({seen[seq].hex() if seq in seen else 'no such record'})")
        n_cp += 1
    return {"records": last, "head": prev.hex(), "checkpoints": n_cp,
            "keys": sorted(keys)}


# ---------------------------------------------------------------- self-test

EXAMPLE_CANONICAL_HEX = (
    "414553502d41554449542d5245434f52442d31000000000000000001187d794cdb21c0000000000f544f4f4c"
    "5f494e564f434154494f4e0000000444454e5900000005616c6963650000000461636d65000000232f616c74"
    "61722e677269642e76312e47726964486f73742f45786563757465546f6f6c0000000e62696c6c696e675f72"
    "6566756e6400000003732d3100000003632d310000000000000014415554484f52495a4154494f4e5f44454e"
    "494544000000000000000200000009706565725f6b696e6400000006636c69656e74000000057374616765"
    "0000000463616c6c00000018656432353531393a66653831326331326633616234636536"
)
EXAMPLE_HASH = "a89a4478306f2afda520916ec4947502832684d02a4418e3ec0bd2df31262c00"
EXAMPLE_SIG = ("394dd3b904febdfd31b9b72915f02ebd8f1f213326e850cabf8b7e7e98b9646c"
               "8601c990cff2afcc51d799b9ccae0f28c95e8724f71f07fd3a0c13d4fbb5240e")
EXAMPLE_PUB = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
EXAMPLE_KEY_ID = "ed25519:fe812c12f3ab4ce6"


def _blank(seq, key_id, **kw):
    r = {"sequence": seq, "timestamp_unix_nanos": 1764700000000000000 + seq,
         "matched_policies": [], "attributes": {}, "key_id": key_id}
    for f in STRING_FIELDS:
        r[f] = ""
    r.update(kw)
    return r


def _to_json(sk, prev, r):
    canonical = record_canonical_bytes(r)
    h = record_hash(prev, canonical)
    obj = {"type": "record", **r, "prev_hash": prev.hex(), "hash": h.hex(),
           "signature": sk.sign(h).hex()}
    return obj, h


def _checkpoint_json(sk, key_id, seq, head):
    c = {"sequence": seq, "head_hash": head, "timestamp_unix_nanos": 1764700000999999999,
         "key_id": key_id}
    return {"type": "checkpoint", "sequence": seq, "head_hash": head.hex(),
            "timestamp_unix_nanos": c["timestamp_unix_nanos"], "key_id": key_id,
            "signature": sk.sign(checkpoint_signed_bytes(c)).hex()}


def synthetic_log():
    """A small log written by the rules of the document (two keys, a rotation, checkpoints),
    to exercise this verifier's fault detection.  Returns (lines, pem of both keys, keys)."""
    sk1 = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    sk2 = Ed25519PrivateKey.from_private_bytes(b"\x08" * 32)
    raw1, raw2 = raw_public(sk1.public_key()), raw_public(sk2.public_key())
    k1, k2 = key_id_of(raw1), key_id_of(raw2)
    out, prev = [], ZERO_HASH
    specs = [
        (sk1, _blank(1, k1, event_type="AUDIT_KEY_ADDED", decision="INFO",
                     attributes={"public_key": raw1.hex()})),
        (sk1, _blank(2, k1, event_type="SIDECAR_STARTED", decision="INFO",
                     attributes={"version": "x", "config": "c", "audit_mode": "sync"})),
        (sk1, _blank(3, k1, event_type="TOOL_INVOCATION", decision="DENY", principal_id="alice",
                     tenant_id="acme", reason_code="AUTHORIZATION_DENIED",
                     matched_policies=["r1", "r2"],
                     attributes={"stage": "call", "peer_kind": "client", "détail": "é"})),
        (sk1, _blank(4, k1, event_type="SIDECAR_STOPPED", decision="INFO")),
        (sk2, _blank(5, k2, event_type="AUDIT_KEY_ROTATED", decision="INFO",
                     attributes={"public_key": raw2.hex(), "previous_key_id": k1})),
        (sk2, _blank(6, k2, event_type="SESSION_CREATE", decision="ALLOW", session_id="s-1")),
        (sk2, _blank(7, k2, event_type="TOOL_INVOCATION", decision="ALLOW")),
    ]
    for sk, r in specs:
        obj, h = _to_json(sk, prev, r)
        out.append(json.dumps(obj))
        if r["sequence"] == 4:
            out.append(json.dumps(_checkpoint_json(sk1, k1, 4, h)))
        if r["sequence"] == 7:
            out.append(json.dumps(_checkpoint_json(sk2, k2, 7, h)))
        prev = h
    pem = b"".join(
        pk.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for pk in (sk1.public_key(), sk2.public_key())).decode()
    return out, pem


def self_test():
    ok = True

    def check(cond, what):
        nonlocal ok
        print(("  ok    " if cond else "  FAIL  ") + what)
        ok = ok and cond

    print("worked example of docs/audit-format.md:")
    sk = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    raw = raw_public(sk.public_key())
    check(raw.hex() == EXAMPLE_PUB, f"public key from the seed 07*32 = {raw.hex()}")
    check(key_id_of(raw) == EXAMPLE_KEY_ID, f"key id = {key_id_of(raw)}")
    rec = _blank(1, key_id_of(raw), timestamp_unix_nanos=1764700000000000000,
                 event_type="TOOL_INVOCATION", decision="DENY", principal_id="alice",
                 tenant_id="acme", method="/altar.grid.v1.GridHost/ExecuteTool",
                 tool_name="billing_refund", session_id="s-1", correlation_id="c-1",
                 invocation_id="", reason_code="AUTHORIZATION_DENIED", matched_policies=[],
                 attributes={"stage": "call", "peer_kind": "client"})
    canonical = record_canonical_bytes(rec)
    check(canonical.hex() == EXAMPLE_CANONICAL_HEX, "canonical bytes equal the document's hex")
    check(canonical[:20] == RECORD_MAGIC, "record magic is the 20 bytes 'AESP-AUDIT-RECORD-1\\0'")
    h = record_hash(ZERO_HASH, canonical)
    check(h.hex() == EXAMPLE_HASH, f"hash = {h.hex()}")
    sig = bytes.fromhex(EXAMPLE_SIG)
    check(verify_sig(sk.public_key(), sig, h), "the document's signature verifies over the hash")
    check(sk.sign(h) == sig, "signing the hash with the seed gives the document's signature")
    check(not verify_sig(sk.public_key(), sig, canonical),
          "(the signature is over the hash, not the canonical bytes)")
    obj, _ = _to_json(sk, ZERO_HASH, dict(rec, event_type="AUDIT_KEY_ADDED", decision="INFO",
                                          attributes={"public_key": raw.hex()}))
    # the example record itself, as an export line, verifies with the example key pinned
    ex_line = json.dumps({"type": "record", **rec, "prev_hash": ZERO_HASH.hex(), "hash": h.hex(),
                          "signature": EXAMPLE_SIG})
    recs, cps = read_export([json.dumps(obj)])
    check(verify(recs, cps)["records"] == 1, "a one-record log with AUDIT_KEY_ADDED verifies")
    r = read_export([ex_line])[0][0][1]
    check(record_hash(r["prev_hash"], record_canonical_bytes(r)) == r["hash"],
          "the example as an export line re-hashes to the document's hash")

    print("this verifier against a synthetic log written by the document's rules:")
    lines, pem = synthetic_log()
    pinned = load_pinned(pem)

    def outcome(ls, pin=None):
        try:
            res = verify(*read_export(ls), pinned=pin)
            return ("OK", res["records"])
        except Fault as f:
            return (f.kind, f.sequence)

    check(outcome(lines) == ("OK", 7), "the log verifies (keys from the chain)")
    check(outcome(lines, pinned) == ("OK", 7), "the log verifies (both keys pinned)")
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    check(outcome(lines, load_pinned(other)) == ("unknown key", 1), "another pinned key: unknown key at 1")
    check(outcome(lines, load_pinned(pem.split("-----END PUBLIC KEY-----")[0] + "-----END PUBLIC KEY-----\n"))
          == ("unknown key", 5), "only the first key pinned: unknown key at the rotation (5)")

    def edit(i, **kw):
        ls = list(lines)
        o = json.loads(ls[i])
        o.update(kw)
        ls[i] = json.dumps(o)
        return ls

    check(outcome(edit(2, decision="ALLOW")) == ("modified record", 3), "a field changed: modified record at 3")
    check(outcome(edit(2, attributes={"stage": "call", "peer_kind": "client", "détail": "e"}))
          == ("modified record", 3), "an attribute changed: modified record at 3")
    check(outcome(lines[:2] + lines[3:]) == ("gap", 3), "record 3 deleted: gap at 3")
    check(outcome(lines[:1] + [lines[2], lines[1]] + lines[3:]) == ("reordered", 2),
          "records 2 and 3 swapped: reordered at 2")
    check(outcome(lines[:3] + [lines[2]] + lines[3:]) == ("duplicated", 4),
          "record 3 twice: duplicated at 4")
    check(outcome(lines[:7] + lines[8:]) == ("tail truncated", 7),
          "record 7 cut, its checkpoint kept: tail truncated at 7")
    check(outcome(lines[:5] + lines[8:], pinned) == ("tail truncated", 5),
          "records 5..7 cut (the rotation too), the checkpoint of 7 kept, keys pinned: "
          "tail truncated at 5")
    check(outcome(lines[:5]) == ("OK", 4), "records 5..7 and their checkpoint cut: undetectable (OK 4)")
    check(outcome(lines[:5] + lines[8:], None) == ("bad checkpoint", 7),
          "same, keys not pinned: the checkpoint of 7 has an "
          "unknown key: bad checkpoint at 7")
    bad_sig = json.loads(lines[2])
    bad_sig["signature"] = ("00" if bad_sig["signature"][:2] != "00" else "01") + bad_sig["signature"][2:]
    check(outcome(lines[:2] + [json.dumps(bad_sig)] + lines[3:]) == ("bad signature", 3),
          "a signature changed: bad signature at 3")
    # re-sign record 3 with an unknown key (hash recomputed): unknown key
    evil = Ed25519PrivateKey.generate()
    r3 = read_export([lines[2]])[0][0][1]
    r3["key_id"] = key_id_of(raw_public(evil.public_key()))
    o3, _ = _to_json(evil, r3["prev_hash"], {k: r3[k] for k in r3 if k not in ("prev_hash", "hash", "signature")})
    check(outcome(lines[:2] + [json.dumps(o3)] + lines[3:]) == ("unknown key", 3),
          "record 3 re-signed by another key: unknown key at 3")
    # record 2 changed and re-signed with the real key (a key-holder's rewrite): the link
    # of record 3 breaks
    r2 = read_export([lines[1]])[0][0][1]
    r2["decision"] = "DENY"
    o2, _ = _to_json(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32), r2["prev_hash"],
                     {k: r2[k] for k in r2 if k not in ("prev_hash", "hash", "signature")})
    check(outcome(lines[:1] + [json.dumps(o2)] + lines[2:]) == ("broken link", 3),
          "record 2 rewritten and re-signed by its key: broken link at 3")
    cp = json.loads(lines[4])
    cp["head_hash"] = json.loads(lines[1])["hash"]
    check(outcome(lines[:4] + [json.dumps(cp)] + lines[5:]) == ("bad checkpoint", 4),
          "a checkpoint's head_hash changed: bad checkpoint at 4")
    forged = _checkpoint_json(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32),
                              json.loads(lines[0])["key_id"], 4, bytes(range(32)))
    check(outcome(lines[:4] + [json.dumps(forged)] + lines[5:]) == ("bad checkpoint", 4),
          "a checkpoint signed by the real key over another head (a fork): bad checkpoint at 4")
    check(outcome(edit(0, sequence=1.0)) == ("malformed", 1), "a float sequence: malformed")
    check(outcome([lines[0].replace('"type": "record"', '"type": "record", "extra": 1')])
          == ("malformed", 1), "an unsigned extra field: malformed")
    big = _blank(U64_MAX, "k", timestamp_unix_nanos=U64_MAX)
    check(record_canonical_bytes(big)[20:36] == b"\xff" * 16, "u64 fields up to 2^64-1 encode exactly")
    print("self-test " + ("passed" if ok else "FAILED"))
    return ok


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", nargs="?", help="the JSON-lines export of `aesp audit export`")
    ap.add_argument("--pubkey", help="PEM file with one or more PUBLIC KEY blocks: accept only those keys")
    ap.add_argument("--checkpoints", action="append", default=[],
                    help="more checkpoint lines kept apart from the export (JSON lines); repeatable")
    ap.add_argument("--self-test", action="store_true", help="check the document's worked example")
    a = ap.parse_args(argv)
    if a.self_test:
        return 0 if self_test() else 1
    if not a.export:
        ap.error("EXPORT.jsonl is required (or --self-test)")
    try:
        with open(a.export, encoding="utf-8") as f:
            lines = f.read().split("\n")
        pinned = None
        if a.pubkey:
            with open(a.pubkey, encoding="utf-8") as f:
                pinned = load_pinned(f.read())
        extra = []
        for path in a.checkpoints:
            with open(path, encoding="utf-8") as f:
                extra += f.read().split("\n")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records, checkpoints = read_export(lines)
    if extra:
        more_records, more_cps = read_export(extra)
        if more_records:
            print(f"error: {a.checkpoints}: only checkpoint lines are accepted there", file=sys.stderr)
            return 2
        checkpoints += more_cps
    try:
        res = verify(records, checkpoints, pinned)
    except Fault as f:
        print(f)
        return 1
    if res["records"] == 0:
        print("FAILED at sequence 1: gap: the export holds no record (a log starts with AUDIT_KEY_ADDED)")
        return 1
    print(f"OK {res['records']} records, head {res['head']}, {res['checkpoints']} checkpoints, "
          f"keys {' '.join(res['keys'])}" + (" (pinned)" if pinned else " (from the chain, not pinned)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

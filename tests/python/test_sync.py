"""The hub's keygate.sync.v1 Watch call, read by grpcio instead of tonic.

The hub writes the gRPC framing of its answers itself (a full snapshot is sent from its one copy
of the document, in pieces as HTTP/2 flow control takes them), so its wire format is checked
here with another implementation: gRPC's C core, through Python's grpcio. The messages are read
with a small protobuf reader (the proto is keygate's own; no generated code is needed).

Run by scripts/test after `cargo build`: python3 -m unittest discover -s tests/python -v
Needs: pip install grpcio
"""

import hashlib
import json
import os
import tempfile
import unittest

import grpc

from test_ext_authz import free_port, mint, serve_until_ready

TOKEN = "sync-token-for-the-test"
WATCH = "/keygate.sync.v1.Sync/Watch"


def varint(buf, i):
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def fields(buf):
    """{field number: [values]} of a protobuf message (varints and length-delimited only)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = bytes(buf[i:i + n]), i + n
        else:
            raise AssertionError(f"wire type {wire} in {buf[:64]!r}")
        out.setdefault(number, []).append(value)
    return out


def watch_request(since_revision=0, client="python"):
    """A WatchRequest: since_revision = 1, client = 2."""
    out = bytearray()
    if since_revision:
        out += b"\x08" + encode_varint(since_revision)
    name = client.encode()
    out += b"\x12" + encode_varint(len(name)) + name
    return bytes(out)


def encode_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Hub(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.keys = [mint("sk_live_") for _ in range(2000)]
        doc = {
            "schema": "keygate.snapshot/v1", "revision": 3,
            "partners": [{"id": "partner_sync", "status": "active"}],
            "keys": [{
                "id": f"key_{i:04}",
                "hash": "sha256:" + hashlib.sha256(k.encode()).hexdigest(),
                "partner_id": "partner_sync", "environment": "live",
                "scopes": ["analyses:read"], "status": "active",
                "name": "a key with a name of some length",
            } for i, k in enumerate(cls.keys)],
        }
        snapshot = os.path.join(cls.dir.name, "keys.json")
        with open(snapshot, "w") as f:
            json.dump(doc, f)
        cls.document_bytes = os.path.getsize(snapshot)
        cls.sync_port, cls.admin_port = free_port(), free_port()
        config = os.path.join(cls.dir.name, "keygate.toml")
        with open(config, "w") as f:
            f.write(
                'environment = "live"\n'
                f'[snapshot]\npath = "{snapshot}"\n'
                f'[sync_server]\nlisten = "127.0.0.1:{cls.sync_port}"\n'
                'token_env = "SYNC_TOKEN"\nheartbeat_interval = "200ms"\n'
                f'[admin]\nlisten = "127.0.0.1:{cls.admin_port}"\n'
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE")}
        env["SYNC_TOKEN"] = TOKEN
        cls.log = open(os.path.join(cls.dir.name, "stderr.log"), "wb")
        cls.proc = serve_until_ready(config, cls.admin_port, env=env, log=cls.log)
        cls.addClassCleanup(lambda: cls.proc.poll() is None and cls.proc.kill())

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=20)
        cls.log.close()
        cls.dir.cleanup()

    def watch(self, request, metadata):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.sync_port}")
        self.addCleanup(channel.close)
        call = channel.unary_stream(
            WATCH, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return call(request, metadata=metadata, timeout=10)

    def test_a_full_snapshot_then_heartbeats(self):
        stream = self.watch(watch_request(), [("authorization", "Bearer " + TOKEN)])
        first = fields(next(stream))
        self.assertIn(1, first, "the first message is a Full")
        full = fields(first[1][0])
        self.assertEqual(full[1], [3], "its revision")
        document = json.loads(full[2][0])
        self.assertGreater(len(full[2][0]), 4 * 64 * 1024, "sent in many pieces")
        self.assertEqual(document["revision"], 3)
        self.assertEqual(len(document["keys"]), len(self.keys))
        self.assertEqual(document["keys"][1999]["id"], "key_1999")
        # Then heartbeats vouching for revision 3 (Heartbeat = 3: revision 1, interval_ms 2).
        beat = fields(next(stream))
        self.assertIn(3, beat, beat)
        heartbeat = fields(beat[3][0])
        self.assertEqual(heartbeat[1], [3])
        self.assertEqual(heartbeat[2], [200])
        stream.cancel()

    def test_a_caller_resuming_without_a_digest_gets_the_whole_document(self):
        # At revision 3 but without the digest of what it holds: the hub cannot vouch for it.
        stream = self.watch(watch_request(since_revision=3), [("authorization", "Bearer " + TOKEN)])
        first = fields(next(stream))
        self.assertIn(1, first, "no digest: a Full, not a heartbeat")
        stream.cancel()

    def test_without_the_token_the_call_is_refused(self):
        stream = self.watch(watch_request(), [("authorization", "Bearer wrong")])
        with self.assertRaises(grpc.RpcError) as refused:
            next(stream)
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_an_unknown_method_is_unimplemented(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.sync_port}")
        self.addCleanup(channel.close)
        call = channel.unary_unary(
            "/keygate.sync.v1.Sync/Nope", request_serializer=lambda b: b,
            response_deserializer=lambda b: b)
        with self.assertRaises(grpc.RpcError) as refused:
            call(b"", metadata=[("authorization", "Bearer " + TOKEN)], timeout=5)
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


if __name__ == "__main__":
    unittest.main()

"""Wire compatibility of keygate's ext_authz front with Envoy's published protos.

A Python grpcio client built from `xds-protos` (Envoy's own .proto files, compiled by their
publisher) calls the real keygate binary: the request fields Envoy sends, the allow mutations
(`append` and `append_action` both), the denied response, and grpc.health.v1.

Run by scripts/test after `cargo test` (which builds target/debug/keygate):
    python3 -m unittest discover -s tests/python -v
Needs: pip install grpcio grpcio-health-checking xds-protos
"""

import hashlib
import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.request
import unittest
import zlib

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("KEYGATE", os.path.join(ROOT, "target", "debug", "keygate"))
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62(n, width):
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = ALPHABET[r] + out
    return out.rjust(width, "0")


def mint(prefix):
    """A key in the contract's format: prefix + 32 base62 + CRC-32 checksum in base62."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(32))
    return prefix + body + base62(zlib.crc32((prefix + body).encode()), 6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_ready(config, admin_port, env=None, log=None):
    """Start `keygate serve --config config` (stdout and stderr to `log`, or inherited) and wait
    until /readyz on `admin_port` answers 200; kill it and raise if it does not within 15 s."""
    proc = subprocess.Popen([BINARY, "serve", "--config", config], stdout=log, stderr=log, env=env)
    deadline = time.time() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("keygate never became ready")
        time.sleep(0.05)


class ExtAuthzWire(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.key = mint("sk_live_")
        cls.revoked = mint("sk_live_")
        key_rec = lambda kid, k, status: {
            "id": kid, "hash": "sha256:" + hashlib.sha256(k.encode()).hexdigest(),
            "partner_id": "partner_acme", "environment": "live",
            "scopes": ["analyses:write", "analyses:read"], "status": status,
        }
        doc = {
            "schema": "keygate.snapshot/v1", "revision": 1,
            "partners": [{"id": "partner_acme", "org_id": "org_1", "status": "active"}],
            "keys": [key_rec("key_py", cls.key, "active"), key_rec("key_gone", cls.revoked, "revoked")],
        }
        snapshot = os.path.join(cls.dir.name, "keys.json")
        with open(snapshot, "w") as f:
            json.dump(doc, f)
        cls.port = free_port()
        config = os.path.join(cls.dir.name, "keygate.toml")
        with open(config, "w") as f:
            f.write(
                'environment = "live"\n'
                '[[key_prefixes]]\nprefix = "sk_live_"\nenvironment = "live"\n'
                f'[snapshot]\npath = "{snapshot}"\n'
                f'[ext_authz]\nlisten = "127.0.0.1:{cls.port}"\n'
                '[[routes.rule]]\nroute = "POST /v1/analyses"\nscopes = ["analyses:write"]\n'
                '[log]\nlevel = "warn"\n'
            )
        cls.proc = subprocess.Popen([BINARY, "serve", "--config", config])
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{cls.port}")
        deadline = time.time() + 15
        health = health_pb2_grpc.HealthStub(cls.channel)
        while True:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                raise RuntimeError("keygate ext_authz never became SERVING")
            time.sleep(0.05)
        cls.stub = eag.AuthorizationStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.proc.terminate()
        cls.proc.wait(timeout=15)
        cls.dir.cleanup()

    def check(self, method, path, headers):
        req = ea.CheckRequest(
            attributes=ac.AttributeContext(
                source=ac.AttributeContext.Peer(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address="10.1.2.3", port_value=51000)
                    )
                ),
                request=ac.AttributeContext.Request(
                    http=ac.AttributeContext.HttpRequest(
                        id="envoy-req-1", method=method, path=path, host="api.example.com:8443",
                        scheme="https", protocol="HTTP/1.1", headers=headers,
                    )
                ),
            )
        )
        return self.stub.Check(req, timeout=5)

    def test_allow_mutations(self):
        r = self.check("POST", "/v1/analyses?dry_run=1",
                       {"x-api-key": self.key, "x-partner-id": "evil", "x-request-id": "req-42"})
        self.assertEqual(r.status.code, 0)
        self.assertTrue(r.HasField("ok_response"))
        headers = {}
        for opt in r.ok_response.headers:
            self.assertTrue(opt.HasField("append"), opt.header.key)
            self.assertFalse(opt.append.value, opt.header.key)
            self.assertEqual(opt.append_action, base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
            headers[opt.header.key] = opt.header.value
        self.assertEqual(headers["x-partner-id"], "partner_acme")
        self.assertEqual(headers["x-org-id"], "org_1")
        self.assertEqual(headers["x-key-id"], "key_py")
        self.assertEqual(headers["x-key-environment"], "live")
        self.assertEqual(headers["x-scopes"], "analyses:read analyses:write")
        self.assertEqual(headers["x-request-id"], "req-42")
        self.assertEqual(list(r.ok_response.headers_to_remove), ["x-api-key"])
        added = {o.header.key: o.header.value for o in r.ok_response.response_headers_to_add}
        self.assertEqual(added, {"x-request-id": "req-42"})
        meta = r.dynamic_metadata.fields
        self.assertEqual(meta["partner_id"].string_value, "partner_acme")
        self.assertEqual(meta["key_id"].string_value, "key_py")
        self.assertEqual([v.string_value for v in meta["scopes"].list_value.values],
                         ["analyses:read", "analyses:write"])

    def test_denied_response(self):
        r = self.check("GET", "/v1/analyses/1", {"authorization": "Bearer " + self.revoked})
        self.assertEqual(r.status.code, 16)  # UNAUTHENTICATED
        self.assertTrue(r.HasField("denied_response"))
        self.assertEqual(r.denied_response.status.code, 401)
        body = json.loads(r.denied_response.body)
        self.assertEqual(body["error"]["code"], "key_revoked")
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertNotIn(self.revoked, r.denied_response.body)
        headers = {o.header.key: o.header.value for o in r.denied_response.headers}
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["www-authenticate"], 'Bearer realm="keygate", error="invalid_token"')
        self.assertEqual(headers["x-request-id"], body["error"]["request_id"])

    def test_scope_and_path(self):
        r = self.check("POST", "/v1/analyses", {"authorization": "Bearer " + mint("sk_test_")})
        self.assertEqual(r.status.code, 16)  # unknown prefix: invalid_api_key
        r = self.check("GET", "/v1/analyses%2F1", {"x-api-key": self.key})
        self.assertEqual(r.status.code, 3)  # INVALID_ARGUMENT
        self.assertEqual(json.loads(r.denied_response.body)["error"]["code"], "invalid_path")

    def test_raw_headers_and_a_large_body(self):
        """Envoy with encode_raw_headers (header_map, raw_value) and with_request_body sending
        6 MiB in raw_body: still a decision, never a gRPC error."""
        req = ea.CheckRequest(
            attributes=ac.AttributeContext(
                source=ac.AttributeContext.Peer(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address="::ffff:10.1.2.3")
                    )
                ),
                request=ac.AttributeContext.Request(
                    http=ac.AttributeContext.HttpRequest(
                        method="POST", path="/v1/analyses", host="api.example.com",
                        header_map=base_pb2.HeaderMap(headers=[
                            base_pb2.HeaderValue(key="x-api-key", raw_value=self.key.encode()),
                            base_pb2.HeaderValue(key="x-org-id", raw_value=b"org_evil"),
                        ]),
                        raw_body=b"x" * (6 << 20),
                    )
                ),
            )
        )
        r = self.stub.Check(req, timeout=10)
        self.assertEqual(r.status.code, 0)
        headers = {o.header.key: o.header.value for o in r.ok_response.headers}
        self.assertEqual(headers["x-org-id"], "org_1")
        self.assertEqual(list(r.ok_response.headers_to_remove), ["x-api-key"])

    def test_grpc_framing_through_grpcio(self):
        """Check is served below tonic: grpcio's framing must still be understood. Many Checks
        in flight on one channel each get their own answer (grpcio sends grpc-timeout on each);
        a gzip-compressed call is refused with UNIMPLEMENTED (keygate agreed to no compression);
        an unknown method of the service is UNIMPLEMENTED, not a CheckResponse."""
        futures = [
            self.stub.Check.future(ea.CheckRequest(attributes=ac.AttributeContext(
                request=ac.AttributeContext.Request(http=ac.AttributeContext.HttpRequest(
                    method="GET", path="/v1/analyses/%d" % i, host="api.example.com",
                    headers={"x-api-key": self.key if i % 2 == 0 else self.revoked,
                             "x-request-id": "req-%d" % i})))), timeout=10)
            for i in range(40)
        ]
        for i, f in enumerate(futures):
            r = f.result()
            self.assertEqual(r.status.code, 0 if i % 2 == 0 else 16, i)
            where = r.ok_response.headers if i % 2 == 0 else r.denied_response.headers
            ids = [o.header.value for o in where if o.header.key == "x-request-id"]
            self.assertEqual(ids, ["req-%d" % i])
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Check(ea.CheckRequest(), timeout=5, compression=grpc.Compression.Gzip)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        nope = self.channel.unary_unary("/envoy.service.auth.v3.Authorization/Nope")
        with self.assertRaises(grpc.RpcError) as e:
            nope(b"", timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)

    def test_health_service_names(self):
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ["", "envoy.service.auth.v3.Authorization"]:
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING, service)


if __name__ == "__main__":
    unittest.main()

"""What an SRE reads off a running keygate: /metrics and the decision log.

The real keygate binary runs all three fronts (proxy, forward-auth, ext_authz) and admin, with
JSON logs at level trace (hyper's, h2's and tonic's events included). Canary keys are sent every
way a key can arrive. Then:

- /metrics must parse with the Prometheus client library's OpenMetrics parser (strict: TYPE,
  HELP, UNIT, `# EOF`), and its answer counters and latency histograms must equal the traffic
  sent, by front and code;
- every log line must be JSON, there must be one decision event per request with its request
  id, front, key id, partner id, code, status and latency; and no line may contain a key, a
  key's body, its SHA-256 digest or an Authorization value.

Run by scripts/test after `cargo build`: python3 -m unittest discover -s tests/python -v
Needs: pip install grpcio xds-protos prometheus-client
"""

import hashlib
import http.client
import http.server
import json
import os
import tempfile
import threading
import unittest

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from test_ext_authz import free_port, mint, serve_until_ready


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


class Operations(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        threading.Thread(target=cls.upstream.serve_forever, daemon=True).start()

        cls.good = mint("sk_live_")
        cls.revoked = mint("sk_live_")
        cls.unknown = mint("sk_live_")
        cls.broken = cls.good[:-1] + ("A" if cls.good[-1] != "A" else "B")  # bad checksum
        rec = lambda kid, k, status: {
            "id": kid, "hash": "sha256:" + sha256(k), "partner_id": "partner_ops",
            "environment": "live", "scopes": ["analyses:read"], "status": status,
        }
        doc = {
            "schema": "keygate.snapshot/v1", "revision": 1,
            "partners": [{"id": "partner_ops", "status": "active"}],
            "keys": [rec("key_ops", cls.good, "active"), rec("key_gone", cls.revoked, "revoked")],
        }
        snapshot = os.path.join(cls.dir.name, "keys.json")
        with open(snapshot, "w") as f:
            json.dump(doc, f)
        cls.ports = {name: free_port() for name in ("proxy", "authz_http", "ext_authz", "admin")}
        config = os.path.join(cls.dir.name, "keygate.toml")
        with open(config, "w") as f:
            f.write(
                'environment = "live"\n'
                '[[key_prefixes]]\nprefix = "sk_live_"\nenvironment = "live"\n'
                f'[snapshot]\npath = "{snapshot}"\n'
                f'[proxy]\nlisten = "127.0.0.1:{cls.ports["proxy"]}"\n'
                f'upstream = "http://127.0.0.1:{cls.upstream.server_address[1]}"\n'
                f'[authz_http]\nlisten = "127.0.0.1:{cls.ports["authz_http"]}"\n'
                f'[ext_authz]\nlisten = "127.0.0.1:{cls.ports["ext_authz"]}"\n'
                f'[admin]\nlisten = "127.0.0.1:{cls.ports["admin"]}"\n'
                '[log]\nlevel = "trace"\nformat = "json"\ndecisions = "all"\n'
            )
        cls.log_path = os.path.join(cls.dir.name, "stderr.log")
        cls.log = open(cls.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("KEYGATE")}
        cls.proc = serve_until_ready(config, cls.ports["admin"], env=env, log=cls.log)
        # tearDownClass does not run when setUpClass fails: never leave keygate behind.
        cls.addClassCleanup(lambda: cls.proc.poll() is None and cls.proc.kill())
        cls.sent = cls.traffic()
        cls.metrics_text = cls.admin("/metrics")[1]
        cls.proc.terminate()
        cls.exit_code = cls.proc.wait(timeout=20)
        cls.log.close()
        with open(cls.log_path, encoding="utf-8", errors="replace") as f:
            cls.lines = f.read().splitlines()

    @classmethod
    def tearDownClass(cls):
        if cls.proc.poll() is None:
            cls.proc.kill()
        cls.upstream.shutdown()
        cls.dir.cleanup()

    @classmethod
    def admin(cls, path):
        c = http.client.HTTPConnection("127.0.0.1", cls.ports["admin"], timeout=5)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return r.status, body

    @classmethod
    def http(cls, front, path, headers):
        c = http.client.HTTPConnection("127.0.0.1", cls.ports[front], timeout=5)
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status, r.getheader("x-request-id")

    @classmethod
    def traffic(cls):
        """Send the canaries every way; return {(front, code): n} and the request ids."""
        sent, ids = {}, []

        def count(front, code, status, want, rid):
            assert status == want, (front, code, status, want)
            sent[(front, code)] = sent.get((front, code), 0) + 1
            ids.append((front, rid))

        proxy = [
            ({"x-api-key": cls.good}, "allowed", 200),
            ({"authorization": "Bearer " + cls.good}, "allowed", 200),
            # A key sent as the request id by mistake is replaced, never logged or forwarded.
            ({"x-api-key": cls.good, "x-request-id": cls.revoked}, "allowed", 200),
            ({"x-api-key": cls.revoked}, "key_revoked", 401),
            ({"authorization": "Bearer " + cls.unknown}, "invalid_api_key", 401),
            ({"x-api-key": cls.broken}, "invalid_api_key", 401),
            ({}, "authentication_required", 401),
        ]
        for headers, code, want in proxy:
            status, rid = cls.http("proxy", "/v1/analyses/1", headers)
            count("proxy", code, status, want, rid)
        authz = [
            ({"x-api-key": cls.good}, "allowed", 200),
            ({"authorization": "Bearer " + cls.revoked}, "key_revoked", 401),
        ]
        for headers, code, want in authz:
            headers = dict(headers, **{"x-original-uri": "/v1/analyses/1", "x-original-method": "GET"})
            status, rid = cls.http("authz_http", "/authz", headers)
            count("authz_http", code, status, want, rid)

        with grpc.insecure_channel(f"127.0.0.1:{cls.ports['ext_authz']}") as channel:
            stub = eag.AuthorizationStub(channel)
            for headers, code, want in [
                ({"authorization": "Bearer " + cls.good}, "allowed", 0),
                ({"x-api-key": cls.unknown}, "invalid_api_key", 16),
            ]:
                req = ea.CheckRequest(attributes=ac.AttributeContext(
                    source=ac.AttributeContext.Peer(address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=1))),
                    request=ac.AttributeContext.Request(http=ac.AttributeContext.HttpRequest(
                        method="GET", path="/v1/analyses/1", host="api.example.com",
                        headers=headers)),
                ))
                r = stub.Check(req, timeout=5)
                rid = None
                if r.HasField("ok_response"):
                    rid = {o.header.key: o.header.value for o in r.ok_response.headers}["x-request-id"]
                else:
                    rid = json.loads(r.denied_response.body)["error"]["request_id"]
                count("ext_authz", code, r.status.code, want, rid)
        cls.ids = ids
        return sent

    def families(self):
        return {f.name: f for f in text_string_to_metric_families(self.metrics_text)}

    def test_exit_code_is_zero(self):
        self.assertEqual(self.exit_code, 0, "\n".join(self.lines[-20:]))

    def test_metrics_parse_and_count_the_traffic(self):
        families = self.families()
        answers = {}
        for s in families["keygate_requests"].samples:
            if s.name == "keygate_requests_total" and s.value:
                answers[(s.labels["front"], s.labels["code"])] = s.value
        self.assertEqual(answers, {k: float(v) for k, v in self.sent.items()})

        for name in ("keygate_request_duration_seconds", "keygate_decision_duration_seconds"):
            self.assertEqual(families[name].type, "histogram", name)
            for front in ("proxy", "authz_http", "ext_authz"):
                samples = [s for s in families[name].samples if s.labels.get("front") == front]
                count = next(s.value for s in samples if s.name.endswith("_count"))
                inf = next(s.value for s in samples
                           if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
                want = sum(n for (f, _), n in self.sent.items() if f == front)
                self.assertEqual((count, inf), (want, want), (name, front))
                buckets = [s.value for s in samples if s.name.endswith("_bucket")]
                self.assertEqual(buckets, sorted(buckets), "buckets are cumulative")

        self.assertEqual(families["keygate_snapshot_revision"].samples[0].value, 1)
        errors = {s.labels["kind"]: s.value for s in families["keygate_upstream_errors"].samples
                  if s.name.endswith("_total")}
        self.assertEqual(errors, {"unavailable": 0, "timeout": 0})
        open_now = {s.labels["front"]: s.value for s in families["keygate_connections_open"].samples}
        self.assertEqual(set(open_now), {"proxy", "authz_http", "ext_authz"})
        # The scrape itself holds no front connection; the gRPC channel was closed.
        self.assertEqual(open_now["proxy"], 0)

    def test_one_decision_event_per_request_with_its_fields(self):
        events = []
        for line in self.lines:
            record = json.loads(line)  # every line is JSON
            if record.get("target") == "keygate::decision":
                events.append(record["fields"])
        self.assertEqual(len(events), sum(self.sent.values()))
        by_id = {e["request_id"]: e for e in events}
        for front, rid in self.ids:
            e = by_id[rid]
            self.assertEqual(e["front"], front)
            self.assertIsInstance(e["latency_us"], int)
            self.assertIn("status", e)
            if e["code"] == "allowed":
                self.assertEqual((e["key_id"], e["partner_id"]), ("key_ops", "partner_ops"))
            elif e["code"] == "key_revoked":
                self.assertEqual(e["key_id"], "key_gone")
            else:
                self.assertEqual(e["key_id"], "-")

    def test_no_line_holds_a_key_a_digest_or_an_authorization_value(self):
        canaries = []
        for key in (self.good, self.revoked, self.unknown, self.broken):
            canaries += [key, key[len("sk_live_"):], sha256(key)]
        self.assertGreater(len(self.lines), 10, "the debug log is suspiciously short")
        for i, line in enumerate(self.lines):
            for c in canaries:
                self.assertNotIn(c, line, f"log line {i} leaks a key or digest")
            self.assertNotIn("Bearer", line, f"log line {i} holds an Authorization value")
        self.assertNotIn(self.good, self.metrics_text)


if __name__ == "__main__":
    unittest.main()

"""deploy/envoy: the shipped Envoy configurations read as Envoy's own API (the published protos of
xds-protos, strictly: a misspelt or misplaced field fails), and say what keygate relies on.

Envoy itself is not run here (no package for it in the registries CI may use); these tests
catch what a review missed before: a field Envoy would reject, and settings that let a spoofed
identity header or a client-chosen path through.
"""

import os
import re
import unittest

import yaml
from google.protobuf import json_format

# Imported for their registration: Any fields (typed_config) resolve through them.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
IDENTITY = ["x-partner-id", "x-org-id", "x-key-id", "x-key-environment", "x-scopes"]
# The headers by which nginx and Traefik name the original request to /authz.
ORIGINAL = ["x-original-uri", "x-original-method", "x-forwarded-uri", "x-forwarded-method"]


def bootstrap(name):
    with open(os.path.join(ROOT, "deploy", "envoy", name)) as f:
        doc = yaml.safe_load(f)
    return json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())


def unpack(any_msg, cls):
    out = cls()
    assert any_msg.Unpack(out), f"{any_msg.type_url} is not {cls.DESCRIPTOR.full_name}"
    return out


def http_filters(b):
    """The listener's HTTP connection manager and its filters by name (unpacked)."""
    [listener] = b.static_resources.listeners
    [chain] = listener.filter_chains
    [net] = chain.filters
    hcm = unpack(net.typed_config, hcm_pb2.HttpConnectionManager)
    return hcm, {f.name: f for f in hcm.http_filters}


def matches(patterns, header):
    """Whether Envoy's StringMatcher list `patterns` matches the header name `header`."""
    for p in patterns:
        value = header.lower() if p.ignore_case else header
        kind = p.WhichOneof("match_pattern")
        if kind == "exact" and value == p.exact:
            return True
        if kind == "prefix" and value.startswith(p.prefix):
            return True
        if kind == "suffix" and value.endswith(p.suffix):
            return True
        if kind == "contains" and p.contains in value:
            return True
        if kind == "safe_regex" and re.fullmatch(p.safe_regex.regex, value):
            return True
    return False


class EnvoyConfigs(unittest.TestCase):
    def test_both_read_as_envoys_api(self):
        for name in ["envoy-grpc.yaml", "envoy-http.yaml"]:
            with self.subTest(name):
                b = bootstrap(name)
                _, filters = http_filters(b)
                self.assertEqual(
                    list(filters), ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
                )
                authz = unpack(filters["envoy.filters.http.ext_authz"].typed_config,
                               ext_authz_pb2.ExtAuthz)
                self.assertFalse(authz.failure_mode_allow, "an error must never allow")
                clusters = {c.name: c for c in b.static_resources.clusters}
                self.assertIn("keygate", clusters)

    def test_both_forward_the_path_they_check(self):
        # keygate decides on the resolved path; Envoy must forward that one, not the client's.
        hcm_fields = hcm_pb2.HttpConnectionManager.DESCRIPTOR.fields_by_name
        reject = hcm_fields["path_with_escaped_slashes_action"].enum_type.values_by_name[
            "REJECT_REQUEST"
        ].number
        for name in ["envoy-grpc.yaml", "envoy-http.yaml"]:
            with self.subTest(name):
                hcm, _ = http_filters(bootstrap(name))
                self.assertTrue(hcm.normalize_path.value)
                self.assertTrue(hcm.merge_slashes)
                self.assertEqual(hcm.path_with_escaped_slashes_action, reject)

    def test_grpc_asks_keygates_ext_authz_port(self):
        b = bootstrap("envoy-grpc.yaml")
        _, filters = http_filters(b)
        authz = unpack(filters["envoy.filters.http.ext_authz"].typed_config, ext_authz_pb2.ExtAuthz)
        self.assertEqual(authz.grpc_service.envoy_grpc.cluster_name, "keygate")
        self.assertLessEqual(authz.grpc_service.timeout.ToMilliseconds(), 1000)
        self.assertEqual(authz.transport_api_version, 2)  # V3
        keygate = {c.name: c for c in b.static_resources.clusters}["keygate"]
        [ep] = keygate.load_assignment.endpoints[0].lb_endpoints
        self.assertEqual(ep.endpoint.address.socket_address.port_value, 9191)

    def test_http_service_sees_every_spoof_and_never_a_path_of_the_clients_choosing(self):
        b = bootstrap("envoy-http.yaml")
        hcm, filters = http_filters(b)
        authz = unpack(filters["envoy.filters.http.ext_authz"].typed_config, ext_authz_pb2.ExtAuthz)
        svc = authz.http_service
        self.assertEqual(svc.path_prefix, "/authz")
        keygate = {c.name: c for c in b.static_resources.clusters}["keygate"]
        [ep] = keygate.load_assignment.endpoints[0].lb_endpoints
        self.assertEqual(ep.endpoint.address.socket_address.port_value, 9192)

        # The filter's own allowed_headers; the one in authorization_request is deprecated.
        self.assertFalse(svc.authorization_request.HasField("allowed_headers"))
        asked = authz.allowed_headers.patterns
        self.assertTrue(asked)
        for h in ["x-api-key", "referer", "origin", "idempotency-key", "x-request-id",
                  "x-forwarded-for", "x-http-method-override", "x-http-method",
                  "x-method-override", "x-original-url", "x-rewrite-url"] + IDENTITY:
            self.assertTrue(matches(asked, h), f"keygate must see {h}")
        for h in ORIGINAL:
            self.assertFalse(matches(asked, h), f"{h} would let a client choose what is checked")
        # Underscored spellings (x_partner_id) are not sent to keygate, so Envoy must drop them.
        self.assertEqual(
            hcm.common_http_protocol_options.headers_with_underscores_action,
            hcm_pb2.HttpConnectionManager.DESCRIPTOR.fields_by_name[
                "common_http_protocol_options"
            ].message_type.fields_by_name["headers_with_underscores_action"]
            .enum_type.values_by_name["DROP_HEADER"].number,
        )

        answer = svc.authorization_response
        for h in IDENTITY + ["x-request-id"]:
            self.assertTrue(matches(answer.allowed_upstream_headers.patterns, h), h)
        for h in ["www-authenticate", "retry-after", "content-type", "x-request-id",
                  "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]:
            self.assertTrue(matches(answer.allowed_client_headers.patterns, h), h)
        for h in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]:
            self.assertTrue(matches(answer.allowed_client_headers_on_success.patterns, h), h)


if __name__ == "__main__":
    unittest.main()

"""deploy/kubernetes and the Dockerfile agree with keygate's configuration and with each other.

Every kustomization (the base and each overlay) is built with `kubectl kustomize` and validated
against the Kubernetes API schemas with `kubernetes-validate --strict` (bundled schemas,
offline). Then, for every Deployment that runs keygate:

- the containerPorts, the Service's targetPorts and the probes' ports are the ports of the
  listen addresses in the keygate.toml of the ConfigMap the container mounts, on a non-loopback
  address (the kubelet and the Service reach the pod address), with the port numbers of
  config.example.toml;
- every container runs as non-root, read-only, without privilege escalation, capabilities or
  an unconfined seccomp profile, with resource requests and a memory limit;
- terminationGracePeriodSeconds and the other containers' preStop sleeps cover [shutdown]
  delay + drain_timeout;
- the config passes `keygate config check` and the snapshot in the Secret `keygate snapshot
  check`, both with the real binary; the snapshot path is a whole-directory Secret mount;
- the image is the one README.md says to build, and the Dockerfile's user and config path are
  the manifests'.

Run by scripts/test after `cargo build`:
    python3 -m unittest discover -s tests/python -v
Needs: kubectl (it includes kustomize) and pip install kubernetes-validate
"""

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import unittest

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BINARY = os.environ.get("KEYGATE", os.path.join(TARGET, "debug", "keygate"))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
# The oldest Kubernetes the manifests are for (the preStop `sleep` handler is on by default
# from 1.30) and a recent one; both are bundled with kubernetes-validate.
KUBERNETES_VERSIONS = ["1.30.0", "1.33.0"]
# What kubelet, endpoint removal and the app's own stop need beyond keygate's shutdown.
GRACE_MARGIN_SECONDS = 5
# keygate's own time beyond delay + drain_timeout: 0.5 s for a front past its drain to be
# stopped, up to 2 s for the snapshot source and admin, and the usage report's flush.
SHUTDOWN_OVERHEAD_SECONDS = 3
# The listeners a keygate.toml may set, with the section of each.
LISTENERS = ["proxy", "ext_authz", "authz_http", "admin", "sync_server"]


def kustomizations():
    """The base and every overlay: each directory under deploy/kubernetes with a kustomization."""
    found = []
    for dirpath, _, files in os.walk(DEPLOY):
        if "kustomization.yaml" in files:
            found.append(os.path.relpath(dirpath, DEPLOY))
    return sorted(found)


def kubectl():
    return shutil.which("kubectl") or "/usr/bin/kubectl"


def seconds(duration):
    """A keygate duration ("250ms", "5s", "1m", "1h") in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", duration)
    if not m:
        raise ValueError(f"not a duration: {duration!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def split_listen(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


class Pod:
    """One Deployment's pod template, with the keygate.toml and snapshot its keygate uses."""

    def __init__(self, case, kustomization, docs, deployment):
        self.case = case
        self.deployment = deployment
        self.name = f"{kustomization}: deployment/{deployment['metadata']['name']}"
        self.spec = deployment["spec"]["template"]["spec"]
        self.containers = self.spec["containers"] + self.spec.get("initContainers", [])
        self.keygate = next(c for c in self.spec["containers"] if c["name"] == "keygate")
        self.others = [c for c in self.spec["containers"] if c is not self.keygate]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}

        args = self.keygate.get("args", [])
        case.assertIn("--config", args, f"{self.name}: keygate runs without --config")
        self.config_path = args[args.index("--config") + 1]
        cm_name, self.config_key = self._mounted(volumes, self.config_path, "configMap", "name")
        self.config_map = find(docs, "ConfigMap", cm_name)
        self.config_text = self.config_map["data"][self.config_key]
        self.config = tomllib.loads(self.config_text)

        self.snapshot_path = self.config["snapshot"]["path"]
        secret_name, self.snapshot_key = self._mounted(
            volumes, self.snapshot_path, "secret", "secretName"
        )
        secret = find(docs, "Secret", secret_name)
        self.snapshot = base64.b64decode(secret["data"][self.snapshot_key])

    def _mounted(self, volumes, path, kind, name_field):
        """(object name, key) of the `kind` volume whose directory mount holds `path`."""
        directory, key = os.path.split(path)
        for m in self.keygate.get("volumeMounts", []):
            if m["mountPath"].rstrip("/") == directory:
                self.case.assertNotIn(
                    "subPath", m, f"{self.name}: {path}: a subPath mount is never updated"
                )
                volume = volumes[m["name"]]
                self.case.assertIn(kind, volume, f"{self.name}: {path} is not on a {kind} volume")
                return volume[kind][name_field], key
        self.case.fail(f"{self.name}: no volume is mounted at {directory} (for {path})")

    def listeners(self):
        """{section: port} of the listeners the config turns on."""
        out = {}
        for section in LISTENERS:
            addr = self.config.get(section, {}).get("listen", "")
            if addr:
                out[section] = split_listen(addr)
        return out

    def port_number(self, container, port):
        """A probe's or Service's port (a number or a containerPort name) as a number."""
        if isinstance(port, int):
            return port
        for p in container.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        self.case.fail(f"{self.name}: container {container['name']} has no port named {port}")


def find(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} named {name}")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class KubernetesManifests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.built = {}
        for k in kustomizations():
            out = run([kubectl(), "kustomize", os.path.join(DEPLOY, k)])
            if out.returncode != 0:
                raise AssertionError(f"kubectl kustomize {k} failed:\n{out.stderr}")
            cls.built[k] = (out.stdout, [d for d in yaml.safe_load_all(out.stdout) if d])
        with open(os.path.join(ROOT, "config.example.toml"), "rb") as f:
            cls.example = tomllib.load(f)
        cls.example_ports = {
            s: split_listen(cls.example[s]["listen"])[1]
            for s in LISTENERS
            if cls.example.get(s, {}).get("listen")
        }
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def pods(self):
        """Every keygate pod of every kustomization, as (kustomization, docs, Pod)."""
        out = []
        for k, (_, docs) in self.built.items():
            for d in docs:
                if d["kind"] == "Deployment" and any(
                    c["name"] == "keygate" for c in d["spec"]["template"]["spec"]["containers"]
                ):
                    out.append((k, docs, Pod(self, k, docs, d)))
        return out

    def test_expected_kustomizations(self):
        self.assertIn("base", self.built)
        self.assertIn(os.path.join("overlays", "ext-authz"), self.built)
        for k, (_, docs) in self.built.items():
            kinds = {d["kind"] for d in docs}
            for kind in ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"]:
                self.assertIn(kind, kinds, f"{k} has no {kind}")

    def test_schemas_validate(self):
        for k, (text, docs) in self.built.items():
            for version in KUBERNETES_VERSIONS:
                with self.subTest(kustomization=k, kubernetes=version):
                    out = run(
                        [sys.executable, "-m", "kubernetes_validate", "--strict",
                         "-k", version, "-"],
                        input=text,
                    )
                    report = out.stdout + out.stderr
                    self.assertEqual(out.returncode, 0, report)
                    # A kind without a bundled schema is only a warning: every resource must
                    # have been checked.
                    self.assertNotIn("WARN", report)
                    self.assertEqual(report.count(" passed for resource "), len(docs), report)

    def test_ports_and_probes_match_the_config(self):
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                listeners = pod.listeners()
                self.assertIn("admin", listeners, f"{pod.name}: probes need [admin] listen")
                for section, (host, port) in listeners.items():
                    self.assertNotIn(
                        host, ("127.0.0.1", "localhost", "::1"),
                        f"{pod.name}: {section}.listen is loopback: neither the kubelet nor a "
                        "Service can reach it",
                    )
                    # The port numbers of config.example.toml, only the address differs.
                    self.assertEqual(port, self.example_ports.get(section), f"{pod.name}: {section}")
                declared = sorted(p["containerPort"] for p in pod.keygate.get("ports", []))
                self.assertEqual(
                    declared, sorted(p for _, p in listeners.values()),
                    f"{pod.name}: keygate's containerPorts are not its listeners",
                )

                admin = listeners["admin"][1]
                live, ready = pod.keygate["livenessProbe"], pod.keygate["readinessProbe"]
                self.assertEqual(live["httpGet"]["path"], "/healthz")
                self.assertEqual(ready["httpGet"]["path"], "/readyz")
                for probe in (live, ready, pod.keygate.get("startupProbe")):
                    if probe:
                        self.assertEqual(
                            pod.port_number(pod.keygate, probe["httpGet"]["port"]), admin,
                            f"{pod.name}: a probe is not on the admin port",
                        )

                labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
                services = [
                    d for d in docs if d["kind"] == "Service"
                    and selects(d["spec"].get("selector", {}), labels)
                ]
                self.assertEqual(len(services), 1, f"{pod.name}: one Service selects the pods")
                targets = {pod.port_number(pod.keygate, p["targetPort"])
                           for p in services[0]["spec"]["ports"]}
                # keygate owns the Service: every target is one of its fronts, never admin.
                fronts = {p for s, (_, p) in listeners.items() if s != "admin"}
                self.assertTrue(targets, f"{pod.name}: the Service has no ports")
                self.assertLessEqual(targets, fronts, f"{pod.name}: Service targets {targets}")
                self.assertNotIn(admin, targets, f"{pod.name}: the admin port is in a Service")

                # The app behind the proxy is only reachable through it.
                for other in pod.others:
                    self.assertFalse(other.get("ports"), f"{pod.name}: {other['name']} has ports")
                if "proxy" in listeners:
                    upstream = pod.config["proxy"]["upstream"]
                    self.assertRegex(upstream, r"^http://127\.0\.0\.1:\d+$")
                    self.app_listens_on(docs, pod, upstream.removeprefix("http://"))

    def app_listens_on(self, docs, pod, addr):
        """The example app (nginx) listens exactly where proxy.upstream points."""
        for other in pod.others:
            for m in other.get("volumeMounts", []):
                volume = next(v for v in pod.spec["volumes"] if v["name"] == m["name"])
                if "configMap" not in volume:
                    continue
                cm = find(docs, "ConfigMap", volume["configMap"]["name"])
                for text in cm.get("data", {}).values():
                    listens = re.findall(r"^\s*listen\s+([^;\s]+)", text, re.M)
                    if listens:
                        self.assertEqual(listens, [addr], f"{pod.name}: the app's listen")
                        return
        self.fail(f"{pod.name}: no app configuration listens on {addr}")

    def test_security_context_on_every_container(self):
        for k, docs, pod in self.pods():
            pod_sc = pod.spec.get("securityContext", {})
            self.assertIs(pod.spec.get("automountServiceAccountToken"), False, pod.name)
            for c in pod.containers:
                with self.subTest(f"{pod.name}: container {c['name']}"):
                    sc = c.get("securityContext", {})
                    effective = lambda key: sc.get(key, pod_sc.get(key))
                    self.assertIs(effective("runAsNonRoot"), True)
                    self.assertNotEqual(effective("runAsUser"), 0)
                    self.assertIs(sc.get("readOnlyRootFilesystem"), True)
                    self.assertIs(sc.get("allowPrivilegeEscalation"), False)
                    self.assertFalse(sc.get("privileged", False))
                    self.assertEqual(sc.get("capabilities", {}).get("drop"), ["ALL"])
                    self.assertFalse(sc.get("capabilities", {}).get("add"))
                    self.assertEqual((effective("seccompProfile") or {}).get("type"), "RuntimeDefault")
                    resources = c.get("resources", {})
                    self.assertIn("cpu", resources.get("requests", {}))
                    self.assertIn("memory", resources.get("requests", {}))
                    self.assertIn("memory", resources.get("limits", {}))

    def test_shutdown_timing(self):
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                shutdown = pod.config.get("shutdown", {})
                self.assertIn("delay", shutdown, f"{pod.name}: set [shutdown] delay explicitly")
                self.assertIn("drain_timeout", shutdown, f"{pod.name}: and drain_timeout")
                keygate_done = (seconds(shutdown["delay"]) + seconds(shutdown["drain_timeout"])
                                + SHUTDOWN_OVERHEAD_SECONDS)
                # A preStop sleep on keygate would hold off its SIGTERM, and so its shutdown.
                own = pod.keygate.get("lifecycle", {}).get("preStop", {})
                keygate_done += own.get("sleep", {}).get("seconds", 0)
                self.assertNotIn("exec", own, f"{pod.name}: keygate's image has no shell")
                grace = pod.spec.get("terminationGracePeriodSeconds", 30)
                self.assertGreaterEqual(
                    grace, keygate_done + GRACE_MARGIN_SECONDS,
                    f"{pod.name}: terminationGracePeriodSeconds {grace} < delay + drain_timeout "
                    f"({keygate_done:g}) + {GRACE_MARGIN_SECONDS}",
                )
                for other in pod.others:
                    pre = other.get("lifecycle", {}).get("preStop", {})
                    self.assertIn("sleep", pre, f"{pod.name}: {other['name']} has no preStop sleep")
                    slept = pre["sleep"]["seconds"]
                    self.assertGreaterEqual(
                        slept, keygate_done,
                        f"{pod.name}: {other['name']} stops before keygate has drained",
                    )
                    self.assertGreaterEqual(
                        grace, slept + GRACE_MARGIN_SECONDS,
                        f"{pod.name}: {other['name']} has no time to stop after its preStop",
                    )

    def test_availability(self):
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                replicas = pod.deployment["spec"].get("replicas", 1)
                self.assertGreaterEqual(replicas, 2, f"{pod.name}: one replica is no service")
                labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
                pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
                        and selects(d["spec"]["selector"]["matchLabels"], labels)]
                self.assertEqual(len(pdbs), 1, f"{pod.name}: one PodDisruptionBudget")
                spec = pdbs[0]["spec"]
                if "maxUnavailable" in spec:
                    self.assertTrue(0 < spec["maxUnavailable"] < replicas, spec)
                else:
                    self.assertTrue(0 < spec["minAvailable"] < replicas, spec)

    def test_config_passes_config_check(self):
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                path = os.path.join(self.tmp.name, f"{k.replace(os.sep, '-')}.toml")
                with open(path, "w") as f:
                    f.write(pod.config_text)
                out = run([BINARY, "config", "check", "--config", path])
                self.assertEqual(out.returncode, 0, f"{pod.name}:\n{out.stdout}{out.stderr}")

    def test_snapshot_passes_snapshot_check(self):
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                path = os.path.join(self.tmp.name, f"{k.replace(os.sep, '-')}.json")
                with open(path, "wb") as f:
                    f.write(pod.snapshot)
                out = run([BINARY, "snapshot", "check", path])
                self.assertEqual(out.returncode, 0, f"{pod.name}:\n{out.stdout}{out.stderr}")

    def test_image_and_dockerfile(self):
        with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
            version = tomllib.load(f)["package"]["version"]
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            dockerfile = f.read()
        image = f"keygate:{version}"
        self.assertIn(f"docker build -t {image} .", readme, "README.md: how to build the image")
        user = re.search(r"^USER\s+(\d+)(?::(\d+))?", dockerfile, re.M)
        self.assertIsNotNone(user, "the Dockerfile sets a numeric non-root USER")
        self.assertNotEqual(user.group(1), "0")
        cmd = re.search(r"^CMD\s+(\[.*\])", dockerfile, re.M)
        for k, docs, pod in self.pods():
            with self.subTest(pod.name):
                self.assertEqual(pod.keygate["image"], image)
                self.assertEqual(pod.keygate["securityContext"]["runAsUser"], int(user.group(1)))
                self.assertEqual(yaml.safe_load(cmd.group(1)), pod.keygate["args"])
                # EXPOSE lists at least the ports the pod declares.
                exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.*)$", dockerfile, re.M)
                           for p in line.split()}
                declared = {p["containerPort"] for p in pod.keygate.get("ports", [])}
                self.assertLessEqual(declared, exposed)

    def test_dockerfile_copies_only_what_the_context_holds(self):
        """.dockerignore leaves out everything but what the Dockerfile copies: a COPY of a path
        it does not let in fails `docker build` (the image is never built here)."""
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            dockerfile = f.read()
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            rules = [l.strip() for l in f if l.strip() and not l.startswith("#")]
        self.assertEqual(rules[0], "*", ".dockerignore starts by leaving everything out")
        allowed = [r[1:].rstrip("/") for r in rules[1:] if r.startswith("!")]
        sources = []
        for line in re.findall(r"^COPY\s+(.*)$", dockerfile, re.M):
            words = line.split()
            if any(w.startswith("--from") for w in words):
                continue
            sources += words[:-1]
        self.assertIn("scripts/build-release", sources, "the image is built by scripts/build-release")
        for source in sources:
            with self.subTest(source):
                source = source.rstrip("/")
                self.assertTrue(os.path.exists(os.path.join(ROOT, source)), f"{source} is not in the repo")
                self.assertTrue(any(source == a or source.startswith(a + "/") for a in allowed),
                                f".dockerignore leaves {source} out of the build context")
        # The release build step runs the script the context holds.
        self.assertRegex(dockerfile, r"(?m)^RUN bash scripts/build-release\b")

    def test_istio_provider_points_at_the_ext_authz_service(self):
        """deploy/istio registers keygate at <service>:<port>: the overlay's gRPC Service port."""
        with open(os.path.join(ROOT, "deploy", "istio", "keygate-ext-authz.yaml")) as f:
            istio = f.read()
        provider = re.search(r"envoyExtAuthzGrpc:\s*\n#\s+service:\s*(\S+)\s*\n#\s+port:\s*(\d+)",
                             istio)
        self.assertIsNotNone(provider, "deploy/istio: envoyExtAuthzGrpc service and port")
        _, docs = self.built[os.path.join("overlays", "ext-authz")]
        fqdns = {}
        for d in docs:
            if d["kind"] == "Service":
                fqdn = f"{d['metadata']['name']}.{d['metadata']['namespace']}.svc.cluster.local"
                fqdns[fqdn] = d
        self.assertIn(provider.group(1), fqdns)
        port = next(p for p in fqdns[provider.group(1)]["spec"]["ports"]
                    if p["port"] == int(provider.group(2)))
        # Istio picks the protocol from appProtocol or the port name's prefix.
        self.assertEqual(port.get("appProtocol"), "grpc")
        self.assertTrue(port["name"].startswith("grpc"))
        self.assertEqual(int(provider.group(2)), self.example_ports["ext_authz"])


if __name__ == "__main__":
    unittest.main()

"""deploy/k8s/: the Kubernetes manifests validate strictly against the Kubernetes schemas
(offline, kubernetes-validate's bundled ones), pass yamllint, build with kustomize, agree with
each other and with deploy/prometheus/scrape.yaml, and every asyncsync command line in them is
accepted by the real CLI together with the ConfigMap's config file (`asyncsync config`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .promql import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra (yamllint)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

K8S = ROOT / "deploy" / "k8s"
YAMLLINT_CONFIG = K8S / ".yamllint"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.yaml"
ASYNCSYNC = str(Path(sys.executable).parent / "asyncsync")

# The oldest version the manifests need (native sidecars, backoffLimitPerIndex: 1.29), a
# current one, and the newest schemas kubernetes-validate bundles.
VERSIONS = ("1.29.0", "1.31.0", kubernetes_validate.latest_version())
# Not in the core schemas: checked by `check_servicemonitor` instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Opt-in manifests that no kustomization lists (placeholder credentials).
UNLISTED = {K8S / "base" / "secret.yaml"}
# Containers that do not run asyncsync: (file, container) -> what they run instead.
NOT_ASYNCSYNC = {
    ("node-daemon/daemonset.yaml", "state-owner"): "chown",
    ("training-job/job.yaml", "train"): "/usr/bin/tini",
}
# Example values for the downward API, as the kubelet would fill them in.
FIELD_EXAMPLES = {"spec.nodeName": "node-1"}
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
CONFIG_FILE_KEY = "asyncsync.toml"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rel(path: Path) -> str:
    return path.relative_to(K8S).as_posix()


def all_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in all_objects()
             if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# -- lint and schemas -----------------------------------------------------------------------

def test_yamllint_is_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
         "-c", str(YAMLLINT_CONFIG), str(K8S)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def validate_objects(objects: list[dict[str, Any]], where: str) -> None:
    for doc in objects:
        what = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            check_servicemonitor(doc)
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{what} against {version}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                # The CLI only warns about a kind it has no schema for: here it fails, so a
                # typo in apiVersion or kind cannot pass unchecked.
                pytest.fail(f"{what}: {exc.message}")


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_validates_strictly(path: Path) -> None:
    objects = documents(path)
    assert objects, f"{rel(path)} holds no object"
    validate_objects(objects, rel(path))


# Fields of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) used or
# plausible here: an unknown one is a typo the operator would reject.
SM_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
           "podTargetLabels", "sampleLimit", "attachMetadata", "selectorMechanism"}
SM_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
               "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings",
               "params", "tlsConfig", "authorization", "followRedirects", "enableHttp2"}
SM_RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
              "action"}
DURATION = re.compile(r"^((\d+)(ms|s|m|h))+$")


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def check_servicemonitor(doc: dict[str, Any]) -> None:
    """Structural validation of a ServiceMonitor: no schema of the CRD is bundled offline."""
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
    assert isinstance(doc["metadata"]["name"], str) and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= SM_SPEC, sorted(set(spec) - SM_SPEC)
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(v, str) for v in labels.values())
    assert spec["endpoints"], "a ServiceMonitor needs endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SM_ENDPOINT, sorted(set(endpoint) - SM_ENDPOINT)
        assert isinstance(endpoint["port"], str)  # a named port of the Service
        assert endpoint.get("path", "/metrics").startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert DURATION.match(endpoint.get(key, "30s")), endpoint
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= SM_RELABEL, sorted(set(relabel) - SM_RELABEL)


# -- kustomize ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", kustomization_files(), ids=rel)
def test_kustomization_lists_what_exists(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert doc["kind"] in ("Kustomization", "Component")
    entries = doc.get("resources", []) + doc.get("components", [])
    assert entries, f"{rel(path)} lists nothing"
    for entry in entries:
        target = (path.parent / entry).resolve()
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry}: no kustomization.yaml"
        else:
            assert target.is_file(), f"{rel(path)}: {entry} does not exist"
            assert documents(target), f"{entry} holds no object"
    for patch in doc.get("patches", []):
        assert "patch" in patch or (path.parent / patch["path"]).is_file(), patch


def listed_files() -> set[Path]:
    listed: set[Path] = set()
    for path in kustomization_files():
        doc = yaml.safe_load(path.read_text())
        for entry in doc.get("resources", []) + doc.get("components", []):
            target = (path.parent / entry).resolve()
            if target.is_file():
                listed.add(target)
    return listed


def test_every_manifest_is_in_a_kustomization() -> None:
    orphans = {p.resolve() for p in manifest_files()} - listed_files() - UNLISTED
    assert not orphans, sorted(map(str, orphans))


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not on PATH: kustomize builds not checked")
    return found


def build(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("directory", ["base", "node-daemon", "training-job", "bulk-migration"])
def test_kustomize_build_validates(directory: str) -> None:
    objects = build(K8S / directory)
    validate_objects(objects, f"kubectl kustomize {directory}")
    if directory == "node-daemon":
        assert {o["metadata"].get("namespace") for o in objects
                if o["kind"] not in ("Namespace", "PriorityClass")} == {"asyncsync"}


def test_prometheus_operator_component_builds(tmp_path: Path) -> None:
    """The Component enabled as the README says: a ServiceMonitor and its Service join, and
    the pod annotations stop asking an annotation-based job to scrape the daemons too."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "node-daemon" / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    doc["components"] = ["prometheus-operator"]
    kustomization.write_text(yaml.safe_dump(doc))
    objects = build(copy / "node-daemon")
    validate_objects(objects, "node-daemon with prometheus-operator")
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "Service", "DaemonSet"} <= kinds
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"


# -- the containers' command lines ----------------------------------------------------------

@dataclass
class Container:
    file: str
    workload: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]
    init: bool

    @property
    def id(self) -> str:
        return f"{self.file}:{self.spec['name']}"

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.spec.get("env", [])}

    def mounts(self) -> dict[str, dict[str, Any]]:
        return {m["mountPath"]: m for m in self.spec.get("volumeMounts", [])}

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def mount_of(self, path: str) -> dict[str, Any]:
        """The volume mount ``path`` lies on (the deepest one)."""
        found = [m for p, m in self.mounts().items() if path == p or path.startswith(p + "/")]
        assert found, f"{self.id}: {path} is on no volume"
        return max(found, key=lambda m: len(m["mountPath"]))


def containers() -> list[Container]:
    found = []
    for path, doc in all_objects():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for key in ("initContainers", "containers"):
            for spec in pod.get(key, []):
                found.append(Container(rel(path), doc, pod, spec, key == "initContainers"))
    return found


def asyncsync_containers() -> list[Container]:
    return [c for c in containers() if (c.file, c.spec["name"]) not in NOT_ASYNCSYNC]


def test_containers_not_checked_are_the_known_ones() -> None:
    """Every container runs asyncsync through the image's entrypoint, or is one of the few
    listed (so a new container is not left out of the command-line checks by accident)."""
    for container in containers():
        command = container.spec.get("command")
        known = NOT_ASYNCSYNC.get((container.file, container.spec["name"]))
        if known is None:
            assert command is None, f"{container.id}: use the entrypoint (tini -- asyncsync)"
            assert container.spec["image"].startswith("ghcr.io/OWNER/asyncsync:")
        else:
            assert command and command[0] == known, container.id


def substitute(container: Container, text: str) -> str:
    """Kubernetes' $(VAR) expansion, with example values for the downward API."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        entry = container.env.get(name)
        assert entry is not None, f"{container.id}: $({name}) is not in env (left literal)"
        if "value" in entry:
            return str(entry["value"])
        field = entry["valueFrom"]["fieldRef"]["fieldPath"]  # never a secret in args
        if field == JOB_NAME_LABEL:
            return str(container.workload["metadata"]["name"])
        assert field in FIELD_EXAMPLES, f"{container.id}: no example for {field}"
        return FIELD_EXAMPLES[field]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, text)


def config_toml() -> str:
    configmap = the("ConfigMap", "asyncsync-config")
    return str(configmap["data"][CONFIG_FILE_KEY])


@dataclass
class CommandLine:
    command: str
    source: str
    destination: str
    flags: list[str]
    settings: dict[str, Any]  # what `asyncsync config` says the command runs with


def effective(container: Container, tmp_path: Path) -> CommandLine:
    raw = container.spec["args"]
    assert all(isinstance(a, str) for a in raw), f"{container.id}: quote every argument"
    args = [substitute(container, a) for a in raw]
    command, rest = args[0], args[1:]
    assert command in ("push", "watch"), f"{container.id}: {command}"
    # SRC and DEST come first; `asyncsync config` takes the flags only.
    positionals = []
    while rest and not rest[0].startswith("-"):
        positionals.append(rest.pop(0))
    assert len(positionals) == 2, f"{container.id}: SRC DEST first, got {positionals}"
    source, destination = positionals
    config_file = tmp_path / CONFIG_FILE_KEY
    config_file.write_text(config_toml())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASYNCSYNC_", "AWS_"))}
    for name, entry in container.env.items():
        if name.startswith("ASYNCSYNC_") and "value" in entry:
            env[name] = str(entry["value"])
    configured = container.env["ASYNCSYNC_CONFIG"]["value"]
    mount = container.mount_of(configured)
    assert container.volume(mount["name"])["configMap"]["name"] == "asyncsync-config"
    assert configured == f"{mount['mountPath']}/{CONFIG_FILE_KEY}"
    env["ASYNCSYNC_CONFIG"] = str(config_file)
    if container.workload["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = "0"  # the Job controller sets it in every pod
    done = subprocess.run([ASYNCSYNC, "config", "--config", str(config_file), command, *rest],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"{container.id}: {done.stderr}"
    assert f"config file {config_file}" in done.stdout.splitlines()[0]
    settings = tomllib.loads(done.stdout)[command]
    return CommandLine(command, source, destination, rest, settings)


@pytest.mark.parametrize("container", asyncsync_containers(), ids=lambda c: c.id)
def test_command_line_is_accepted_by_the_cli(container: Container, tmp_path: Path) -> None:
    from asyncsync.config import parse_destination

    line = effective(container, tmp_path)
    destination = parse_destination(line.destination)  # raises ConfigError on a bad one
    assert destination.scheme == "s3" and destination.prefix
    assert "$(" not in line.destination
    # SRC is a directory the container has mounted, and asyncsync only reads it.
    assert line.source.startswith("/")
    assert container.mount_of(line.source).get("readOnly") is True, container.id
    # The manifest lives on a writable volume that is not the source.
    state = container.mount_of(str(line.settings["state_dir"]))
    assert not state.get("readOnly"), container.id
    assert state["mountPath"] != container.mount_of(line.source)["mountPath"]


def test_the_config_file_is_valid_for_every_command(tmp_path: Path) -> None:
    config_file = tmp_path / CONFIG_FILE_KEY
    config_file.write_text(config_toml())
    done = subprocess.run([ASYNCSYNC, "config", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    sections = tomllib.loads(done.stdout)
    assert set(sections) == {"push", "watch", "run"}
    assert sections["watch"]["run_depth"] == sections["push"]["run_depth"] == 2


# -- what the manifests rely on -------------------------------------------------------------

def by_id(container_id: str) -> Container:
    return next(c for c in containers() if c.id == container_id)


DAEMONS = ["node-daemon/daemonset.yaml:asyncsync", "training-job/job.yaml:asyncsync"]


@pytest.mark.parametrize("container_id", DAEMONS)
def test_daemon_ports_probes_and_grace(container_id: str, tmp_path: Path) -> None:
    container = by_id(container_id)
    line = effective(container, tmp_path)
    assert line.command == "watch"
    settings = line.settings
    assert settings["log_format"] == "json"
    # The final flush (--grace) ends before the kubelet's SIGKILL.
    assert settings["grace"] < container.pod["terminationGracePeriodSeconds"]
    port = int(str(settings["metrics_addr"]).rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container.spec["ports"]}
    assert ports["metrics"] == port
    assert container.spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container.spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # deploy/prometheus/scrape.yaml finds the pod by these annotations and this label.
    template = container.workload["spec"]["template"]["metadata"]
    annotations = template["annotations"]
    assert annotations["prometheus.io/scrape"] == scrape_keep("annotation_prometheus_io_scrape")
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert re.fullmatch(scrape_keep("label_app_kubernetes_io_name"),
                        template["labels"]["app.kubernetes.io/name"])


def scrape_keep(meta: str) -> str:
    """The regex scrape.yaml's Kubernetes job keeps pods by, for one pod meta label."""
    jobs = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    job = next(j for j in jobs if "kubernetes_sd_configs" in j)
    for relabel in job["relabel_configs"]:
        if relabel.get("source_labels") == [f"__meta_kubernetes_pod_{meta}"] \
                and relabel.get("action") == "keep":
            return str(relabel["regex"])
    pytest.fail(f"scrape.yaml keeps pods by no {meta}")


def hardened(spec: dict[str, Any]) -> None:
    context = spec["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]


def test_node_daemon() -> None:
    daemonset = the("DaemonSet", "asyncsync")
    pod = daemonset["spec"]["template"]["spec"]
    container = by_id("node-daemon/daemonset.yaml:asyncsync")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    hardened(container.spec)
    assert "add" not in container.spec["securityContext"]["capabilities"]
    # The init container is the only root, with CAP_CHOWN alone.
    init = by_id("node-daemon/daemonset.yaml:state-owner")
    hardened(init.spec)
    assert init.spec["securityContext"]["capabilities"]["add"] == ["CHOWN"]
    uid = pod["securityContext"]["runAsUser"]
    assert init.spec["command"][1] == f"{uid}:{pod['securityContext']['runAsGroup']}"
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert container.env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "/$(NODE_NAME)" in container.spec["args"][2]
    assert container.spec["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                           "limits": {"cpu": "1", "memory": "512Mi"}}
    assert container.volume("runs")["hostPath"]["type"] == "Directory"
    assert container.volume("state")["hostPath"]["type"] == "DirectoryOrCreate"
    assert init.mount_of("/var/lib/asyncsync")["name"] == "state"
    assert container.mount_of("/tmp")["name"] == "tmp"
    assert "emptyDir" in container.volume("tmp")
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    priority = the("PriorityClass", pod["priorityClassName"])
    assert 0 < priority["value"] < 1_000_000_000  # below the system-* classes
    the("ServiceAccount", pod["serviceAccountName"])
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_servicemonitor_finds_the_daemons_through_the_service() -> None:
    monitor = the("ServiceMonitor")
    service = the("Service", "asyncsync-metrics")
    daemonset = the("DaemonSet", "asyncsync")
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # scraped when store is down
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    endpoint = monitor["spec"]["endpoints"][0]
    container_ports = {p["name"]: p["containerPort"]
                       for p in daemonset["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service_ports[endpoint["port"]]["targetPort"] in container_ports
    assert {"targetLabel": "job", "replacement": "asyncsync"} in endpoint["relabelings"]


def test_training_job_sidecar() -> None:
    job = the("Job", "yolov8n-coco8")
    pod = job["spec"]["template"]["spec"]
    sidecar = by_id("training-job/job.yaml:asyncsync")
    train = by_id("training-job/job.yaml:train")
    assert sidecar.init and sidecar.spec["restartPolicy"] == "Always"  # native sidecar
    assert pod["restartPolicy"] == "Never"
    field = sidecar.env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == JOB_NAME_LABEL
    assert "/$(JOB_NAME)" in sidecar.spec["args"][2]
    # One runs volume, an emptyDir: the training writes where the sidecar reads.
    source = sidecar.spec["args"][1]
    assert sidecar.mount_of(source)["name"] == "runs"
    assert "emptyDir" in sidecar.volume("runs")
    written = [a.partition("=")[2] for a in train.spec["args"] if a.startswith("project=")]
    assert written and train.mount_of(written[0])["name"] == "runs"
    assert train.mount_of("/dev/shm")["name"] == "dshm"
    assert train.volume("dshm")["emptyDir"]["medium"] == "Memory"
    assert train.spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    hardened(sidecar.spec)
    hardened(train.spec)
    # Every path the training writes to is a volume (the root filesystem is read-only).
    for path in ("/workspace", "/home/trainer", "/tmp", written[0]):
        assert train.mount_of(path)


def test_bulk_migration_shards() -> None:
    job = the("Job", "asyncsync-migration")
    spec = job["spec"]
    container = by_id("bulk-migration/job.yaml:push")
    args = container.spec["args"]
    shard = args[args.index("--shard") + 1]
    assert shard.startswith("auto/")
    count = int(shard.partition("/")[2])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == count
    assert spec["backoffLimitPerIndex"] >= 1
    assert 0 <= spec["maxFailedIndexes"] < count
    assert "--checkpoint-manifest" in args and "--json" in args
    source = container.volume(container.mount_of(args[1])["name"])
    assert source["persistentVolumeClaim"]["readOnly"] is True
    state_dir = args[args.index("--state-dir") + 1]
    assert "emptyDir" in container.volume(container.mount_of(state_dir)["name"])
    hardened(container.spec)


def test_credentials_come_from_the_service_account_or_an_optional_secret() -> None:
    account = the("ServiceAccount", "asyncsync")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert "iam.gke.io/gcp-service-account" in (K8S / "base" / "serviceaccount.yaml").read_text()
    assert account["automountServiceAccountToken"] is False
    secret = the("Secret", "asyncsync-s3-credentials")
    keys = set(secret["stringData"])
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("REPLACE_ME") for v in secret["stringData"].values())
    for container in asyncsync_containers():
        assert container.pod["serviceAccountName"] == "asyncsync"
        for key in keys:
            ref = container.env[key]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "asyncsync-s3-credentials", "key": key, "optional": True}

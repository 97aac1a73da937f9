"""deploy/ (the EMQX cluster under compose, Kubernetes with KEDA), checked without a container engine or a
cluster: every YAML parses; every PatchCast config it embeds loads with the project's closed config
loader, with the PATCHCAST_* variables the services set; every ``patchcast`` command line and probe is a
valid invocation; every metric a Prometheus query or KEDA trigger names is one PatchCast exports (from
the real exporters, rendered here); the cross-references (selectors, ports, config mounts, compose
dependencies, Prometheus targets, load-balancer backends, EMQX seeds) point at things that exist."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_helpers import REPO

from inference_worker.prometheus import WorkerSnapshot, worker_families
from patchcast.cli import build_parser
from patchcast.scaling.backends import ObserveBackend
from patchcast.scaling.service import ScalerService
from shared import protocol
from shared.config import Config, load_config
from shared.prometheus import Family
from shared.topics import V1
from shared.transport import Incoming

DEPLOY = REPO / "deploy"
EMQX_COMPOSE = DEPLOY / "emqx" / "compose.yaml"
K8S = DEPLOY / "kubernetes"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_METRIC = re.compile(r"\b(patchcast_[a-z0-9_]+|process_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(patchcast_[a-z0-9_]+)\{([^}]*)\}")
_K8S_KINDS = {"Namespace", "Service", "StatefulSet", "Deployment", "ConfigMap", "ScaledObject", "PodMonitor",
              "ServiceMonitor"}


def interpolate(text: str) -> str:
    """Compose variable syntax with no variables set: ``${X:-default}`` → default, ``$$`` → ``$``."""
    return _VAR.sub(lambda m: m.group(2) or "", text).replace("$$", "$")


def parses(argv: list[str]) -> None:
    """A valid ``patchcast`` command line (argparse exits on anything it does not know)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"not a valid patchcast invocation: {argv}") from exc
    assert getattr(args, "handler", None) is not None, argv


def loads_config(toml_text: str, tmp_path: Path, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / f"patchcast-{abs(hash(toml_text))}.toml"
    path.write_text(toml_text)
    return load_config(path, environ=env or {})


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


# ---- the metric names PatchCast really exports ---------------------------------------------------

def _worker_metrics(worker: str) -> protocol.WorkerMetrics:
    return protocol.WorkerMetrics(
        worker_id=worker, model="m", at=time.time(), window_s=1.0, queue_depth=3, queue_capacity=256,
        oldest_queued_ms=120.0, requests=40, requests_per_s=12.5, batches=5, batch_size_mean=2.5,
        batch_size_max=4, tokens_per_batch_mean=120.0, busy_fraction=0.6, service_ms_p50=10.0,
        service_ms_p95=40.0, service_ms_p99=80.0, errors_by_code={"busy": 1})


async def _scaler_families() -> list[Family]:
    service = ScalerService(Config(), ObserveBackend())
    await service.backend.scale_to(1)
    service._on_message(Incoming(topic=V1.metrics("worker", "w1"), payload=protocol.encode(_worker_metrics("w1"))))
    await service._decide_once()
    return service.families()


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Metric name → label names, from a worker's own endpoint and the scaler's (observe backend)."""
    snap = WorkerSnapshot(worker_id="w1", model_id="m", requests=1, replies=1, batches=1, queue_depth=0,
                          queue_capacity=256, oldest_queued_s=0.0, engine_restarts=0, decoder_replacements=0,
                          resends_replayed=0, resends_dropped=0, errors_by_code={"busy": 1},
                          last_metrics=_worker_metrics("w1"))
    out: dict[str, set[str]] = {}
    for fam in [*worker_families(snap), *asyncio.run(_scaler_families())]:
        labels = out.setdefault(fam.name, set())
        for sample_labels, _value in fam.samples:
            labels.update(sample_labels)
    return out


def check_query(query: str, exported: dict[str, set[str]]) -> None:
    names = _METRIC.findall(query)
    assert names, f"no PatchCast metric in {query!r}"
    for name in names:
        assert name in exported, f"{name} (in {query!r}) is not a metric PatchCast exports"
    for name, matchers in _SELECTOR.findall(query):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            assert label in exported[name], f"{name} has no label {label!r} (in {query!r})"


# ---- every file ------------------------------------------------------------------------------------

def test_every_yaml_under_deploy_parses():
    files = yaml_files()
    assert EMQX_COMPOSE in files and len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_exporters_render_the_metrics_the_docs_name(exported: dict[str, set[str]]):
    for name in ("patchcast_pool_desired_workers", "patchcast_pool_queue_depth", "patchcast_worker_queue_depth",
                 "patchcast_worker_busy_fraction"):
        assert name in exported, name
    # the per-worker gauges: the worker's own endpoint labels them with the model, the scaler's does not
    assert {"worker", "model"} <= exported["patchcast_worker_queue_depth"]


# ---- compose: the 3-node EMQX cluster ------------------------------------------------------------

@pytest.fixture(scope="module")
def emqx_compose() -> dict[str, Any]:
    data = yaml.safe_load(EMQX_COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def patchcast_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("patchcast")}


def test_compose_has_what_compose_needs(emqx_compose: dict[str, Any]):
    services = emqx_compose["services"]
    assert {"emqx1", "emqx2", "emqx3", "mqtt-lb", "worker", "scaler", "edge", "prometheus"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for cfg in svc.get("configs", []):
            assert cfg["source"] in emqx_compose["configs"] and cfg["target"].startswith("/"), (name, cfg)
        for port in svc.get("ports", []):
            assert re.fullmatch(r"(127\.0\.0\.1:)?\d+:\d+", str(port)), (name, port)
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("${PATCHCAST_DATA"), (name, volume)  # data from the host, read-only
            assert volume.endswith(":ro"), (name, volume)
    for name, svc in patchcast_services(emqx_compose).items():
        build = svc["build"]
        assert (EMQX_COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile", name
    assert services["worker"]["deploy"]["replicas"] >= 2
    grace = float(services["worker"]["stop_grace_period"].rstrip("s"))
    cfg = load_config(environ={})
    assert grace >= cfg.worker.shutdown_grace_s + 5


def test_compose_emqx_nodes_form_one_cluster(emqx_compose: dict[str, Any]):
    nodes = {n: s for n, s in emqx_compose["services"].items() if n.startswith("emqx")}
    assert len(nodes) == 3
    names = set()
    for name, svc in nodes.items():
        env = svc["environment"]
        assert svc["image"].startswith("emqx/emqx:5."), name
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        node = env["EMQX_NODE_NAME"]
        host = node.split("@", 1)[1]
        assert host == svc["hostname"] and host in svc["networks"]["default"]["aliases"], name
        names.add(node)
        seeds = set(env["EMQX_CLUSTER__STATIC__SEEDS"].strip("[]").split(","))
        assert seeds == {s["environment"]["EMQX_NODE_NAME"] for s in nodes.values()}, name
    assert len(names) == 3
    # the load balancer's backends are the three nodes
    haproxy = emqx_compose["configs"]["haproxy-cfg"]["content"]
    backends = set(re.findall(r"^\s*server \S+ (\S+):1883", haproxy, re.M))
    assert backends == set(nodes), backends


def test_compose_patchcast_services_are_valid_invocations_and_configs(emqx_compose: dict[str, Any],
                                                                      tmp_path: Path):
    toml_text = interpolate(emqx_compose["configs"]["patchcast-toml"]["content"])
    base = loads_config(toml_text, tmp_path)
    assert base.worker.metrics_port and base.scaler.backend == "observe"
    emqx_env = emqx_compose["services"]["emqx1"]["environment"]
    assert emqx_env["EMQX_MQTT__MAX_PACKET_SIZE"] == "1MB" and base.broker.max_packet_bytes == 1 << 20
    services = emqx_compose["services"]
    for name, svc in patchcast_services(emqx_compose).items():
        command = [interpolate(str(a)) for a in svc["command"]]
        parses(command)
        assert command[command.index("--config") + 1] == "/etc/patchcast/patchcast.toml", name
        assert [c["target"] for c in svc["configs"]] == ["/etc/patchcast/patchcast.toml"], name
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        cfg = loads_config(toml_text, tmp_path, env)
        assert cfg.broker.host in services, (name, cfg.broker.host)
    # devices on one node, workers over the load balancer: requests cross the cluster
    assert services["edge"]["environment"]["PATCHCAST_BROKER__HOST"] == "emqx1"
    assert services["worker"]["environment"]["PATCHCAST_BROKER__HOST"] == "mqtt-lb"
    check = services["worker"]["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    argv = shlex.split(interpolate(check[1]).replace("$HOSTNAME", "host"))
    assert argv[:2] == ["patchcast", "health"]
    parses(argv[1:])


def test_compose_prometheus_scrapes_the_workers_and_the_scaler(emqx_compose: dict[str, Any], tmp_path: Path):
    prom = yaml.safe_load(interpolate(emqx_compose["configs"]["prometheus-yml"]["content"]))
    base = loads_config(interpolate(emqx_compose["configs"]["patchcast-toml"]["content"]), tmp_path)
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    worker_sd = jobs["patchcast-worker"]["dns_sd_configs"][0]
    assert worker_sd["names"] == ["worker"] and worker_sd["port"] == base.worker.metrics_port
    assert jobs["patchcast-scaler"]["static_configs"][0]["targets"] == [f"scaler:{base.scaler.metrics_port}"]
    scaler = emqx_compose["services"]["scaler"]["command"]
    assert scaler[scaler.index("--metrics-port") + 1] == str(base.scaler.metrics_port)
    for target in jobs["emqx"]["static_configs"][0]["targets"]:
        assert target.split(":")[0] in emqx_compose["services"], target


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kust["resources"])
    for name in resources:
        assert (K8S / name).is_file(), name
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # the Prometheus Operator's monitors need its CRDs: applied on their own where it runs
    assert on_disk - resources == {"prometheus-monitors.yaml"}


def test_manifests_are_kubernetes_objects():
    seen = set()
    for path, doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert doc["kind"] in _K8S_KINDS, (path, doc["kind"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(), path


def _workloads() -> list[dict[str, Any]]:
    return [*by_kind("Deployment").values(), *by_kind("StatefulSet").values()]


def test_services_select_pods_and_name_their_ports():
    for name, svc in by_kind("Service").items():
        matches = [w for w in _workloads()
                   if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pods"
        ports = {p["name"]: p["containerPort"] for w in matches for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (name, port)
    emqx = by_kind("StatefulSet")["emqx"]
    assert emqx["spec"]["serviceName"] in by_kind("Service") and emqx["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in emqx["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "dns"
    assert env["EMQX_CLUSTER__DNS__NAME"].startswith(f"{emqx['spec']['serviceName']}.patchcast.svc")
    assert by_kind("Service")[emqx["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def _patchcast_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for w in _workloads():
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"].split(":")[0] == "patchcast":
                yield w["metadata"]["name"], pod, c


def test_patchcast_pods_run_valid_commands_on_the_mounted_config(tmp_path: Path):
    configmaps = by_kind("ConfigMap")
    toml_text = configmaps["patchcast-config"]["data"]["patchcast.toml"]
    base = loads_config(toml_text, tmp_path)
    assert base.broker.host in by_kind("Service") and base.scaler.backend == "observe"
    emqx_env = {e["name"]: e.get("value") for e in
                by_kind("StatefulSet")["emqx"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert emqx_env["EMQX_MQTT__MAX_PACKET_SIZE"] == "1MB" and base.broker.max_packet_bytes == 1 << 20
    names = set()
    for name, pod, c in _patchcast_containers():
        names.add(name)
        parses(c["args"])
        config_path = c["args"][c["args"].index("--config") + 1]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = [(volumes[n]["configMap"]["name"], path) for n, path in mounts.items() if "configMap" in volumes[n]]
        assert any(config_path.startswith(path + "/") and config_path.rsplit("/", 1)[1] in configmaps[cm]["data"]
                   for cm, path in mounted), (name, config_path)
        env = {e["name"]: e.get("value", "from-a-secret") for e in c.get("env", [])}
        loads_config(toml_text, tmp_path, env)
        for probe in ("readinessProbe", "livenessProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[:2] == ["sh", "-c"], (name, probe)
                argv = shlex.split(command[2].replace("$HOSTNAME", "host"))
                assert argv[:2] == ["patchcast", "health"], (name, probe)
                parses(argv[1:])
    assert names == {"patchcast-worker", "patchcast-scaler"}


def test_worker_pods_drain_and_expose_their_metrics(tmp_path: Path):
    base = loads_config(by_kind("ConfigMap")["patchcast-config"]["data"]["patchcast.toml"], tmp_path)
    worker = by_kind("Deployment")["patchcast-worker"]
    pod = worker["spec"]["template"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= base.worker.shutdown_grace_s + 10
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == base.worker.metrics_port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    scaler = by_kind("Deployment")["patchcast-scaler"]["spec"]["template"]
    args = scaler["spec"]["containers"][0]["args"]
    assert args[args.index("--backend") + 1] == "observe"
    assert int(args[args.index("--metrics-port") + 1]) == base.scaler.metrics_port == int(
        scaler["metadata"]["annotations"]["prometheus.io/port"])


def test_keda_scales_the_worker_deployment_on_exported_metrics(exported: dict[str, set[str]]):
    scaled = by_kind("ScaledObject")
    assert list(scaled) == ["patchcast-worker"]
    spec = scaled["patchcast-worker"]["spec"]
    assert spec["scaleTargetRef"]["name"] in by_kind("Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    queries = []
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
        check_query(meta["query"], exported)
        queries.append(meta["query"])
    assert any("patchcast_pool_desired_workers" in q for q in queries)


def test_monitors_select_the_pods_and_services():
    monitors = {d["kind"]: d for d in yaml.safe_load_all((K8S / "prometheus-monitors.yaml").read_text())}
    worker_labels = by_kind("Deployment")["patchcast-worker"]["spec"]["template"]["metadata"]["labels"]
    assert monitors["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    assert monitors["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        by_kind("Service")["patchcast-scaler"]["metadata"]["labels"].items())


def test_every_metric_named_under_deploy_is_exported(exported: dict[str, set[str]]):
    """Queries in comments or docs inside deploy/ included: a renamed metric fails here (a name ending in
    ``_`` is a prefix, as in ``patchcast_pool_*``)."""
    for path in yaml_files():
        for name in set(_METRIC.findall(path.read_text())):
            known = any(e.startswith(name) for e in exported) if name.endswith("_") else name in exported
            assert known, f"{path.relative_to(REPO)} names {name}, which PatchCast does not export"

"""compose.yaml and Dockerfile, checked without a container engine: every service command is a valid
``patchcast`` invocation, every mounted file exists, the broker profile agrees with broker/mosquitto.conf,
and the Dockerfile's steps are checkable (sources exist, the project is installed, the entry point is
``patchcast``, the torch pin fits pyproject). ``docker compose config`` runs too where the client can."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from ops_helpers import REPO

from patchcast.cli import build_parser
from shared.config import BrokerConfig
from shared.models import ZOO_DIR

COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose variable syntax with no variables set: ``${X:-default}`` → default, ``$$`` → ``$``."""
    return _VAR.sub(lambda m: m.group(2) or "", text).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def parses(argv: list[str]) -> None:
    """A valid ``patchcast`` command line (argparse exits on anything it does not know)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports the problem on stderr
        raise AssertionError(f"not a valid patchcast invocation: {argv}") from exc
    assert getattr(args, "handler", None) is not None, argv


def patchcast_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("patchcast")}


def test_services_present(compose: dict[str, Any]):
    services = compose["services"]
    assert {"mosquitto", "worker", "edge", "monitor"} <= set(services)
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    # one descriptor per connection: the broker's fd limit is its real connection cap (Fleet scale)
    assert services["mosquitto"]["ulimits"]["nofile"]["hard"] >= 20_000
    assert services["worker"]["deploy"]["replicas"] >= 1
    assert set(patchcast_services(compose)) == {"worker", "edge", "monitor", "worker-vehicles", "worker-animals"}
    # the specialist pools start only on request, and serve the zoo's specialists on their own topics
    for name in ("worker-vehicles", "worker-animals"):
        svc = services[name]
        assert svc["profiles"] == ["experts"]
        model_id = name.removeprefix("worker-")
        assert svc["command"][svc["command"].index("--model-id") + 1] == model_id
        assert svc["command"][svc["command"].index("--server-model") + 1] == f"zoo:cifar10-{model_id}"
        assert (ZOO_DIR / f"cifar10-{model_id}.safetensors").is_file()
    for svc in patchcast_services(compose).values():
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["environment"]["PATCHCAST_BROKER__HOST"] == "mosquitto"


def test_service_commands_are_patchcast_invocations(compose: dict[str, Any]):
    for name, svc in patchcast_services(compose).items():
        command = [interpolate(str(a)) for a in svc["command"]]
        parses(command)
        assert command[0] == name.split("-")[0] if name != "monitor" else command == ["monitor"]


def test_service_environments_are_valid_configs(compose: dict[str, Any]):
    """Every PATCHCAST_* variable a service sets (defaults filled in) loads into the closed config."""
    from shared.config import load_config

    for name, svc in patchcast_services(compose).items():
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        cfg = load_config(environ=env)
        assert cfg.broker.host == "mosquitto", name
    edge_env = {k: interpolate(str(v)) for k, v in compose["services"]["edge"]["environment"].items()}
    assert load_config(environ=edge_env).routing.min_share == 0.95
    routed = load_config(environ={**edge_env, "PATCHCAST_ROUTING__EXPERTS": "vehicles=0,1,8,9; animals=2,3,4,5,6,7"})
    assert routed.routing.experts.startswith("vehicles=")


def test_healthchecks_use_availability(compose: dict[str, Any]):
    seen = 0
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck", {})
        if check.get("disable"):
            continue
        test = [interpolate(str(a)) for a in check["test"]]
        kind, rest = test[0], test[1:]
        argv = shlex.split(rest[0].replace("$HOSTNAME", "host")) if kind == "CMD-SHELL" else rest
        assert kind in ("CMD", "CMD-SHELL"), name
        if argv[0] == "patchcast":
            parses(argv[1:])
            assert argv[1] == "health" and "--role" in argv
            seen += 1
        else:
            assert name == "mosquitto" and argv[0] == "mosquitto_sub"
    assert seen == 4  # the worker pools and the edge


def test_mounted_files_exist(compose: dict[str, Any]):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            raw = volume if isinstance(volume, str) else volume["source"]
            source = raw.split(":", 1)[0]
            if source.startswith("${"):  # data from the host ($PATCHCAST_DATA): documented, not in the repo
                assert "PATCHCAST_DATA" in source, (name, source)
                continue
            assert source.startswith("."), (name, source)
            assert (REPO / source).exists(), (name, source)
    for config in compose.get("configs", {}).values():
        if "file" in config:
            assert (REPO / config["file"]).exists(), config


def _directives(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            out.setdefault(key, value.strip())
    return out


def test_broker_profile_matches_project_config(compose: dict[str, Any]):
    inline = _directives(compose["configs"]["mosquitto-conf"]["content"])
    local = _directives((REPO / "broker" / "mosquitto.conf").read_text())
    for key in ("max_packet_size", "set_tcp_nodelay", "persistence", "max_inflight_messages", "max_queued_messages"):
        assert inline.get(key) == local.get(key), key
    assert int(inline["max_packet_size"]) == BrokerConfig().max_packet_bytes
    assert inline["listener"].split() == ["1883", "0.0.0.0"]  # reachable on the compose network …
    assert compose["services"]["mosquitto"]["ports"] == ["127.0.0.1:1883:1883"]  # … and only loopback on the host


def _dockerfile() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            steps.append((op.upper(), rest.strip()))
    return steps


def test_dockerfile_steps():
    steps = _dockerfile()
    ops = [op for op, _ in steps]
    assert ops[0] == "FROM" and steps[0][1].startswith("python:3.11")
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = []
    for op, rest in steps:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY source {src} missing"
                assert src.rstrip("/") not in ignored, f"COPY source {src} is excluded by .dockerignore"
                copied.append(src.rstrip("/"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    # Everything the package needs is copied: pyproject, its readme, every package folder.
    assert {"pyproject.toml", project["project"]["readme"]} <= set(copied)
    packages = {p.split("*")[0] for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied), packages - set(copied)
    runs = [rest for op, rest in steps if op == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs), "the project itself is not installed"
    assert project["project"]["name"] == "patchcast" and "patchcast" in project["project"]["scripts"]
    entry = [rest for op, rest in steps if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["patchcast"]
    cmd = [rest for op, rest in steps if op == "CMD"]
    parses(yaml.safe_load(cmd[-1]))


def test_dockerfile_torch_pin_fits_pyproject():
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    bounds = {Requirement(d).name: Requirement(d).specifier for d in project["project"]["dependencies"]}
    pins = dict(re.findall(r'"(torch|torchvision)==([0-9.]+)"', DOCKERFILE.read_text()))
    assert set(pins) == {"torch", "torchvision"}
    for name, version in pins.items():
        assert bounds[name].contains(version), (name, version, str(bounds[name]))


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"docker client has no compose plugin: {(probe.stderr or probe.stdout).strip()[:120]}")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and re.search(r"daemon|connect|engine", result.stderr, re.I):
        pytest.skip(f"compose config needs an engine here: {result.stderr.strip()[:120]}")
    assert result.returncode == 0, result.stderr


def test_image_installs_every_module():
    """``pip install .`` ships only what setuptools finds: every folder of Python modules under the
    included packages must be a package (have ``__init__.py``), or the image would miss it."""
    from setuptools import find_packages

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(REPO), include=include))
    for top in {p.split("*")[0] for p in include}:
        for module in (REPO / top).rglob("*.py"):
            package = ".".join(module.parent.relative_to(REPO).parts)
            assert package in found, f"{module.relative_to(REPO)} is outside any installed package"


# ---- compose.production.yaml: the production broker profile layered on compose.yaml ---------------

PRODUCTION = REPO / "compose.production.yaml"
SECRETS_ENV = {"PATCHCAST_WORKER_PASSWORD": "w", "PATCHCAST_MONITOR_PASSWORD": "m"}


def _interpolate_with(text: str, values: dict[str, str]) -> str:
    """Compose interpolation where ``values`` are set (``${X:?msg}`` takes the value)."""
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")
    return pattern.sub(lambda m: values.get(m.group(1), m.group(2) or ""), text).replace("$$", "$")


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    data = yaml.safe_load(PRODUCTION.read_text())
    assert isinstance(data, dict)
    return data


def test_production_overlay_gives_every_client_tls_and_its_login(compose: dict[str, Any],
                                                                 production: dict[str, Any]):
    """Each PatchCast service's environment, base merged with the overlay, is a valid config over TLS
    on 8883 with the CA from its mounted secrets; workers and the monitor log in; devices use the
    per-device credentials file."""
    from shared.config import load_config

    base = patchcast_services(compose)
    overlay = production["services"]
    assert set(base) <= set(overlay), set(base) - set(overlay)
    for name in base:
        env = {k: _interpolate_with(str(v), SECRETS_ENV)
               for k, v in {**base[name]["environment"], **overlay[name]["environment"]}.items()}
        cfg = load_config(environ=env)
        assert cfg.broker.host == "mosquitto" and cfg.broker.port == 8883 and cfg.broker.tls, name
        assert cfg.broker.tls_ca_file == "/tls/ca.crt" and cfg.broker.tls_verify_hostname, name
        assert cfg.broker.tls_cert_file.startswith("/tls/client-") and cfg.broker.tls_key_file, name
        mounts = [_interpolate_with(v, {}).split(":")[1] for v in overlay[name]["volumes"]]
        assert "/tls" in mounts, name
        if name == "edge":
            assert cfg.edge.credentials_file == "/secrets/fleet.cred" and "/secrets/fleet.cred" in mounts
            assert not cfg.broker.username
        else:
            assert cfg.broker.username in ("worker-pool", "monitor") and cfg.broker.password in ("w", "m"), name
    for svc in overlay.values():
        for volume in svc.get("volumes", []):
            assert volume.startswith("${PATCHCAST_SECRETS:-./secrets}/"), volume  # never the repository's files


def test_production_overlay_broker_config_matches_the_profile(production: dict[str, Any]):
    inline = _directives(production["configs"]["mosquitto-production-conf"]["content"])
    profile = _directives((REPO / "broker" / "production" / "mosquitto.conf").read_text())
    for key in ("max_packet_size", "set_tcp_nodelay", "persistence", "max_inflight_messages", "max_queued_messages",
                "max_queued_bytes", "memory_limit", "max_keepalive", "allow_anonymous", "per_listener_settings",
                "tls_version"):
        assert inline.get(key) == profile.get(key), key
    assert inline["allow_anonymous"] == "false" and inline["plugin"].endswith("mosquitto_dynamic_security.so")
    assert inline["require_certificate"] == "true"
    mosquitto = production["services"]["mosquitto"]
    assert mosquitto["command"][-1] == mosquitto["configs"][0]["target"]
    assert "8883:8883" in mosquitto["ports"]


def test_production_overlay_broker_config_loads_in_this_mosquitto(production: dict[str, Any], tmp_path):
    """The overlay's broker config, with this host's plugin and test certificates, starts Mosquitto."""
    from patchcast.broker import BrokerProcess, SecurityFile, find_dynsec_plugin, find_mosquitto, make_test_certs
    from shared.errors import BrokerProcessError

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerProcessError as exc:
        pytest.skip(str(exc))
    template = tmp_path / "production.conf"
    template.write_text(production["configs"]["mosquitto-production-conf"]["content"])
    certs = make_test_certs(tmp_path / "tls", days=1)
    sec = SecurityFile.load(tmp_path / "dynsec.json")
    sec.add_client("monitor", "observer")
    with BrokerProcess(port=0, template=template, tls=certs.listener(require_certificate=True),
                       security_file=sec.save()) as broker:
        assert broker.running()

"""The service commands: help texts, and a clear message (no traceback) without mosquitto."""

from __future__ import annotations

import pytest

from patchcast import broker as broker_module
from patchcast.broker import parse_address, render_config
from patchcast.cli import main
from shared.errors import ConfigError


@pytest.mark.parametrize("command", ["broker", "worker", "edge"])
def test_help_explains_the_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: patchcast " + command in out
    assert {"broker": "--port", "worker": "--group", "edge": "--devices"}[command] in out


def test_broker_without_mosquitto_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(broker_module.shutil, "which", lambda _name: None)
    monkeypatch.setattr(broker_module, "_SEARCH_DIRS", ())
    assert main(["broker", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "not installed" in err and "apt-get install mosquitto" in err and "brew" in err and "docker" in err


def test_render_config_sets_port_and_packet_limit() -> None:
    text = render_config("# c\nlistener 1883 127.0.0.1\nmax_packet_size 1048576\nset_tcp_nodelay true\n",
                         host="127.0.0.1", port=41234, max_packet_bytes=2048)
    assert "listener 41234 127.0.0.1" in text and "max_packet_size 2048" in text and "set_tcp_nodelay true" in text
    assert "listener 1883" not in text


def test_project_broker_config_matches_the_client_limit() -> None:
    from shared.config import BrokerConfig

    text = broker_module.LOCAL_CONF.read_text()
    assert f"max_packet_size {BrokerConfig().max_packet_bytes}" in text
    assert "set_tcp_nodelay true" in text and "listener 1883 127.0.0.1" in text
    prod = (broker_module.REPO_ROOT / "broker" / "production" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in prod and "mosquitto_dynamic_security.so" in prod
    assert "listener 8883" in prod and "certfile" in prod and "tls_version tlsv1.2" in prod
    assert "\nacl_file" not in prod  # Mosquitto 2.0 checks an acl_file only at delivery (broker/production/README.md)


@pytest.mark.parametrize(("text", "expected"), [("h:1", ("h", 1)), ("h", ("h", None)), (":7", ("127.0.0.1", 7)),
                                                ("[::1]:1884", ("::1", 1884))])
def test_parse_address(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_address(text) == expected


def test_parse_address_rejects_bad_ports() -> None:
    with pytest.raises(ConfigError):
        parse_address("h:99999")


def test_worker_on_a_missing_gpu_fails_clearly(model_files) -> None:
    """A real process (its logging set up as in production), with no GPU visible to it."""
    import os
    import subprocess
    import sys

    _edge, server = model_files
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "patchcast.cli", "worker", "--device", "cuda", "--server-model",
                           f"file:{server}", "--broker", "127.0.0.1:1", "--log-format", "console"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "worker.device is 'cuda' but this torch sees no CUDA GPU" in proc.stderr

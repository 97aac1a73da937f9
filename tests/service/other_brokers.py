"""A second MQTT v5 broker implementation for the service tests: rumqttd (Rust), not Mosquitto.

rumqttd comes from the PyPI wheel ``iotcore`` (rumqttd compiled in; a dev extra of this project).
Tests marked ``any_broker`` run over Mosquitto and over rumqttd (tests/service/conftest.py); without
``iotcore`` the rumqttd runs are skipped. rumqttd does not cluster (its cluster settings are not
implemented in 0.20): this shows broker independence, not a multi-node broker (docs/deployment.md,
"Clustered brokers").
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from waiting import wait_until

from patchcast.broker import free_port
from shared.transport import mqtt_ping


def rumqttd_installed() -> bool:
    return importlib.util.find_spec("iotcore") is not None


# rumqttd's own configuration: one MQTT v5 listener on loopback, packets up to PatchCast's
# broker.max_packet_bytes (1 MiB).
RUMQTTD_CONF = """\
id = 0

[router]
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "patchcast-v5"
listen = "{host}:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true
"""


@dataclass
class Rumqttd:
    """rumqttd in a child process (``python -m iotcore --config FILE``) on a free loopback port."""

    host: str = "127.0.0.1"
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Rumqttd:
        self._dir = tempfile.TemporaryDirectory(prefix="patchcast-rumqttd-")
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port(self.host)
            conf = Path(self._dir.name) / "rumqttd.toml"
            conf.write_text(RUMQTTD_CONF.format(host=self.host, port=self.port))
            log = open(Path(self._dir.name) / "rumqttd.log", "wb")  # noqa: SIM115 - closed by the child's exit
            try:
                self._proc = subprocess.Popen([sys.executable, "-m", "iotcore", "--config", str(conf),
                                               "--log-level", "warning"],
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)
            finally:
                log.close()
            if self._wait_ready(self._proc, 15.0):
                return self
            self.stop_process()
        raise RuntimeError(f"rumqttd did not start: {(Path(self._dir.name) / 'rumqttd.log').read_text()[-800:]}")

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
        """True once rumqttd answers a CONNECT; False when it exited or ``timeout_s`` passed first."""
        wait_until(lambda: proc.poll() is not None or mqtt_ping(self.host, self.port, timeout=0.5), timeout_s,
                   message="rumqttd to accept connections", fail=False)
        return proc.poll() is None and mqtt_ping(self.host, self.port, timeout=0.5)

    def stop_process(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        self.stop_process()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

"""PatchCast over a second MQTT v5 broker implementation: rumqttd (Rust), not Mosquitto.

The same end-to-end, delivery and worker-kill tests as over Mosquitto (the test functions of
test_service_end_to_end.py, test_delivery.py and test_service_worker_kill.py, collected here again)
run against rumqttd 0.20, with this module's ``broker`` fixture in place of the Mosquitto one. No
PatchCast code knows which broker it talks to: only MQTT v5 (shared subscriptions ``$share/<group>/…``,
response topic, correlation data, message expiry, retained availability, PUBACK reason codes).

rumqttd comes from the PyPI wheel ``iotcore`` (rumqttd compiled in; ``pip install iotcore``, a dev
extra of this project). Without it the module is skipped. rumqttd does not cluster (its cluster
settings are not implemented in 0.20): this shows broker independence, not a multi-node broker
(docs/deployment.md, "Clustered brokers").
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

if importlib.util.find_spec("iotcore") is None:
    pytest.skip("rumqttd is not installed (pip install iotcore: rumqttd compiled into a wheel)",
                allow_module_level=True)

import test_delivery as delivery
import test_service_end_to_end as e2e
import test_service_worker_kill as kill
from service_helpers import async_test

from patchcast.broker import free_port
from shared.config import load_config
from shared.topics import V1
from shared.transport import NO_SUBSCRIBERS, Transport, mqtt_ping

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
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._proc.poll() is None:
                if mqtt_ping(self.host, self.port, timeout=0.5):
                    return self
                time.sleep(0.05)
            self.stop_process()
        raise RuntimeError(f"rumqttd did not start: {(Path(self._dir.name) / 'rumqttd.log').read_text()[-800:]}")

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


@pytest.fixture(scope="module")
def broker() -> Iterator[Rumqttd]:
    """rumqttd in place of the Mosquitto fixture, for every test collected in this module."""
    b = Rumqttd().start()
    try:
        yield b
    finally:
        b.stop()


# The same tests as over Mosquitto, collected here with the fixture above.
test_rumqttd_end_to_end_two_workers_eight_devices = (
    e2e.test_two_workers_eight_devices_every_request_answered_once_on_its_own_topic)
test_rumqttd_resend_answered_from_memory = (
    delivery.test_resend_after_a_dropped_reply_is_answered_from_memory_and_computed_once)
test_rumqttd_device_resends_under_the_same_id = (
    delivery.test_device_resends_under_the_same_id_and_hands_one_answer_per_image)
test_rumqttd_sigkill_one_worker = (  # marked slow where it is defined
    kill.test_sigkill_one_worker_loses_nothing_silently_and_sigterm_drains)


@async_test(30)
async def test_rumqttd_acknowledges_a_publish_to_nobody_with_plain_success(broker, unique) -> None:
    """Where this broker differs: MQTT v5 lets a broker answer a QoS 1 publish that matched no
    subscriber with PUBACK 0x10 ("no matching subscribers"); Mosquitto does, rumqttd 0.20 answers
    0x00. PatchCast's fast re-send (test_delivery.py, a request that reached no worker) needs
    the 0x10; without it a device re-sends after edge.reply_timeout_s, as with a lost request."""
    cfg = load_config(overrides={"broker": {"port": broker.port}}, environ={})
    client = Transport(cfg.broker, client_id=f"{unique}-lonely")
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(client.run(), name="client")
        await client.wait_connected()
        code = await client.publish(V1.request(f"nobody-{unique}", f"{unique}cam-0000"), b"x", qos=1)
        task.cancel()
    assert code == 0 != NO_SUBSCRIBERS

"""Run a local Mosquitto for development, tests and the demo.

The project's ``broker/mosquitto.conf`` is the template: :func:`render_config` replaces its
``listener`` and ``max_packet_size`` lines, :class:`BrokerProcess` writes the result to a
temporary folder, starts ``mosquitto -c`` on it and waits until the broker answers an MQTT
CONNECT. Used by ``patchcast broker``, the service tests and the demo.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from shared.errors import BrokerProcessError

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONF = REPO_ROOT / "broker" / "mosquitto.conf"

INSTALL_HINT = (
    "install Mosquitto: 'apt-get install mosquitto' (Debian/Ubuntu), 'brew install mosquitto' (macOS), "
    "or run the official image: 'docker run -p 1883:1883 eclipse-mosquitto:2' and point "
    "--broker / PATCHCAST_BROKER__PORT at it")

# Used only when the package runs without its checkout (no broker/ folder beside it).
_FALLBACK_CONF = """\
listener 1883 127.0.0.1
allow_anonymous true
max_packet_size 1048576
set_tcp_nodelay true
persistence false
log_dest stderr
"""

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin")


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` executable; :class:`BrokerProcessError` with install hints if absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SEARCH_DIRS:  # sbin is often not on a normal user's PATH
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BrokerProcessError("'mosquitto' is not installed (looked on PATH and in "
                             f"{', '.join(_SEARCH_DIRS)}); {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_config(template: str, *, host: str, port: int, max_packet_bytes: int | None = None) -> str:
    """Template text with its listener set to ``host:port`` (and ``max_packet_size`` replaced)."""
    lines = []
    listener_done = False
    for line in template.splitlines():
        stripped = line.strip()
        if re.match(r"^listener\s", stripped):
            if listener_done:
                continue  # one listener only: the others would collide across test brokers
            line, listener_done = f"listener {port} {host}", True
        elif max_packet_bytes is not None and re.match(r"^max_packet_size\s", stripped):
            line = f"max_packet_size {max_packet_bytes}"
        lines.append(line)
    if not listener_done:
        lines.insert(0, f"listener {port} {host}")
    return "\n".join(lines) + "\n"


def mqtt_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an MQTT v5 CONNECT gets a CONNACK (the broker is up; it may still refuse this
    anonymous probe, as the production profile does)."""
    client_id = b"patchcast-probe"
    # CONNECT: protocol name "MQTT", level 5, flags clean start, keep-alive 5 s, no properties.
    variable = b"\x00\x04MQTT\x05\x02\x00\x05\x00" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(variable)]) + variable
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            head = s.recv(4)
            ok = len(head) >= 2 and head[0] == 0x20
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT, so the broker does not log a lost client
            return ok
    except OSError:
        return False


@dataclass
class BrokerProcess:
    """A ``mosquitto`` child process on ``host:port`` with a rendered copy of ``template``.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``port=0`` picks a free port.
    """

    port: int = 0
    host: str = "127.0.0.1"
    template: Path | None = None
    max_packet_bytes: int | None = None
    ready_timeout_s: float = 10.0
    executable: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return Path(self._dir.name) / "mosquitto.log" if self._dir else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> BrokerProcess:
        exe = self.executable or find_mosquitto()
        template_path = self.template or LOCAL_CONF
        template = template_path.read_text() if template_path.is_file() else _FALLBACK_CONF
        self._dir = tempfile.TemporaryDirectory(prefix="patchcast-broker-")
        fixed_port = self.port != 0
        # A free port can be taken between the probe and mosquitto's bind: retry with another.
        for _attempt in range(1 if fixed_port else 3):
            if not fixed_port:
                self.port = free_port(self.host)
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(render_config(template, host=self.host, port=self.port,
                                          max_packet_bytes=self.max_packet_bytes))
            log = open(Path(self._dir.name) / "mosquitto.log", "wb")  # noqa: SIM115 - closed by the child's exit
            try:
                self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            if self._wait_ready():
                return self
            self._terminate()
        detail = self.log_path.read_text(errors="replace").strip()[-800:] if self.log_path else ""
        self._cleanup_dir()
        raise BrokerProcessError(f"mosquitto did not start on {self.host}:{self.port}: "
                                 f"{detail or 'no output'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if mqtt_ping(self.host, self.port, timeout=0.5):
                return True
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def stop(self) -> None:
        self._terminate()
        self._cleanup_dir()

    def wait(self) -> int:
        """Block until the broker exits (for ``patchcast broker`` in the foreground)."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def parse_address(text: str) -> tuple[str, int | None]:
    """``host:port``, ``host`` or ``:port`` → (host, port or None); ``[v6]:port`` for IPv6 literals."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            from shared.errors import ConfigError

            raise ConfigError(f"--broker {text!r}: port must be 1..65535")
        return host or "127.0.0.1", int(port_text)
    return host or "127.0.0.1", None

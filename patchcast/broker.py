"""Run a local Mosquitto for development, tests and the demo, or the production profile.

The project's ``broker/mosquitto.conf`` is the template: :func:`render_config` replaces its
``listener`` and ``max_packet_size`` lines, :class:`BrokerProcess` writes the result to a
temporary folder, starts ``mosquitto -c`` on it and waits until the broker answers an MQTT
CONNECT (:func:`shared.transport.mqtt_ping`: the transport is the project's only MQTT code).
Used by ``patchcast broker``, the service tests and the demo.

The production profile (``broker/production/mosquitto.conf``) authenticates every client and
checks every subscription and publish through Mosquitto's dynamic-security plugin:
:class:`SecurityFile` writes the plugin's JSON (one client and one role per device, its client id
bound to its user name; shared roles for worker pools and observers), :func:`make_test_certs` a
CA and certificates for its TLS listener (openssl), and :class:`BrokerProcess` runs it with
``security_file`` and ``tls`` set. See broker/production/README.md for why the plugin and not
``acl_file`` (Mosquitto 2.0 checks an acl_file only at delivery, never at SUBSCRIBE).
"""

from __future__ import annotations

import base64
import getpass
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from shared.errors import BrokerProcessError
from shared.topics import PROTOCOL_PREFIX, validate_id
from shared.transport import mqtt_ping

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONF = REPO_ROOT / "broker" / "mosquitto.conf"
PRODUCTION_CONF = REPO_ROOT / "broker" / "production" / "mosquitto.conf"

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


# Listener-scoped TLS settings of a template: dropped with its listeners (BrokerProcess writes its own).
_LISTENER_TLS = frozenset({"certfile", "keyfile", "cafile", "capath", "crlfile", "require_certificate",
                           "tls_version", "ciphers", "ciphers_tls1.3", "use_identity_as_username",
                           "use_subject_as_username", "tls_engine", "tls_keyform"})


@dataclass(frozen=True)
class ListenerTLS:
    """The TLS settings of a test or local listener (PEM files)."""

    certfile: Path
    keyfile: Path
    cafile: Path
    require_certificate: bool = False  # mutual TLS: clients must present a certificate signed by cafile

    def lines(self) -> list[str]:
        out = [f"certfile {self.certfile}", f"keyfile {self.keyfile}", f"cafile {self.cafile}",
               "tls_version tlsv1.2"]
        if self.require_certificate:
            out.append("require_certificate true")
        return out


def render_config(template: str, *, host: str, port: int, max_packet_bytes: int | None = None,
                  tls: ListenerTLS | None = None, overrides: Mapping[str, str] | None = None) -> str:
    """Template text with one listener on ``host:port`` (TLS when ``tls`` is given; the template's
    other listeners and their TLS lines are dropped), ``max_packet_size`` replaced, and each
    directive in ``overrides`` set to its value (appended when the template lacks it)."""
    lines = []
    listener_done = False
    pending = dict(overrides or {})
    listener = [f"listener {port} {host}", *(tls.lines() if tls else [])]
    for line in template.splitlines():
        stripped = line.strip()
        key = stripped.split(None, 1)[0] if stripped and not stripped.startswith("#") else ""
        if key == "listener":
            if listener_done:
                continue  # one listener only: the others would collide across test brokers
            lines.extend(listener)
            listener_done = True
            continue
        if key in _LISTENER_TLS:
            continue
        if max_packet_bytes is not None and key == "max_packet_size":
            line = f"max_packet_size {max_packet_bytes}"
        elif key in (overrides or {}):
            if key not in pending:
                continue  # a directive given twice in the template: keep the first, overridden
            line = f"{key} {pending.pop(key)}"
        lines.append(line)
    if not listener_done:
        lines[0:0] = listener
    lines.extend(f"{key} {value}" for key, value in pending.items())
    return "\n".join(lines) + "\n"


def tcp_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to ``host:port`` is accepted (a TLS listener's readiness: a plain
    probe cannot speak to it, and with require_certificate an anonymous TLS one cannot either)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
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
    tls: ListenerTLS | None = None  # a TLS listener instead of plain MQTT
    security_file: Path | None = None  # dynamic-security JSON (SecurityFile): the production profile
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
                                          max_packet_bytes=self.max_packet_bytes, tls=self.tls,
                                          overrides=self._overrides(Path(self._dir.name))))
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

    def _overrides(self, folder: Path) -> dict[str, str]:
        """Directives a rendered copy must change: the security plugin, and the template's system
        paths (persistence, syslog) moved into this broker's own folder."""
        out = {"persistence_location": f"{folder}/", "log_dest": "stderr"}
        if self.security_file is not None:
            out["allow_anonymous"] = "false"
            out["plugin"] = find_dynsec_plugin()
            out["plugin_opt_config_file"] = str(Path(self.security_file).resolve())
        if os.name == "posix" and os.geteuid() == 0:
            # Started as root, mosquitto would switch to its own user, which cannot read this
            # process's private files (security file, keys): keep the starting user.
            out["user"] = getpass.getuser()
        return out

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            ready = tcp_ping if self.tls else mqtt_ping
            if ready(self.host, self.port, timeout=0.5):
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


# ---- production profile: dynamic-security plugin ------------------------------------------------

_PLUGIN_DIRS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                "/usr/local/lib/mosquitto_dynamic_security.so", "/usr/local/lib/*/mosquitto_dynamic_security.so",
                "/opt/homebrew/lib/mosquitto_dynamic_security.so", "/usr/local/opt/mosquitto/lib/*.so")


def find_dynsec_plugin() -> str:
    """Path of Mosquitto's dynamic-security plugin (Mosquitto ≥ 2.0; Debian ships it in the
    ``mosquitto`` package); :class:`BrokerProcessError` when absent."""
    for pattern in _PLUGIN_DIRS:
        for found in sorted(glob.glob(pattern)):
            if found.endswith("mosquitto_dynamic_security.so") and os.access(found, os.R_OK):
                return found
    raise BrokerProcessError("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so, Mosquitto ≥ 2.0) "
                             "is not installed; the production profile needs it")


ClientKind = Literal["device", "worker", "observer", "admin"]
KINDS: tuple[ClientKind, ...] = ("device", "worker", "observer", "admin")
ROLE_WORKER = "patchcast-worker"
ROLE_OBSERVER = "patchcast-observer"
ROLE_DEVICES = "patchcast-devices"  # what every device shares: watching worker availability
ROLE_ADMIN = "dynsec-admin"
DEVICE_ROLE_PREFIX = "patchcast-device:"
PBKDF2_ITERATIONS = 101  # what mosquitto_ctrl and mosquitto_passwd write for Mosquitto 2.0


def _acl(kind: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": allow}


def _read(topic_filter: str, *, literal: bool = False) -> list[dict[str, Any]]:
    """Subscribe to ``topic_filter`` and receive what matches it."""
    return [_acl("subscribeLiteral" if literal else "subscribePattern", topic_filter),
            _acl("publishClientReceive", topic_filter)]


def device_acls(device: str, prefix: str = PROTOCOL_PREFIX) -> list[dict[str, Any]]:
    """One device's own topics. Mosquitto 2.0's plugin has no %u/%c substitution, so every device
    gets its own role with literal topics (the subscription is matched literally: only its own reply
    topic, never a wildcard, ``$share/…`` or a request topic)."""
    d = validate_id(device, "device id")
    return [
        _acl("publishClientSend", f"{prefix}/req/+/{d}"),
        _acl("publishClientSend", f"{prefix}/region/+/{d}"),
        _acl("publishClientSend", f"{prefix}/metrics/edge/{d}"),
        _acl("publishClientSend", f"{prefix}/availability/edge/{d}"),  # also its last will
        *_read(f"{prefix}/reply/{d}", literal=True),
    ]


def shared_roles(prefix: str = PROTOCOL_PREFIX) -> list[dict[str, Any]]:
    """The roles every file holds: devices' common part, worker pools, observers, the plugin's admin."""
    return [
        {"rolename": ROLE_DEVICES, "textname": "every device: watch whether workers are online",
         "acls": _read(f"{prefix}/availability/worker/+", literal=True)},
        {"rolename": ROLE_WORKER, "textname": "inference worker pools",
         "acls": [
             # Mosquitto 2.0 checks a shared subscription with its $share/<group>/ prefix: only
             # this role can join a pool, a device's attempt is refused at SUBSCRIBE.
             _acl("subscribePattern", f"$share/+/{prefix}/req/#"),
             _acl("publishClientReceive", f"{prefix}/req/#"),
             *_read(f"{prefix}/region/#"),
             # Replies go to each request's response topic (a device's reply topic; the worker
             # checks it is the sender's own), nothing else a device reads.
             _acl("publishClientSend", f"{prefix}/reply/+"),
             _acl("publishClientSend", f"{prefix}/metrics/worker/+"),
             _acl("publishClientSend", f"{prefix}/errors/worker/+"),
             _acl("publishClientSend", f"{prefix}/availability/worker/+"),
             *_read(f"{prefix}/availability/worker/+"),
         ]},
        {"rolename": ROLE_OBSERVER, "textname": "monitor, scaler, health checks: read-only",
         "acls": [*_read(f"{prefix}/#"), *_read("$SYS/#")]},
        {"rolename": ROLE_ADMIN, "textname": "mosquitto_ctrl dynsec: live changes to this file",
         "acls": [_acl("publishClientSend", "$CONTROL/dynamic-security/#"),
                  *_read("$CONTROL/dynamic-security/#")]},
    ]


def hash_password(password: str, salt: bytes, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The plugin's stored form: base64 of PBKDF2-HMAC-SHA512(password, salt), 64 bytes."""
    return base64.b64encode(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)).decode()


def new_password() -> str:
    return secrets.token_urlsafe(18)


@dataclass
class SecurityFile:
    """Mosquitto's dynamic-security JSON: the production profile's users, client-id bindings and ACLs.

    Devices: one client each, user name = device id = its only allowed client id (a CONNECT with
    another client id, e.g. a worker's, is refused with 0x87), with its own role. Workers, observers
    and admins: one client per user name, shared by processes (not bound to a client id). Default
    access is deny for publishing, receiving and subscribing. The broker reads the file at start;
    edit it with :meth:`add_client` and restart, or change a running broker with
    ``mosquitto_ctrl dynsec`` as an admin user (the plugin then rewrites the file).
    """

    path: Path
    prefix: str = PROTOCOL_PREFIX
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str, prefix: str = PROTOCOL_PREFIX) -> SecurityFile:
        """The file at ``path``, or a new one (roles only, no clients) when it does not exist yet."""
        path = Path(path)
        if not path.exists():
            data: dict[str, Any] = {
                "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                     "subscribe": False, "unsubscribe": True},
                "clients": [], "groups": [], "roles": shared_roles(prefix)}
            return cls(path, prefix, data)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BrokerProcessError(f"{path}: not a readable dynamic-security file: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("clients", []), list):
            raise BrokerProcessError(f"{path}: not a dynamic-security file (no clients list)")
        data.setdefault("clients", [])
        data.setdefault("roles", [])
        data.setdefault("groups", [])
        known = {r.get("rolename") for r in data["roles"]}
        data["roles"] += [r for r in shared_roles(prefix) if r["rolename"] not in known]
        return cls(path, prefix, data)

    def usernames(self) -> list[str]:
        return [str(c["username"]) for c in self.data["clients"]]

    def kind_of(self, username: str) -> ClientKind | None:
        for client in self.data["clients"]:
            if client["username"] == username:
                roles = {r["rolename"] for r in client.get("roles", [])}
                if ROLE_WORKER in roles:
                    return "worker"
                if ROLE_OBSERVER in roles:
                    return "observer"
                if ROLE_ADMIN in roles:
                    return "admin"
                return "device"
        return None

    def add_client(self, username: str, kind: ClientKind, password: str | None = None, *,
                   replace: bool = False) -> str:
        """Create ``username`` (a device id for ``kind="device"``) and return its password
        (``password`` or a new random one). :class:`BrokerProcessError` if it exists and not ``replace``."""
        if kind not in KINDS:
            raise BrokerProcessError(f"client kind {kind!r} is not one of {', '.join(KINDS)}")
        name = validate_id(username, "user name")
        if name in self.usernames():
            if not replace:
                raise BrokerProcessError(f"{self.path}: client {name!r} exists (replace it to set a new password)")
            self.remove_client(name)
        secret = password if password is not None else new_password()
        if not secret:
            raise BrokerProcessError("an empty password is not allowed")
        salt = secrets.token_bytes(12)
        client: dict[str, Any] = {"username": name, "textname": f"patchcast {kind}",
                                  "password": hash_password(secret, salt), "salt": base64.b64encode(salt).decode(),
                                  "iterations": PBKDF2_ITERATIONS}
        if kind == "device":
            role = DEVICE_ROLE_PREFIX + name
            self.data["roles"] = [r for r in self.data["roles"] if r.get("rolename") != role]
            self.data["roles"].append({"rolename": role, "acls": device_acls(name, self.prefix)})
            client["clientid"] = name  # the only client id this user may connect with
            client["roles"] = [{"rolename": role, "priority": 1}, {"rolename": ROLE_DEVICES}]
        else:
            role = {"worker": ROLE_WORKER, "observer": ROLE_OBSERVER, "admin": ROLE_ADMIN}[kind]
            client["roles"] = [{"rolename": role}]
        self.data["clients"].append(client)
        return secret

    def remove_client(self, username: str) -> bool:
        before = len(self.data["clients"])
        self.data["clients"] = [c for c in self.data["clients"] if c["username"] != username]
        self.data["roles"] = [r for r in self.data["roles"] if r.get("rolename") != DEVICE_ROLE_PREFIX + username]
        return len(self.data["clients"]) < before

    def save(self) -> Path:
        """Write atomically, readable by its owner only (it holds password hashes)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)
        return self.path


def write_credentials(path: Path | str, secrets_by_user: Mapping[str, str]) -> Path:
    """Append ``user password`` lines to a credentials file (mode 600): what ``patchcast edge
    --credentials`` reads to give each simulated device its own password."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for user, secret in secrets_by_user.items():
            f.write(f"{user} {secret}\n")
    return path


# ---- TLS material for tests and first deployments -----------------------------------------------

@dataclass(frozen=True)
class CertSet:
    """Files :func:`make_test_certs` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: Mapping[str, tuple[Path, Path]]  # name → (certificate, key)

    def listener(self, *, require_certificate: bool = False) -> ListenerTLS:
        return ListenerTLS(self.server_cert, self.server_key, self.ca, require_certificate)


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise BrokerProcessError("'openssl' is not installed; it makes the test CA and certificates")
    try:
        subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise BrokerProcessError(f"openssl {args[0]} failed: {exc.stderr.decode(errors='replace').strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BrokerProcessError(f"openssl {args[0]} timed out") from exc


def make_test_certs(out: Path | str, *, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                    clients: Sequence[str] = (), days: int = 30, ca_name: str = "PatchCast test CA") -> CertSet:
    """A new CA (``ca.crt``/``ca.key``), a server certificate for ``hosts`` (DNS names and IP
    addresses in subjectAltName) and one client certificate per name in ``clients`` (CN = name),
    all P-256 keys, made with the openssl command in ``out``. For tests and a first deployment;
    a real deployment signs with its own CA."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
             "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=out)

    def issue(name: str, cn: str, extensions: str) -> tuple[Path, Path]:
        (out / f"{name}.ext").write_text(extensions)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=out)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext", cwd=out)
        for leftover in (f"{name}.csr", f"{name}.ext"):
            (out / leftover).unlink(missing_ok=True)
        os.chmod(out / f"{name}.key", 0o600)
        return out / f"{name}.crt", out / f"{name}.key"

    common = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    alt = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    server = issue("server", hosts[0] if hosts else "localhost",
                   common + "extendedKeyUsage=serverAuth\n" + (f"subjectAltName={alt}\n" if alt else ""))
    issued = {validate_id(c, "client name"): issue(f"client-{c}", c, common + "extendedKeyUsage=clientAuth\n")
              for c in clients}
    os.chmod(out / "ca.key", 0o600)
    return CertSet(out / "ca.crt", server[0], server[1], issued)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def check_tls_files(tls: ListenerTLS) -> None:
    """:class:`BrokerProcessError` naming the file when a listener's certificate, key or CA is unusable."""
    for path in (tls.certfile, tls.keyfile, tls.cafile):
        if not Path(path).is_file():
            raise BrokerProcessError(f"TLS file {path} does not exist")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
        ctx.load_verify_locations(str(tls.cafile))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerProcessError(f"TLS files {tls.certfile}, {tls.keyfile}, {tls.cafile}: {exc}") from exc

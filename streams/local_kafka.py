"""A real local Apache Kafka broker (3.9.1, KRaft, one node) run from Maven Central jars.

This is the embedded Kafka of DESIGN.md: `abstream kafka start|stop|status`, `make demo`
and the test session all run the genuine broker, not a stand-in. Layout of a data dir:

    DATA_DIR/server.properties   rendered from infra/kafka/server.properties on every start
    DATA_DIR/cluster_id          chosen once, before the storage is formatted
    DATA_DIR/kraft-logs/         the broker's log dirs and the KRaft metadata log
    DATA_DIR/broker.log          the JVM's stdout and stderr (appended across restarts)
    DATA_DIR/broker.pid          the broker's pid while it runs

The jars are fetched once into a cache folder with Maven (`ensure_jars`); the broker is a
detached JVM in its own session, so it outlives the Python process that started it until
`stop` or `kill`. Linux/macOS only (process groups, /proc when present).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "3.9.1"
INFRA_DIR = Path(__file__).resolve().parent.parent / "infra" / "kafka"
POM = INFRA_DIR / "pom.xml"
SERVER_PROPERTIES_TEMPLATE = INFRA_DIR / "server.properties"
LOG4J_PROPERTIES = INFRA_DIR / "log4j.properties"
DEFAULT_LIB_DIR = Path.home() / ".cache" / "abstream" / f"kafka-{KAFKA_VERSION}" / "lib"

_JARS_MARKER = ".abstream-jars-complete"
_HOST = "127.0.0.1"
_JVM_OPTS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)
_SCRAM_MECHANISM = "SCRAM-SHA-256"
# Brokers started by this process, kept so they can be reaped (and Popen does not warn).
_children: dict[int, subprocess.Popen[bytes]] = {}


class LocalKafkaError(Exception):
    """A failure a user can fix; the message is one line and says what to do."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path


def ensure_jars(lib_dir: Path) -> Path:
    """Fetch the broker's jars into lib_dir with Maven unless already there; returns lib_dir.

    A marker file (holding a hash of infra/kafka/pom.xml) is written only after a complete
    copy, so an interrupted fetch is redone and a changed pom triggers a fresh fetch.
    """
    lib_dir = Path(lib_dir).expanduser().resolve()
    pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = lib_dir / _JARS_MARKER
    if _marker_matches(marker, pom_digest):
        return lib_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "Maven (mvn) not found on PATH; install Maven 3.8+ (e.g. apt-get install maven) "
            f"or put the Kafka {KAFKA_VERSION} jars in {lib_dir} yourself"
        )
    lib_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(lib_dir / ".fetch.lock"):
        if _marker_matches(marker, pom_digest):
            return lib_dir
        # Jars left from another version would shadow the right ones on the classpath.
        for stale in lib_dir.glob("*.jar"):
            stale.unlink()
        mvn_log = lib_dir / "mvn.log"
        cmd = [
            mvn, "-q", "-B", "-f", str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={lib_dir}",
        ]
        with mvn_log.open("w") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0 or not any(lib_dir.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise LocalKafkaError(
                f"fetching the Kafka jars with Maven failed ({_first_error_line(mvn_log)}); "
                f"check network access to Maven Central and see {mvn_log}"
            )
        marker.write_text(pom_digest + "\n")
    return lib_dir


def start(
    *,
    data_dir: Path,
    port: int = 9092,
    controller_port: int | None = None,
    lib_dir: Path | None = None,
    timeout_s: float = 90,
    sasl_port: int | None = None,
    sasl_users: dict[str, str] | None = None,
) -> BrokerStatus:
    """Start the broker for data_dir (or find it running) and return its status once it answers.

    Idempotent: a broker already running from data_dir on the same port is returned as is
    (its other settings are not changed; stop it first to change them).
    Storage is formatted once (the cluster id is kept in data_dir); later starts reuse the data.
    With sasl_port and sasl_users, a SASL_PLAINTEXT listener with SCRAM-SHA-256 users is added
    next to the PLAINTEXT one.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if (sasl_port is None) != (not sasl_users):
        raise LocalKafkaError("pass both sasl_port and sasl_users (name -> password), or neither")
    java = _find_java()
    lib_dir = ensure_jars(DEFAULT_LIB_DIR if lib_dir is None else lib_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    with _file_lock(data_dir / ".start.lock"):
        pid = _running_pid(data_dir)
        if pid is not None:
            recorded = _recorded_port(data_dir)
            if recorded is not None and recorded != port:
                raise LocalKafkaError(
                    f"a broker from {data_dir} already runs on port {recorded}; "
                    f"use port {recorded} or stop it first (abstream kafka stop)"
                )
            bootstrap = f"{_HOST}:{port}"
            _wait_until_answering(pid, bootstrap, data_dir, time.monotonic() + timeout_s)
            return _status(data_dir, pid, bootstrap)

        if controller_port is None:
            controller_port = _default_controller_port(port)
        wanted = {"port": port, "controller_port": controller_port}
        if sasl_port is not None:
            wanted["sasl_port"] = sasl_port
        if len(set(wanted.values())) != len(wanted):
            raise LocalKafkaError(f"broker ports must differ, got {wanted}; choose distinct ports")
        for name, number in wanted.items():
            if not _port_free(number):
                raise LocalKafkaError(
                    f"{name.replace('_', ' ')} {number} on {_HOST} is in use by another process; "
                    f"stop that process or pick another port"
                )

        properties = data_dir / "server.properties"
        properties.write_text(
            _render_properties(data_dir, port, controller_port, sasl_port)
        )
        freshly_formatted = _format_storage(java, lib_dir, data_dir, properties, sasl_users)
        pid = _launch(java, lib_dir, data_dir, properties)
        bootstrap = f"{_HOST}:{port}"
        try:
            _wait_until_answering(pid, bootstrap, data_dir, time.monotonic() + timeout_s)
            if sasl_users and not freshly_formatted:
                # SCRAM users given at format time exist only in a fresh cluster; on older
                # data they are added (or their passwords replaced) through the admin API.
                _upsert_scram_users(bootstrap, sasl_users)
        except BaseException:
            _signal_group(pid, signal.SIGKILL)
            _wait_for_exit(pid, 10)
            _pid_file(data_dir).unlink(missing_ok=True)
            raise
        return _status(data_dir, pid, bootstrap)


def stop(*, data_dir: Path, timeout_s: float = 30) -> bool:
    """Shut the broker down cleanly (SIGTERM, then SIGKILL after timeout_s).

    Returns True if a running broker was stopped, False if none was running.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    pid = _running_pid(data_dir)
    if pid is None:
        _pid_file(data_dir).unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_for_exit(pid, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_for_exit(pid, 10)
    _pid_file(data_dir).unlink(missing_ok=True)
    return True


def kill(*, data_dir: Path) -> bool:
    """SIGKILL the broker with no clean shutdown (fault tests); the data stays for a later start.

    Returns True if a running broker was killed.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    pid = _running_pid(data_dir)
    if pid is None:
        _pid_file(data_dir).unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGKILL)
    _wait_for_exit(pid, 10)
    _pid_file(data_dir).unlink(missing_ok=True)
    return True


def status(*, data_dir: Path, port: int = 9092) -> BrokerStatus:
    """Return whether the broker of data_dir runs (its process is alive) and where it listens.

    The port recorded in data_dir/server.properties wins over `port`, which only serves for a
    data dir that has never been started.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    recorded = _recorded_port(data_dir)
    bootstrap = f"{_HOST}:{recorded if recorded is not None else port}"
    return _status(data_dir, _running_pid(data_dir), bootstrap)


# --- storage and launch ---------------------------------------------------------------


def _render_properties(
    data_dir: Path, port: int, controller_port: int, sasl_port: int | None
) -> str:
    listeners = [f"PLAINTEXT://{_HOST}:{port}", f"CONTROLLER://{_HOST}:{controller_port}"]
    advertised = [f"PLAINTEXT://{_HOST}:{port}"]
    protocol_map = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    sasl_settings = ""
    if sasl_port is not None:
        listeners.append(f"SASL_PLAINTEXT://{_HOST}:{sasl_port}")
        advertised.append(f"SASL_PLAINTEXT://{_HOST}:{sasl_port}")
        protocol_map.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
        sasl_settings = "\n".join(
            [
                "# SASL_PLAINTEXT listener: SCRAM-SHA-256 users live in the KRaft metadata log.",
                f"sasl.enabled.mechanisms={_SCRAM_MECHANISM}",
                f"listener.name.sasl_plaintext.sasl.enabled.mechanisms={_SCRAM_MECHANISM}",
                "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        )
    template = string.Template(SERVER_PROPERTIES_TEMPLATE.read_text())
    return template.substitute(
        controller_port=controller_port,
        listeners=",".join(listeners),
        advertised_listeners=",".join(advertised),
        protocol_map=",".join(protocol_map),
        log_dir=str(data_dir / "kraft-logs"),
        sasl_settings=sasl_settings,
    )


def _format_storage(
    java: str,
    lib_dir: Path,
    data_dir: Path,
    properties: Path,
    sasl_users: dict[str, str] | None,
) -> bool:
    """Format the KRaft storage unless already formatted; returns True if it formatted now."""
    if (data_dir / "kraft-logs" / "meta.properties").exists():
        return False
    cluster_id_file = data_dir / "cluster_id"
    if not cluster_id_file.exists():
        cluster_id_file.write_text(_new_cluster_id() + "\n")
    cluster_id = cluster_id_file.read_text().strip()
    cmd = [
        java, *_JVM_OPTS, f"-Dlog4j.configuration={LOG4J_PROPERTIES.as_uri()}",
        "-cp", str(lib_dir / "*"), "kafka.tools.StorageTool",
        "format", "-t", cluster_id, "-c", str(properties), "--ignore-formatted",
    ]
    for name, password in (sasl_users or {}).items():
        if any(c in name + password for c in ',=[]"'):
            raise LocalKafkaError(
                f"SASL user {name!r}: names and passwords must not contain , = [ ] or \"; "
                "choose simpler ones"
            )
        cmd += ["--add-scram", f"{_SCRAM_MECHANISM}=[name={name},password={password}]"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log_file = data_dir / "broker.log"
    with log_file.open("a") as log:
        log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise LocalKafkaError(
            f"formatting Kafka storage in {data_dir} failed "
            f"({_last_error_line(log_file)}); see {log_file}"
        )
    return True


def _launch(java: str, lib_dir: Path, data_dir: Path, properties: Path) -> int:
    log_file = data_dir / "broker.log"
    cmd = [
        java, *_JVM_OPTS,
        f"-Dlog4j.configuration={LOG4J_PROPERTIES.as_uri()}",
        f"-Dkafka.logs.dir={data_dir / 'kraft-logs'}",
        "-cp", str(lib_dir / "*"), "kafka.Kafka", str(properties),
    ]
    with log_file.open("ab") as log:
        log.write(f"\n=== abstream: starting Kafka {KAFKA_VERSION} at {time.ctime()}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    _pid_file(data_dir).write_text(f"{process.pid}\n")
    _children[process.pid] = process
    return process.pid


def _wait_until_answering(pid: int, bootstrap: str, data_dir: Path, deadline: float) -> None:
    from confluent_kafka.admin import AdminClient

    host, port = bootstrap.rsplit(":", 1)
    log_file = data_dir / "broker.log"
    admin = None
    while True:
        if not _alive(pid):
            raise LocalKafkaError(
                f"the Kafka broker exited while starting ({_last_error_line(log_file)}); "
                f"see {log_file}"
            )
        # A TCP probe first keeps librdkafka from logging connection refusals while the
        # JVM boots.
        if _accepts_connections(host, int(port)):
            if admin is None:
                admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    return
            except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
                pass
        if time.monotonic() >= deadline:
            raise LocalKafkaError(
                f"the Kafka broker did not answer on {bootstrap} in time "
                f"({_last_error_line(log_file)}); see {log_file}, or raise the timeout"
            )
        time.sleep(0.2)


def _upsert_scram_users(bootstrap: str, sasl_users: dict[str, str]) -> None:
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    upserts = [
        UserScramCredentialUpsertion(
            name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), password.encode()
        )
        for name, password in sasl_users.items()
    ]
    for name, future in admin.alter_user_scram_credentials(upserts).items():
        try:
            future.result(timeout=30)
        except Exception as exc:
            raise LocalKafkaError(
                f"could not create SASL user {name!r} ({exc}); check the broker log"
            ) from exc


# --- processes and files --------------------------------------------------------------


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            "Java not found (no JAVA_HOME, no java on PATH); install Java 17 "
            "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return java


def _pid_file(data_dir: Path) -> Path:
    return data_dir / "broker.pid"


def _running_pid(data_dir: Path) -> int | None:
    """Return the pid in data_dir/broker.pid if that process is alive and is this dir's broker."""
    try:
        pid = int(_pid_file(data_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return None
        # Guards against a recycled pid after a reboot or a crash.
        if b"kafka.Kafka" not in args or str(data_dir / "server.properties").encode() not in args:
            return None
    return pid


def _alive(pid: int) -> bool:
    # A broker this process started is its child: poll() reaps it, so that an exited
    # broker does not linger as a zombie that still answers kill(pid, 0).
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _status(data_dir: Path, pid: int | None, bootstrap: str) -> BrokerStatus:
    return BrokerStatus(
        running=pid is not None,
        pid=pid,
        bootstrap=bootstrap,
        data_dir=data_dir,
        log_file=data_dir / "broker.log",
    )


def _recorded_port(data_dir: Path) -> int | None:
    try:
        text = (data_dir / "server.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("listeners="):
            for listener in line.split("=", 1)[1].split(","):
                if listener.startswith("PLAINTEXT://"):
                    return int(listener.rsplit(":", 1)[1])
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the JVM sets, so a port in TIME_WAIT after a stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _default_controller_port(port: int) -> int:
    if port + 1000 <= 65535 and _port_free(port + 1000):
        return port + 1000
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's Uuid)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # Kafka's Uuid.randomUuid() avoids these too
            return cluster_id


def _marker_matches(marker: Path, digest: str) -> bool:
    try:
        return marker.read_text().strip() == digest
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail_lines(path: Path, limit_bytes: int = 64_000) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit_bytes))
            return handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _last_error_line(log_file: Path) -> str:
    """The most telling recent log line (last ERROR/FATAL/exception, else the last line)."""
    lines = [line.strip() for line in _tail_lines(log_file) if line.strip()]
    if not lines:
        return "no broker output"
    telling = [
        line for line in lines
        if any(word in line for word in ("ERROR", "FATAL", "Exception", "Error:"))
    ]
    line = (telling or lines)[-1]
    return "last log line: " + (line if len(line) <= 240 else line[:237] + "...")


def _first_error_line(mvn_log: Path) -> str:
    lines = [line.strip() for line in _tail_lines(mvn_log) if line.strip()]
    errors = [line for line in lines if line.startswith("[ERROR]")]
    line = (errors or lines or ["no Maven output"])[0]
    return line if len(line) <= 240 else line[:237] + "..."

"""Lifecycle of the real local Kafka broker (streams/local_kafka.py).

These tests start their own brokers on free ports from 19092 up, with temporary data dirs,
so they never touch a broker someone runs on 9092 (or the session broker).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams import local_kafka
from streams.local_kafka import BrokerStatus, LocalKafkaError

pytestmark = pytest.mark.kafka

SASL_USERS = {"alice": "alice-secret"}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(start: int = 19092) -> tuple[int, int, int]:
    """A broker port with its controller (port+1000) and SASL (port+1) ports all free."""
    for port in range(start, start + 400, 2):
        if all(_free(p) for p in (port, port + 1, port + 1000)):
            return port, port + 1000, port + 1
    raise RuntimeError("no free ports for a test broker")


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)


def _produce(config: dict[str, str], topic: str, value: bytes) -> None:
    producer = Producer(config)
    errors: list[KafkaError] = []
    producer.produce(topic, value=value, on_delivery=lambda err, msg: err and errors.append(err))
    assert producer.flush(30) == 0
    assert errors == []


def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                values.append(msg.value())
    finally:
        consumer.close()
    return values


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerStatus]:
    port, controller_port, sasl_port = _free_ports()
    data_dir = tmp_path_factory.mktemp("kafka")
    status = local_kafka.start(
        data_dir=data_dir,
        port=port,
        controller_port=controller_port,
        sasl_port=sasl_port,
        sasl_users=SASL_USERS,
    )
    try:
        yield status
    finally:
        local_kafka.stop(data_dir=data_dir)


def test_start_gives_a_broker_that_round_trips_a_message(broker: BrokerStatus) -> None:
    assert broker.running and broker.pid is not None
    assert broker.bootstrap.startswith("127.0.0.1:")
    assert (broker.data_dir / "broker.pid").read_text().strip() == str(broker.pid)
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    _create_topic(broker.bootstrap, topic)
    _produce({"bootstrap.servers": broker.bootstrap}, topic, b"hello")
    assert _consume_all(broker.bootstrap, topic, 1) == [b"hello"]


def test_second_start_returns_the_running_broker(broker: BrokerStatus) -> None:
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    again = local_kafka.start(data_dir=broker.data_dir, port=port, timeout_s=10)
    assert again == broker


def test_start_on_the_same_data_with_another_port_says_so(broker: BrokerStatus) -> None:
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    with pytest.raises(LocalKafkaError) as error:
        local_kafka.start(data_dir=broker.data_dir, port=port + 7, timeout_s=10)
    assert "\n" not in str(error.value)
    assert f"port {port}" in str(error.value)


def test_status_of_the_running_broker(broker: BrokerStatus) -> None:
    assert local_kafka.status(data_dir=broker.data_dir) == broker


def test_port_used_by_another_process_is_a_one_line_error(
    broker: BrokerStatus, tmp_path: Path
) -> None:
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    with pytest.raises(LocalKafkaError) as error:
        local_kafka.start(data_dir=tmp_path / "other", port=port, controller_port=port + 3)
    message = str(error.value)
    assert "\n" not in message
    assert f"{port}" in message and "in use" in message
    assert not (tmp_path / "other" / "broker.pid").exists()


def test_sasl_scram_user_can_produce(broker: BrokerStatus) -> None:
    sasl_port = int(broker.bootstrap.rsplit(":", 1)[1]) + 1
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    _create_topic(broker.bootstrap, topic)
    _produce(
        {
            "bootstrap.servers": f"127.0.0.1:{sasl_port}",
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "alice",
            "sasl.password": SASL_USERS["alice"],
        },
        topic,
        b"authenticated",
    )
    assert _consume_all(broker.bootstrap, topic, 1) == [b"authenticated"]


def test_sasl_wrong_password_is_rejected(broker: BrokerStatus) -> None:
    sasl_port = int(broker.bootstrap.rsplit(":", 1)[1]) + 1
    errors: list[KafkaError] = []
    producer = Producer(
        {
            "bootstrap.servers": f"127.0.0.1:{sasl_port}",
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "alice",
            "sasl.password": "wrong",
            "error_cb": errors.append,
        }
    )
    delivered: list = []  # the delivery reports' errors: None for a message the broker took
    producer.produce("anything", value=b"x", on_delivery=lambda err, msg: delivered.append(err))
    deadline = time.monotonic() + 20
    while not errors and time.monotonic() < deadline:
        producer.poll(0.2)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    producer.poll(1.0)
    # len(producer) also counts librdkafka's queued requests and events (it was 2 once, with
    # the one message still queued): the delivery reports say whether anything got through.
    assert None not in delivered, "a message got through with a wrong password"


def test_stop_restart_and_crash_keep_the_data(tmp_path: Path) -> None:
    port, controller_port, sasl_port = _free_ports(19400)
    data_dir = tmp_path / "kafka"
    first = local_kafka.start(data_dir=data_dir, port=port, controller_port=controller_port)
    try:
        topic = "durable"
        _create_topic(first.bootstrap, topic)
        _produce({"bootstrap.servers": first.bootstrap, "acks": "all"}, topic, b"kept")

        assert local_kafka.stop(data_dir=data_dir) is True
        stopped = local_kafka.status(data_dir=data_dir)
        assert not stopped.running and stopped.pid is None
        assert stopped.bootstrap == first.bootstrap
        assert not (data_dir / "broker.pid").exists()
        assert local_kafka.stop(data_dir=data_dir) is False

        # SCRAM users asked for on data formatted without them are added at start.
        second = local_kafka.start(
            data_dir=data_dir,
            port=port,
            controller_port=controller_port,
            sasl_port=sasl_port,
            sasl_users={"bob": "bob-secret"},
        )
        assert second.pid != first.pid
        assert _consume_all(second.bootstrap, topic, 1) == [b"kept"]
        _produce(
            {
                "bootstrap.servers": f"127.0.0.1:{sasl_port}",
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "SCRAM-SHA-256",
                "sasl.username": "bob",
                "sasl.password": "bob-secret",
            },
            topic,
            b"from bob",
        )

        # An unclean end (fault tests): the next start recovers the log.
        assert local_kafka.kill(data_dir=data_dir) is True
        assert not local_kafka.status(data_dir=data_dir).running
        third = local_kafka.start(data_dir=data_dir, port=port, controller_port=controller_port)
        assert _consume_all(third.bootstrap, topic, 2) == [b"kept", b"from bob"]
    finally:
        local_kafka.stop(data_dir=data_dir)
    assert not local_kafka.status(data_dir=data_dir).running


def test_broker_not_up_in_time_is_a_one_line_error_and_leaves_nothing(tmp_path: Path) -> None:
    port, controller_port, _ = _free_ports(19700)
    data_dir = tmp_path / "kafka"
    with pytest.raises(LocalKafkaError) as error:
        local_kafka.start(
            data_dir=data_dir, port=port, controller_port=controller_port, timeout_s=0.1
        )
    message = str(error.value)
    assert "\n" not in message
    assert "did not answer" in message and str(data_dir / "broker.log") in message
    assert not local_kafka.status(data_dir=data_dir).running
    assert not (data_dir / "broker.pid").exists()


def test_missing_java_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalKafkaError) as error:
        local_kafka.start(data_dir=tmp_path / "kafka", port=_free_ports()[0])
    message = str(error.value)
    assert "\n" not in message
    assert "Java" in message and "JAVA_HOME" in message


def test_missing_maven_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = shutil.which("java")
    assert java is not None
    os.symlink(java, bin_dir / "java")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(LocalKafkaError) as error:
        local_kafka.ensure_jars(tmp_path / "empty-lib")
    message = str(error.value)
    assert "\n" not in message
    assert "Maven" in message

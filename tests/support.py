"""Helpers shared by the fixtures and the tests that need settings outside a fixture."""
from __future__ import annotations

import socket
import uuid
from dataclasses import replace
from pathlib import Path

from streams.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(bootstrap: str, tmp: Path, clickhouse_dsn: str | None = None) -> Settings:
    """Settings of one test: its own topic prefix, home, database and web port."""
    tag = uuid.uuid4().hex[:10]
    return replace(
        Settings.from_env({}),
        home=tmp / "home",
        kafka_bootstrap=bootstrap,
        topic_prefix=f"t{tag}.",
        clickhouse_dsn=clickhouse_dsn or f"chdb://{tmp / 'chdb'}",
        clickhouse_database=f"t{tag}",
        web_port=free_port(),
        broker_session_timeout_s=6.0,
        batch_within_s=0.1,
    )


def read_all(settings: Settings, topic: str, timeout_s: float = 10.0) -> list:
    """Every message of a topic (all partitions, from the beginning, up to its end now)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}test-reader",
                                                  "enable.auto.commit": "false"}))
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        pending = {p: end for p, end in ends.items() if end > 0}
        messages = []
        while pending:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"{topic} did not deliver up to its end")
            if message.error() is not None:
                continue
            messages.append(message)
            if message.offset() + 1 >= pending.get(message.partition(), 0):
                pending.pop(message.partition(), None)
        return messages
    finally:
        consumer.close()

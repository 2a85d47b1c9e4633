"""Shared fixtures: one real Kafka broker for the whole session, and for each test its own
topic prefix, home folder and ClickHouse database, so that tests never see each other's data."""
from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from streams import local_kafka
from streams.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """The session's broker: ABSTREAM_TEST_KAFKA_BOOTSTRAP if set (an already running one),
    else a local broker started here on a free port and stopped at the end."""
    existing = os.environ.get("ABSTREAM_TEST_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    data_dir = tmp_path_factory.mktemp("kafka")
    status = local_kafka.start(data_dir=data_dir, port=free_port(), controller_port=free_port())
    try:
        yield status.bootstrap
    finally:
        local_kafka.stop(data_dir=data_dir)


@pytest.fixture(scope="session")
def session_chdb_dsn(tmp_path_factory) -> str:
    # A process can open one chDB path only: every in-process test shares this one and
    # gets a database of its own.
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def settings(kafka_broker, tmp_path, session_chdb_dsn) -> Settings:
    """Settings of one test: its own topic prefix, home, database and web port."""
    tag = uuid.uuid4().hex[:10]
    return replace(
        Settings.from_env({}),
        home=tmp_path / "home",
        kafka_bootstrap=kafka_broker,
        topic_prefix=f"t{tag}.",
        clickhouse_dsn=session_chdb_dsn,
        clickhouse_database=f"t{tag}",
        web_port=free_port(),
        broker_session_timeout_s=6.0,
        batch_within_s=0.1,
    )


@pytest.fixture
def worker_settings(settings, tmp_path) -> Settings:
    """Settings for a worker subprocess that holds the sink role: its own chDB directory,
    since the test process holds the session's."""
    return replace(settings, clickhouse_dsn=f"chdb://{tmp_path / 'worker-chdb'}")

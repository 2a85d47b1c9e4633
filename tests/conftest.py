"""Shared fixtures: one real Kafka broker for the whole session, and for each test its own
topic prefix, home folder and ClickHouse database, so that tests never see each other's data."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from streams import local_kafka
from streams.settings import Settings
from tests.support import free_port, make_settings


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
    return make_settings(kafka_broker, tmp_path, session_chdb_dsn)


@pytest.fixture
def worker_settings(settings, tmp_path) -> Settings:
    """Settings for a worker subprocess that holds the sink role: its own chDB directory,
    since the test process holds the session's."""
    return replace(settings, clickhouse_dsn=f"chdb://{tmp_path / 'worker-chdb'}")

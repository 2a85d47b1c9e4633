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

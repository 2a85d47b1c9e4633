"""ClickHouse through clickhouse-connect: the same code for ``chdb://PATH`` and ``http(s)://``.

Only this module talks to ClickHouse. Every query built from user input is parameterised;
identifiers (database, table) come from settings and a closed set, never from events.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect

from streams.codec import SCHEMA_DIR, EventKind, LocalCatalogue

DDL_DIR = Path(__file__).resolve().parent.parent / "infra" / "clickhouse"

RAW_TABLES = {
    EventKind.ASSIGNMENT: "assignments",
    EventKind.PREDICTION: "predictions",
    EventKind.SHADOW: "shadow",
    EventKind.OUTCOME: "outcomes",
}
DEADLETTER_TABLE = "deadletter"
DEADLETTER_COLUMNS = ("topic", "partition", "offset", "reason", "detail", "key", "payload", "received_time")
DECISIONS_TABLE = "decisions"
ALERTS_TABLE = "alerts"


def event_columns(kind: EventKind) -> tuple[str, ...]:
    """The raw table's columns: the fields of the newest Avro schema of the kind."""
    catalogue = LocalCatalogue(SCHEMA_DIR)
    return tuple(f["name"] for f in catalogue.writer(catalogue.id_for(kind)).parsed["fields"])


class WarehouseError(RuntimeError):
    """ClickHouse refused or could not be reached; the message never contains credentials."""


def redact_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# clickhouse-connect logs driver failures itself; here every failure reaches the caller as a
# WarehouseError of one line with the DSN's password redacted, so its own log is silenced.
logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)

_clients: dict[str, tuple[Any, threading.Lock]] = {}
_clients_lock = threading.Lock()


def _client(dsn: str) -> tuple[Any, threading.Lock]:
    # A process can open only one chDB path, and the engine is not re-entrant: one shared
    # client per DSN, used under its lock.
    with _clients_lock:
        if dsn not in _clients:
            try:
                _clients[dsn] = (clickhouse_connect.get_client(dsn=dsn), threading.Lock())
            except Exception as exc:
                raise WarehouseError(f"cannot open ClickHouse at {redact_dsn(dsn)}: {_one_line(exc)}") from None
        return _clients[dsn]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass(frozen=True)
class QueryResult:
    column_names: tuple[str, ...]
    rows: list[tuple]


class Warehouse:
    """One ClickHouse database of abstream: schema, columnar inserts, read-only queries."""

    def __init__(self, dsn: str, database: str = "abstream"):
        self.dsn = dsn
        self.database = database
        self._client, self._lock = _client(dsn)

    def apply_schema(self) -> None:
        """Create the database and tables if missing (idempotent): every infra/clickhouse/*.sql in order."""
        for path in sorted(DDL_DIR.glob("*.sql")):
            for statement in _statements(path.read_text()):
                self.command(statement.replace("{db}", self.database))

    def command(self, sql: str) -> None:
        with self._lock:
            try:
                self._client.command(sql)
            except Exception as exc:
                raise WarehouseError(f"ClickHouse command failed: {_one_line(exc)}") from None

    def insert(self, table: str, column_names: Sequence[str], columns: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            try:
                self._client.insert(
                    f"{self.database}.{table}", data=columns, column_names=list(column_names), column_oriented=True
                )
            except Exception as exc:
                raise WarehouseError(f"insert into {table} failed: {_one_line(exc)}") from None

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None, *, readonly: bool = True) -> QueryResult:
        """Rows of a query; ``{db}`` in the SQL names this database; read-only unless said otherwise."""
        settings = {"readonly": 1} if readonly else None
        with self._lock:
            try:
                result = self._client.query(sql.replace("{db}", self.database), parameters=parameters, settings=settings)
            except Exception as exc:
                raise WarehouseError(f"query failed: {_one_line(exc)}") from None
        return QueryResult(tuple(result.column_names), list(result.result_rows))

    def rows_since(self, table: str, floors: Mapping[int, int], columns: Sequence[str]) -> list[tuple]:
        """(kafka_partition, *columns) of the rows read from these Kafka partitions at or after
        each one's floor offset: one pass over the table's coordinates for all of them."""
        conditions = " OR ".join(f"(kafka_partition = {int(p)} AND kafka_offset >= {int(o)})" for p, o in floors.items())
        return self.query(f"SELECT kafka_partition, {', '.join(columns)} FROM {{db}}.{table} WHERE {conditions}").rows

    def existing_offsets(self, table: str, where: Mapping[str, Any], offset_column: str,
                         offsets: Iterable[int]) -> set[int]:
        """Which of these offsets the table holds among the rows whose columns equal ``where``
        (the Kafka partition, and for dead letters the source topic)."""
        conditions = "".join(f"{column} = %({column})s AND " for column in where)
        rows = self.query(
            f"SELECT {offset_column} FROM {{db}}.{table} WHERE {conditions}{offset_column} IN %(offsets)s",
            {**where, "offsets": sorted(set(offsets))},
        ).rows
        return {row[0] for row in rows}


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]

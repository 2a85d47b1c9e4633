"""The one settings object: read from ``ABSTREAM_*`` environment variables, overridden by flags.

Every setting is documented in the README's settings table; nothing else in the code reads
the environment.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit


class _DebugOnly(logging.LoggerAdapter):
    def log(self, level, msg, *args, **kwargs):
        self.logger.debug(msg, *args, **kwargs)


LIBRDKAFKA_LOG = _DebugOnly(logging.getLogger("abstream.kafka"), {})


class SettingsError(ValueError):
    """A setting has a value abstream cannot use; the message names the variable."""


# Kafka client security settings passed through unchanged, as librdkafka names them.
_KAFKA_PASSTHROUGH = {
    "ABSTREAM_KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "ABSTREAM_KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "ABSTREAM_KAFKA_SASL_USERNAME": "sasl.username",
    "ABSTREAM_KAFKA_SASL_PASSWORD": "sasl.password",
    "ABSTREAM_KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
}


@dataclass(frozen=True)
class Settings:
    home: Path = Path(".abstream")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security: Mapping[str, str] = field(default_factory=dict)
    clickhouse_dsn: str = ""
    clickhouse_database: str = "abstream"
    topic_prefix: str = "abstream."
    partitions: int = 4
    schema_registry_url: str = ""
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    batch_max_events: int = 10000
    decision_interval_s: float = 0.25
    exposure_retention_s: float = 7 * 24 * 3600.0
    model_registry: str = ""
    broker_session_timeout_s: float = 30.0
    sink_resend_window: int = 20_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        home = Path(env.get("ABSTREAM_HOME", ".abstream"))
        values = dict(
            home=home,
            kafka_bootstrap=env.get("ABSTREAM_KAFKA_BOOTSTRAP", cls.kafka_bootstrap),
            kafka_security={
                key: env[var] for var, key in _KAFKA_PASSTHROUGH.items() if env.get(var)
            },
            clickhouse_dsn=env.get("ABSTREAM_CLICKHOUSE_DSN", ""),
            clickhouse_database=env.get("ABSTREAM_CLICKHOUSE_DATABASE", cls.clickhouse_database),
            topic_prefix=env.get("ABSTREAM_TOPIC_PREFIX", cls.topic_prefix),
            partitions=_int(env, "ABSTREAM_PARTITIONS", cls.partitions),
            schema_registry_url=env.get("ABSTREAM_SCHEMA_REGISTRY_URL", ""),
            web_host=env.get("ABSTREAM_WEB_HOST", cls.web_host),
            web_port=_int(env, "ABSTREAM_WEB_PORT", cls.web_port),
            batch_max_events=_int(env, "ABSTREAM_BATCH_MAX_EVENTS", cls.batch_max_events),
            decision_interval_s=_float(env, "ABSTREAM_DECISION_INTERVAL_S", cls.decision_interval_s),
            exposure_retention_s=_float(env, "ABSTREAM_EXPOSURE_RETENTION_S", cls.exposure_retention_s),
            model_registry=env.get("ABSTREAM_MODEL_REGISTRY", ""),
            broker_session_timeout_s=_float(
                env, "ABSTREAM_BROKER_SESSION_TIMEOUT_S", cls.broker_session_timeout_s
            ),
            sink_resend_window=_int(env, "ABSTREAM_SINK_RESEND_WINDOW", cls.sink_resend_window),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.clickhouse_dsn:
            settings = replace(settings, clickhouse_dsn=f"chdb://{(home / 'clickhouse').resolve()}")
        settings.validate()
        return settings

    def validate(self) -> None:
        scheme = urlsplit(self.clickhouse_dsn).scheme
        if scheme not in ("chdb", "http", "https"):
            raise SettingsError(
                f"ABSTREAM_CLICKHOUSE_DSN must start with chdb://, http:// or https://, got {scheme or 'no scheme'}://"
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", self.clickhouse_database):
            raise SettingsError("ABSTREAM_CLICKHOUSE_DATABASE must be a plain identifier (letters, digits, _)")
        if self.partitions < 1:
            raise SettingsError("ABSTREAM_PARTITIONS must be at least 1")
        if self.sink_resend_window < 1:
            raise SettingsError("ABSTREAM_SINK_RESEND_WINDOW must be at least 1 (offsets of an input partition)")

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    @property
    def chdb_path(self) -> Path:
        return Path(urlsplit(self.clickhouse_dsn).path)

    def kafka_config(self, **extra) -> dict:
        """confluent-kafka (librdkafka) configuration with the security settings passed through.
        librdkafka's own log lines go to the ``abstream.kafka`` logger at DEBUG: a refused
        password or an unreachable broker reaches the user as one line from the code that
        asked, not as librdkafka's retries on stderr."""
        return {"bootstrap.servers": self.kafka_bootstrap, "logger": LIBRDKAFKA_LOG, **self.kafka_security, **extra}

    def to_env(self) -> dict[str, str]:
        """The ``ABSTREAM_*`` variables that reproduce these settings in a child process."""
        env = {
            "ABSTREAM_HOME": str(self.home),
            "ABSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "ABSTREAM_CLICKHOUSE_DSN": self.clickhouse_dsn,
            "ABSTREAM_CLICKHOUSE_DATABASE": self.clickhouse_database,
            "ABSTREAM_TOPIC_PREFIX": self.topic_prefix,
            "ABSTREAM_PARTITIONS": str(self.partitions),
            "ABSTREAM_SCHEMA_REGISTRY_URL": self.schema_registry_url,
            "ABSTREAM_WEB_HOST": self.web_host,
            "ABSTREAM_WEB_PORT": str(self.web_port),
            "ABSTREAM_BATCH_MAX_EVENTS": str(self.batch_max_events),
            "ABSTREAM_DECISION_INTERVAL_S": str(self.decision_interval_s),
            "ABSTREAM_EXPOSURE_RETENTION_S": str(self.exposure_retention_s),
            "ABSTREAM_MODEL_REGISTRY": self.model_registry,
            "ABSTREAM_BROKER_SESSION_TIMEOUT_S": str(self.broker_session_timeout_s),
            "ABSTREAM_SINK_RESEND_WINDOW": str(self.sink_resend_window),
        }
        by_key = {key: var for var, key in _KAFKA_PASSTHROUGH.items()}
        env.update({by_key[key]: value for key, value in self.kafka_security.items()})
        return env

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


def _int(env: Mapping[str, str], var: str, default: int) -> int:
    try:
        return int(env.get(var, default))
    except ValueError:
        raise SettingsError(f"{var} must be a whole number, got {env[var]!r}") from None


def _float(env: Mapping[str, str], var: str, default: float) -> float:
    try:
        return float(env.get(var, default))
    except ValueError:
        raise SettingsError(f"{var} must be a number, got {env[var]!r}") from None

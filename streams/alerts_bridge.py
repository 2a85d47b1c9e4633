"""The alerts bridge: guardrail alerts from ``<prefix>alerts`` to Alertmanager's API.

On-call already routes Prometheus alerts through Alertmanager (infra/alertmanager/); the
processor's own guardrail alerts travel on a Kafka topic. The bridge consumes that topic in
its own consumer group and POSTs each alert to ``{alertmanager}/api/v2/alerts``: a firing
alert with ``startsAt``, a resolved one with ``endsAt``. Offsets are committed only after
Alertmanager answered 2xx (at least once; Alertmanager deduplicates by labels). Alertmanager
forgets an alert that is not sent again before its ``resolve_timeout``, so the bridge sends
the alerts still firing again every ``resend_s``.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from confluent_kafka import Consumer, KafkaError

from streams.codec import Codec, ControlKind, DeadLetter, schema_source
from streams.settings import Settings
from streams.topics import ALERTS

log = logging.getLogger("abstream.alerts_bridge")


class BridgeError(RuntimeError):
    """Alertmanager refused or could not be reached; the message is one line."""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


def alertmanager_alert(alert: dict) -> dict:
    """Alertmanager's v2 alert for an abstream Alert record (labels identify it)."""
    body = {
        "labels": {"alertname": "AbstreamGuardrail", "service": "abstream", "severity": alert["severity"],
                   "experiment": alert["experiment_id"], "variant": alert["variant"],
                   "guardrail": alert["guardrail"], "kind": alert["kind"], "action": alert["action"]},
        "annotations": {"summary": f"{alert['experiment_id']}: guardrail {alert['guardrail']} {alert['state']} "
                                   f"for {alert['variant']}",
                        "evidence": alert["evidence"], "alert_id": alert["alert_id"],
                        "observed": "" if alert["observed"] is None else f"{alert['observed']:g}",
                        "threshold": f"{alert['threshold']:g}"},
        "startsAt": _iso(alert["event_time"] if alert["state"] == "firing" else alert["emitted_time"]),
    }
    if alert["state"] == "resolved":
        body["endsAt"] = _iso(alert["emitted_time"])
    return body


def post(alertmanager_url: str, alerts: list[dict], timeout_s: float = 10.0) -> None:
    request = urllib.request.Request(f"{alertmanager_url.rstrip('/')}/api/v2/alerts", method="POST",
                                     data=json.dumps(alerts).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if not 200 <= response.status < 300:
                raise BridgeError(f"Alertmanager answered {response.status}")
    except urllib.error.HTTPError as exc:
        raise BridgeError(f"Alertmanager answered {exc.code}: {exc.read()[:200]!r}") from None
    except urllib.error.URLError as exc:
        raise BridgeError(f"cannot reach Alertmanager at {alertmanager_url}: {exc.reason}") from None


def run_bridge(settings: Settings, alertmanager_url: str, *, resend_s: float = 60.0, once: bool = False) -> int:
    """Forward alerts until stopped; with ``once``, until the topic is read to its end.
    Returns the number of alerts forwarded."""
    codec = Codec(schema_source(settings.schema_registry_url))
    consumer = Consumer(settings.kafka_config(**{
        "group.id": f"{settings.topic_prefix}alerts-bridge", "enable.auto.commit": "false",
        "auto.offset.reset": "earliest", "enable.partition.eof": "true"}))
    consumer.subscribe([settings.topic(ALERTS)])
    firing: dict[str, dict] = {}  # alert_id without its firing number -> the Alertmanager alert
    forwarded, last_resend = 0, time.monotonic()
    # Partitions read to their end (librdkafka's partition-EOF events). `--once` stops when all
    # assigned partitions are: a count of empty polls stopped it before the first fetch of a
    # slow start, having forwarded nothing.
    at_end: set[tuple[str, int]] = set()
    try:
        while True:
            messages = consumer.consume(num_messages=500, timeout=0.5)
            records = []
            for m in messages:
                if m.error() is None:
                    records.append(m)
                    at_end.discard((m.topic(), m.partition()))
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add((m.topic(), m.partition()))
            assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            if once and not records and assigned and assigned <= at_end:
                return forwarded
            batch = []
            for message in records:
                alert = codec.decode(ControlKind.ALERT, message.value())
                if isinstance(alert, DeadLetter):
                    log.warning("skipping an undecodable alert at offset %d: %s", message.offset(), alert.detail)
                    continue
                body = alertmanager_alert(alert)
                key = alert["alert_id"].rsplit("/", 1)[0]
                if alert["state"] == "firing":
                    firing[key] = body
                else:
                    firing.pop(key, None)
                batch.append(body)
            if batch:
                post(alertmanager_url, batch)
                consumer.commit(asynchronous=False)
                forwarded += len(batch)
            if firing and time.monotonic() - last_resend > resend_s:
                post(alertmanager_url, list(firing.values()))
                last_resend = time.monotonic()
    finally:
        consumer.close()

"""The client library for model-serving services: sticky assignment, the control-plane
follower (kill switches and allocations), the event publisher, the shadow helper, and the
:class:`Router` facade that ties them together.

Assignment
----------
A unit's bucket is ``int.from_bytes(sha256(f"{salt}:{unit_id}".encode("utf-8")).digest()[:8],
"big") % 10_000``: SHA-256 of the UTF-8 text, its first 8 bytes read as a big-endian unsigned
integer, modulo 10,000. It is the same in every process, on every platform and in every
Python version (never ``hash()``, which is salted per process); any language with SHA-256
computes the same bucket. The modulo bias is below 1e-15.

The salt is the experiment's ``assignment_salt`` (``salt``, or the experiment_id when empty),
so two experiments assign independently, and changing the salt reshuffles an experiment.

Weights become whole basis points (of the 10,000 buckets): every treatment gets its share
rounded half up on its own, and control gets the rest, so the arms always cover exactly the
10,000 buckets and a treatment's size never depends on another treatment's weight.

Buckets are laid out so that changing one treatment's weight (control giving or taking the
difference, as in a canary step, a kill or a resume) moves units only between that
treatment and control::

    [ t1 ->  |            control            | <- tk ... t3 | t2 ]
    0                                                       10,000

The first treatment (variant order, control excluded) grows upward from bucket 0, the second
downward from bucket 10,000, any further ones stacked below it, and control holds the buckets
in between. With one or two treatments (a canary; an A/B/C test) every treatment has the
property; with three or more, the first and the last have it, and changing a middle one also
shifts the treatments between it and control (no layout can give it to three or more
treatments at once: with treatment weights a, b, c free, each treatment's range at weight w
would have to be the complement of another's at 1 - w).

Control plane
-------------
``<prefix>killswitch`` and ``<prefix>allocations`` are compacted topics keyed by
experiment_id. For each experiment the record with the highest ``version`` is in force (a
lower version arriving later is ignored; a tombstone removes the experiment's record).
Weights come from the allocation in force when there is one, else from the experiment's
config. Then the kill switch in force applies, in basis points so that nothing else moves:

- ``kill`` V, ``rollback`` V: V gets no units, its buckets go to control; ``rollback`` with
  variant ``*`` sends every treatment's buckets to control. Control itself cannot be killed
  (such a record is ignored with a warning);
- ``resume`` V: nothing is killed; the weights in force apply;
- ``promote`` V: V gets every unit.

Because only the newest record per experiment is in force (and compaction keeps only that
one), killing two variants of one experiment takes one allocation with both at weight 0,
not two kill records.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Awaitable, Callable, Mapping, TypeVar

from confluent_kafka import KafkaException

from streams.codec import (Codec, ControlKind, DeadLetter, EventKind, LocalCatalogue, SchemaLookupNeeded,
                           SchemaRegistryUnavailable, SchemaRejected, schema_source, validate)
from streams.experiments import ExperimentCatalogue, ExperimentConfig
from streams.settings import Settings
from streams.topics import ALLOCATIONS, INPUT_TOPICS, KILLSWITCH, TopicError, TopicFollower, ensure_topics, make_producer

log = logging.getLogger(__name__)
_client_log = logging.getLogger("streams.client.librdkafka")

BUCKETS = 10_000
ALL_TREATMENTS = "*"
T = TypeVar("T")


class UnknownExperiment(KeyError):
    """variant_for() was asked about an experiment the experiments topic does not hold."""

    def __str__(self) -> str:
        return f"no experiment {self.args[0]!r} in the experiments topic (create it with `abstream experiment create`)"


class InvalidEvent(ValueError):
    """An event the caller built cannot be published: a field is missing, of the wrong type,
    or fails the validation rules the workers apply (the message says which)."""


class PublishError(RuntimeError):
    """The producer refused a message for a reason other than a full queue, or the schema
    registry could not register abstream's schema of its kind (the message says which)."""


# ---------------------------------------------------------------------------------------
# Assignment (pure)
# ---------------------------------------------------------------------------------------

def unit_bucket(salt: str, unit_id: str) -> int:
    """The unit's bucket in [0, 10,000): SHA-256 of ``f"{salt}:{unit_id}"`` (UTF-8), first
    8 bytes big-endian, modulo 10,000."""
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def basis_points(weights: Mapping[str, float], control: str) -> dict[str, int]:
    """Variant -> whole buckets out of 10,000, in the mapping's order.

    Weights are normalised by their sum. Each treatment's share is rounded half up on its
    own (after rounding away float noise below 1e-6 of a bucket) and control gets the
    rest, so the result always sums to 10,000 and a treatment's size depends only on its own
    weight and the total. Raises ValueError for a negative or non-finite weight, a zero
    total, or a control that is not among the variants.
    """
    if control not in weights:
        raise ValueError(f"control {control!r} is not one of the variants ({', '.join(weights)})")
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight!r}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise ValueError("the weights sum to 0: at least one variant needs a positive weight")
    points = {name: 0 if name == control else int(math.floor(round(w / total * BUCKETS, 6) + 0.5))
              for name, w in weights.items()}
    excess = sum(points.values()) - BUCKETS
    # Only when control's own share is below half a bucket per treatment can rounding up
    # overshoot; take the overshoot back from the last treatments.
    for name in reversed([n for n in weights if n != control]):
        if excess <= 0:
            break
        taken = min(excess, points[name])
        points[name] -= taken
        excess -= taken
    points[control] = BUCKETS - sum(points.values())
    return points


@dataclass(frozen=True)
class BucketLayout:
    """Contiguous bucket ranges ``(variant, start, end)`` covering [0, 10,000) in bucket order."""

    ranges: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, points: Mapping[str, int], control: str) -> "BucketLayout":
        """The layout described in the module docstring: first treatment up from 0, the
        others down from 10,000, control between."""
        if sum(points.values()) != BUCKETS:
            raise ValueError(f"basis points must sum to {BUCKETS}, got {sum(points.values())}")
        treatments = [name for name in points if name != control]
        low: list[tuple[str, int, int]] = []
        high: list[tuple[str, int, int]] = []
        bottom = 0
        if treatments:
            first = treatments[0]
            low.append((first, 0, points[first]))
            bottom = points[first]
        top = BUCKETS
        for name in treatments[1:]:
            high.append((name, top - points[name], top))
            top -= points[name]
        ranges = (*low, (control, bottom, top), *reversed(high))
        return cls(tuple(r for r in ranges if r[2] > r[1]))

    def variant_at(self, bucket: int) -> str:
        for name, start, end in self.ranges:
            if start <= bucket < end:
                return name
        raise ValueError(f"bucket {bucket} is outside [0, {BUCKETS})")

    def size(self, variant: str) -> int:
        return sum(end - start for name, start, end in self.ranges if name == variant)


class KillAction(str, Enum):
    KILL = "kill"
    ROLLBACK = "rollback"
    RESUME = "resume"
    PROMOTE = "promote"


class AllocationReason(str, Enum):
    CANARY_STEP = "canary_step"
    BANDIT = "bandit"
    ROLLBACK = "rollback"
    MANUAL = "manual"
    PROMOTE = "promote"


@dataclass(frozen=True)
class KillSwitch:
    """An order about one variant (``schemas/killswitch.v1.avsc``); see the module docstring."""

    experiment_id: str
    action: KillAction
    variant: str
    version: int
    reason: str = ""
    alert_id: str | None = None
    event_time_ms: int = 0

    def to_record(self) -> dict:
        """The record for ``Codec.encode(ControlKind.KILLSWITCH, ...)``."""
        return {"experiment_id": self.experiment_id, "action": self.action.value, "variant": self.variant,
                "reason": self.reason, "alert_id": self.alert_id, "event_time": self.event_time_ms,
                "version": self.version}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "KillSwitch":
        return cls(record["experiment_id"], KillAction(record["action"]), record["variant"], record["version"],
                   record["reason"], record["alert_id"], record["event_time"])


@dataclass(frozen=True)
class Allocation:
    """Weights that replace the config's (``schemas/allocation.v1.avsc``)."""

    experiment_id: str
    weights: Mapping[str, float]
    version: int
    reason: AllocationReason = AllocationReason.MANUAL
    event_time_ms: int = 0

    def to_record(self) -> dict:
        """The record for ``Codec.encode(ControlKind.ALLOCATION, ...)``."""
        return {"experiment_id": self.experiment_id, "weights": dict(self.weights), "version": self.version,
                "reason": self.reason.value, "event_time": self.event_time_ms}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Allocation":
        """Raises ValueError for a negative or non-finite weight."""
        weights = dict(record["weights"])
        for name, weight in weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {name!r} is {weight!r}")
        return cls(record["experiment_id"], weights, record["version"], AllocationReason(record["reason"]),
                   record["event_time"])


def effective_points(weights: Mapping[str, float], control: str, *, allocation: Allocation | None = None,
                     killswitch: KillSwitch | None = None) -> dict[str, int]:
    """Variant -> buckets after the allocation in force (if any) replaced ``weights`` and the
    kill switch in force (if any) applied, as described in the module docstring.

    An allocation's weights for variants not in ``weights`` are ignored and variants it does
    not name get 0; an allocation that leaves no positive weight is ignored. A kill switch
    naming an unknown variant, or killing control, is ignored. Both are logged.
    """
    if allocation is not None:
        unknown = sorted(set(allocation.weights) - set(weights))
        if unknown:
            log.warning("allocation v%d of %s names unknown variants %s; ignored",
                        allocation.version, allocation.experiment_id, unknown)
        allocated = {name: float(allocation.weights.get(name, 0.0)) for name in weights}
        if math.fsum(allocated.values()) > 0:
            weights = allocated
        else:
            log.warning("allocation v%d of %s gives no variant a positive weight; config weights used",
                        allocation.version, allocation.experiment_id)
    points = basis_points(weights, control)
    if killswitch is None or killswitch.action is KillAction.RESUME:
        return points
    target = killswitch.variant
    if killswitch.action is KillAction.PROMOTE:
        if target not in points:
            log.warning("kill switch v%d of %s promotes unknown variant %r; ignored",
                        killswitch.version, killswitch.experiment_id, target)
            return points
        return {name: BUCKETS if name == target else 0 for name in points}
    if killswitch.action is KillAction.ROLLBACK and target == ALL_TREATMENTS:
        return {name: BUCKETS if name == control else 0 for name in points}
    if target == control or target not in points:
        log.warning("kill switch v%d of %s cannot %s variant %r (%s); ignored", killswitch.version,
                    killswitch.experiment_id, killswitch.action.value, target,
                    "it is the control" if target == control else "not a variant")
        return points
    points = dict(points)
    points[control] += points[target]
    points[target] = 0
    return points


@dataclass(frozen=True)
class Assigner:
    """A salt and a bucket layout: everything needed to assign units of one experiment.
    ``allocation_version`` is the version of the allocation in force (0: the config's
    weights), as published."""

    salt: str
    layout: BucketLayout
    allocation_version: int = 0

    def variant_for(self, unit_id: str) -> str:
        return self.layout.variant_at(unit_bucket(self.salt, unit_id))


def assigner(config_or_weights: ExperimentConfig | Mapping[str, float], salt: str | None = None, *,
             control: str | None = None, allocation: Allocation | None = None,
             killswitch: KillSwitch | None = None) -> Assigner:
    """The :class:`Assigner` of an experiment config (its weights, control and
    ``assignment_salt``), or of a mapping variant -> weight in variant order (control: the
    ``control`` argument, else the first variant; ``salt`` required)."""
    if isinstance(config_or_weights, ExperimentConfig):
        weights = config_or_weights.weights
        control = control or config_or_weights.control
        salt = config_or_weights.assignment_salt if salt is None else salt
    else:
        weights = dict(config_or_weights)
        if not weights:
            raise ValueError("no variants to assign to")
        control = control or next(iter(weights))
        if salt is None:
            raise ValueError("a salt is required when assigning from plain weights")
    points = effective_points(weights, control, allocation=allocation, killswitch=killswitch)
    return Assigner(salt, BucketLayout.of(points, control), allocation.version if allocation else 0)


def assign(config_or_weights: ExperimentConfig | Mapping[str, float], unit_id: str, salt: str | None = None, *,
           control: str | None = None, allocation: Allocation | None = None,
           killswitch: KillSwitch | None = None) -> str:
    """The variant of ``unit_id``: sticky (the same for the same inputs in every process),
    honouring the allocation and kill switch in force when given. See :func:`assigner`;
    build an :class:`Assigner` once when assigning many units."""
    return assigner(config_or_weights, salt, control=control, allocation=allocation,
                    killswitch=killswitch).variant_for(unit_id)


def sampled(salt: str, key: str, rate: float) -> bool:
    """True for a deterministic ``rate`` share of keys (whole basis points): the key's
    bucket, hashed like a unit's, is below ``rate * 10,000``."""
    return unit_bucket(salt, key) < int(math.floor(round(rate * BUCKETS, 6) + 0.5))


def publish_control(settings: Settings, order: KillSwitch | Allocation, *, codec: Codec | None = None,
                    timeout_s: float = 10.0) -> None:
    """Publish a kill switch or an allocation keyed by its experiment_id and wait for the
    broker's acknowledgement; raises :class:`TopicError` when it is not delivered. For
    on-call and scripts; the stage-2 controllers publish their own."""
    kind, topic = ((ControlKind.KILLSWITCH, KILLSWITCH) if isinstance(order, KillSwitch)
                   else (ControlKind.ALLOCATION, ALLOCATIONS))
    record = order.to_record()
    if not record["event_time"]:
        record["event_time"] = _now_ms()
    value = (codec or Codec(schema_source(settings.schema_registry_url))).encode(kind, record)
    producer = make_producer(settings, logger=_client_log, **{"message.timeout.ms": str(int(timeout_s * 1000))})
    outcome: list = []
    producer.produce(settings.topic(topic), key=order.experiment_id.encode("utf-8"), value=value,
                     on_delivery=lambda err, msg: outcome.append(err))
    producer.flush(timeout_s + 5.0)
    if not outcome or outcome[0] is not None:
        problem = outcome[0].str() if outcome else f"no acknowledgement within {timeout_s:g} s"
        raise TopicError(f"cannot publish {kind.value} of {order.experiment_id} to {settings.topic(topic)}: {problem}")


# ---------------------------------------------------------------------------------------
# Control-plane follower
# ---------------------------------------------------------------------------------------

class ControlFollower(TopicFollower):
    """``<prefix>killswitch`` and ``<prefix>allocations`` followed in a background thread:
    the kill switch and allocation in force for every experiment (highest version wins).
    See :class:`streams.topics.TopicFollower` for ``version``, ``wait_until_caught_up`` and
    ``wait_for_change``; records that do not decode, or whose key does not match their
    experiment_id, are skipped and counted in ``skipped``. :meth:`start` raises
    :class:`TopicError` when a topic is missing (``ensure_topics`` creates them).
    """

    def __init__(self, settings: Settings, *, codec: Codec | None = None, poll_s: float = 0.1):
        self.kinds = {settings.topic(KILLSWITCH): ControlKind.KILLSWITCH,
                      settings.topic(ALLOCATIONS): ControlKind.ALLOCATION}
        super().__init__(settings, list(self.kinds), role="control", poll_s=poll_s)
        self._codec = codec or Codec(schema_source(settings.schema_registry_url))
        self._killswitches: dict[str, KillSwitch] = {}
        self._allocations: dict[str, Allocation] = {}

    def _apply(self, msg) -> bool:
        kind = self.kinds[msg.topic()]
        key = msg.key().decode("utf-8", "replace") if msg.key() is not None else None
        state: dict = self._killswitches if kind is ControlKind.KILLSWITCH else self._allocations
        try:
            if msg.value() is None:
                if key is None:
                    raise ValueError("tombstone without a key")
                with self._changed:
                    return state.pop(key, None) is not None
            record = self._codec.decode(kind, msg.value())
            if isinstance(record, DeadLetter):
                raise ValueError(f"{record.reason.value}: {record.detail}")
            parsed = (KillSwitch if kind is ControlKind.KILLSWITCH else Allocation).from_record(record)
            if key is not None and key != parsed.experiment_id:
                raise ValueError(f"key {key!r} does not match experiment_id {parsed.experiment_id!r}")
        except (ValueError, KeyError) as exc:
            self.skipped += 1
            log.warning("skipped record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            return False
        with self._changed:
            current = state.get(parsed.experiment_id)
            if current is not None and parsed.version <= current.version:
                if parsed.version < current.version:
                    log.info("ignored %s v%d of %s: v%d is in force", kind.value, parsed.version,
                             parsed.experiment_id, current.version)
                return False
            state[parsed.experiment_id] = parsed
            return True

    def killswitch(self, experiment_id: str) -> KillSwitch | None:
        return self._killswitches.get(experiment_id)

    def allocation(self, experiment_id: str) -> Allocation | None:
        return self._allocations.get(experiment_id)


# ---------------------------------------------------------------------------------------
# Publisher
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublisherStats:
    """Messages by fate: acknowledged by the broker, failed after librdkafka's retries,
    dropped because the local queue stayed full, and still in flight."""

    delivered: int
    failed: int
    dropped: int
    pending: int
    last_error: str | None = None


def _now_ms() -> int:
    return int(time.time() * 1000)


class EventPublisher:
    """Publishes assignment, prediction, shadow and outcome events to the input topics.

    The producer is confluent-kafka's, idempotent, murmur2-partitioned
    (:func:`streams.topics.make_producer`); messages are keyed by unit_id and written in the
    Confluent wire format by :class:`Codec`. ``event_id`` (a uuid4) and ``event_time`` (now,
    epoch ms) are filled in when absent. A background thread serves delivery reports, which
    :meth:`stats` counts.

    Publishing never blocks longer than ``max_block_s``: when librdkafka's local queue is
    full (``BufferError``), the call serves delivery reports (``poll``) until there is room
    or the bound has passed; then the event is dropped, counted in ``dropped``, logged, and
    the call returns False. An event that cannot be encoded or fails the workers' validation
    raises :class:`InvalidEvent` (a bug in the caller, not a transient condition).

    The schema registry is never asked on the caller's thread either: a thread registers the
    four kinds' schemas from the start (again after 0.25 s, doubling to 5 s, while the registry
    cannot), and an event whose schema is not registered within ``max_block_s`` raises
    :class:`PublishError`. Asked inline, a registry that hangs held every publishing call for
    its client's timeout (3 s, twice) while the outage lasted: a router's request path with it.
    :meth:`wait_for_schemas` waits for them at start-up.
    """

    def __init__(self, settings: Settings, *, codec: Codec | None = None, max_block_s: float = 0.05,
                 producer_config: Mapping[str, str] | None = None):
        self.settings = settings
        self.max_block_s = max_block_s
        self._codec = codec or Codec(schema_source(settings.schema_registry_url))
        self._topics = {kind: settings.topic(name) for kind, name in INPUT_TOPICS.items()}
        self._producer = make_producer(settings, logger=_client_log, **dict(producer_config or {}))
        self._lock = threading.Lock()
        self._delivered = self._failed = self._dropped = 0
        self._last_error: str | None = None
        self._last_drop_log = 0.0
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._serve_reports, name="event-publisher", daemon=True)
        self._poller.start()
        self._schema_ready = {kind: threading.Event() for kind in EventKind}
        self._schema_problem: dict[EventKind, str] = {}
        if isinstance(self._codec.schemas, LocalCatalogue):  # no registry: every id is known
            for ready in self._schema_ready.values():
                ready.set()
        else:
            threading.Thread(target=self._register_schemas, name="event-publisher-schemas", daemon=True).start()

    def __enter__(self) -> "EventPublisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _serve_reports(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)

    def _register_schemas(self) -> None:
        """Have the codec know every kind's schema id, trying again while the registry cannot
        say (the id is then cached by the catalogue: encoding asks no one)."""
        wait_s = 0.25
        pending = list(EventKind)
        while pending and not self._stopping.is_set():
            for kind in list(pending):
                try:
                    try:
                        self._codec.schemas.id_for(kind)
                    except SchemaLookupNeeded as need:  # a catalogue that does not ask inline
                        self._codec.schemas.ask(need)
                        self._codec.schemas.id_for(kind)
                except (SchemaRegistryUnavailable, SchemaRejected) as exc:
                    self._schema_problem[kind] = str(exc)
                    continue
                self._schema_problem.pop(kind, None)
                self._schema_ready[kind].set()
                pending.remove(kind)
            if pending:
                self._stopping.wait(wait_s)
                wait_s = min(5.0, wait_s * 2)

    def wait_for_schemas(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` for the four kinds' schemas to be registered; True when they are."""
        deadline = time.monotonic() + timeout_s
        return all(ready.wait(max(0.0, deadline - time.monotonic())) for ready in self._schema_ready.values())

    def _on_delivery(self, err, msg) -> None:
        with self._lock:
            if err is None:
                self._delivered += 1
            else:
                self._failed += 1
                self._last_error = err.str()
        if err is not None:
            log.warning("event not delivered to %s: %s", msg.topic(), err.str())

    def publish(self, kind: EventKind, record: Mapping[str, Any]) -> bool:
        """Queue one event; True when queued, False when dropped because the queue stayed
        full for ``max_block_s``. Raises :class:`InvalidEvent` or :class:`PublishError`."""
        record = dict(record)
        if not record.get("event_id"):
            record["event_id"] = str(uuid.uuid4())
        if record.get("event_time") is None:
            record["event_time"] = _now_ms()
        ready = self._schema_ready[kind]
        if not ready.is_set() and not ready.wait(self.max_block_s):  # is_set: no lock per event
            problem = self._schema_problem.get(kind, "the schema registry has not answered yet")
            raise PublishError(f"cannot publish {kind.value} event: its schema is not registered yet ({problem})")
        try:
            value = self._codec.encode(kind, record)
            problem = validate(kind, record)
        except (SchemaRegistryUnavailable, SchemaRejected) as exc:  # not the event's fault
            raise PublishError(f"cannot publish {kind.value} event: {exc}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidEvent(f"{kind.value} event cannot be encoded: {type(exc).__name__}: {exc}") from None
        if problem is not None:
            raise InvalidEvent(f"{kind.value} event is invalid: {problem}")
        key = str(record["unit_id"]).encode("utf-8")
        deadline: float | None = None
        while True:
            try:
                self._producer.produce(self._topics[kind], key=key, value=value, on_delivery=self._on_delivery)
                return True
            except BufferError:
                now = time.monotonic()
                deadline = now + self.max_block_s if deadline is None else deadline
                if now >= deadline:
                    return self._drop(kind)
                self._producer.poll(min(0.005, deadline - now))
            except KafkaException as exc:
                raise PublishError(f"cannot publish {kind.value} event: {exc.args[0].str()}") from None

    def _drop(self, kind: EventKind) -> bool:
        with self._lock:
            self._dropped += 1
            dropped = self._dropped
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:  # one line per 10 s, not one per event
            self._last_drop_log = now
            log.warning("producer queue full for %.3f s: %s event dropped (%d dropped so far)",
                        self.max_block_s, kind.value, dropped)
        return False

    def assignment(self, experiment_id: str, unit_id: str, variant: str, *, allocation_version: int = 0,
                   segment: Mapping[str, str] | None = None, event_id: str | None = None,
                   event_time_ms: int | None = None) -> bool:
        """Publish an exposure: ``unit_id`` was served ``variant``."""
        return self.publish(EventKind.ASSIGNMENT, {
            "event_id": event_id, "event_time": event_time_ms, "experiment_id": experiment_id, "unit_id": unit_id,
            "variant": variant, "allocation_version": allocation_version, "segment": dict(segment or {})})

    def prediction(self, experiment_id: str, unit_id: str, *, request_id: str, variant: str, model_name: str,
                   model_version: str, latency_ms: float, score: float | None = None, label: str | None = None,
                   status: str = "ok", event_id: str | None = None, event_time_ms: int | None = None) -> bool:
        """Publish a prediction; ``status`` is ok, error or timeout."""
        return self.publish(EventKind.PREDICTION, {
            "event_id": event_id, "event_time": event_time_ms, "experiment_id": experiment_id, "unit_id": unit_id,
            "request_id": request_id, "variant": variant, "model_name": model_name, "model_version": model_version,
            "score": score, "label": label, "latency_ms": float(latency_ms), "status": str(getattr(status, "value", status))})

    def shadow(self, experiment_id: str, unit_id: str, *, request_id: str, champion_model: str,
               champion_version: str, challenger_model: str, challenger_version: str, champion_latency_ms: float,
               challenger_status: str, challenger_latency_ms: float | None = None,
               champion_score: float | None = None, challenger_score: float | None = None,
               champion_label: str | None = None, challenger_label: str | None = None,
               event_id: str | None = None, event_time_ms: int | None = None) -> bool:
        """Publish a shadow comparison; ``challenger_status`` is ok, error or timeout."""
        return self.publish(EventKind.SHADOW, {
            "event_id": event_id, "event_time": event_time_ms, "experiment_id": experiment_id, "unit_id": unit_id,
            "request_id": request_id, "champion_model": champion_model, "champion_version": champion_version,
            "challenger_model": challenger_model, "challenger_version": challenger_version,
            "champion_score": champion_score, "challenger_score": challenger_score,
            "champion_label": champion_label, "challenger_label": challenger_label,
            "champion_latency_ms": float(champion_latency_ms),
            "challenger_latency_ms": None if challenger_latency_ms is None else float(challenger_latency_ms),
            "challenger_status": str(getattr(challenger_status, "value", challenger_status))})

    def outcome(self, experiment_id: str, unit_id: str, metric: str, value: float, *, request_id: str | None = None,
                event_id: str | None = None, event_time_ms: int | None = None) -> bool:
        """Publish an outcome (a business label) of ``unit_id``; it may come days late."""
        return self.publish(EventKind.OUTCOME, {
            "event_id": event_id, "event_time": event_time_ms, "experiment_id": experiment_id, "unit_id": unit_id,
            "metric": metric, "value": float(value), "request_id": request_id})

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._delivered, self._failed, self._dropped, len(self._producer), self._last_error)

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait up to ``timeout_s`` for every queued event's delivery report; return how many
        are still undelivered (0 when all are acknowledged or failed)."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush, then stop serving delivery reports; return the events still undelivered."""
        left = self.flush(timeout_s)
        self._stopping.set()
        self._poller.join(1.0)
        return left


# ---------------------------------------------------------------------------------------
# Shadow helper
# ---------------------------------------------------------------------------------------

class ShadowStatus(str, Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"


def answer_fields(answer: Any) -> tuple[float | None, str | None]:
    """(score, label) of a model's answer: a number is a score, a string a label, a mapping
    or an object may carry ``score`` and ``label``; anything else gives (None, None)."""
    if isinstance(answer, bool):
        return None, str(answer).lower()
    if isinstance(answer, (int, float)):
        return float(answer), None
    if isinstance(answer, str):
        return None, answer
    if isinstance(answer, Mapping):
        score, label = answer.get("score"), answer.get("label")
    else:
        score, label = getattr(answer, "score", None), getattr(answer, "label", None)
    score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
    return score, None if label is None else str(label)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


class ShadowRunner:
    """Runs a challenger beside the champion on a deterministic sample of requests.

    ``await run(champion, challenger, ...)`` returns (or raises) exactly what
    ``await champion()`` does, as soon as it does. For a sampled request the challenger
    runs concurrently in a background task, bounded by ``timeout_s``; once both are done, a
    Shadow event with both answers, both latencies and the challenger's status (ok, error,
    timeout) is published. A timed-out challenger is cancelled and published with no
    latency (it is censored at ``timeout_s``); a failed one with the time until it failed.
    When the champion itself fails, the challenger is cancelled and nothing is published.

    Sampling: request ``r`` is shadowed when ``sampled(salt, r, sample_rate)`` holds, so
    every replica shadows the same requests. The challenger must be a coroutine that awaits
    (CPU-bound work belongs in ``asyncio.to_thread``), or it would hold up the event loop
    and with it the champion.
    """

    def __init__(self, publisher: EventPublisher, sample_rate: float, timeout_s: float, *, salt: str = "shadow",
                 describe: Callable[[Any], tuple[float | None, str | None]] = answer_fields):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.publisher = publisher
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self.salt = salt
        self.describe = describe
        self.published = 0
        self.not_published = 0
        self._tasks: set[asyncio.Task] = set()

    def sampled(self, request_id: str) -> bool:
        return sampled(self.salt, request_id, self.sample_rate)

    async def run(self, champion: Callable[[], Awaitable[T]], challenger: Callable[[], Awaitable[Any]], *,
                  experiment_id: str, unit_id: str, request_id: str, champion_model: ModelRef,
                  challenger_model: ModelRef) -> T:
        """The champion's answer; see the class docstring."""
        if not self.sampled(request_id):
            return await champion()
        champion_done: asyncio.Future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._shadow(challenger, champion_done, dict(
            experiment_id=experiment_id, unit_id=unit_id, request_id=request_id,
            champion_model=champion_model.name, champion_version=champion_model.version,
            challenger_model=challenger_model.name, challenger_version=challenger_model.version)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        started = time.perf_counter()
        try:
            answer = await champion()
        except BaseException:
            champion_done.cancel()
            raise
        champion_done.set_result((answer, (time.perf_counter() - started) * 1000.0))
        return answer

    async def _shadow(self, challenger: Callable[[], Awaitable[Any]], champion_done: asyncio.Future,
                      fields: dict) -> None:
        async def call() -> Any:
            return await challenger()

        started = time.perf_counter()
        attempt = asyncio.ensure_future(call())
        done, _ = await asyncio.wait({attempt}, timeout=self.timeout_s)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        challenger_answer = None
        if not done:
            # Cancel without waiting: a challenger that ignores cancellation must not hold
            # the shadow event back either.
            attempt.cancel()
            attempt.add_done_callback(lambda t: t.cancelled() or t.exception())
            status, latency_ms = ShadowStatus.TIMEOUT, None
        elif attempt.exception() is not None:
            log.debug("challenger failed on request %s: %r", fields["request_id"], attempt.exception())
            status, latency_ms = ShadowStatus.ERROR, elapsed_ms
        else:
            status, latency_ms = ShadowStatus.OK, elapsed_ms
            challenger_answer = attempt.result()
        await asyncio.wait({champion_done})
        if champion_done.cancelled():
            attempt.cancel()
            self.not_published += 1
            return
        champion_answer, champion_latency_ms = champion_done.result()
        try:
            champion_score, champion_label = self.describe(champion_answer)
            challenger_score, challenger_label = (self.describe(challenger_answer) if status is ShadowStatus.OK
                                                  else (None, None))
            queued = self.publisher.shadow(
                **fields, champion_latency_ms=champion_latency_ms, challenger_status=status.value,
                challenger_latency_ms=latency_ms, champion_score=champion_score, challenger_score=challenger_score,
                champion_label=champion_label, challenger_label=challenger_label)
        except Exception as exc:  # the background task has nobody to raise to
            log.warning("shadow event for request %s not published: %s", fields["request_id"], exc)
            queued = False
        if queued:
            self.published += 1
        else:
            self.not_published += 1

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float = 10.0) -> int:
        """Wait up to ``timeout_s`` for running shadow comparisons; return how many are left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return len(self._tasks)


# ---------------------------------------------------------------------------------------
# Router facade
# ---------------------------------------------------------------------------------------

class ExposureLogging(str, Enum):
    ONCE = "once"      # once per (experiment, unit, variant) per process
    ALWAYS = "always"  # on every variant_for() call
    NEVER = "never"    # the caller publishes exposures itself


@dataclass
class _Cached:
    config: ExperimentConfig
    allocation: Allocation | None
    killswitch: KillSwitch | None
    assigner: Assigner


class Router:
    """What a model-serving service needs: ``variant_for``, ``record_prediction``,
    ``record_outcome`` and a shadow runner, kept current with the experiments, kill-switch
    and allocation topics by background threads.

    Exposures: with ``exposures="once"`` (the default) ``variant_for`` publishes an
    Assignment event the first time this process serves a unit a variant of an experiment,
    and again only if the unit's variant changes (a kill switch or a new allocation moved
    it; the workers keep the first exposure and count the other as an inconsistency). The
    memory of exposures is per process and bounded (``exposure_memory`` entries, least
    recently used forgotten first), so a restarted or second replica publishes a unit's
    exposure again; the workers keep the first. ``"always"`` publishes on every call,
    ``"never"`` leaves it to the caller. The exposure's ``allocation_version`` is the
    allocation in force (its version, a publication time in ms).

    An experiment that is not running (draft, paused, stopped) serves its control and
    publishes no exposure. An experiment the topic does not hold raises
    :class:`UnknownExperiment` (nothing blocks to look for it: the follower reads new
    experiments within a poll interval).
    """

    def __init__(self, settings: Settings, *, publisher: EventPublisher | None = None,
                 exposures: ExposureLogging | str = ExposureLogging.ONCE, exposure_memory: int = 1_000_000,
                 codec: Codec | None = None):
        self.settings = settings
        self._codec = codec or Codec(schema_source(settings.schema_registry_url))
        self.publisher = publisher or EventPublisher(settings, codec=self._codec)
        self._owns_publisher = publisher is None
        self.exposures = ExposureLogging(exposures)
        self.catalogue = ExperimentCatalogue(settings, codec=self._codec)
        self.control = ControlFollower(settings, codec=self._codec)
        self._cache: dict[str, _Cached] = {}
        self._exposed: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._exposure_memory = exposure_memory
        self._lock = threading.Lock()

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, timeout_s: float = 30.0, *, create_topics: bool = True) -> "Router":
        """Create missing topics (unless ``create_topics`` is False), follow the control
        topics, and return once everything published before the call has been read."""
        if create_topics:
            ensure_topics(self.settings, timeout_s)
        self.catalogue.start(timeout_s)
        self.control.start(timeout_s)
        self.catalogue.wait_until_caught_up(timeout_s)
        self.control.wait_until_caught_up(timeout_s)
        if not self.publisher.wait_for_schemas(timeout_s):
            # Serving goes on: the variants need no registry, and events raise PublishError
            # until the schemas are registered (the publisher keeps trying).
            log.warning("the event schemas are not registered after %g s; events raise PublishError until they are",
                        timeout_s)
        return self

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop following, flush the publisher (if the router made it); return the events
        still undelivered."""
        self.control.stop()
        self.catalogue.stop()
        return self.publisher.close(timeout_s) if self._owns_publisher else self.publisher.flush(timeout_s)

    def _assigner(self, experiment_id: str) -> tuple[ExperimentConfig, Assigner]:
        config = self.catalogue.get(experiment_id)
        if config is None:
            raise UnknownExperiment(experiment_id)
        allocation = self.control.allocation(experiment_id)
        killswitch = self.control.killswitch(experiment_id)
        cached = self._cache.get(experiment_id)
        if (cached is None or cached.config is not config or cached.allocation is not allocation
                or cached.killswitch is not killswitch):
            cached = _Cached(config, allocation, killswitch,
                             assigner(config, allocation=allocation, killswitch=killswitch))
            self._cache[experiment_id] = cached
        return config, cached.assigner

    def weights(self, experiment_id: str) -> dict[str, float]:
        """Variant -> share of units now served (allocation and kill switch applied)."""
        _, current = self._assigner(experiment_id)
        return {name: current.layout.size(name) / BUCKETS for name in self.catalogue.get(experiment_id).variant_names}

    def variant_for(self, experiment_id: str, unit_id: str, *, segment: Mapping[str, str] | None = None) -> str:
        """The unit's variant, publishing its exposure as the class docstring says."""
        config, current = self._assigner(experiment_id)
        if not config.is_active:
            return config.control
        variant = current.variant_for(unit_id)
        if self.exposures is ExposureLogging.NEVER:
            return variant
        key = (experiment_id, unit_id)
        if self.exposures is ExposureLogging.ONCE:
            with self._lock:
                if self._exposed.get(key) == variant:
                    self._exposed.move_to_end(key)
                    return variant
        if self.publisher.assignment(experiment_id, unit_id, variant, segment=segment,
                                     allocation_version=current.allocation_version) \
                and self.exposures is ExposureLogging.ONCE:
            with self._lock:
                self._exposed[key] = variant
                self._exposed.move_to_end(key)
                while len(self._exposed) > self._exposure_memory:
                    self._exposed.popitem(last=False)
        return variant

    def model_of(self, experiment_id: str, variant: str) -> ModelRef:
        """The model name and version the experiment's config gives ``variant``."""
        config = self.catalogue.get(experiment_id)
        if config is None:
            raise UnknownExperiment(experiment_id)
        for v in config.variants:
            if v.name == variant:
                return ModelRef(v.model_name or variant, v.model_version)
        raise KeyError(f"experiment {experiment_id} has no variant {variant!r}")

    def record_prediction(self, experiment_id: str, unit_id: str, *, request_id: str, variant: str,
                          latency_ms: float, model_name: str | None = None, model_version: str | None = None,
                          score: float | None = None, label: str | None = None, status: str = "ok",
                          event_time_ms: int | None = None) -> bool:
        """Publish a Prediction; the model defaults to the one the config names for ``variant``."""
        if model_name is None or model_version is None:
            model = self.model_of(experiment_id, variant)
            model_name = model.name if model_name is None else model_name
            model_version = model.version if model_version is None else model_version
        return self.publisher.prediction(experiment_id, unit_id, request_id=request_id, variant=variant,
                                         model_name=model_name, model_version=model_version, latency_ms=latency_ms,
                                         score=score, label=label, status=status, event_time_ms=event_time_ms)

    def record_outcome(self, experiment_id: str, unit_id: str, metric: str, value: float, *,
                       request_id: str | None = None, event_time_ms: int | None = None) -> bool:
        """Publish an Outcome of ``unit_id``."""
        return self.publisher.outcome(experiment_id, unit_id, metric, value, request_id=request_id,
                                      event_time_ms=event_time_ms)

    def shadow_runner(self, sample_rate: float, timeout_s: float, **options: Any) -> ShadowRunner:
        """A :class:`ShadowRunner` publishing through this router's publisher."""
        return ShadowRunner(self.publisher, sample_rate, timeout_s, **options)

"""Stage 1's fold as a pure function: messages in; partials, dead letters and state-log
transactions out. The reference is the rules of streams/units.py applied by hand, one event
at a time, with plain dicts and lists (:class:`Rules`)."""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiokafka.partitioner import murmur2
from prometheus_client import REGISTRY
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from confluent_kafka.schema_registry import SchemaRegistryClient

from streams.codec import Codec, DeadLetterReason, EventKind, RegistryCatalogue, SchemaRegistryUnavailable
from streams.experiments import ExperimentConfig, start
from streams.partials import HOUR_MS, LATENCY_SKETCH, SCORE_BINS, Partial
from streams.settings import Settings
from streams.stage1 import Stage1, StateUnreadable, group_by_partition
from streams.topics import INPUT_TOPICS, murmur2_partitions
from streams.units import MAX_AWAITING_OUTCOMES, RECENT_EVENT_IDS, UnitTable, pack, unpack
from tests.support import refuse_schema_lookups

CODEC = Codec()
SETTINGS = Settings.from_env({})
T0 = 1_767_225_600_000
WINDOW_S = 3600
CONFIGS = {
    "e": start(ExperimentConfig.from_mapping({
        "experiment_id": "e", "variants": ["control", "treatment"], "attribution_window_s": WINDOW_S,
        "primary_metric": {"name": "conversion", "kind": "binary"},
        "secondary_metrics": [{"name": "revenue", "kind": "continuous"}]})),
    "r": start(ExperimentConfig.from_mapping({
        "experiment_id": "r", "variants": ["a", "b"], "attribution_window_s": WINDOW_S,
        "primary_metric": {"name": "rpc", "kind": "ratio", "numerator": "revenue", "denominator": "clicks"}})),
}


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Experiments:
    def __init__(self, configs=None):
        self.configs = CONFIGS if configs is None else configs

    def get(self, experiment_id):
        return self.configs.get(experiment_id)

    def refresh(self, timeout_s=5.0):
        pass


DEFAULTS = {
    EventKind.ASSIGNMENT: {"variant": "treatment", "allocation_version": 0, "segment": {}},
    EventKind.PREDICTION: {"request_id": "r", "variant": "treatment", "model_name": "m", "model_version": "v",
                           "score": 0.5, "label": None, "latency_ms": 10.0, "status": "ok"},
    EventKind.SHADOW: {"request_id": "r", "champion_model": "m", "champion_version": "1", "challenger_model": "m",
                       "challenger_version": "2", "champion_score": 0.375, "challenger_score": 0.75,
                       "champion_label": None, "challenger_label": None, "champion_latency_ms": 10.0,
                       "challenger_latency_ms": 14.0, "challenger_status": "ok"},
    EventKind.OUTCOME: {"metric": "conversion", "value": 1.0, "request_id": None},
}


def record(kind: EventKind, n: int, **fields) -> dict:
    return {"event_id": f"x{n}", "event_time": T0 + n, "experiment_id": "e", "unit_id": "u1", **DEFAULTS[kind], **fields}


def message(kind: EventKind, offset: int, partition: int = 0, **fields) -> Message:
    r = record(kind, offset, **fields)
    return Message(SETTINGS.topic(INPUT_TOPICS[kind]), partition, offset, r["unit_id"].encode(), CODEC.encode(kind, r))


class Log:
    """What the worker does with a batch's transactions: keep them per partition, in order."""

    def __init__(self, fold: Stage1):
        self.fold = fold
        self.transactions: dict[int, list[tuple[str, list[bytes]]]] = defaultdict(list)

    def process(self, messages: list[Message]):
        for partition in {m.partition for m in messages}:
            if partition not in self.fold.partitions:
                self.fold.load(partition, self.transactions[partition], from_start=True)
        result = self.fold.process(group_by_partition(messages))
        for partition, chunks in result.transactions.items():
            self.transactions[partition].append(("delta", chunks))
        return result


def fresh_fold(configs=None) -> tuple[Stage1, Log]:
    fold = Stage1(SETTINGS, CODEC, Experiments(configs))
    return fold, Log(fold)


def partial_of(fold: Stage1, partition: int = 0, experiment_id: str = "e") -> Partial:
    return fold.partitions[partition].partials[experiment_id]


# --- the reference: the rules applied by hand -------------------------------------------------

@dataclass
class Unit:
    ids: list[str] = field(default_factory=list)
    variant: str | None = None
    exposed_ms: int | None = None
    last_ms: int = 0
    totals: dict = field(default_factory=lambda: defaultdict(float))
    fates: dict = field(default_factory=lambda: defaultdict(int))
    inconsistencies: int = 0
    predicted: dict = field(default_factory=lambda: defaultdict(int))
    awaiting: list = field(default_factory=list)


class Rules:
    """streams/units.py's rules, one event at a time; counters as stage 2 reads them."""

    def __init__(self):
        self.units: dict[tuple[int, str, str], Unit] = {}
        self.counters: dict[tuple[int, str], dict] = defaultdict(lambda: defaultdict(float))
        self.positions: dict[tuple[str, int], int] = {}

    def batch(self, messages: list[Message]) -> None:
        """In the fold's order: per partition, topic by topic (assignments, predictions, shadow
        runs, outcomes), each in offset order."""
        order = {SETTINGS.topic(INPUT_TOPICS[k]): i for i, k in enumerate(EventKind)}
        for m in sorted(messages, key=lambda m: (m.partition, order[m.topic], m.offset)):
            if m.offset < self.positions.get((m.topic, m.partition), 0):
                continue
            self.positions[(m.topic, m.partition)] = m.offset + 1
            kind = {SETTINGS.topic(INPUT_TOPICS[k]): k for k in EventKind}[m.topic]
            r = CODEC.decode(kind, m.value)
            if not isinstance(r, dict) or r["experiment_id"] not in CONFIGS:
                continue
            self.event(m.partition, kind, r)

    def event(self, partition: int, kind: EventKind, r: dict) -> None:
        config = CONFIGS[r["experiment_id"]]
        u = self.units.setdefault((partition, r["experiment_id"], r["unit_id"]), Unit())
        identity = f"{kind.value}:{r['event_id']}"
        if identity in u.ids:
            return
        u.ids = (u.ids + [identity])[-RECENT_EVENT_IDS:]
        u.last_ms = max(u.last_ms, r["event_time"])
        counters = self.counters[(partition, r["experiment_id"])]
        if kind is EventKind.ASSIGNMENT:
            if u.variant is None:
                u.variant, u.exposed_ms = r["variant"], r["event_time"]
                waiting, u.awaiting = u.awaiting, []
                u.fates["awaiting_exposure"] -= len(waiting)
                for metric, t, value in waiting:
                    self.judge(u, config, metric, t, value)
            elif r["variant"] != u.variant:
                u.inconsistencies += 1
        elif kind is EventKind.PREDICTION:
            v = r["variant"]
            u.predicted[v] += 1
            counters[("status", v, r["status"])] += 1
            latency = r["latency_ms"]
            bucket = "z" if latency == 0 else str(math.ceil(math.log(latency) / math.log(LATENCY_SKETCH.gamma)))
            counters[("latency", v, bucket)] += 1
            if r["score"] is not None:
                score_bin = min(SCORE_BINS - 1, int(min(1.0, max(0.0, r["score"])) * SCORE_BINS))
                counters[("score", v, f"{r['event_time'] // HOUR_MS}:{score_bin}")] += 1
        elif kind is EventKind.SHADOW:
            c = f"{r['challenger_model']}:{r['challenger_version']}"
            counters[("shadow", c, "runs")] += 1
            counters[("shadow", c, r["challenger_status"])] += 1
            if r["challenger_status"] == "ok":
                if r["champion_label"] is not None and r["challenger_label"] is not None:
                    counters[("shadow", c, "compared")] += 1
                    counters[("shadow", c, "disagree")] += r["champion_label"] != r["challenger_label"]
                elif r["champion_score"] is not None and r["challenger_score"] is not None:
                    counters[("shadow", c, "compared")] += 1
                    counters[("shadow", c, "disagree")] += (r["champion_score"] >= 0.5) != (r["challenger_score"] >= 0.5)
        elif u.variant is None:
            if len(u.awaiting) >= MAX_AWAITING_OUTCOMES:
                u.fates["dropped_awaiting"] += 1
            else:
                u.awaiting.append((r["metric"], r["event_time"], r["value"]))
                u.fates["awaiting_exposure"] += 1
        else:
            self.judge(u, config, r["metric"], r["event_time"], r["value"])

    @staticmethod
    def judge(u: Unit, config, metric: str, t: int, value: float) -> None:
        if t < u.exposed_ms:
            u.fates["before_exposure"] += 1
        elif t >= u.exposed_ms + config.attribution_window_s * 1000:
            u.fates["after_window"] += 1
        else:
            u.fates["attributed"] += 1
            tracked = {n for m in config.metrics for n in ((m.numerator, m.denominator) if m.kind.value == "ratio" else (m.name,))}
            if metric in tracked:
                u.totals[metric] += value

    def partial(self, partition: int, experiment_id: str) -> dict:
        config = CONFIGS[experiment_id]
        units = [u for (p, e, _), u in self.units.items() if p == partition and e == experiment_id]
        variants: dict = {}
        fates: dict = defaultdict(int)
        for u in units:
            for fate, n in u.fates.items():
                fates[fate] += n
            if u.variant is None:
                continue
            arm = variants.setdefault(u.variant, {"units": 0, "sums": {}})
            arm["units"] += 1
            for m in config.metrics:
                t = u.totals
                if m.kind.value == "binary":
                    terms = [float(t[m.name] > 0)]
                elif m.kind.value == "continuous":
                    terms = [t[m.name], t[m.name] ** 2]
                else:
                    x, y = t[m.numerator], t[m.denominator]
                    terms = [x, x * x, y, y * y, x * y]
                sums = arm["sums"].setdefault(m.name, [0.0] * len(terms))
                arm["sums"][m.name] = [a + b for a, b in zip(sums, terms)]
        exposed = [u.exposed_ms for u in units if u.exposed_ms is not None]
        counters: dict = {}
        mine = self.counters[(partition, experiment_id)]
        # Of the score bins, those of each variant's first and latest hour only (what drift reads).
        hours = defaultdict(list)
        for ns, name, key in mine:
            if ns == "score":
                hours[name].append(int(key.split(":")[0]))
        for (ns, name, key), n in mine.items():
            if ns == "score" and int(key.split(":")[0]) not in (min(hours[name]), max(hours[name])):
                continue
            counters.setdefault(f"{ns}:{name}", {})[key] = n
        return {"variants": variants, "fates": {f: n for f, n in fates.items() if n},
                "inconsistencies": sum(u.inconsistencies + (sum(u.predicted.values()) - u.predicted.get(u.variant, 0)
                                                            if u.variant is not None else 0) for u in units),
                "watermark_ms": max((u.last_ms for u in units), default=0),
                "first_exposure_ms": min(exposed) if exposed else None, "counters": counters}


def folded(partial: Partial) -> dict:
    d = partial.to_dict()
    return {**d, "counters": {g: {k: v for k, v in c.items()} for g, c in d["counters"].items()}}


# --- the property -----------------------------------------------------------------------------

UNITS = [f"u{i}" for i in range(6)] + ["heavy"]
VARIANTS = ["control", "treatment", "a", "b", "ghost"]


@st.composite
def events(draw):
    """A stream of messages over two partitions: re-sends, late and early outcomes, waiting
    outcomes, a heavy unit that fills its id window, an unknown experiment, bad bytes."""
    n = draw(st.integers(1, 160))
    out: list[tuple[EventKind, dict | bytes]] = []
    sent: list[tuple[EventKind, dict]] = []
    for i in range(n):
        if sent and draw(st.integers(0, 9)) == 0:
            kind, r = sent[draw(st.integers(0, len(sent) - 1))]  # a re-send: same identity, new offset
            out.append((kind, r))
            continue
        kind = draw(st.sampled_from(list(EventKind)))
        unit = draw(st.sampled_from(UNITS))
        experiment_id = draw(st.sampled_from(["e", "e", "r", "nobody"]))
        # On a grid of half windows, so that outcomes fall exactly on the window's edges too.
        t = T0 + draw(st.integers(-4, 4)) * WINDOW_S * 500 + draw(st.sampled_from([0, 0, 1, -1]))
        fields = {"experiment_id": experiment_id, "unit_id": unit, "event_time": t, "event_id": f"id{i}"}
        if kind is EventKind.ASSIGNMENT:
            fields["variant"] = draw(st.sampled_from(VARIANTS))
        elif kind is EventKind.PREDICTION:
            fields |= {"variant": draw(st.sampled_from(VARIANTS)), "status": draw(st.sampled_from(["ok", "error", "timeout"])),
                       "latency_ms": draw(st.sampled_from([0.0, 1.0, 12.5, 99.9, 1500.0])),
                       "score": draw(st.one_of(st.none(), st.sampled_from([-3.0, 0.0, 0.25, 0.5, 0.99, 1.0, 7.0])))}
        elif kind is EventKind.SHADOW:
            fields |= {"challenger_version": draw(st.sampled_from(["2", "3"])),
                       "challenger_status": draw(st.sampled_from(["ok", "ok", "error"])),
                       "champion_label": draw(st.sampled_from([None, "x", "y"])),
                       "challenger_label": draw(st.sampled_from([None, "x", "y"])),
                       "champion_score": draw(st.sampled_from([None, 0.25, 0.75])),
                       "challenger_score": draw(st.sampled_from([None, 0.25, 0.75]))}
        else:
            fields |= {"metric": draw(st.sampled_from(["conversion", "revenue", "clicks", "other"])),
                       "value": float(draw(st.integers(0, 5)))}  # integers: float sums in any order are exact
        r = record(kind, i, **fields)
        sent.append((kind, r))
        out.append((kind, r))
        if draw(st.integers(0, 29)) == 0:
            out.append((kind, b"\x00\x00\x00\x00\x02not avro"))
    return out


def as_messages(stream, partitions: int = 2) -> list[Message]:
    offsets: dict = defaultdict(int)
    messages = []
    for kind, r in stream:
        if isinstance(r, bytes):
            unit, value = b"u0", r
        else:
            unit, value = r["unit_id"].encode(), CODEC.encode(kind, r)
        topic = SETTINGS.topic(INPUT_TOPICS[kind])
        partition = zlib.crc32(unit) % partitions
        messages.append(Message(topic, partition, offsets[(topic, partition)], unit, value))
        offsets[(topic, partition)] += 1
    return messages


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.lists(st.integers(1, 60), min_size=1, max_size=8), st.data())
def test_the_fold_equals_the_rules_applied_one_event_at_a_time(stream, cuts, data):
    """Whatever the batch boundaries, replays, reloads from the state log (from the start, from
    a snapshot) and the order of arrival within a batch's topics: the partials equal the rules
    applied by hand."""
    messages = as_messages(stream)
    fold, log = fresh_fold()
    rules = Rules()
    at = 0
    for i, size in enumerate(cuts * 20):
        if at >= len(messages):
            break
        batch = messages[at:at + size]
        if at and data.draw(st.booleans(), label=f"replay before batch {i}"):
            batch = messages[max(0, at - 7):at] + batch  # a redelivery of what was folded, then new ones
        at += size
        log.process(batch)
        rules.batch(batch)
        what = data.draw(st.sampled_from(["go on", "go on", "reload", "snapshot"]), label=f"after batch {i}")
        if what == "snapshot":
            for partition in list(fold.partitions):
                log.transactions[partition] = [("snapshot", fold.snapshot(partition))]
        if what in ("reload", "snapshot"):
            fold = Stage1(SETTINGS, CODEC, Experiments())
            log.fold = fold
    for partition in list(log.transactions):
        if partition not in fold.partitions:
            fold.load(partition, log.transactions[partition], from_start=True)
    for (partition, experiment_id) in {(p, e) for p, e, _ in rules.units} | set(rules.counters):
        assert folded(partial_of(fold, partition, experiment_id)) == rules.partial(partition, experiment_id)
    # and a new owner that reads the whole log gets the same
    for partition, transactions in log.transactions.items():
        again = Stage1(SETTINGS, CODEC, Experiments())
        again.load(partition, transactions, from_start=True)
        for experiment_id, partial in fold.partitions[partition].partials.items():
            assert folded(again.partitions[partition].partials[experiment_id]) == folded(partial)
        assert again.partitions[partition].positions == fold.partitions[partition].positions


# --- single rules ---------------------------------------------------------------------------

def test_a_redelivered_message_changes_nothing_however_many_events_came_between():
    fold, log = fresh_fold()
    batch = [message(EventKind.ASSIGNMENT, 1)] + [message(EventKind.PREDICTION, i, latency_ms=float(i)) for i in range(2, 300)]
    log.process(batch)
    before = partial_of(fold).to_dict()
    fold.take_dirty()
    # A hand-over redelivers from the last commit: the same offsets, far more than the id window back.
    result = log.process(batch[:5])
    assert result.transactions == {} and fold.take_dirty() == []  # nothing new to write
    assert partial_of(fold).to_dict() == before


def test_a_re_sent_event_is_a_duplicate_at_another_offset():
    fold, log = fresh_fold()
    log.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.OUTCOME, 2)])
    resent = message(EventKind.OUTCOME, 2)
    resent.offset = 9
    log.process([resent])
    assert partial_of(fold).stats(CONFIGS["e"].primary_metric)["treatment"].successes == 1
    assert partial_of(fold).fates == {"attributed": 1}


def test_a_re_sent_event_is_recognised_among_the_unit_s_last_64_only():
    fold, log = fresh_fold()
    first = message(EventKind.PREDICTION, 0, event_id="twin")
    others = [message(EventKind.PREDICTION, i) for i in range(1, RECENT_EVENT_IDS)]
    log.process([first, *others])
    twin = message(EventKind.PREDICTION, 0, event_id="twin")
    twin.offset = 100
    log.process([twin])  # 63 events since: still among the last 64
    assert partial_of(fold).counters[("status", "treatment", "ok")] == RECENT_EVENT_IDS
    pushed = message(EventKind.PREDICTION, 101)
    again = message(EventKind.PREDICTION, 0, event_id="twin")
    again.offset = 102
    log.process([pushed, again])  # the 65th event pushed the twin out of the window
    assert partial_of(fold).counters[("status", "treatment", "ok")] == RECENT_EVENT_IDS + 2


def test_outcomes_wait_for_their_exposure_up_to_a_limit():
    fold, log = fresh_fold()
    waiting = [message(EventKind.OUTCOME, i, event_time=T0 + 10) for i in range(MAX_AWAITING_OUTCOMES + 3)]
    log.process(waiting)
    assert partial_of(fold).fates == {"awaiting_exposure": MAX_AWAITING_OUTCOMES, "dropped_awaiting": 3}
    log.process([message(EventKind.ASSIGNMENT, 1, event_time=T0)])
    assert partial_of(fold).fates == {"attributed": MAX_AWAITING_OUTCOMES, "dropped_awaiting": 3}
    assert partial_of(fold).stats(CONFIGS["e"].primary_metric)["treatment"].successes == 1


def test_a_huge_finite_score_is_binned_not_a_crash():
    fold, log = fresh_fold()
    result = log.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.PREDICTION, 2, score=1e307),
                          message(EventKind.PREDICTION, 3, score=-1e307)])
    assert result.dead == []
    assert sorted(key.split(":")[1] for ns, _, key in partial_of(fold).counters if ns == "score") == ["0", "19"]


def test_a_record_without_value_is_a_dead_letter():
    fold, log = fresh_fold()
    result = log.process([Message(SETTINGS.topic("outcomes"), 0, 7, None, None)])
    [(_, letter)] = result.dead
    assert letter.reason is DeadLetterReason.NOT_WIRE_FORMAT
    assert fold.partitions[0].positions == {SETTINGS.topic("outcomes"): 8}  # judged, never again


def test_a_poison_event_becomes_a_dead_letter_and_the_unit_keeps_the_rest():
    class Fragile(Stage1):
        def _apply(self, table, events, rows):
            if any((e.decoded.numbers["event_time"][e.picked] == T0 + 2).any() for e in events):
                table.columns["fates"][rows[0], 0] += 100  # a failure midway must not leave this behind
                raise RuntimeError("boom")
            return super()._apply(table, events, rows)

    fold = Fragile(SETTINGS, CODEC, Experiments())
    log = Log(fold)
    # u2's outcome waits for an exposure that comes after the batch.
    result = log.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.OUTCOME, 2), message(EventKind.OUTCOME, 3),
                          message(EventKind.OUTCOME, 4, unit_id="u2", event_time=T0 + 10)])
    [(dead_message, letter)] = result.dead
    assert dead_message.offset == 2 and letter.reason is DeadLetterReason.PROCESSING_ERROR and "boom" in letter.detail
    assert partial_of(fold).fates == {"attributed": 1, "awaiting_exposure": 1}
    assert partial_of(fold).stats(CONFIGS["e"].primary_metric)["treatment"].successes == 1
    again = Stage1(SETTINGS, CODEC, Experiments())
    again.load(0, log.transactions[0], from_start=True)
    assert partial_of(again).to_dict() == partial_of(fold).to_dict()
    # the waiting outcome was written with the slow path's changes: both judge it alike
    exposure = message(EventKind.ASSIGNMENT, 5, unit_id="u2", event_time=T0)
    for each in (fold, again):
        each.process(group_by_partition([exposure]))
        assert partial_of(each).fates == {"attributed": 2}
    assert partial_of(again).to_dict() == partial_of(fold).to_dict()


def test_a_poison_event_sends_only_its_own_partition_one_event_at_a_time_and_the_others_count_once():
    """A batch's partitions are folded and counted together; when one raises, every table is put
    back and the partitions are folded one by one: only the poisoned one event by event."""
    class Fragile(Stage1):
        def __init__(self, *args):
            super().__init__(*args)
            self.sizes: dict[int, list[int]] = defaultdict(list)

        def _apply(self, table, events, rows):
            partition = next(p for p, state in self.partitions.items() if state.table is table)
            self.sizes[partition].append(rows.size)
            if any((e.decoded.numbers["event_time"][e.picked] == T0 + 5).any() for e in events):
                raise RuntimeError("boom")
            return super()._apply(table, events, rows)

    def batch():
        return [message(EventKind.ASSIGNMENT, 1, partition=0), message(EventKind.PREDICTION, 2, partition=0),
                message(EventKind.PREDICTION, 3, partition=0, status="error"),
                message(EventKind.SHADOW, 4, partition=0),
                message(EventKind.ASSIGNMENT, 1, partition=1, unit_id="u2"),
                message(EventKind.PREDICTION, 2, partition=1, unit_id="u2", event_time=T0 + 5),
                message(EventKind.PREDICTION, 3, partition=1, unit_id="u2", latency_ms=40.0),
                message(EventKind.SHADOW, 4, partition=1, unit_id="u2", challenger_status="error")]

    def errors() -> float:
        return REGISTRY.get_sample_value("abstream_predictions_total",
                                         {"experiment": "e", "variant": "treatment", "status": "error"}) or 0.0

    fold = Fragile(SETTINGS, CODEC, Experiments())
    before = errors()
    result = Log(fold).process(batch())
    [(dead_message, letter)] = result.dead
    assert (dead_message.partition, dead_message.offset) == (1, 2) and "boom" in letter.detail
    assert errors() - before == 1  # counted once, though the batch was counted before it was put back
    assert fold.sizes[0] == [4, 4]  # the whole batch, then partition 0 alone: never one event at a time
    assert fold.sizes[1][:2] == [4, 4] and set(fold.sizes[1][2:]) == {1}
    reference = Stage1(SETTINGS, CODEC, Experiments())
    Log(reference).process([m for m in batch() if (m.partition, m.offset) != (1, 2)])
    for partition in (0, 1):
        assert partial_of(fold, partition).to_dict() == partial_of(reference, partition).to_dict()
    assert partial_of(fold, 0).counters[("status", "treatment", "error")] == 1
    assert partial_of(fold, 1).counters[("shadow", "m:2", "error")] == 1


def test_a_batch_the_schema_registry_cannot_decode_for_now_changes_nothing_and_folds_alike_later(monkeypatch):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-stage1-outage"})
    writer = Codec(RegistryCatalogue(registry))
    outcome_id = RegistryCatalogue(registry).id_for(EventKind.OUTCOME)

    def encoded(kind, offset, **fields):
        r = record(kind, offset, **fields)
        return Message(SETTINGS.topic(INPUT_TOPICS[kind]), 0, offset, r["unit_id"].encode(), writer.encode(kind, r))

    # Assignments decode before outcomes: a failure on the outcomes must not leave their rows behind.
    batch = group_by_partition([encoded(EventKind.ASSIGNMENT, 1), encoded(EventKind.ASSIGNMENT, 2, unit_id="u2"),
                                encoded(EventKind.OUTCOME, 3), encoded(EventKind.OUTCOME, 4, unit_id="u3")])
    reference = Stage1(SETTINGS, Codec(RegistryCatalogue(registry)), Experiments())
    reference.load(0, [], from_start=True)
    expected = reference.process(batch)

    outage = {"down": True}
    refuse_schema_lookups(monkeypatch, registry, lambda schema_id, _: outage["down"] and schema_id == outcome_id)
    fold = Stage1(SETTINGS, Codec(RegistryCatalogue(registry)), Experiments())
    fold.load(0, [], from_start=True)
    for _ in range(2):
        with pytest.raises(SchemaRegistryUnavailable, match=f"schema id {outcome_id}"):
            fold.process(batch)
        assert fold.partitions[0].table.n == 0 and fold.partitions[0].positions == {} and not fold.take_dirty()
    outage["down"] = False
    result = fold.process(batch)
    assert not result.dead and not expected.dead
    assert result.transactions == expected.transactions
    assert partial_of(fold).to_dict() == partial_of(reference).to_dict()
    assert partial_of(fold).fates == {"attributed": 1, "awaiting_exposure": 1}


def test_murmur2_partitions_are_kafkas_default_partitioner():
    rng = np.random.default_rng(5)
    alphabet = [chr(c) for c in [*range(32, 127), 0xE9, 0x4E2D, 0x1F600]]
    keys = ["", "a", "ab", "abc", "abcd", *(f"u{i:05d}" for i in range(40))] + [
        "".join(rng.choice(alphabet, size=int(rng.integers(0, 257)))) for _ in range(500)]
    for partitions in (1, 6, 12, 50):
        assert murmur2_partitions(keys, partitions).tolist() == \
            [(murmur2(k.encode()) & 0x7FFFFFFF) % partitions for k in keys]
    assert murmur2_partitions([], 6).tolist() == []


def test_units_that_murmur2_puts_on_another_partition_are_counted_once_per_experiment():
    def off(topic="assignments"):
        return REGISTRY.get_sample_value("abstream_units_off_partition_total", {"topic": topic}) or 0.0

    home = {u: (murmur2(u.encode()) & 0x7FFFFFFF) % SETTINGS.partitions for u in (f"u{i}" for i in range(40))}
    fold, log = fresh_fold()
    before = off()
    log.process([message(EventKind.ASSIGNMENT, i, partition=p, unit_id=u) for i, (u, p) in enumerate(home.items())])
    assert off() == before
    elsewhere = [(u, (p + 1) % SETTINGS.partitions) for u, p in list(home.items())[:7]]
    log.process([message(EventKind.ASSIGNMENT, 100 + i, partition=p, unit_id=u, experiment_id=e)
                 for e in ("e", "r") for i, (u, p) in enumerate(elsewhere)] +
                [message(EventKind.OUTCOME, 200 + i, partition=p, unit_id=u) for i, (u, p) in enumerate(elsewhere)])
    assert off() == before + 14  # 7 units in two experiments; their outcomes add nothing


def test_score_bins_are_kept_for_the_first_and_the_latest_hour_only():
    """A long experiment's partials do not grow with its age: drift reads two hours."""
    fold, log = fresh_fold()
    hour = 3_600_000
    log.process([message(EventKind.ASSIGNMENT, 0)] +
                [message(EventKind.PREDICTION, i, event_time=T0 + i * hour, score=0.1 + (i % 5) / 10) for i in range(1, 49)])
    kept = {(name, key) for ns, name, key in partial_of(fold).counters if ns == "score"}
    assert kept == {("treatment", f"{(T0 + hour) // hour}:4"), ("treatment", f"{(T0 + 48 * hour) // hour}:8")}
    assert sum(n for (ns, _, _), n in partial_of(fold).counters.items() if ns == "status") == 48


def test_score_bins_of_a_middle_hour_go_whichever_batch_makes_it_middle():
    fold, log = fresh_fold()
    hour = 3_600_000
    first, later = (T0 + hour) // hour, (T0 + 2 * hour) // hour
    log.process([message(EventKind.ASSIGNMENT, 0), message(EventKind.PREDICTION, 1, event_time=T0 + hour, score=0.15)])
    log.process([message(EventKind.PREDICTION, 2, event_time=T0 + 2 * hour, score=0.45)])
    log.process([message(EventKind.PREDICTION, 3, event_time=T0 + 2 * hour + 1, score=0.45)])  # no new counter
    scores = lambda: {key: n for (ns, _, key), n in partial_of(fold).counters.items() if ns == "score"}
    bin_of = lambda score: int(score * SCORE_BINS)
    assert scores() == {f"{first}:{bin_of(0.15)}": 1, f"{later}:{bin_of(0.45)}": 2}
    log.process([message(EventKind.PREDICTION, 4, event_time=T0 + 3 * hour, score=0.95)])
    assert scores() == {f"{first}:{bin_of(0.15)}": 1, f"{(T0 + 3 * hour) // hour}:{bin_of(0.95)}": 1}


def test_a_state_log_that_cannot_be_applied_is_refused_whole():
    fold, log = fresh_fold()
    log.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.OUTCOME, 2)])
    good = log.transactions[0]
    for damaged in (b"", b"\x07 not a chunk", good[0][1][0][:-5]):
        again = Stage1(SETTINGS, CODEC, Experiments())
        with pytest.raises(StateUnreadable, match="input partition 0 cannot be applied"):
            again.load(0, [*good, ("delta", [damaged])], from_start=True)
        assert 0 not in again.partitions and not again.take_dirty()
    # A partition continued from memory is not left half-applied either.
    with pytest.raises(StateUnreadable):
        fold.load(0, [("delta", [b"\x07 not a chunk"])], from_start=False)
    assert 0 not in fold.partitions


def test_prediction_latencies_reach_the_histogram_once_even_when_a_batch_is_folded_twice(monkeypatch):
    from prometheus_client import REGISTRY

    def latency_count() -> float:
        return REGISTRY.get_sample_value("abstream_prediction_latency_seconds_count",
                                         {"experiment": "e", "variant": "treatment"}) or 0.0

    real, calls = UnitTable.delta_chunks, []

    def fails_once(self, *args):
        calls.append(args)
        if len(calls) == 1:  # after the batch's events were applied and counted: the fold starts over
            raise RuntimeError("boom")
        return real(self, *args)

    monkeypatch.setattr(UnitTable, "delta_chunks", fails_once)
    fold, log = fresh_fold()
    before = latency_count()
    result = log.process([message(EventKind.PREDICTION, 2, latency_ms=30.0), message(EventKind.PREDICTION, 3, latency_ms=3000.0)])
    assert result.dead == [] and len(calls) > 1
    assert latency_count() - before == 2
    assert partial_of(fold).counters[("status", "treatment", "ok")] == 2
    assert REGISTRY.get_sample_value("abstream_prediction_latency_seconds_bucket",
                                     {"experiment": "e", "variant": "treatment", "le": "0.05"}) >= 1


def test_events_of_an_unknown_experiment_are_dead_letters_when_the_catalogue_cannot_be_refreshed():
    from streams.experiments import ExperimentTopicError

    class Unreachable(Experiments):
        refreshes = 0

        def refresh(self, timeout_s=5.0):
            self.refreshes += 1
            raise ExperimentTopicError("cannot ask for the end of experiments: broker down")

    catalogue = Unreachable()
    fold = Stage1(SETTINGS, CODEC, catalogue)
    result = Log(fold).process([message(EventKind.ASSIGNMENT, 1, experiment_id="new"), message(EventKind.ASSIGNMENT, 2),
                                message(EventKind.OUTCOME, 3, experiment_id="new")])
    assert sorted((m.offset, letter.reason) for m, letter in result.dead) == \
        [(1, DeadLetterReason.UNKNOWN_EXPERIMENT), (3, DeadLetterReason.UNKNOWN_EXPERIMENT)]
    assert fold.unit_states() == 1 and catalogue.refreshes == 1  # the known experiment's event is folded


def test_expired_experiments_leave_the_state_and_a_snapshot_holds_the_rest():
    fold, log = fresh_fold()
    log.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.ASSIGNMENT, 2, experiment_id="r", variant="a"),
                 message(EventKind.OUTCOME, 3, experiment_id="r", metric="clicks", value=2.0)])
    assert fold.expire({"e"}, []) == [] and fold.unit_states() == 2  # a partition not named keeps its rows
    assert fold.expire({"e"}, [0, 1]) == [0] and fold.expire({"e"}, [0]) == []
    assert set(fold.partitions[0].partials) == {"r"} and fold.unit_states() == 1
    again = Stage1(SETTINGS, CODEC, Experiments())
    again.load(0, [("snapshot", fold.snapshot(0))], from_start=True)
    assert partial_of(again, 0, "r").to_dict() == partial_of(fold, 0, "r").to_dict()
    assert again.partitions[0].positions == fold.partitions[0].positions


def test_a_chunk_holds_no_code_and_refuses_what_it_does_not_know():
    chunk = pack({"kind": "x"}, {"a": np.arange(3, dtype=np.int64)})
    meta, arrays = unpack(chunk)
    assert meta == {"kind": "x"} and arrays["a"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError):
        pack({}, {"a": np.array([object()], dtype=object)})
    forged = chunk.replace(b'"<i8"', b'"|O8"')
    with pytest.raises(ValueError):
        unpack(forged)
    fold, log = fresh_fold()
    log.process([message(EventKind.ASSIGNMENT, 1)])
    [rows_chunk, _] = log.transactions[0][0][1]
    meta, arrays = unpack(rows_chunk)
    with pytest.raises(ValueError, match="adds rows from 0 to a table of 1 rows"):
        fold.partitions[0].table.apply_chunk(meta, arrays)  # the same new row once more
    assert UnitTable().apply_chunk(meta, arrays) is None

"""Stage 1's fold as a pure function: messages in, unit states, partials and dead letters out."""
from __future__ import annotations

from dataclasses import dataclass

from streams.codec import Codec, DeadLetterReason, EventKind
from streams.experiments import ExperimentConfig, start
from streams.settings import Settings
from streams.stage1 import Stage1
from streams.units import UnitState

CODEC = Codec()
SETTINGS = Settings.from_env({})
CONFIG = start(ExperimentConfig.from_mapping({"experiment_id": "e", "variants": ["control", "treatment"],
                                              "primary_metric": {"name": "conversion", "kind": "binary"}}))


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Experiments:
    def get(self, experiment_id):
        return CONFIG if experiment_id == "e" else None

    def refresh(self, timeout_s=5.0):
        pass


def stage1(cls=Stage1) -> tuple[Stage1, dict]:
    units: dict = {}
    return cls(SETTINGS, CODEC, Experiments(), read_unit=units.get, scan_units=lambda: list(units.items())), units


def message(kind: EventKind, offset: int, **fields) -> Message:
    base = {"event_id": f"x{offset}", "event_time": 1_767_225_600_000 + offset, "experiment_id": "e", "unit_id": "u1"}
    defaults = {
        EventKind.ASSIGNMENT: {"variant": "treatment", "allocation_version": 0, "segment": {}},
        EventKind.PREDICTION: {"request_id": "r", "variant": "treatment", "model_name": "m", "model_version": "v",
                               "score": 0.5, "label": None, "latency_ms": 10.0, "status": "ok"},
        EventKind.OUTCOME: {"metric": "conversion", "value": 1.0, "request_id": None},
    }[kind]
    topic = SETTINGS.topic({EventKind.ASSIGNMENT: "assignments", EventKind.PREDICTION: "predictions",
                            EventKind.OUTCOME: "outcomes"}[kind])
    return Message(topic, 0, offset, b"u1", CODEC.encode(kind, {**base, **defaults, **fields}))


def test_a_poison_event_becomes_a_dead_letter_and_the_unit_keeps_the_rest():
    class Fragile(Stage1):
        def _apply(self, state, events, config):
            if any(event["event_id"] == "x2" for _, event, _ in events):
                state.fates["half-written"] = 1  # a failure midway must not leave this behind
                raise RuntimeError("boom")
            return super()._apply(state, events, config)

    fold, units = stage1(Fragile)
    result = fold.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.OUTCOME, 2), message(EventKind.OUTCOME, 3)])
    [(dead_message, letter)] = result.dead
    assert dead_message.offset == 2 and letter.reason is DeadLetterReason.PROCESSING_ERROR and "boom" in letter.detail
    [(_, key, stored)] = result.unit_writes
    state = UnitState.from_bytes(stored)
    assert state.variant == "treatment" and state.fates == {"attributed": 1} and state.totals == {"conversion": 1.0}
    [(_, _, partial)] = fold.take_dirty()
    assert partial.stats(CONFIG.primary_metric)["treatment"].successes == 1


def test_a_huge_finite_score_is_binned_not_a_crash():
    fold, _ = stage1()
    result = fold.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.PREDICTION, 2, score=1e307),
                           message(EventKind.PREDICTION, 3, score=-1e307)])
    assert result.dead == []
    [(_, _, stored)] = result.unit_writes
    state = UnitState.from_bytes(stored)
    assert sorted(key.split(":")[1] for ns, _, key in state.counters if ns == "score") == ["0", "19"]


def test_a_record_without_value_is_a_dead_letter():
    fold, _ = stage1()
    result = fold.process([Message(SETTINGS.topic("outcomes"), 0, 7, None, None)])
    [(_, letter)] = result.dead
    assert letter.reason is DeadLetterReason.NOT_WIRE_FORMAT


def shadow(offset: int, **fields) -> Message:
    run = {"event_id": f"s{offset}", "event_time": 1_767_225_600_000 + offset, "experiment_id": "e", "unit_id": "u1",
           "request_id": "r", "champion_model": "m", "champion_version": "1", "challenger_model": "m",
           "challenger_version": "2", "champion_score": 0.375, "challenger_score": 0.75, "champion_label": None,
           "challenger_label": None, "champion_latency_ms": 10.0, "challenger_latency_ms": 14.0,
           "challenger_status": "ok", **fields}
    return Message(SETTINGS.topic("shadow"), 0, offset, b"u1", CODEC.encode(EventKind.SHADOW, run))


def test_a_redelivered_message_changes_nothing_however_many_events_came_between():
    fold, units = stage1()
    batch = [message(EventKind.ASSIGNMENT, 1)] + [message(EventKind.PREDICTION, i, latency_ms=float(i)) for i in range(2, 300)]
    for _, key, stored in fold.process(batch).unit_writes:
        units[key] = stored
    before = fold.take_dirty()[0][2].to_dict()
    # A hand-over redelivers from the last commit: the same offsets, far more than the id window back.
    result = fold.process(batch[:5])
    assert result.unit_writes == [] and fold.take_dirty() == []
    assert fold.partials[0]["e"].to_dict() == before


def test_a_re_sent_event_is_a_duplicate_at_another_offset():
    fold, units = stage1()
    first = fold.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.OUTCOME, 2)])
    for _, key, stored in first.unit_writes:
        units[key] = stored
    resent = message(EventKind.OUTCOME, 2)
    resent.offset = 9
    assert fold.process([resent]).unit_writes == []
    assert fold.partials[0]["e"].stats(CONFIG.primary_metric)["treatment"].successes == 1


def test_the_folded_partial_equals_the_sum_of_the_unit_states():
    # The fold moves a partial by deltas and counter journals; the reference is a partial
    # built from scratch from the final unit states.
    import random

    from streams.partials import Partial

    rng = random.Random(3)
    fold, units = stage1()
    offset = 0
    for batch_no in range(30):
        batch = []
        for _ in range(rng.randint(1, 40)):
            offset += 1
            unit = f"u{rng.randint(1, 12)}"
            kind = rng.choice([EventKind.ASSIGNMENT, EventKind.PREDICTION, EventKind.OUTCOME, EventKind.SHADOW])
            if kind is EventKind.SHADOW:
                m = shadow(offset, unit_id=unit, challenger_status=rng.choice(["ok", "error"]),
                           challenger_score=rng.randint(0, 8) / 8)  # binary fractions: float sums stay exact
            else:
                extra = {EventKind.ASSIGNMENT: {"variant": rng.choice(["control", "treatment"])},
                         EventKind.PREDICTION: {"variant": rng.choice(["control", "treatment"]), "score": rng.random(),
                                                "latency_ms": rng.uniform(1, 500), "status": rng.choice(["ok", "error"])},
                         EventKind.OUTCOME: {"value": float(rng.randint(0, 1))}}[kind]
                m = message(kind, offset, unit_id=unit, event_time=1_767_225_600_000 + rng.randint(0, 10**6), **extra)
            m.key = unit.encode()
            batch.append(m)
            if rng.random() < 0.1:
                batch.append(m)  # a redelivery inside the batch
        for _, key, stored in fold.process(batch).unit_writes:
            units[key] = stored
    reference = Partial()
    for stored in units.values():
        reference.add_unit(UnitState.from_bytes(stored), CONFIG.metrics)
    folded = fold.partials[0]["e"].to_dict()
    expected = reference.to_dict()
    assert folded == expected


def test_a_unit_state_survives_its_stored_form():
    state = UnitState()
    state.first_time("a\n1", 5)  # the id hashes may contain any byte, the newline included
    for i in range(100):
        state.first_time(f"p{i}", 10 + i)
    state.expose("treatment", 3, 1000, frozenset({"conversion"}))
    state.outcome("conversion", 4, 1.0, 1000, frozenset({"conversion"}))
    state.predicted({"variant": "control", "status": "ok", "latency_ms": 12.5, "score": 0.3, "event_time": 7})
    state.applied_before(2, 41)
    assert UnitState.from_bytes(state.to_bytes()) == state
    assert len(state.recent_ids) == 64 * 8 and not state.first_time("p99", 0) and state.first_time("p1", 0)


def test_a_stored_unit_state_that_names_a_callable_is_refused():
    import pickle

    import pytest

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        UnitState.from_bytes(pickle.dumps(Payload(), protocol=5))


def test_prediction_latencies_reach_the_histogram_once_even_when_a_batch_is_applied_twice():
    from prometheus_client import REGISTRY

    def latency_count() -> float:
        return REGISTRY.get_sample_value("abstream_prediction_latency_seconds_count", {"experiment": "e", "variant": "treatment"}) or 0.0

    class Fragile(Stage1):
        def _apply(self, state, events, config):
            if any(event["event_id"] == "x9" for _, event, _ in events):
                raise RuntimeError("boom")  # after the fast path has seen the predictions before it
            return super()._apply(state, events, config)

    fold, _ = stage1(Fragile)
    before = latency_count()
    result = fold.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.PREDICTION, 2, latency_ms=30.0),
                           message(EventKind.PREDICTION, 3, latency_ms=3000.0), message(EventKind.OUTCOME, 9)])
    assert len(result.dead) == 1
    assert latency_count() - before == 2
    assert REGISTRY.get_sample_value("abstream_prediction_latency_seconds_bucket",
                                     {"experiment": "e", "variant": "treatment", "le": "0.05"}) >= 1


def test_any_unit_state_survives_its_stored_form():
    from hypothesis import given, settings as hsettings, strategies as st

    metrics = frozenset({"m", "n"})
    operation = st.one_of(
        st.tuples(st.just("id"), st.text(max_size=20), st.integers(0, 10**13)),
        st.tuples(st.just("expose"), st.sampled_from(["control", "treatment", "ü\n"]), st.integers(0, 10**13)),
        st.tuples(st.just("outcome"), st.sampled_from(["m", "n", "x"]), st.integers(0, 10**13),
                  st.floats(-1e9, 1e9, allow_nan=False)),
        st.tuples(st.just("predicted"), st.sampled_from(["control", "treatment"]), st.floats(0, 1e5),
                  st.one_of(st.none(), st.floats(-5, 5)), st.sampled_from(["ok", "error", "timeout"])),
        st.tuples(st.just("offset"), st.integers(0, 3), st.integers(0, 2**62)),
    )

    @hsettings(max_examples=200, deadline=None)
    @given(st.lists(operation, max_size=60))
    def check(operations):
        state = UnitState()
        for op in operations:
            if op[0] == "id":
                state.first_time(op[1], op[2])
            elif op[0] == "expose":
                state.expose(op[1], op[2], 10**6, metrics)
            elif op[0] == "outcome":
                state.outcome(op[1], op[2], op[3], 10**6, metrics)
            elif op[0] == "predicted":
                state.predicted({"variant": op[1], "latency_ms": op[2], "score": op[3], "status": op[4], "event_time": 7})
            else:
                state.applied_before(op[1], op[2])
        assert UnitState.from_bytes(state.to_bytes()) == state
        assert state.copy() == state

    check()


def test_events_of_an_unknown_experiment_are_dead_letters_when_the_catalogue_cannot_be_refreshed():
    from streams.experiments import ExperimentTopicError

    class Unreachable(Experiments):
        refreshes = 0

        def refresh(self, timeout_s=5.0):
            self.refreshes += 1
            raise ExperimentTopicError("cannot ask for the end of experiments: broker down")

    units: dict = {}
    catalogue = Unreachable()
    fold = Stage1(SETTINGS, CODEC, catalogue, read_unit=units.get, scan_units=lambda: list(units.items()))
    result = fold.process([message(EventKind.ASSIGNMENT, 1, experiment_id="new"), message(EventKind.ASSIGNMENT, 2),
                           message(EventKind.OUTCOME, 3, experiment_id="new")])
    assert [(m.offset, letter.reason) for m, letter in result.dead] == \
        [(1, DeadLetterReason.UNKNOWN_EXPERIMENT), (3, DeadLetterReason.UNKNOWN_EXPERIMENT)]
    assert len(result.unit_writes) == 1 and catalogue.refreshes == 1  # the known experiment's event is folded

"""Stage 1's fold as a pure function: messages in, unit states, partials and dead letters out."""
from __future__ import annotations

from dataclasses import dataclass

from streams.codec import Codec, DeadLetterReason, EventKind
from streams.experiments import ExperimentConfig, start
from streams.settings import Settings
from streams.stage1 import Stage1

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
    [(_, key, state)] = result.unit_writes
    assert state["v"] == "treatment" and state["f"] == {"attributed": 1} and state["m"] == {"conversion": 1.0}
    [(_, _, partial)] = fold.take_dirty()
    assert partial.stats(CONFIG.primary_metric)["treatment"].successes == 1


def test_a_huge_finite_score_is_binned_not_a_crash():
    fold, _ = stage1()
    result = fold.process([message(EventKind.ASSIGNMENT, 1), message(EventKind.PREDICTION, 2, score=1e307),
                           message(EventKind.PREDICTION, 3, score=-1e307)])
    assert result.dead == []
    [(_, _, state)] = result.unit_writes
    assert sorted(k.split(":")[1] for k in state["c"]["score:treatment"]) == ["0", "19"]


def test_a_record_without_value_is_a_dead_letter():
    fold, _ = stage1()
    result = fold.process([Message(SETTINGS.topic("outcomes"), 0, 7, None, None)])
    [(_, letter)] = result.dead
    assert letter.reason is DeadLetterReason.NOT_WIRE_FORMAT

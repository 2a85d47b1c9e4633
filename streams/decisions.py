"""Reading decisions back: the newest Decision event of each experiment."""
from __future__ import annotations

from streams.codec import Codec, ControlKind, DeadLetter, schema_source
from streams.settings import Settings
from streams.topics import DECISIONS, read_latest


def latest_decisions(settings: Settings, timeout_s: float = 10.0) -> dict[str, dict]:
    """experiment_id -> its newest Decision record, from the decisions topic."""
    codec = Codec(schema_source(settings.schema_registry_url))
    decisions = {}
    for key, (_, value) in read_latest(settings, settings.topic(DECISIONS), timeout_s).items():
        record = codec.decode(ControlKind.DECISION, value)
        if key is not None and not isinstance(record, DeadLetter):
            decisions[key.decode()] = record
    return decisions

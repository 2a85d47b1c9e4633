"""Experiments as data: the ExperimentConfig value objects, the user's config file, the
lifecycle, and the compacted ``<prefix>experiments`` topic that holds them.

The topic is the single source of truth. It has one partition and ``cleanup.policy=compact``;
a record's key is the experiment_id (UTF-8) and its value the codec-encoded
ExperimentConfig (``schemas/experiment_config.v1.avsc``), so the newest record per key is
the experiment's current state. Writers read the topic to its end, compute the next config
with a pure function (:func:`start`, :func:`pause`, :func:`stop`, :func:`revise`) and publish
it; readers follow the topic (:class:`ExperimentCatalogue`).
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streams.codec import Codec, ControlKind, DeadLetter, schema_source
from streams.settings import Settings
from streams.topics import TopicError, TopicFollower, make_producer, read_latest

log = logging.getLogger(__name__)
# librdkafka's own log lines go here rather than to stderr, where they would break the
# command line's one-line errors.
_client_log = logging.getLogger("streams.experiments.librdkafka")

EXPERIMENTS_TOPIC = "experiments"
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_NAME_CHARS = 256
DEFAULT_SRM_THRESHOLD = 0.001


class ConfigError(ValueError):
    """An experiment config is invalid or a lifecycle step is not allowed; the message is one
    line that names the field (``variants[1].weight: ...``) or the experiment."""


class ExperimentTopicError(TopicError):
    """The experiments topic cannot be created, read or written."""


class ExperimentStatus(str, Enum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class MetricKind(str, Enum):
    BINARY = "binary"
    CONTINUOUS = "continuous"
    RATIO = "ratio"


class MetricDirection(str, Enum):
    INCREASE = "increase"
    DECREASE = "decrease"


class GuardrailKind(str, Enum):
    LATENCY_P95 = "latency_p95"
    LATENCY_P99 = "latency_p99"
    ERROR_RATE = "error_rate"
    TIMEOUT_RATE = "timeout_rate"
    METRIC_HARM = "metric_harm"
    SRM = "srm"
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    DRIFT = "drift"


class GuardrailAction(str, Enum):
    ALERT = "alert"
    KILL = "kill"


class SequentialMethod(str, Enum):
    SEQUENTIAL = "sequential"
    MSPRT = "msprt"


class AllocationMode(str, Enum):
    FIXED = "fixed"
    CANARY = "canary"
    THOMPSON = "thompson"


# Guardrails whose threshold is a rate in [0, 1] when absolute.
_RATE_GUARDRAILS = {GuardrailKind.ERROR_RATE, GuardrailKind.TIMEOUT_RATE, GuardrailKind.SHADOW_DISAGREEMENT}


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    model_name: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class Metric:
    """An outcome metric (binary or continuous, by its outcome ``name``) or a ratio of two
    outcome metrics summed per unit (``numerator`` / ``denominator``, delta method)."""

    name: str
    kind: MetricKind
    direction: MetricDirection = MetricDirection.INCREASE
    numerator: str | None = None
    denominator: str | None = None


@dataclass(frozen=True)
class Guardrail:
    """A ceiling that must not be crossed by a treatment.

    ``threshold`` is, by kind: latency_p95/p99 in ms; error_rate, timeout_rate,
    shadow_disagreement a rate in [0, 1]; drift a PSI level; srm the p-value below which the
    split is declared mismatched; metric_harm the significance level at which harm beyond
    ``margin`` (relative to control, in the metric's bad direction) is declared. With
    ``relative_to_control`` the threshold is a ratio to the control's value instead.
    """

    name: str
    kind: GuardrailKind
    threshold: float
    relative_to_control: bool = False
    metric: str | None = None
    margin: float = 0.0
    min_count: int = 100
    action: GuardrailAction = GuardrailAction.ALERT


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment's definition and lifecycle state, as in ``experiment_config.v1.avsc``.

    Times are epoch milliseconds; durations are whole seconds. Variant weights sum to 1.
    """

    experiment_id: str
    variants: tuple[Variant, ...]
    control: str
    primary_metric: Metric
    version: int = 1
    updated_time_ms: int = 0
    status: ExperimentStatus = ExperimentStatus.DRAFT
    started_time_ms: int | None = None
    description: str = ""
    unit: str = "user"
    salt: str = ""
    secondary_metrics: tuple[Metric, ...] = ()
    guardrails: tuple[Guardrail, ...] = ()
    alpha: float = 0.05
    power: float = 0.8
    mde: float | None = None
    min_sample_per_variant: int = 100
    min_runtime_s: int = 0
    max_duration_s: int | None = None
    sequential_method: SequentialMethod = SequentialMethod.SEQUENTIAL
    attribution_window_s: int = 604_800
    cuped_covariate: str | None = None
    allocation: AllocationMode = AllocationMode.FIXED
    canary_steps: tuple[float, ...] = ()
    canary_min_step_s: int = 60
    canary_min_step_sample: int = 100

    # -- what the engine asks -------------------------------------------------------------

    @property
    def variant_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    @property
    def weights(self) -> dict[str, float]:
        """Variant name -> weight (normalised: the weights sum to 1)."""
        return {v.name: v.weight for v in self.variants}

    @property
    def treatments(self) -> tuple[str, ...]:
        """The non-control variant names, in declared order."""
        return tuple(v.name for v in self.variants if v.name != self.control)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The primary metric, then the secondary metrics."""
        return (self.primary_metric, *self.secondary_metrics)

    @property
    def is_active(self) -> bool:
        """True while the experiment is running (assigning units and deciding)."""
        return self.status is ExperimentStatus.RUNNING

    @property
    def assignment_salt(self) -> str:
        """The salt of the assignment hash: ``salt``, or the experiment_id when it is empty."""
        return self.salt or self.experiment_id

    # -- the Avro record ------------------------------------------------------------------

    def to_record(self) -> dict:
        """The record for ``Codec.encode(ControlKind.EXPERIMENT_CONFIG, ...)``."""
        return {
            "experiment_id": self.experiment_id,
            "version": self.version,
            "updated_time": self.updated_time_ms,
            "status": self.status.value,
            "started_time": self.started_time_ms,
            "description": self.description,
            "unit": self.unit,
            "salt": self.salt,
            "variants": [
                {"name": v.name, "weight": v.weight, "model_name": v.model_name, "model_version": v.model_version}
                for v in self.variants
            ],
            "control": self.control,
            "primary_metric": _metric_record(self.primary_metric),
            "secondary_metrics": [_metric_record(m) for m in self.secondary_metrics],
            "guardrails": [
                {"name": g.name, "kind": g.kind.value, "threshold": g.threshold,
                 "relative_to_control": g.relative_to_control, "metric": g.metric, "margin": g.margin,
                 "min_count": g.min_count, "action": g.action.value}
                for g in self.guardrails
            ],
            "alpha": self.alpha,
            "power": self.power,
            "mde": self.mde,
            "min_sample_per_variant": self.min_sample_per_variant,
            "min_runtime_s": self.min_runtime_s,
            "max_duration_s": self.max_duration_s,
            "sequential_method": self.sequential_method.value,
            "attribution_window_s": self.attribution_window_s,
            "cuped_covariate": self.cuped_covariate,
            "allocation": self.allocation.value,
            "canary_steps": list(self.canary_steps),
            "canary_min_step_s": self.canary_min_step_s,
            "canary_min_step_sample": self.canary_min_step_sample,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ExperimentConfig":
        """The config of a decoded record (trusted: written by :meth:`to_record`)."""
        return cls(
            experiment_id=record["experiment_id"],
            version=record["version"],
            updated_time_ms=record["updated_time"],
            status=ExperimentStatus(record["status"]),
            started_time_ms=record["started_time"],
            description=record["description"],
            unit=record["unit"],
            salt=record["salt"],
            variants=tuple(Variant(v["name"], v["weight"], v["model_name"], v["model_version"]) for v in record["variants"]),
            control=record["control"],
            primary_metric=_metric_from_record(record["primary_metric"]),
            secondary_metrics=tuple(_metric_from_record(m) for m in record["secondary_metrics"]),
            guardrails=tuple(
                Guardrail(g["name"], GuardrailKind(g["kind"]), g["threshold"], g["relative_to_control"], g["metric"],
                          g["margin"], g["min_count"], GuardrailAction(g["action"]))
                for g in record["guardrails"]
            ),
            alpha=record["alpha"],
            power=record["power"],
            mde=record["mde"],
            min_sample_per_variant=record["min_sample_per_variant"],
            min_runtime_s=record["min_runtime_s"],
            max_duration_s=record["max_duration_s"],
            sequential_method=SequentialMethod(record["sequential_method"]),
            attribution_window_s=record["attribution_window_s"],
            cuped_covariate=record["cuped_covariate"],
            allocation=AllocationMode(record["allocation"]),
            canary_steps=tuple(record["canary_steps"]),
            canary_min_step_s=record["canary_min_step_s"],
            canary_min_step_sample=record["canary_min_step_sample"],
        )

    # -- the user's file ------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, now_ms: int | None = None) -> "ExperimentConfig":
        """A new experiment (status draft, version 1, updated at ``now_ms``) from a user's
        config, validated; raises :class:`ConfigError` naming the first bad field.

        Fields and defaults are those of the schema, with friendlier forms:

        - a variant may be just its name; variant weights are any positive numbers and are
          normalised to sum to 1 (``[1, 1]`` and ``[50, 50]`` both mean an even split);
          when no variant gives a weight the split is even;
        - ``control`` defaults to the first variant;
        - with ``allocation: canary`` (exactly two variants) the variants carry no weight:
          the challenger starts at ``canary_steps[0]``, which ``weights`` then reports;
        - durations (``*_s``) are whole seconds or strings such as ``"7d"``, ``"12h"``,
          ``"30m"``, ``"45s"``, ``"2w"`` or ``"1h30m"``;
        - a guardrail's ``name`` defaults to its kind; an srm guardrail's threshold defaults
          to 0.001 and a metric_harm guardrail's to ``alpha``.

        The lifecycle fields (status, version, times) are not part of a config file: they
        are set by :func:`start`, :func:`pause`, :func:`stop` and :func:`revise`.
        """
        return _parse_config(mapping, _now_ms() if now_ms is None else now_ms)

    def to_mapping(self) -> dict:
        """The definition as a user's config (no lifecycle fields), such that
        ``from_mapping(config.to_mapping())`` defines the same experiment."""
        record = self.to_record()
        for name in _LIFECYCLE_FIELDS:
            record.pop(name)
        if self.allocation is AllocationMode.CANARY:
            for variant in record["variants"]:
                del variant["weight"]  # the split follows canary_steps
        return record


def _metric_record(metric: Metric) -> dict:
    return {"name": metric.name, "kind": metric.kind.value, "direction": metric.direction.value,
            "numerator": metric.numerator, "denominator": metric.denominator}


def _metric_from_record(record: Mapping[str, Any]) -> Metric:
    return Metric(record["name"], MetricKind(record["kind"]), MetricDirection(record["direction"]),
                  record["numerator"], record["denominator"])


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------
# Parsing and validation of a user's config
# ---------------------------------------------------------------------------------------

_LIFECYCLE_FIELDS = ("version", "updated_time", "status", "started_time")
_TOP_FIELDS = (
    "experiment_id", "description", "unit", "salt", "variants", "control", "primary_metric",
    "secondary_metrics", "guardrails", "alpha", "power", "mde", "min_sample_per_variant",
    "min_runtime_s", "max_duration_s", "sequential_method", "attribution_window_s",
    "cuped_covariate", "allocation", "canary_steps", "canary_min_step_s", "canary_min_step_sample",
)
_VARIANT_FIELDS = ("name", "weight", "model_name", "model_version")
_METRIC_FIELDS = ("name", "kind", "direction", "numerator", "denominator")
_GUARDRAIL_FIELDS = ("name", "kind", "threshold", "relative_to_control", "metric", "margin", "min_count", "action")

_DURATION_UNITS_S = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])")
_MISSING = object()


def _where(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Reads the fields of one mapping of a user's config, each error naming its path."""

    def __init__(self, mapping: Any, path: str, allowed: Iterable[str], what: str = "a mapping of fields"):
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{path or 'config'}: must be {what}, got {_show(mapping)}")
        self.mapping = mapping
        self.path = path
        allowed = tuple(allowed)
        for key in mapping:
            if not isinstance(key, str) or key not in allowed:
                raise ConfigError(f"{_where(path, str(key))}: unknown field{_did_you_mean(str(key), allowed)}")

    def at(self, key: str) -> str:
        return _where(self.path, key)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        value = self.mapping.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ConfigError(f"{self.at(key)}: required")
            return default
        return value

    def string(self, key: str, default: Any = _MISSING, *, pattern: re.Pattern | None = None,
               optional: bool = False, max_chars: int = MAX_NAME_CHARS) -> str | None:
        value = self.raw(key, None if optional else default)
        if value is None:
            return None
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ConfigError(f"{self.at(key)}: must be a string, got {_show(value)}{hint}")
        if pattern is not None and not pattern.fullmatch(value):
            raise ConfigError(f"{self.at(key)}: must be 1-64 characters of A-Z a-z 0-9 . _ -, got {_show(value)}")
        if len(value) > max_chars:
            raise ConfigError(f"{self.at(key)}: must be at most {max_chars} characters, got {len(value)}")
        return value

    def name(self, key: str, default: Any = _MISSING, *, optional: bool = False) -> str | None:
        """A metric or guardrail name: non-empty, no surrounding blanks."""
        value = self.string(key, default, optional=optional)
        if value is not None and (not value or value != value.strip()):
            raise ConfigError(f"{self.at(key)}: must be a non-empty name without surrounding spaces, got {_show(value)}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, optional: bool = False) -> float | None:
        value = self.raw(key, None if optional else default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.at(key)}: must be a number, got {_show(value)}")
        return float(value)

    def count(self, key: str, default: Any = _MISSING, *, minimum: int = 0) -> int:
        value = self.raw(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.at(key)}: must be a whole number >= {minimum}, got {_show(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.at(key)}: must be true or false, got {_show(value)}")
        return value

    def choice(self, key: str, enum: type[Enum], default: Any = _MISSING):
        value = self.raw(key, default)
        if isinstance(value, enum):
            return value
        try:
            return enum(value)
        except ValueError:
            symbols = ", ".join(e.value for e in enum)
            raise ConfigError(f"{self.at(key)}: must be one of {symbols}, got {_show(value)}") from None

    def duration_s(self, key: str, default: Any = _MISSING, *, optional: bool = False, minimum: int = 0) -> int | None:
        value = self.raw(key, None if optional else default)
        if value is None:
            return None
        seconds = parse_duration_s(value, self.at(key))
        if seconds < minimum:
            raise ConfigError(f"{self.at(key)}: must be at least {minimum} s, got {_show(value)}")
        return seconds

    def items(self, key: str, default: Any = _MISSING) -> list:
        value = self.raw(key, default)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{self.at(key)}: must be a list, got {_show(value)}")
        return list(value)


def _did_you_mean(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_duration_s(value: Any, path: str = "duration") -> int:
    """Whole seconds from a number of seconds or a string like ``"7d"``, ``"12h"``,
    ``"30m"``, ``"45s"``, ``"2w"``, ``"1h30m"`` or ``"3600"``; raises :class:`ConfigError`."""
    problem = f"{path}: must be whole seconds or a duration like 7d, 12h, 30m, got {_show(value)}"
    if isinstance(value, bool):
        raise ConfigError(problem)
    if isinstance(value, (int, float)):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+", text):
            seconds = int(text)
        elif text and re.fullmatch(rf"(?:{_DURATION_PART.pattern}\s*)+", text):
            seconds = sum(float(n) * _DURATION_UNITS_S[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ConfigError(problem)
    else:
        raise ConfigError(problem)
    if not math.isfinite(seconds) or seconds < 0 or seconds != int(seconds):
        raise ConfigError(problem)
    return int(seconds)


def _parse_config(mapping: Mapping[str, Any], now_ms: int) -> ExperimentConfig:
    if isinstance(mapping, Mapping):
        for name in _LIFECYCLE_FIELDS:
            if name in mapping:
                raise ConfigError(f"{name}: set by abstream (experiment create/start/pause/stop), not by the config; remove it")
    top = _Fields(mapping, "", _TOP_FIELDS)
    experiment_id = top.string("experiment_id", pattern=ID_PATTERN)
    variants = _parse_variants(top)
    names = [v.name for v in variants]
    control = top.string("control", names[0])
    if control not in names:
        raise ConfigError(f"control: {control!r} is not one of the variants ({', '.join(names)})")

    primary = _parse_metric(top.raw("primary_metric"), "primary_metric")
    secondary = [_parse_metric(m, f"secondary_metrics[{i}]") for i, m in enumerate(top.items("secondary_metrics", []))]
    seen = {primary.name: "primary_metric"}
    for i, metric in enumerate(secondary):
        if metric.name in seen:
            raise ConfigError(f"secondary_metrics[{i}].name: {metric.name!r} is already used by {seen[metric.name]}")
        seen[metric.name] = f"secondary_metrics[{i}]"

    alpha = top.number("alpha", 0.05)
    if not 0.0 < alpha <= 0.5:
        raise ConfigError(f"alpha: must be in (0, 0.5], got {_show(alpha)}")
    power = top.number("power", 0.8)
    if not 0.0 < power < 1.0:
        raise ConfigError(f"power: must be in (0, 1), got {_show(power)}")
    mde = top.number("mde", optional=True)
    if mde is not None and mde <= 0.0:
        raise ConfigError(f"mde: must be a positive relative effect (0.02 for 2%), got {_show(mde)}")

    guardrails = _parse_guardrails(top, set(seen), alpha)

    min_runtime_s = top.duration_s("min_runtime_s", 0)
    max_duration_s = top.duration_s("max_duration_s", optional=True, minimum=1)
    if max_duration_s is not None and max_duration_s < min_runtime_s:
        raise ConfigError(f"max_duration_s: must be at least min_runtime_s ({min_runtime_s} s), got {max_duration_s} s")
    attribution_window_s = top.duration_s("attribution_window_s", 604_800, minimum=1)

    allocation = top.choice("allocation", AllocationMode, AllocationMode.FIXED)
    canary_steps = _parse_canary_steps(top, allocation, variants)
    if canary_steps:
        for i, item in enumerate(top.mapping["variants"]):
            if isinstance(item, Mapping) and item.get("weight") is not None:
                raise ConfigError(f"variants[{i}].weight: with allocation canary the split follows canary_steps; remove the weight")
        variants = tuple(replace(v, weight=canary_steps[0] if v.name != control else 1.0 - canary_steps[0]) for v in variants)

    return ExperimentConfig(
        experiment_id=experiment_id,
        version=1,
        updated_time_ms=now_ms,
        status=ExperimentStatus.DRAFT,
        started_time_ms=None,
        description=top.string("description", "", max_chars=4096),
        unit=top.name("unit", "user"),
        salt=top.string("salt", ""),
        variants=variants,
        control=control,
        primary_metric=primary,
        secondary_metrics=tuple(secondary),
        guardrails=guardrails,
        alpha=alpha,
        power=power,
        mde=mde,
        min_sample_per_variant=top.count("min_sample_per_variant", 100, minimum=1),
        min_runtime_s=min_runtime_s,
        max_duration_s=max_duration_s,
        sequential_method=top.choice("sequential_method", SequentialMethod, SequentialMethod.SEQUENTIAL),
        attribution_window_s=attribution_window_s,
        cuped_covariate=top.name("cuped_covariate", optional=True),
        allocation=allocation,
        canary_steps=canary_steps,
        canary_min_step_s=top.duration_s("canary_min_step_s", 60),
        canary_min_step_sample=top.count("canary_min_step_sample", 100),
    )


def _parse_variants(top: _Fields) -> tuple[Variant, ...]:
    items = top.items("variants")
    if len(items) < 2:
        raise ConfigError(f"variants: an experiment needs at least two variants, got {len(items)}")
    parsed: list[tuple[str, float | None, str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        path = f"variants[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        fields = _Fields(item, path, _VARIANT_FIELDS, "a variant name or a mapping with name and weight")
        name = fields.string("name", pattern=ID_PATTERN)
        if name in seen:
            raise ConfigError(f"{path}.name: {name!r} is used by another variant; names must be unique")
        seen.add(name)
        weight = fields.raw("weight", None)
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{path}.weight: must be a positive number, got {_show(weight)}")
            weight = float(weight)
        parsed.append((name, weight, fields.string("model_name", ""), fields.string("model_version", "")))
    given = [w for _, w, _, _ in parsed if w is not None]
    if given and len(given) != len(parsed):
        i = next(i for i, p in enumerate(parsed) if p[1] is None)
        raise ConfigError(f"variants[{i}].weight: required when other variants have a weight")
    total = sum(given) if given else float(len(parsed))
    return tuple(Variant(n, (1.0 if w is None else w) / total, m, v) for n, w, m, v in parsed)


def _parse_metric(value: Any, path: str) -> Metric:
    fields = _Fields(value, path, _METRIC_FIELDS)
    kind = fields.choice("kind", MetricKind)
    metric = Metric(
        name=fields.name("name"),
        kind=kind,
        direction=fields.choice("direction", MetricDirection, MetricDirection.INCREASE),
        numerator=fields.name("numerator", optional=True),
        denominator=fields.name("denominator", optional=True),
    )
    if kind is MetricKind.RATIO:
        if metric.numerator is None or metric.denominator is None:
            raise ConfigError(f"{path}: a ratio metric needs numerator and denominator")
        if metric.numerator == metric.denominator:
            raise ConfigError(f"{path}.denominator: must differ from the numerator ({metric.numerator!r})")
    else:
        for part in ("numerator", "denominator"):
            if getattr(metric, part) is not None:
                raise ConfigError(f"{path}.{part}: only a ratio metric has a {part} (kind is {kind.value})")
    return metric


def _parse_guardrails(top: _Fields, metric_names: set[str], alpha: float) -> tuple[Guardrail, ...]:
    guardrails: list[Guardrail] = []
    seen: set[str] = set()
    for i, item in enumerate(top.items("guardrails", [])):
        path = f"guardrails[{i}]"
        fields = _Fields(item, path, _GUARDRAIL_FIELDS)
        kind = fields.choice("kind", GuardrailKind)
        name = fields.name("name", kind.value)
        if name in seen:
            raise ConfigError(f"{path}.name: {name!r} is used by another guardrail; give each a unique name")
        seen.add(name)
        relative = fields.flag("relative_to_control", False)
        default_threshold = {GuardrailKind.SRM: DEFAULT_SRM_THRESHOLD, GuardrailKind.METRIC_HARM: alpha}.get(kind, _MISSING)
        threshold = fields.number("threshold", default_threshold)
        metric = fields.name("metric", optional=True)
        margin = fields.number("margin", 0.0)

        if kind in (GuardrailKind.SRM, GuardrailKind.METRIC_HARM):
            if not 0.0 < threshold < 1.0:
                raise ConfigError(f"{path}.threshold: a {kind.value} threshold is a p-value level in (0, 1), got {_show(threshold)}")
            if relative:
                raise ConfigError(f"{path}.relative_to_control: does not apply to a {kind.value} guardrail")
        elif threshold <= 0.0:
            raise ConfigError(f"{path}.threshold: must be a positive number, got {_show(threshold)}")
        elif kind in _RATE_GUARDRAILS and not relative and threshold > 1.0:
            raise ConfigError(f"{path}.threshold: a {kind.value} threshold is a rate in (0, 1], got {_show(threshold)}")

        if kind is GuardrailKind.METRIC_HARM:
            if metric is None:
                raise ConfigError(f"{path}.metric: a metric_harm guardrail names the metric it judges")
            if metric not in metric_names:
                raise ConfigError(f"{path}.metric: {metric!r} is not the primary or a secondary metric ({', '.join(sorted(metric_names))})")
            if margin < 0.0:
                raise ConfigError(f"{path}.margin: must be >= 0 (tolerated relative harm), got {_show(margin)}")
        else:
            if metric is not None:
                raise ConfigError(f"{path}.metric: only a metric_harm guardrail names a metric")
            if margin != 0.0:
                raise ConfigError(f"{path}.margin: only a metric_harm guardrail has a margin")
        guardrails.append(Guardrail(
            name=name, kind=kind, threshold=threshold, relative_to_control=relative, metric=metric,
            margin=margin, min_count=fields.count("min_count", 100),
            action=fields.choice("action", GuardrailAction, GuardrailAction.ALERT),
        ))
    return tuple(guardrails)


def _parse_canary_steps(top: _Fields, allocation: AllocationMode, variants: tuple[Variant, ...]) -> tuple[float, ...]:
    raw = top.items("canary_steps", [])
    if allocation is not AllocationMode.CANARY:
        if raw:
            raise ConfigError(f"canary_steps: only used with allocation: canary (allocation is {allocation.value})")
        return ()
    if len(variants) != 2:
        raise ConfigError(f"allocation: canary needs exactly two variants (control and one challenger), got {len(variants)}")
    if not raw:
        raise ConfigError("canary_steps: allocation canary needs a plan of challenger weights, e.g. [0.05, 0.25, 0.5, 1.0]")
    steps: list[float] = []
    for i, step in enumerate(raw):
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
            raise ConfigError(f"canary_steps[{i}]: must be a challenger weight in (0, 1], got {_show(step)}")
        steps.append(float(step))
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] != 1.0:
        raise ConfigError(f"canary_steps: must increase and end at 1.0, got {_show(steps)}")
    return tuple(steps)


# ---------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------

def load_config_file(path: str | Path, *, now_ms: int | None = None) -> ExperimentConfig:
    """The config in a YAML or JSON file (see :meth:`ExperimentConfig.from_mapping`);
    raises :class:`ConfigError` with one line that starts with the file name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    mapping = _parse_text(text, path)
    try:
        return ExperimentConfig.from_mapping(mapping, now_ms=now_ms)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    try:
        documents = list(yaml.load_all(text, Loader=_ConfigLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {where}{problem}") from None
    if not documents or documents == [None]:
        raise ConfigError(f"{path}: is empty; see examples/experiments/ for a config")
    if len(documents) != 1:
        raise ConfigError(f"{path}: must hold one YAML document, found {len(documents)}")
    return documents[0]


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys, and reads ``1e-3`` as a number (as YAML 1.2
    and JSON do; PyYAML's YAML 1.1 rules would read it as a string)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


# ---------------------------------------------------------------------------------------
# Lifecycle: draft -> running <-> paused -> stopped (final)
# ---------------------------------------------------------------------------------------

def _next(config: ExperimentConfig, now_ms: int | None, **changes: Any) -> ExperimentConfig:
    changes.setdefault("version", config.version + 1)
    return replace(config, updated_time_ms=_now_ms() if now_ms is None else now_ms, **changes)


def start(config: ExperimentConfig, *, now_ms: int | None = None) -> ExperimentConfig:
    """The config running: from draft (sets ``started_time_ms``) or paused (keeps it)."""
    if config.status not in (ExperimentStatus.DRAFT, ExperimentStatus.PAUSED):
        already = "already " if config.status is ExperimentStatus.RUNNING else ""
        raise ConfigError(f"cannot start experiment {config.experiment_id}: it is {already}{config.status.value}")
    now_ms = _now_ms() if now_ms is None else now_ms
    started = config.started_time_ms if config.started_time_ms is not None else now_ms
    return _next(config, now_ms, status=ExperimentStatus.RUNNING, started_time_ms=started)


def pause(config: ExperimentConfig, *, now_ms: int | None = None) -> ExperimentConfig:
    """The config paused; only a running experiment can be paused."""
    if config.status is not ExperimentStatus.RUNNING:
        raise ConfigError(f"cannot pause experiment {config.experiment_id}: it is {config.status.value}, not running")
    return _next(config, now_ms, status=ExperimentStatus.PAUSED)


def stop(config: ExperimentConfig, *, now_ms: int | None = None) -> ExperimentConfig:
    """The config stopped, for good; only a running or paused experiment can be stopped."""
    if config.status not in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED):
        why = "already stopped" if config.status is ExperimentStatus.STOPPED else "a draft that never started"
        raise ConfigError(f"cannot stop experiment {config.experiment_id}: it is {why}")
    return _next(config, now_ms, status=ExperimentStatus.STOPPED)


def revise(current: ExperimentConfig, new: ExperimentConfig, *, now_ms: int | None = None) -> ExperimentConfig:
    """``new``'s definition with ``current``'s lifecycle (status, started time) and the next
    version: what ``experiment create --replace`` publishes. A stopped experiment is final."""
    if new.experiment_id != current.experiment_id:
        raise ConfigError(f"experiment_id: cannot revise {current.experiment_id} with a config for {new.experiment_id}")
    if current.status is ExperimentStatus.STOPPED:
        raise ConfigError(f"cannot replace experiment {current.experiment_id}: it is stopped; create it under a new id")
    return _next(new, now_ms, version=current.version + 1, status=current.status, started_time_ms=current.started_time_ms)


TRANSITIONS = {"start": start, "pause": pause, "stop": stop}


# ---------------------------------------------------------------------------------------
# The compacted topic
# ---------------------------------------------------------------------------------------

def experiments_topic(settings: Settings) -> str:
    return settings.topic(EXPERIMENTS_TOPIC)


def ensure_experiments_topic(settings: Settings, timeout_s: float = 30.0) -> str:
    """Create ``<prefix>experiments`` (one partition, compacted) if missing; return its name.
    Refuses a topic of that name that is not compacted."""
    topic = experiments_topic(settings)
    admin = AdminClient(settings.kafka_config(logger=_client_log))
    deadline = time.monotonic() + timeout_s
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise ExperimentTopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    if topic not in existing:
        new = NewTopic(topic, num_partitions=1, replication_factor=-1, config={"cleanup.policy": "compact"})
        for name, future in admin.create_topics([new], operation_timeout=timeout_s).items():
            try:
                future.result(timeout=max(1.0, deadline - time.monotonic()))
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise ExperimentTopicError(f"cannot create topic {name}: {exc.args[0].str()}") from None
        while topic not in admin.list_topics(timeout=timeout_s).topics:
            if time.monotonic() > deadline:
                raise ExperimentTopicError(f"topic {topic} did not appear within {timeout_s:g} s")
            time.sleep(0.1)
        return topic
    resource = ConfigResource("topic", topic)
    try:
        described = admin.describe_configs([resource])[resource].result(timeout=max(1.0, deadline - time.monotonic()))
    except KafkaException as exc:
        raise ExperimentTopicError(f"cannot describe topic {topic}: {exc.args[0].str()}") from None
    policy = described["cleanup.policy"].value if "cleanup.policy" in described else ""
    if "compact" not in (policy or ""):
        raise ExperimentTopicError(f"topic {topic} has cleanup.policy={policy}, expected compact: "
                                   "it would lose experiments; recreate it or choose another ABSTREAM_TOPIC_PREFIX")
    return topic


def _codec(settings: Settings) -> Codec:
    return Codec(schema_source(settings.schema_registry_url))


def publish_config(settings: Settings, config: ExperimentConfig, *, codec: Codec | None = None,
                   timeout_s: float = 30.0) -> None:
    """Publish ``config`` keyed by its experiment_id and wait for the broker's acknowledgement;
    raises :class:`ExperimentTopicError` when it is not delivered."""
    topic = ensure_experiments_topic(settings, timeout_s)
    value = (codec or _codec(settings)).encode(ControlKind.EXPERIMENT_CONFIG, config.to_record())
    producer = make_producer(settings, **{"message.timeout.ms": str(int(timeout_s * 1000)), "logger": _client_log})
    outcome: list = []
    producer.produce(topic, key=config.experiment_id.encode(), value=value,
                     on_delivery=lambda err, msg: outcome.append(err))
    producer.flush(timeout_s + 5.0)
    if not outcome:
        raise ExperimentTopicError(f"experiment {config.experiment_id} was not delivered to {topic} within {timeout_s:g} s")
    if outcome[0] is not None:
        raise ExperimentTopicError(f"cannot publish experiment {config.experiment_id} to {topic}: {outcome[0].str()}")


def _decode(codec: Codec, key: bytes | None, value: bytes | None) -> tuple[str | None, ExperimentConfig | None]:
    """(experiment_id, config) of a message; config None for a tombstone; raises ValueError
    for a record that does not decode or does not match its key."""
    experiment_id = key.decode("utf-8", "replace") if key is not None else None
    if value is None:
        if experiment_id is None:
            raise ValueError("tombstone without a key")
        return experiment_id, None
    record = codec.decode(ControlKind.EXPERIMENT_CONFIG, value)
    if isinstance(record, DeadLetter):
        raise ValueError(f"{record.reason.value}: {record.detail}")
    config = ExperimentConfig.from_record(record)
    if experiment_id is not None and experiment_id != config.experiment_id:
        raise ValueError(f"key {experiment_id!r} does not match experiment_id {config.experiment_id!r}")
    return config.experiment_id, config


@dataclass(frozen=True)
class ConfigScan:
    """The topic read to its end: newest config per experiment, and records skipped as undecodable."""

    configs: dict[str, ExperimentConfig]
    skipped: int = 0


def scan_configs(settings: Settings, timeout_s: float = 10.0, *, codec: Codec | None = None) -> ConfigScan:
    """The experiments topic read to its end (:func:`streams.topics.read_latest`): newest
    record per key wins, a tombstone removes the key, and a record that does not decode is
    skipped and counted. Raises :class:`ExperimentTopicError` on timeout."""
    topic = ensure_experiments_topic(settings, timeout_s)
    codec = codec or _codec(settings)
    try:
        latest = read_latest(settings, topic, timeout_s)
    except TopicError as exc:
        raise ExperimentTopicError(str(exc)) from None
    configs: dict[str, ExperimentConfig] = {}
    skipped = 0
    for key, (partition, value) in latest.items():
        try:
            experiment_id, config = _decode(codec, key, value)
        except ValueError as exc:
            skipped += 1
            log.warning("skipped the newest record of key %r in %s[%d]: %s", key, topic, partition, exc)
            continue
        if config is not None:
            configs[experiment_id] = config
    return ConfigScan(configs, skipped)


def read_configs(settings: Settings, timeout_s: float = 10.0) -> dict[str, ExperimentConfig]:
    """experiment_id -> newest config, read from the topic to its end (see :func:`scan_configs`)."""
    return scan_configs(settings, timeout_s).configs


class ExperimentCatalogue(TopicFollower):
    """The experiments topic followed in a background thread: the newest config of every
    experiment, kept current for as long as it runs (see :class:`streams.topics.TopicFollower`:
    ``version``, ``wait_until_caught_up``, ``refresh``, ``wait_for_change``). Records that do
    not decode are skipped and counted in ``skipped``.
    """

    error_type = ExperimentTopicError

    def __init__(self, settings: Settings, *, codec: Codec | None = None, poll_s: float = 0.2):
        super().__init__(settings, [experiments_topic(settings)], role="experiments", poll_s=poll_s)
        self.topic = experiments_topic(settings)
        self._codec = codec or _codec(settings)
        self._configs: dict[str, ExperimentConfig] = {}

    def start(self, timeout_s: float = 30.0) -> "ExperimentCatalogue":
        """Create the topic if missing, note its high watermark, start following it."""
        if self._thread is None:
            ensure_experiments_topic(self.settings, timeout_s)
        return super().start(timeout_s)

    def _apply(self, msg) -> bool:
        try:
            experiment_id, config = _decode(self._codec, msg.key(), msg.value())
        except ValueError as exc:
            self.skipped += 1
            log.warning("skipped record at %s[%d]@%d: %s", self.topic, msg.partition(), msg.offset(), exc)
            return False
        with self._changed:
            if config is None:
                return self._configs.pop(experiment_id, None) is not None
            if self._configs.get(experiment_id) == config:
                return False
            self._configs[experiment_id] = config
            return True

    def get(self, experiment_id: str) -> ExperimentConfig | None:
        """The newest config of the experiment, or None when the topic has none."""
        return self._configs.get(experiment_id)

    def all(self) -> dict[str, ExperimentConfig]:
        """A copy of experiment_id -> newest config."""
        with self._changed:
            return dict(self._configs)


def order(settings: Settings, config: ExperimentConfig, action: str, variant: str, reason: str,
          *, now_ms: int | None = None, timeout_s: float = 30.0) -> tuple[dict, dict]:
    """A person's kill or resume of one variant: publishes the KillSwitch record and the
    Allocation that goes with it (kill: the variant's share to control; resume: the config's
    weights) and returns both. Versions are publication times kept above the newest record's,
    so they order with the records stage 2 publishes."""
    from streams.topics import ALLOCATIONS, KILLSWITCH, read_latest

    if variant not in config.variant_names:
        raise ConfigError(f"experiment {config.experiment_id} has no variant {variant!r} "
                          f"(variants: {', '.join(config.variant_names)})")
    if action == "kill" and variant == config.control:
        raise ConfigError(f"cannot kill {variant}: it is the control of {config.experiment_id}")
    now_ms = _now_ms() if now_ms is None else now_ms
    codec = _codec(settings)
    key = config.experiment_id.encode()

    def newest(topic: str, kind: ControlKind) -> dict | None:
        found = read_latest(settings, settings.topic(topic), timeout_s).get(key)
        return None if found is None else codec.decode(kind, found[1])

    switch, allocation = newest(KILLSWITCH, ControlKind.KILLSWITCH), newest(ALLOCATIONS, ControlKind.ALLOCATION)
    weights = dict(allocation["weights"]) if allocation else dict(config.weights)
    if action == "kill":
        weights = {v: 0.0 if v == variant else w + (weights.get(variant, 0.0) if v == config.control else 0.0)
                   for v, w in weights.items()}
    else:
        weights = dict(config.weights)
    switch_record = {"experiment_id": config.experiment_id, "action": action, "variant": variant, "reason": reason,
                     "alert_id": None, "event_time": now_ms,
                     "version": max(now_ms, (switch["version"] + 1) if switch else 0)}
    allocation_record = {"experiment_id": config.experiment_id, "weights": weights,
                         "version": max(now_ms, (allocation["version"] + 1) if allocation else 0),
                         "reason": "manual", "event_time": now_ms}
    producer = make_producer(settings, **{"message.timeout.ms": str(int(timeout_s * 1000)), "logger": _client_log})
    failures: list[str] = []
    for topic, kind, record in ((KILLSWITCH, ControlKind.KILLSWITCH, switch_record),
                                (ALLOCATIONS, ControlKind.ALLOCATION, allocation_record)):
        producer.produce(settings.topic(topic), key=key, value=codec.encode(kind, record),
                         on_delivery=lambda err, _msg: failures.append(err.str()) if err else None)
    if producer.flush(timeout_s) or failures:
        raise ExperimentTopicError(f"could not publish the {action} order: {failures[:1] or 'timed out'}")
    return switch_record, allocation_record

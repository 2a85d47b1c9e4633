"""Simulated experiments with a known truth, for the demo and the tests.

An :class:`ExperimentScenario` names each variant's true conversion rate and revenue per
conversion, the traffic split the routers actually produce (which may differ from the
configured one, to simulate an assignment bug), and how outcomes arrive: after a random
lag from the exposure (some beyond the attribution window), some from before the exposure,
some for units never exposed, plus duplicates and predictions that name the wrong variant.

:func:`scenario_events` returns every message in the order it reaches Kafka (event time
plus a transit delay for outcomes). Revenue is a whole number of currency units, so every
sum the engine keeps is exact in floating point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streams.codec import EventKind


@dataclass(frozen=True)
class ArmTruth:
    conversion_rate: float
    revenue_per_conversion: float = 20.0
    latency_ms: float = 40.0
    error_rate: float = 0.005


@dataclass(frozen=True)
class ExperimentScenario:
    experiment_id: str
    arms: dict[str, ArmTruth]
    split: dict[str, float]
    units: int = 2000
    start_ms: int = 1_767_225_600_000
    exposures_per_s: float = 50.0
    window_s: float = 3600.0
    mean_lag_s: float = 600.0
    beyond_window_share: float = 0.05
    before_exposure_share: float = 0.02
    never_exposed_units: int = 20
    inconsistent_share: float = 0.005
    duplicate_share: float = 0.01
    max_transit_s: float = 30.0
    predictions_per_unit: float = 1.5
    seed: int = 0
    run_id: str = ""
    segments: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"country": ("de", "fr", "us"),
                                                                          "platform": ("ios", "android", "web")})


def scenario_events(s: ExperimentScenario) -> list[tuple[int, EventKind, dict]]:
    """(arrival time ms, kind, record) for every message of the scenario, in arrival order."""
    rng = np.random.default_rng(s.seed)
    names = sorted(s.split)
    shares = np.array([s.split[n] for n in names], dtype=float)
    shares /= shares.sum()
    out: list[tuple[int, EventKind, dict]] = []
    counter = iter(range(10**9))

    def event(kind: EventKind, unit: str, time_ms: int, **fields) -> dict:
        return {"event_id": f"{s.run_id}{s.experiment_id}-{next(counter)}", "event_time": int(time_ms),
                "experiment_id": s.experiment_id, "unit_id": unit, **fields}

    exposure_ms = s.start_ms + np.cumsum(rng.exponential(1000.0 / s.exposures_per_s, s.units)).astype(np.int64)
    variants = rng.choice(names, size=s.units, p=shares)
    for i in range(s.units):
        unit = f"{s.run_id}{s.experiment_id}-u{i:06d}"
        variant = str(variants[i])
        arm = s.arms[variant]
        t0 = int(exposure_ms[i])
        segment = {key: str(rng.choice(values)) for key, values in s.segments.items()}
        out.append((t0, EventKind.ASSIGNMENT, event(EventKind.ASSIGNMENT, unit, t0, variant=variant,
                                                    allocation_version=1, segment=segment)))
        if rng.random() < s.inconsistent_share:
            other = names[(names.index(variant) + 1) % len(names)]
            t = t0 + int(rng.integers(1, 5000))
            out.append((t, EventKind.ASSIGNMENT, event(EventKind.ASSIGNMENT, unit, t, variant=other,
                                                       allocation_version=1, segment=segment)))
        for _ in range(rng.poisson(s.predictions_per_unit)):
            t = t0 + int(rng.integers(0, 60_000))
            failed = rng.random() < arm.error_rate
            out.append((t, EventKind.PREDICTION, event(
                EventKind.PREDICTION, unit, t, request_id=f"r{next(counter)}", variant=variant,
                model_name="ranker", model_version=variant, score=None if failed else float(rng.random()),
                label=None, latency_ms=float(rng.lognormal(np.log(arm.latency_ms), 0.3)),
                status="error" if failed else "ok")))
        if rng.random() < s.before_exposure_share:
            t = t0 - int(rng.integers(1_000, 3_600_000))
            out.append(_outcome(rng, s, event(EventKind.OUTCOME, unit, t, metric="conversion", value=1.0, request_id=None)))
        if rng.random() < arm.conversion_rate:
            beyond = rng.random() < s.beyond_window_share
            lag_ms = int(1000 * (s.window_s * (1 + rng.random()) if beyond else min(rng.exponential(s.mean_lag_s), s.window_s * 0.99)))
            t = t0 + lag_ms
            out.append(_outcome(rng, s, event(EventKind.OUTCOME, unit, t, metric="conversion", value=1.0, request_id=None)))
            revenue = float(max(1, int(rng.poisson(arm.revenue_per_conversion))))
            out.append(_outcome(rng, s, event(EventKind.OUTCOME, unit, t, metric="revenue", value=revenue, request_id=None)))
    last_ms = int(exposure_ms[-1])
    for j in range(s.never_exposed_units):
        unit = f"{s.run_id}{s.experiment_id}-ghost{j:04d}"
        t = s.start_ms + int(rng.integers(0, max(1, last_ms - s.start_ms)))
        out.append(_outcome(rng, s, event(EventKind.OUTCOME, unit, t, metric="conversion", value=1.0, request_id=None)))
    for i in rng.choice(len(out), size=int(len(out) * s.duplicate_share), replace=False):
        arrival, kind, record = out[i]
        out.append((arrival + int(rng.integers(1, 120_000)), kind, record))
    out.sort(key=lambda item: item[0])
    return out


def _outcome(rng: np.random.Generator, s: ExperimentScenario, record: dict) -> tuple[int, EventKind, dict]:
    return record["event_time"] + int(rng.uniform(0, s.max_transit_s * 1000)), EventKind.OUTCOME, record

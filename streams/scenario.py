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
    # Latency multiplier of a variant once this share of the units has been exposed (a regression).
    latency_regression: dict[str, float] = field(default_factory=dict)
    regression_after: float = 0.5
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
        slowdown = s.latency_regression.get(variant, 1.0) if i >= s.regression_after * s.units else 1.0
        for _ in range(rng.poisson(s.predictions_per_unit)):
            t = t0 + int(rng.integers(0, 60_000))
            failed = rng.random() < arm.error_rate
            out.append((t, EventKind.PREDICTION, event(
                EventKind.PREDICTION, unit, t, request_id=f"r{next(counter)}", variant=variant,
                model_name="ranker", model_version=variant, score=None if failed else float(rng.random()),
                label=None, latency_ms=float(rng.lognormal(np.log(arm.latency_ms * slowdown), 0.3)),
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


def shadow_events(experiment_id: str, runs: int, *, disagreement: float, start_ms: int = 1_767_225_600_000,
                  runs_per_s: float = 50.0, challenger: tuple[str, str] = ("ranker", "v3"), error_rate: float = 0.0,
                  seed: int = 0, run_id: str = "") -> list[tuple[int, EventKind, dict]]:
    """Shadow runs of a challenger beside the champion: a share ``disagreement`` of the
    scored runs falls on the other side of the 0.5 decision threshold."""
    rng = np.random.default_rng(seed)
    out = []
    t = start_ms
    for i in range(runs):
        t += int(rng.exponential(1000.0 / runs_per_s)) + 1
        champion = float(rng.random())
        flip = rng.random() < disagreement
        if flip:
            challenger_score = 1.0 - champion
        else:
            challenger_score = float(np.clip(champion + rng.normal(0, 0.02), 0, 1))
            if (challenger_score >= 0.5) != (champion >= 0.5):
                challenger_score = champion  # noise must not cross the threshold: only flips disagree
        failed = rng.random() < error_rate
        out.append((t, EventKind.SHADOW, {
            "event_id": f"{run_id}{experiment_id}-s{i}", "event_time": t, "experiment_id": experiment_id,
            "unit_id": f"{run_id}{experiment_id}-u{int(rng.integers(0, runs // 3 + 1)):06d}",
            "request_id": f"{run_id}{experiment_id}-r{i}", "champion_model": challenger[0], "champion_version": "v1",
            "challenger_model": challenger[0], "challenger_version": challenger[1],
            "champion_score": champion, "challenger_score": None if failed else challenger_score,
            "champion_label": None, "challenger_label": None,
            "champion_latency_ms": float(rng.lognormal(np.log(40), 0.3)),
            "challenger_latency_ms": None if failed else float(rng.lognormal(np.log(45), 0.3)),
            "challenger_status": "error" if failed else "ok",
        }))
    return out

"""Guardrails: readings of an experiment's health, alert transitions, and the canary rule.

Pure: stage 2 passes in merged counts and statistics and gets back readings and state.

A :class:`Reading` says whether a guardrail is breached now and whether it has clearly
recovered. The two differ (hysteresis): a ceiling breaches above its threshold and recovers
only below ``RECOVERY_FRACTION`` of it, so a value hovering at the threshold does not make
an alert flap. :func:`transition` turns readings into alert events on state changes only:
one ``firing`` when a guardrail breaches, nothing while it stays breached, one ``resolved``
when it recovers, after which it is armed again.

Statistical guardrails are anytime-valid, so they can be read at every look:
``error_rate`` and ``timeout_rate`` relative to control use the confidence sequence of the
difference of rates (one-sided at level alpha); ``metric_harm`` breaches when the upper end
of the confidence sequence of the relative lift (in the metric's good direction) is below
``-margin``; ``srm`` uses the sequential sample-ratio test (Lindon & Malek).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from analysis.drift import ks_binned, psi
from analysis.sequential import confidence_sequence, sequential_srm_pvalue
from analysis.sketch import Histogram, QuantileSketch
from analysis.stats import Moments, ProportionStats

RECOVERY_FRACTION = 0.8
DRIFT_RECOVERY_PSI = 0.1
DEFAULT_SHADOW_DISAGREEMENT = 0.05
DEFAULT_DRIFT_PSI = 0.2
_QUANTILE = {"latency_p95": 0.95, "latency_p99": 0.99}
SCORE_EDGES = tuple(i / 20 for i in range(21))


def score_histogram(counts: list[float]) -> Histogram:
    """Scores counted in 20 equal bins of [0, 1] (as stage 1 bins them)."""
    return Histogram(SCORE_EDGES, tuple(int(c) for c in counts))


@dataclass(frozen=True)
class GuardrailSpec:
    """What a guardrail watches (mirrors the experiment config's Guardrail)."""

    name: str
    kind: str
    threshold: float
    relative_to_control: bool = False
    metric: str | None = None
    margin: float = 0.0
    min_count: int = 100
    action: str = "alert"


@dataclass(frozen=True)
class Reading:
    guardrail: str
    kind: str
    variant: str
    breached: bool
    recovered: bool
    observed: float | None
    threshold: float
    p_value: float | None
    evidence: str


@dataclass(frozen=True)
class ExperimentHealth:
    """The merged counts stage 2 reads guardrails from."""

    control: str
    alpha: float
    increase_is_better: Mapping[str, bool]
    status: Mapping[str, Mapping[str, float]]
    latency: Mapping[str, QuantileSketch]
    metrics: Mapping[str, Mapping[str, Moments]]
    exposures: Mapping[str, int]
    weights: Mapping[str, float]
    shadow: Mapping[str, Mapping[str, float]]
    scores_by_hour: Mapping[str, Mapping[int, list[float]]]


def _ceiling(spec: GuardrailSpec, variant: str, observed: float | None, threshold: float, enough: bool,
             evidence: str, p_value: float | None = None) -> Reading:
    breached = enough and observed is not None and observed > threshold
    recovered = not enough or observed is None or observed < RECOVERY_FRACTION * threshold
    return Reading(spec.name, spec.kind, variant, breached, recovered, observed, threshold, p_value, evidence)


def _latency(spec: GuardrailSpec, h: ExperimentHealth, variant: str) -> Reading:
    q = _QUANTILE[spec.kind]
    sketch, control = h.latency.get(variant), h.latency.get(h.control)
    enough = sketch is not None and sketch.count >= spec.min_count
    if spec.relative_to_control:
        enough = enough and control is not None and control.count >= spec.min_count
    observed = sketch.quantile(q) if enough else None
    threshold = spec.threshold * control.quantile(q) if enough and spec.relative_to_control else spec.threshold
    name = f"p{round(q * 100)}"
    evidence = (f"{name} latency {observed:.1f} ms against a ceiling of {threshold:.1f} ms over {sketch.count} predictions"
                if enough else f"waiting for {spec.min_count} predictions")
    return _ceiling(spec, variant, observed, threshold, enough, evidence)


def _rate(spec: GuardrailSpec, h: ExperimentHealth, variant: str) -> Reading:
    status = "error" if spec.kind == "error_rate" else "timeout"

    def arm(name: str) -> ProportionStats:
        counts = h.status.get(name, {})
        return ProportionStats(int(sum(counts.values())), int(counts.get(status, 0)))

    treatment, control = arm(variant), arm(h.control)
    enough = treatment.n >= spec.min_count
    if not spec.relative_to_control:
        observed = treatment.mean if treatment.n else None
        return _ceiling(spec, variant, observed, spec.threshold, enough,
                        f"{status} rate {treatment.successes}/{treatment.n} against a ceiling of {spec.threshold:.2%}")
    enough = enough and control.n >= spec.min_count
    threshold = spec.threshold * control.mean
    observed = treatment.mean if treatment.n else None
    p_value = None
    significant = False
    if enough and (control.variance > 0 or treatment.variance > 0):
        # One-sided at alpha: the two-sided sequence at 2 alpha.
        test = confidence_sequence(control, treatment, alpha=min(0.5, 2 * h.alpha))
        significant, p_value = test.ci_low > 0, test.p_value
    breached = enough and observed is not None and observed > threshold and significant
    recovered = not enough or observed is None or observed < RECOVERY_FRACTION * threshold or not significant
    evidence = (f"{status} rate {treatment.successes}/{treatment.n} ({treatment.mean:.2%}) against "
                f"{spec.threshold:g} x control's {control.mean:.2%}" + (f", always-valid p = {p_value:.2g}" if p_value is not None else ""))
    return Reading(spec.name, spec.kind, variant, breached, recovered, observed, threshold, p_value, evidence)


def _harm(spec: GuardrailSpec, h: ExperimentHealth, variant: str) -> Reading:
    arms = h.metrics.get(spec.metric or "", {})
    control, treatment = arms.get(h.control), arms.get(variant)
    alpha = spec.threshold
    sign = 1.0 if h.increase_is_better.get(spec.metric or "", True) else -1.0
    if control is None or treatment is None or min(control.n, treatment.n) < max(2, spec.min_count):
        return Reading(spec.name, spec.kind, variant, False, True, None, -spec.margin, None,
                       f"waiting for {spec.min_count} units per variant")
    try:
        test = confidence_sequence(control, treatment, alpha=min(0.5, 2 * alpha), relative=True)
    except ValueError:
        return Reading(spec.name, spec.kind, variant, False, True, None, -spec.margin, None, "no variation yet")
    best_case = max(sign * test.ci_low, sign * test.ci_high)
    breached = best_case < -spec.margin
    evidence = (f"{spec.metric} lift {test.estimate:+.2%} [{test.ci_low:+.2%}, {test.ci_high:+.2%}]: "
                f"{'worse' if breached else 'not shown worse'} than control by more than {spec.margin:.1%}")
    return Reading(spec.name, spec.kind, variant, breached, not breached, test.estimate, -spec.margin, test.p_value, evidence)


def _srm(spec: GuardrailSpec, h: ExperimentHealth) -> Reading:
    names = sorted(v for v, w in h.weights.items() if w > 0)
    counts = [h.exposures.get(v, 0) for v in names]
    if len(names) < 2 or sum(counts) < spec.min_count:
        return Reading(spec.name, spec.kind, "*", False, True, None, spec.threshold, None, "waiting for units")
    p = sequential_srm_pvalue(counts, [h.weights[v] for v in names])
    split = ", ".join(f"{v} {c}" for v, c in zip(names, counts))
    return Reading(spec.name, spec.kind, "*", p < spec.threshold, p > min(1.0, 10 * spec.threshold), p,
                   spec.threshold, p, f"units {split} against planned weights: sequential SRM p = {p:.2g}")


def _shadow(spec: GuardrailSpec, h: ExperimentHealth, challenger: str) -> Reading:
    # Divergence of the score distributions is the offline report's (shadow_pairs in ClickHouse):
    # computed here on every look it cost a third of stage 2, an exact Kolmogorov tail for nothing.
    counts = h.shadow[challenger]
    compared, runs = counts.get("compared", 0), counts.get("runs", 0)
    disagreement = counts.get("disagree", 0) / compared if compared else 0.0
    error_rate = (counts.get("error", 0) + counts.get("timeout", 0)) / runs if runs else 0.0
    enough = compared >= spec.min_count or runs >= spec.min_count
    observed = max(disagreement, error_rate) if enough else None
    evidence = (f"challenger {challenger}: disagreement {disagreement:.2%} over {compared:.0f} compared runs, "
                f"errors and timeouts {error_rate:.2%} of {runs:.0f}, against {spec.threshold:.0%}")
    return _ceiling(spec, challenger, observed, spec.threshold, enough, evidence)


def _drift(spec: GuardrailSpec, h: ExperimentHealth, variant: str) -> Reading:
    hours = h.scores_by_hour.get(variant, {})
    if len(hours) < 2:
        return Reading(spec.name, spec.kind, variant, False, True, None, spec.threshold, None,
                       "waiting for a second hour of scores")
    first, last = score_histogram(hours[min(hours)]), score_histogram(hours[max(hours)])
    if min(first.count, last.count) < spec.min_count:
        return Reading(spec.name, spec.kind, variant, False, True, None, spec.threshold, None,
                       f"waiting for {spec.min_count} scores in the baseline and the latest hour")
    value = psi(first, last)
    ks = ks_binned(first, last)
    return Reading(spec.name, spec.kind, variant, value > spec.threshold, value < DRIFT_RECOVERY_PSI, value,
                   spec.threshold, ks.p_value,
                   f"score PSI {value:.3f} (KS {ks.statistic:.3f}) of the latest hour against the first")


def read_guardrails(specs: list[GuardrailSpec], h: ExperimentHealth) -> list[Reading]:
    """One reading per guardrail and variant judged (treatments, challengers, or '*')."""
    treatments = sorted(v for v in h.weights if v != h.control)
    readings: list[Reading] = []
    for spec in specs:
        if spec.kind in _QUANTILE:
            readings += [_latency(spec, h, v) for v in treatments]
        elif spec.kind in ("error_rate", "timeout_rate"):
            readings += [_rate(spec, h, v) for v in treatments]
        elif spec.kind == "metric_harm":
            readings += [_harm(spec, h, v) for v in treatments]
        elif spec.kind == "srm":
            readings.append(_srm(spec, h))
        elif spec.kind == "shadow_disagreement":
            readings += [_shadow(spec, h, c) for c in sorted(h.shadow)]
        elif spec.kind == "drift":
            readings += [_drift(spec, h, v) for v in sorted(h.scores_by_hour)]
    return readings


@dataclass(frozen=True)
class AlertTransition:
    state: str  # "firing" or "resolved"
    reading: Reading
    firing_number: int


@dataclass(frozen=True)
class GuardrailStates:
    """Per (guardrail, variant): whether it is firing and how many times it has fired."""

    firing: frozenset[tuple[str, str]] = frozenset()
    firings: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"firing": sorted(list(k) for k in self.firing),
                "firings": [[g, v, n] for (g, v), n in sorted(self.firings.items())]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GuardrailStates":
        if not d:
            return cls()
        return cls(frozenset(tuple(k) for k in d["firing"]), {(g, v): n for g, v, n in d["firings"]})


def transition(states: GuardrailStates, readings: list[Reading]) -> tuple[GuardrailStates, list[AlertTransition]]:
    """The new states and the alert events: on transitions only (see the module doc)."""
    firing = set(states.firing)
    firings = dict(states.firings)
    events = []
    for r in readings:
        key = (r.guardrail, r.variant)
        if key not in firing and r.breached:
            firing.add(key)
            firings[key] = firings.get(key, 0) + 1
            events.append(AlertTransition("firing", r, firings[key]))
        elif key in firing and r.recovered and not r.breached:
            firing.discard(key)
            events.append(AlertTransition("resolved", r, firings[key]))
    return GuardrailStates(frozenset(firing), firings), events


@dataclass(frozen=True)
class CanaryState:
    """Where a canary roll-out stands: the step in force, since when (event time), and the
    challenger's units when it began; ``done`` once promoted or rolled back."""

    step: int = 0
    step_started_ms: int | None = None
    step_start_units: int = 0
    done: str | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "step_started_ms": self.step_started_ms,
                "step_start_units": self.step_start_units, "done": self.done}

    @classmethod
    def from_dict(cls, d: dict | None) -> "CanaryState":
        return cls(**d) if d else cls()


def canary_next(state: CanaryState, steps: list[float], *, watermark_ms: int, challenger_units: int,
                min_step_s: float, min_step_sample: int, blocked: bool) -> CanaryState:
    """The canary state after a look: advance one step once the current one has lasted
    ``min_step_s`` of event time and seen ``min_step_sample`` challenger units with no
    guardrail firing; reaching the last step (weight 1.0) is promotion."""
    if state.done is not None:
        return state
    if state.step_started_ms is None:
        return replace(state, step_started_ms=watermark_ms, step_start_units=challenger_units)
    if blocked:
        return state
    lasted = (watermark_ms - state.step_started_ms) / 1000 >= min_step_s
    sampled = challenger_units - state.step_start_units >= min_step_sample
    if not (lasted and sampled) or state.step + 1 >= len(steps):
        return state
    step = state.step + 1
    return CanaryState(step, watermark_ms, challenger_units, "promoted" if steps[step] >= 1.0 else None)

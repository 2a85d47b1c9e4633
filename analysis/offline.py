"""Warehouse-side analysis: the SQL the report runs, and pure functions of its rows.

Every query reads the analyst views of ``infra/clickhouse/003_views.sql`` (so the report
and analysts share one attribution rule, the stream's) and takes its values as ClickHouse
query parameters (``{name:Type}``): no experiment id or metric name is ever part of the SQL
text. ``{db}`` names the database (streams.warehouse substitutes it).

Rows come back as dicts (column name -> value); the functions below turn them into the
statistics of analysis.stats and the results of the tests in analysis/, and never do I/O.
Timestamps are selected as epoch milliseconds so that rows read over HTTP (JSON) and
directly (clickhouse-connect) are the same numbers.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from analysis.bayesian import beta_binomial_test, gaussian_test
from analysis.bootstrap import BootstrapInterval, bootstrap_lift
from analysis.compare import compare
from analysis.drift import PsiBand, psi
from analysis.fixed import MannWhitneyResult, mann_whitney, srm_pvalue, welch_test, z_test
from analysis.multiple import benjamini_hochberg, holm
from analysis.planning import sample_size
from analysis.results import ComparisonResult
from analysis.sequential_cost import sequential_cost
from analysis.sketch import Histogram
from analysis.stats import CupedStats, MeanStats, ProportionStats, RatioStats
from analysis.verdict import Decision, DecisionPolicy, Verdict, decide

Row = Mapping[str, Any]
Stats = ProportionStats | MeanStats | RatioStats
DAY_MS = 86_400_000
SCORE_BINS = 20
SCORE_EDGES = tuple(i / SCORE_BINS for i in range(SCORE_BINS + 1))
UNIT_SAMPLE_CAP = 100_000

UNITS = "{db}.unit_metrics(experiment_id = {experiment_id:String}, window_ms = {window_ms:UInt64})"


@dataclass(frozen=True)
class MetricSpec:
    """What the SQL needs of a metric: its kind and the outcome names it totals."""

    name: str
    kind: str
    numerator: str
    denominator: str | None = None
    increase_is_better: bool = True


def metric_specs(config: Any) -> list[MetricSpec]:
    """Return the config's metrics (primary first) as :class:`MetricSpec`."""
    specs = []
    for m in config.metrics:
        kind = m.kind.value if isinstance(m.kind, Enum) else m.kind
        direction = m.direction.value if isinstance(m.direction, Enum) else m.direction
        specs.append(MetricSpec(m.name, kind, m.numerator if kind == "ratio" else m.name,
                                m.denominator if kind == "ratio" else None, direction == "increase"))
    return specs


def metric_parameters(metrics: Sequence[MetricSpec]) -> dict[str, str]:
    """Return the query parameters naming each metric's outcome totals (m0a, m0b, ...)."""
    out = {}
    for i, m in enumerate(metrics):
        out[f"m{i}a"] = m.numerator
        if m.denominator is not None:
            out[f"m{i}b"] = m.denominator
    return out


# --------------------------------------------------------------------------- SQL


SPAN_SQL = """
SELECT min(t) AS first_ms, max(t) AS last_ms FROM (
    SELECT toUnixTimestamp64Milli(event_time) AS t FROM {db}.assignments WHERE experiment_id = {experiment_id:String}
    UNION ALL SELECT toUnixTimestamp64Milli(event_time) FROM {db}.outcomes WHERE experiment_id = {experiment_id:String}
    UNION ALL SELECT toUnixTimestamp64Milli(event_time) FROM {db}.predictions WHERE experiment_id = {experiment_id:String}
)"""

EXPOSURES_SQL = """
SELECT variant, count() AS n, min(toUnixTimestamp64Milli(exposed_time)) AS first_ms,
       max(toUnixTimestamp64Milli(exposed_time)) AS last_ms, sum(other_variant_assignments) AS other_variant_assignments
FROM {db}.exposures WHERE experiment_id = {experiment_id:String} GROUP BY variant ORDER BY variant"""


def moments_sql(metrics: Sequence[MetricSpec], *, covariate: bool, by: str) -> str:
    """Return the SQL of every metric's sums per variant, grouped ``by`` "variant",
    "segment" (each segment key and value) or "bucket" (exposure time bucket).

    Per metric i: m{i}_pos (units with total > 0), m{i}_x, m{i}_xx (sum and sum of squares
    of the unit totals), for ratios m{i}_y, m{i}_yy, m{i}_xy (denominator), and with a
    covariate c (the unit's total of the covariate outcome, any time) c_sum, c_cc,
    m{i}_xc and m{i}_pc (cross products with the total and with the indicator).
    """
    columns = ["count() AS n"]
    c = "all_totals[{covariate:String}]"
    if covariate:
        columns += [f"sum({c}) AS c_sum", f"sum({c} * {c}) AS c_cc"]
    for i, m in enumerate(metrics):
        x = f"totals[{{m{i}a:String}}]"
        columns += [f"countIf({x} > 0) AS m{i}_pos", f"sum({x}) AS m{i}_x", f"sum({x} * {x}) AS m{i}_xx"]
        if m.denominator is not None:
            y = f"totals[{{m{i}b:String}}]"
            columns += [f"sum({y}) AS m{i}_y", f"sum({y} * {y}) AS m{i}_yy", f"sum({x} * {y}) AS m{i}_xy"]
        elif covariate:
            columns += [f"sum({x} * {c}) AS m{i}_xc", f"sumIf({c}, {x} > 0) AS m{i}_pc"]
    select = ",\n       ".join(columns)
    if by == "variant":
        return f"SELECT variant, {select}\nFROM {UNITS}\nGROUP BY variant ORDER BY variant"
    if by == "segment":
        return (f"SELECT segment_key, segment_value, variant, {select}\nFROM {UNITS}\n"
                "ARRAY JOIN mapKeys(segment) AS segment_key, mapValues(segment) AS segment_value\n"
                "GROUP BY segment_key, segment_value, variant ORDER BY segment_key, segment_value, variant")
    if by == "bucket":
        return (f"SELECT intDiv(toUnixTimestamp64Milli(exposed_time) - {{start_ms:Int64}}, {{bucket_ms:Int64}}) AS bucket, "
                f"variant, {select}\nFROM {UNITS}\nGROUP BY bucket, variant ORDER BY bucket, variant")
    raise ValueError(f"unknown grouping {by!r}")


def unit_values_sql(metric_index: int, ratio: bool) -> str:
    """Return the SQL of per-unit totals of one metric, at most {cap} units per variant
    (a deterministic sample by unit hash when there are more)."""
    y = f", totals[{{m{metric_index}b:String}}] AS y" if ratio else ""
    return (f"SELECT variant, totals[{{m{metric_index}a:String}}] AS x{y}\nFROM {UNITS}\n"
            "ORDER BY variant, cityHash64(unit_id) LIMIT {cap:UInt64} BY variant")


NOVELTY_UNITS_SQL = """
SELECT d AS days_since_exposure, variant, count() AS n
FROM {db}.exposures ARRAY JOIN range({days:UInt32}) AS d
WHERE experiment_id = {experiment_id:String}
  AND toUnixTimestamp64Milli(exposed_time) + least((d + 1) * 86400000, {window_ms:UInt64}) <= {end_ms:Int64}
GROUP BY d, variant ORDER BY d, variant"""

NOVELTY_SUMS_SQL = """
SELECT days_since_exposure, variant, countIf(totals[{m0a:String}] > 0) AS m0_pos,
       sum(totals[{m0a:String}]) AS m0_x, sum(totals[{m0a:String}] * totals[{m0a:String}]) AS m0_xx
FROM {db}.unit_day_metrics(experiment_id = {experiment_id:String}, window_ms = {window_ms:UInt64})
WHERE toUnixTimestamp64Milli(exposed_time) + least((days_since_exposure + 1) * 86400000, {window_ms:UInt64}) <= {end_ms:Int64}
GROUP BY days_since_exposure, variant ORDER BY days_since_exposure, variant"""

LATENCY_SQL = """
SELECT variant, count() AS predictions, countIf(status = 'error') AS errors, countIf(status = 'timeout') AS timeouts,
       quantileExact(0.5)(latency_ms) AS p50_ms, quantileExact(0.95)(latency_ms) AS p95_ms,
       quantileExact(0.99)(latency_ms) AS p99_ms
FROM {db}.predictions WHERE experiment_id = {experiment_id:String} GROUP BY variant ORDER BY variant"""

LATENCY_BY_BUCKET_SQL = """
SELECT intDiv(toUnixTimestamp64Milli(event_time) - {start_ms:Int64}, {bucket_ms:Int64}) AS bucket, variant,
       count() AS predictions, quantileExact(0.5)(latency_ms) AS p50_ms, quantileExact(0.95)(latency_ms) AS p95_ms,
       quantileExact(0.99)(latency_ms) AS p99_ms
FROM {db}.predictions WHERE experiment_id = {experiment_id:String} GROUP BY bucket, variant ORDER BY bucket, variant"""

SCORES_SQL = """
SELECT intDiv(toUnixTimestamp64Milli(event_time) - {start_ms:Int64}, {bucket_ms:Int64}) AS bucket, variant,
       greatest(0, least(19, toInt32(floor(assumeNotNull(score) * 20)))) AS bin, count() AS n
FROM {db}.predictions WHERE experiment_id = {experiment_id:String} AND score IS NOT NULL
GROUP BY bucket, variant, bin ORDER BY bucket, variant, bin"""

SHADOW_SQL = """
SELECT challenger, count() AS runs, countIf(challenger_status = 'ok') AS ok,
       countIf(challenger_status = 'error') AS errors, countIf(challenger_status = 'timeout') AS timeouts,
       countIf(compared) AS compared_runs, countIf(disagree = 1) AS disagreements,
       avgIf(abs(score_diff), compared AND score_diff IS NOT NULL) AS mean_abs_score_diff,
       avgIf(latency_diff_ms, challenger_status = 'ok') AS mean_latency_diff_ms,
       quantileExactIf(0.95)(latency_diff_ms, challenger_status = 'ok' AND latency_diff_ms IS NOT NULL) AS p95_latency_diff_ms
FROM {db}.shadow_pairs WHERE experiment_id = {experiment_id:String} GROUP BY challenger ORDER BY challenger"""

SHADOW_BY_BUCKET_SQL = """
SELECT intDiv(toUnixTimestamp64Milli(event_time) - {start_ms:Int64}, {bucket_ms:Int64}) AS bucket, challenger,
       countIf(compared) AS compared_runs, countIf(disagree = 1) AS disagreements
FROM {db}.shadow_pairs WHERE experiment_id = {experiment_id:String} GROUP BY bucket, challenger ORDER BY bucket, challenger"""

SHADOW_EXAMPLES_SQL = """
SELECT toUnixTimestamp64Milli(event_time) AS time_ms, unit_id, request_id, champion, challenger,
       champion_score, challenger_score, champion_label, challenger_label
FROM {db}.shadow_pairs WHERE experiment_id = {experiment_id:String} AND disagree = 1
ORDER BY abs(ifNull(score_diff, 0)) DESC, request_id LIMIT 5"""

DECISIONS_SQL = """
SELECT toUnixTimestamp64Milli(decision_time) AS decision_ms, toUnixTimestamp64Milli(watermark_time) AS watermark_ms,
       verdict, verdict_variant, reason, srm_p_value, c.variant AS variant, c.lift AS lift, c.ci_low AS ci_low,
       c.ci_high AS ci_high, c.p_value AS p_value
FROM {db}.decisions ARRAY JOIN comparisons AS c
WHERE experiment_id = {experiment_id:String} AND c.primary
ORDER BY decision_time, kafka_partition, kafka_offset"""

ALERTS_EXIST_SQL = "EXISTS TABLE {db}.alerts"

ALERTS_SQL = """
SELECT toUnixTimestamp64Milli(event_time) AS time_ms, guardrail, kind, variant, state, severity, action,
       observed, threshold, evidence
FROM {db}.alerts WHERE experiment_id = {experiment_id:String} ORDER BY emitted_time, kafka_partition, kafka_offset"""


def time_bucket_ms(first_ms: int, last_ms: int, buckets: int = 12) -> int:
    """Return a round bucket width giving about ``buckets`` buckets over [first, last]."""
    span = max(1, last_ms - first_ms)
    for width in (1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000, 6 * 3_600_000, DAY_MS):
        if span / width <= buckets:
            return width
    return DAY_MS * math.ceil(span / (DAY_MS * buckets))


# --------------------------------------------------------------------------- statistics of rows


def metric_statistic(metric: MetricSpec, row: Row, i: int) -> Stats:
    """Return metric i's statistic of one group's row (the stream's definition of the metric)."""
    n = int(row["n"])
    if metric.kind == "binary":
        return ProportionStats(n, int(row[f"m{i}_pos"]))
    if metric.kind == "continuous":
        return MeanStats(n, float(row[f"m{i}_x"]), float(row[f"m{i}_xx"]))
    return RatioStats(n, float(row[f"m{i}_x"]), float(row[f"m{i}_xx"]), float(row[f"m{i}_y"]),
                      float(row[f"m{i}_yy"]), float(row[f"m{i}_xy"]))


def cuped_statistic(metric: MetricSpec, row: Row, i: int) -> CupedStats:
    """Return metric i with the covariate's sums (binary metrics as their 0/1 indicator)."""
    n = int(row["n"])
    if metric.kind == "binary":
        pos = float(row[f"m{i}_pos"])
        return CupedStats(n, pos, pos, float(row["c_sum"]), float(row["c_cc"]), float(row[f"m{i}_pc"]))
    return CupedStats(n, float(row[f"m{i}_x"]), float(row[f"m{i}_xx"]), float(row["c_sum"]), float(row["c_cc"]),
                      float(row[f"m{i}_xc"]))


def statistics_by_variant(metrics: Sequence[MetricSpec], rows: Iterable[Row]) -> dict[str, dict[str, Stats]]:
    """Return metric name -> variant -> statistic from :func:`moments_sql` rows by variant."""
    out: dict[str, dict[str, Stats]] = {m.name: {} for m in metrics}
    for row in rows:
        for i, m in enumerate(metrics):
            out[m.name][row["variant"]] = metric_statistic(m, row, i)
    return out


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class MetricComparison:
    """Every test of one metric for one treatment against control."""

    metric: str
    kind: str
    primary: bool
    variant: str
    control: Stats
    treatment: Stats
    fixed: ComparisonResult | None
    sequential: ComparisonResult | None
    bayesian: ComparisonResult | None
    adjusted_p_value: float | None = None
    cuped: ComparisonResult | None = None
    cuped_variance_reduction: float | None = None
    bootstrap: BootstrapInterval | None = None
    mann_whitney: MannWhitneyResult | None = None
    skewness: float | None = None


def _fixed(metric: MetricSpec, control: Stats, treatment: Stats, alpha: float) -> ComparisonResult | None:
    try:
        if metric.kind == "binary":
            return z_test(control, treatment, relative=True, alpha=alpha)
        return welch_test(control, treatment, relative=True, alpha=alpha)
    except (ValueError, ZeroDivisionError):
        return None


def _bayesian(metric: MetricSpec, control: Stats, treatment: Stats, alpha: float) -> ComparisonResult | None:
    try:
        if metric.kind == "binary":
            return beta_binomial_test(control, treatment, relative=True, alpha=alpha)
        return gaussian_test(control, treatment, relative=True, alpha=alpha)
    except (ValueError, ZeroDivisionError):
        return None


def stream_decision(policy: DecisionPolicy, metrics: Sequence[MetricSpec], stats: Mapping[str, Mapping[str, Stats]],
                    weights: Mapping[str, float], runtime_s: float, *, check_srm: bool = True) -> Decision:
    """Return analysis.verdict's decision on the recomputed statistics: the same function
    the stream's stage 2 calls, so its anytime-valid numbers are the stream's."""
    primary = metrics[0]
    exposures = {v: s.n for v, s in stats[primary.name].items()}
    return decide(policy, primary.name, stats[primary.name], {m.name: stats[m.name] for m in metrics[1:]},
                  exposures, {v: w for v, w in weights.items() if w > 0}, runtime_s, check_srm=check_srm)


def compare_metrics(policy: DecisionPolicy, metrics: Sequence[MetricSpec], stats: Mapping[str, Mapping[str, Stats]],
                    decision: Decision, *, cuped: Mapping[str, Mapping[str, CupedStats]] | None = None,
                    unit_values: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray | None]]] | None = None,
                    bootstrap_resamples: int = 2000, seed: int = 0) -> list[MetricComparison]:
    """Return fixed-horizon, anytime-valid (the decision's), Bayesian, CUPED, bootstrap and
    Mann-Whitney results of every metric and treatment.

    Primary metric at alpha / treatments (as the stream), secondary at alpha with Holm-
    adjusted fixed-horizon p-values across metrics and treatments. Lifts are relative.
    """
    treatments = [v for v in sorted(stats[metrics[0].name]) if v != policy.control]
    alpha_primary = policy.alpha / max(1, len(treatments))
    anytime = {(c.metric, c.variant): c for c in (*decision.primary, *decision.secondary)}
    out = []
    for k, metric in enumerate(metrics):
        arms = stats[metric.name]
        alpha = alpha_primary if k == 0 else policy.alpha
        control = arms.get(policy.control)
        for variant in treatments:
            treatment = arms.get(variant)
            if control is None or treatment is None:
                continue
            streamed = anytime.get((metric.name, variant))
            result = dict(metric=metric.name, kind=metric.kind, primary=k == 0, variant=variant, control=control,
                          treatment=treatment, fixed=_fixed(metric, control, treatment, alpha),
                          sequential=streamed.test if streamed else None,
                          bayesian=_bayesian(metric, control, treatment, alpha))
            if cuped and metric.name in cuped and metric.kind != "ratio":
                arms_c = cuped[metric.name]
                try:
                    result["cuped"] = compare(arms_c[policy.control], arms_c[variant], method="welch",
                                              relative=True, alpha=alpha)
                    plain = result["fixed"]
                    if plain is not None:
                        result["cuped_variance_reduction"] = 1.0 - ((result["cuped"].ci_high - result["cuped"].ci_low)
                                                                    / (plain.ci_high - plain.ci_low)) ** 2
                except (ValueError, ZeroDivisionError, KeyError):
                    pass
            values = (unit_values or {}).get(metric.name)
            if values and policy.control in values and variant in values and metric.kind != "binary":
                (xc, yc), (xt, yt) = values[policy.control], values[variant]
                try:
                    result["bootstrap"] = bootstrap_lift(xc, xt, alpha=alpha, resamples=bootstrap_resamples, seed=seed,
                                                         control_denominators=yc, treatment_denominators=yt)
                    if metric.kind == "continuous":
                        result["mann_whitney"] = mann_whitney(xc, xt)
                        pooled = np.concatenate([xc, xt])
                        sd = pooled.std()
                        result["skewness"] = float(((pooled - pooled.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0
                except ValueError:
                    pass
            out.append(MetricComparison(**result))
    secondary = [i for i, c in enumerate(out) if not c.primary and c.fixed is not None]
    if secondary:
        adjusted = holm([out[i].fixed.p_value for i in secondary])
        for i, p in zip(secondary, adjusted):
            out[i] = MetricComparison(**{**out[i].__dict__, "adjusted_p_value": float(p)})
    return out


# --------------------------------------------------------------------------- SRM and segments


@dataclass(frozen=True)
class SegmentResult:
    key: str
    value: str
    variant: str
    units: dict[str, int]
    srm_p_value: float | None
    srm_adjusted_p_value: float | None
    lift: ComparisonResult | None
    adjusted_p_value: float | None


def segment_results(policy: DecisionPolicy, metric: MetricSpec, rows: Iterable[Row],
                    weights: Mapping[str, float], *, min_units: int = 30) -> list[SegmentResult]:
    """Return, per segment value and treatment, the primary metric's fixed-horizon relative
    lift (BH-adjusted across all cells: segments are exploratory, so the false discovery
    rate is controlled) and the segment's chi-square SRM p-value (Holm-adjusted across
    segments: any mismatch matters). Cells with fewer than ``min_units`` units per arm
    get no test."""
    groups: dict[tuple[str, str], dict[str, Row]] = defaultdict(dict)
    for row in rows:
        groups[(row["segment_key"], row["segment_value"])][row["variant"]] = row
    variants = sorted(v for v, w in weights.items() if w > 0)
    cells: list[dict] = []
    for (key, value), by_variant in sorted(groups.items()):
        units = {v: int(by_variant[v]["n"]) if v in by_variant else 0 for v in variants}
        srm = srm_pvalue([units[v] for v in variants], [weights[v] for v in variants]) if sum(units.values()) else None
        control = by_variant.get(policy.control)
        for variant in variants:
            if variant == policy.control:
                continue
            treatment = by_variant.get(variant)
            lift = None
            if control is not None and treatment is not None and min(units[policy.control], units[variant]) >= min_units:
                lift = _fixed(metric, metric_statistic(metric, control, 0), metric_statistic(metric, treatment, 0),
                              policy.alpha)
            cells.append(dict(key=key, value=value, variant=variant, units=units, srm_p_value=srm, lift=lift))
    tested = [i for i, c in enumerate(cells) if c["lift"] is not None]
    adjusted = dict(zip(tested, benjamini_hochberg([cells[i]["lift"].p_value for i in tested]))) if tested else {}
    firsts: dict[tuple[str, str], int] = {}
    for i, c in enumerate(cells):
        firsts.setdefault((c["key"], c["value"]), i)
    srm_cells = [i for i in firsts.values() if cells[i]["srm_p_value"] is not None]
    srm_adjusted = dict(zip(srm_cells, holm([cells[i]["srm_p_value"] for i in srm_cells]))) if srm_cells else {}
    by_segment = {(cells[i]["key"], cells[i]["value"]): srm_adjusted.get(i) for i in firsts.values()}
    return [SegmentResult(**c, srm_adjusted_p_value=by_segment[(c["key"], c["value"])],
                          adjusted_p_value=float(adjusted[i]) if i in adjusted else None)
            for i, c in enumerate(cells)]


# --------------------------------------------------------------------------- over time


@dataclass(frozen=True)
class TimePoint:
    """Cumulative state at the end of one time bucket."""

    bucket: int
    end_ms: int
    units: dict[str, int]
    new_units: dict[str, int]
    lifts: dict[str, ComparisonResult | None]


def cumulative_lifts(policy: DecisionPolicy, metric: MetricSpec, rows: Iterable[Row], start_ms: int,
                     bucket_ms: int, treatments: Sequence[str]) -> list[TimePoint]:
    """Return, per exposure bucket, the anytime-valid relative lift of the units exposed
    so far (with their outcomes as now attributed) -- the engine's test at each point."""
    from analysis.verdict import SEQUENTIAL_METHODS

    by_bucket: dict[int, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_bucket[int(row["bucket"])][row["variant"]] = row
    totals: dict[str, dict[str, float]] = {}
    out = []
    alpha = policy.alpha / max(1, len(treatments))
    for bucket in sorted(by_bucket):
        new = {}
        for variant, row in by_bucket[bucket].items():
            acc = totals.setdefault(variant, defaultdict(float))
            for k, v in row.items():
                if k not in ("bucket", "variant"):
                    acc[k] += float(v)
            new[variant] = int(row["n"])
        lifts: dict[str, ComparisonResult | None] = {}
        for variant in treatments:
            lifts[variant] = None
            if policy.control in totals and variant in totals:
                c = metric_statistic(metric, totals[policy.control], 0)
                t = metric_statistic(metric, totals[variant], 0)
                if c.n >= 2 and t.n >= 2:
                    try:
                        lifts[variant] = SEQUENTIAL_METHODS[policy.method](c, t, alpha=alpha, relative=True)
                    except (ValueError, ZeroDivisionError):
                        pass
        out.append(TimePoint(bucket, start_ms + (bucket + 1) * bucket_ms, {v: int(a["n"]) for v, a in totals.items()},
                             new, lifts))
    return out


@dataclass(frozen=True)
class NoveltyPoint:
    days_since_exposure: int
    units: dict[str, int]
    lifts: dict[str, ComparisonResult | None]


def novelty(policy: DecisionPolicy, metric: MetricSpec, unit_rows: Iterable[Row], sum_rows: Iterable[Row],
            treatments: Sequence[str]) -> list[NoveltyPoint]:
    """Return the primary metric's fixed-horizon relative lift on outcomes in each day
    since exposure, over the units observed for that whole day (or their whole window).

    A treatment effect that shrinks with days since exposure is a novelty effect."""
    units: dict[int, dict[str, int]] = defaultdict(dict)
    for row in unit_rows:
        units[int(row["days_since_exposure"])][row["variant"]] = int(row["n"])
    sums: dict[int, dict[str, Row]] = defaultdict(dict)
    for row in sum_rows:
        sums[int(row["days_since_exposure"])][row["variant"]] = row
    out = []
    for day in sorted(units):
        lifts: dict[str, ComparisonResult | None] = {}
        arm = {}
        for variant, n in units[day].items():
            row = sums[day].get(variant, {"m0_pos": 0, "m0_x": 0.0, "m0_xx": 0.0})
            arm[variant] = metric_statistic(metric, {**row, "n": n}, 0)
        for variant in treatments:
            lifts[variant] = (_fixed(metric, arm[policy.control], arm[variant], policy.alpha)
                              if policy.control in arm and variant in arm else None)
        out.append(NoveltyPoint(day, units[day], lifts))
    return out


def drift_by_bucket(rows: Iterable[Row]) -> dict[str, list[tuple[int, float, int]]]:
    """Return variant -> [(bucket, PSI of its score histogram against its first bucket,
    scores in the bucket)] (analysis.drift.psi on 20 bins over [0, 1], as the stream)."""
    counts: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0] * SCORE_BINS))
    for row in rows:
        counts[row["variant"]][int(row["bucket"])][int(row["bin"])] += int(row["n"])
    out = {}
    for variant, buckets in sorted(counts.items()):
        ordered = sorted(buckets)
        reference = Histogram(SCORE_EDGES, tuple(buckets[ordered[0]]))
        out[variant] = [(b, psi(reference, Histogram(SCORE_EDGES, tuple(buckets[b]))), sum(buckets[b]))
                        for b in ordered]
    return out


def psi_band(value: float) -> str:
    """Return the customary reading of a PSI value (stable, moderate, shifted)."""
    return PsiBand.of(value).value


# --------------------------------------------------------------------------- verdict


class ReportVerdict(str, Enum):
    SHIP = "ship"
    KEEP_CHAMPION = "keep champion"
    EXTEND = "extend"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Recommendation:
    verdict: ReportVerdict
    variant: str | None
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def recommend(policy: DecisionPolicy, decision: Decision, comparisons: Sequence[MetricComparison],
              *, mde: float | None, power: float, units_per_day: float | None, runtime_s: float,
              kill_alerts: Sequence[str] = ()) -> Recommendation:
    """Return the report's verdict, in words.

    1. A sample ratio mismatch (the stream's sequential SRM test) makes the results
       untrustworthy: inconclusive.
    2. A firing kill-switch guardrail, or a treatment whose anytime-valid interval lies on
       the bad side of zero: keep the champion.
    3. A treatment whose anytime-valid interval lies on the good side: ship the best one
       (secondary metrics whose Holm-adjusted p-value shows harm are named as caveats).
    4. Otherwise, with an MDE: if every treatment's interval excludes an improvement as
       large as the MDE, keep the champion (futility, valid at any look). If the smallest
       arm is below the units the anytime-valid test needs for the MDE at the configured
       power (analysis.sequential_cost), and the maximum duration is not reached, extend;
       else inconclusive. Without an MDE: extend until the maximum duration, then
       inconclusive.
    """
    sign = 1.0 if policy.increase_is_better else -1.0
    primary = [c for c in comparisons if c.primary]
    notes = []
    for c in comparisons:
        if not c.primary and c.adjusted_p_value is not None and c.adjusted_p_value < policy.alpha and c.fixed:
            notes.append(f"secondary metric {c.metric} moves {c.fixed.estimate:+.2%} for {c.variant} "
                         f"(Holm-adjusted p = {c.adjusted_p_value:.3g})")
    if decision.srm_flag:
        return Recommendation(ReportVerdict.INCONCLUSIVE, None, (
            f"sample ratio mismatch: sequential SRM p = {decision.srm_p_value:.2g} < {decision.srm_alpha} "
            f"(units {dict(sorted(decision.exposures.items()))}); the assignment is broken, so no metric here can be "
            "trusted -- find the cause, fix it and restart the experiment",), tuple(notes))
    if kill_alerts:
        return Recommendation(ReportVerdict.KEEP_CHAMPION, None,
                              tuple(f"kill-switch guardrail fired: {a}" for a in kill_alerts), tuple(notes))
    if decision.verdict is Verdict.STOP_HARM:
        return Recommendation(ReportVerdict.KEEP_CHAMPION, decision.variant, (decision.reason,), tuple(notes))
    if decision.verdict is Verdict.SHIP:
        return Recommendation(ReportVerdict.SHIP, decision.variant, (decision.reason,), tuple(notes))
    if decision.verdict is Verdict.CONTINUE and ("waiting for" in decision.reason or "minimum runtime" in decision.reason):
        return Recommendation(ReportVerdict.EXTEND, None, (decision.reason,), tuple(notes))
    at_max = policy.max_duration_s is not None and runtime_s >= policy.max_duration_s
    if mde is None:
        if at_max:
            return Recommendation(ReportVerdict.INCONCLUSIVE, None, (
                f"no variant differs from {policy.control} after the maximum duration",), tuple(notes))
        return Recommendation(ReportVerdict.EXTEND, None, (
            f"no variant differs from {policy.control} yet; no MDE is configured, so there is no planned sample "
            "(set mde; see `abstream plan`)",), tuple(notes))
    tested = [c for c in primary if c.sequential is not None]
    if tested and all(sign * (c.sequential.ci_high if sign > 0 else c.sequential.ci_low) < abs(mde) for c in tested):
        bound = ", ".join(f"{c.variant} [{c.sequential.ci_low:+.2%}, {c.sequential.ci_high:+.2%}]" for c in tested)
        return Recommendation(ReportVerdict.KEEP_CHAMPION, None, (
            f"no treatment can be as good as the MDE of {abs(mde):.1%}: anytime-valid intervals {bound} exclude it",),
            tuple(notes))
    needed, smallest = None, min(decision.exposures.values()) if decision.exposures else 0
    control = primary[0].control if primary else None
    if control is not None:
        try:
            kind_sd = None if isinstance(control, ProportionStats) else math.sqrt(control.variance)
            alpha_each = policy.alpha / max(1, len(primary))
            plan = sample_size(control.mean, abs(mde) * sign, relative=True, sd=kind_sd, alpha=alpha_each, power=power)
            needed = sequential_cost(plan, policy.method).n_control_max
        except (ValueError, ZeroDivisionError):
            needed = None
    if needed is not None and smallest < needed and not at_max:
        more = needed - smallest
        when = ""
        if units_per_day:
            share = smallest / max(1, sum(decision.exposures.values()))
            when = f", about {math.ceil(more / max(units_per_day * share, 1e-9))} more day(s) at the current traffic"
        return Recommendation(ReportVerdict.EXTEND, None, (
            f"no variant differs from {policy.control} yet; the anytime-valid test needs about {needed:,} units per "
            f"variant to detect {abs(mde):.1%} with power {power:.0%} and the smallest arm has {smallest:,} "
            f"({more:,} more{when})",), tuple(notes))
    return Recommendation(ReportVerdict.INCONCLUSIVE, None, (
        f"no variant differs from {policy.control} although the planned sample ({needed or 0:,} per variant) or the "
        "maximum duration is reached; an effect, if any, is smaller than the test can see",), tuple(notes))

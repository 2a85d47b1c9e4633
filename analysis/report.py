"""The experiment report: collect rows through a query function, analyse them (pure, in
analysis.offline), render Markdown and self-contained HTML with PNG plots.

The shell (``abstream report``) passes a ``query(sql, parameters) -> (columns, rows)``
that reaches ClickHouse however it can; nothing here opens a connection. Plots are drawn
with matplotlib's Agg backend and embedded in the HTML as base64 PNGs.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis import offline
from analysis.fixed import srm_pvalue
from analysis.offline import MetricComparison, Recommendation
from analysis.results import ComparisonResult
from analysis.verdict import Decision, DecisionPolicy

Query = Callable[[str, Mapping[str, Any]], tuple[Sequence[str], Sequence[Sequence[Any]]]]
PLOTS = ("lift_over_time", "traffic_split", "latency", "shadow_agreement", "drift")


class ReportError(Exception):
    """The report cannot be made (no such data); the message is one line for the user."""


@dataclass
class WarehouseRows:
    """Every row the report reads, as dicts, plus the time grid they were bucketed on."""

    first_ms: int
    last_ms: int
    bucket_ms: int
    exposures: list[dict]
    arms: list[dict]
    segments: list[dict]
    buckets: list[dict]
    unit_values: dict[str, list[dict]]
    novelty_units: list[dict]
    novelty_sums: list[dict]
    latency: list[dict]
    latency_buckets: list[dict]
    scores: list[dict]
    shadow: list[dict]
    shadow_buckets: list[dict]
    shadow_examples: list[dict]
    decisions: list[dict]
    alerts: list[dict] | None


def _rows(query: Query, sql: str, parameters: Mapping[str, Any]) -> list[dict]:
    columns, rows = query(sql, parameters)
    return [dict(zip(columns, row)) for row in rows]


def collect_steps(config: Any) -> int:
    """Return how many queries :func:`collect` runs (for a progress bar)."""
    continuous = sum(1 for m in offline.metric_specs(config) if m.kind != "binary")
    return 16 + continuous


def collect(config: Any, query: Query, *, on_step: Callable[[str], None] = lambda _: None,
            unit_sample_cap: int = offline.UNIT_SAMPLE_CAP) -> WarehouseRows:
    """Return the rows of every query of the report for ``config``'s experiment.

    Raises :class:`ReportError` when ClickHouse holds no exposure of the experiment.
    """
    metrics = offline.metric_specs(config)
    base = {"experiment_id": config.experiment_id, "window_ms": int(config.attribution_window_s * 1000)}
    with_metrics = {**base, **offline.metric_parameters(metrics)}
    covariate = config.cuped_covariate is not None
    if covariate:
        with_metrics["covariate"] = config.cuped_covariate

    def step(name: str, sql: str, parameters: Mapping[str, Any]) -> list[dict]:
        on_step(name)
        return _rows(query, sql, parameters)

    exposures = step("exposures", offline.EXPOSURES_SQL, base)
    if not exposures:
        raise ReportError(f"ClickHouse holds no exposure of experiment {config.experiment_id!r} "
                          "(has its traffic reached the sink?)")
    span = step("time span", offline.SPAN_SQL, base)[0]
    # Time series start at the first exposure and are bucketed over the exposure period.
    first_ms, last_ms = min(int(r["first_ms"]) for r in exposures), int(span["last_ms"])
    bucket_ms = offline.time_bucket_ms(first_ms, max(int(r["last_ms"]) for r in exposures))
    grid = {"start_ms": first_ms, "bucket_ms": bucket_ms}
    arms = step("metrics by variant", offline.moments_sql(metrics, covariate=covariate, by="variant"), with_metrics)
    segments = step("metrics by segment", offline.moments_sql(metrics[:1], covariate=False, by="segment"),
                    {**base, **offline.metric_parameters(metrics[:1])})
    buckets = step("metrics over time", offline.moments_sql(metrics[:1], covariate=False, by="bucket"),
                   {**base, **offline.metric_parameters(metrics[:1]), **grid})
    unit_values = {}
    for i, m in enumerate(metrics):
        if m.kind != "binary":
            parameters = {**base, "cap": unit_sample_cap, f"m{i}a": m.numerator}
            if m.denominator is not None:
                parameters[f"m{i}b"] = m.denominator
            unit_values[m.name] = step(f"unit values of {m.name}", offline.unit_values_sql(i, m.denominator is not None),
                                       parameters)
    days = max(1, math.ceil(config.attribution_window_s * 1000 / offline.DAY_MS))
    novelty = {**base, "days": days, "end_ms": last_ms, "m0a": metrics[0].numerator}
    novelty_units = step("novelty units", offline.NOVELTY_UNITS_SQL, novelty)
    novelty_sums = step("novelty sums", offline.NOVELTY_SUMS_SQL, novelty) if metrics[0].kind != "ratio" else []
    latency = step("latency", offline.LATENCY_SQL, base)
    latency_buckets = step("latency over time", offline.LATENCY_BY_BUCKET_SQL, {**base, **grid})
    scores = step("score distributions", offline.SCORES_SQL, {**base, **grid})
    shadow = step("shadow runs", offline.SHADOW_SQL, base)
    shadow_buckets = step("shadow over time", offline.SHADOW_BY_BUCKET_SQL, {**base, **grid})
    shadow_examples = step("shadow disagreements", offline.SHADOW_EXAMPLES_SQL, base)
    decisions = step("decision history", offline.DECISIONS_SQL, base)
    has_alerts = step("alerts table", offline.ALERTS_EXIST_SQL, {})
    alerts = step("alerts", offline.ALERTS_SQL, base) if has_alerts and list(has_alerts[0].values())[0] else None
    return WarehouseRows(first_ms, last_ms, bucket_ms, exposures, arms, segments, buckets, unit_values,
                         novelty_units, novelty_sums, latency, latency_buckets, scores, shadow, shadow_buckets,
                         shadow_examples, decisions, alerts)


# --------------------------------------------------------------------------- analysis


@dataclass
class Report:
    """Everything the report says, as numbers and result objects."""

    experiment_id: str
    config: Any
    policy: DecisionPolicy
    rows: WarehouseRows
    decision: Decision
    comparisons: list[MetricComparison]
    srm_chi2_p_value: float | None
    segments: list[offline.SegmentResult]
    timeline: list[offline.TimePoint]
    novelty: list[offline.NoveltyPoint]
    drift: dict[str, list[tuple[int, float, int]]]
    recommendation: Recommendation
    generated_ms: int
    notes: list[str] = field(default_factory=list)


def analyse(config: Any, policy: DecisionPolicy, rows: WarehouseRows, *, generated_ms: int,
            bootstrap_resamples: int = 2000, seed: int = 0) -> Report:
    """Return the report of the rows (pure)."""
    metrics = offline.metric_specs(config)
    weights = {v: w for v, w in config.weights.items() if w > 0}
    check_srm = getattr(getattr(config, "allocation", None), "value", "fixed") == "fixed"
    stats = offline.statistics_by_variant(metrics, rows.arms)
    first_exposure = min(int(r["first_ms"]) for r in rows.exposures)
    runtime_s = max(0.0, (rows.last_ms - first_exposure) / 1000)
    decision = offline.stream_decision(policy, metrics, stats, weights, runtime_s, check_srm=check_srm)
    cuped = None
    if config.cuped_covariate is not None:
        cuped = {m.name: {r["variant"]: offline.cuped_statistic(m, r, i) for r in rows.arms}
                 for i, m in enumerate(metrics) if m.kind != "ratio"}
    import numpy as np

    unit_values = {}
    for name, value_rows in rows.unit_values.items():
        by_variant: dict[str, tuple[list, list]] = {}
        for r in value_rows:
            xs, ys = by_variant.setdefault(r["variant"], ([], []))
            xs.append(float(r["x"]))
            if "y" in r:
                ys.append(float(r["y"]))
        unit_values[name] = {v: (np.asarray(xs), np.asarray(ys) if ys else None) for v, (xs, ys) in by_variant.items()}
    comparisons = offline.compare_metrics(policy, metrics, stats, decision, cuped=cuped, unit_values=unit_values,
                                          bootstrap_resamples=bootstrap_resamples, seed=seed)
    variants = sorted(weights)
    counts = [decision.exposures.get(v, 0) for v in variants]
    srm_chi2 = srm_pvalue(counts, [weights[v] for v in variants]) if check_srm and len(variants) > 1 else None
    treatments = [v for v in variants if v != policy.control]
    segments = offline.segment_results(policy, metrics[0], rows.segments, weights)
    timeline = offline.cumulative_lifts(policy, metrics[0], rows.buckets, rows.first_ms, rows.bucket_ms, treatments)
    novelty = offline.novelty(policy, metrics[0], rows.novelty_units, rows.novelty_sums, treatments) \
        if metrics[0].kind != "ratio" else []
    drift = offline.drift_by_bucket(rows.scores)
    kill_alerts = _firing_kills(rows.alerts or [])
    span_days = max((rows.last_ms - first_exposure) / offline.DAY_MS, 1e-9)
    recommendation = offline.recommend(policy, decision, comparisons, mde=config.mde, power=config.power,
                                       units_per_day=sum(counts) / span_days, runtime_s=runtime_s,
                                       kill_alerts=kill_alerts)
    return Report(config.experiment_id, config, policy, rows, decision, comparisons, srm_chi2, segments, timeline,
                  novelty, drift, recommendation, generated_ms)


def _firing_kills(alerts: list[dict]) -> list[str]:
    last: dict[tuple[str, str], dict] = {}
    for a in alerts:
        last[(a["guardrail"], a["variant"])] = a
    return [f"{a['guardrail']} on {a['variant']}: {a['evidence']}" for a in last.values()
            if a["state"] == "firing" and a["action"] == "kill"]


# --------------------------------------------------------------------------- numbers as JSON


def _result(r: ComparisonResult | None) -> dict | None:
    if r is None:
        return None
    return {"method": r.method, "estimate": r.estimate, "ci_low": r.ci_low, "ci_high": r.ci_high,
            "p_value": None if math.isnan(r.p_value) else r.p_value, "alpha": r.alpha,
            "chance_to_win": r.chance_to_win, "risk": list(r.risk) if r.risk else None}


def _mean(s: Any) -> float | None:
    try:
        return s.mean
    except (ValueError, ZeroDivisionError):
        return None


def to_json(report: Report) -> dict:
    """Return the report's numbers as a JSON-ready dict."""
    rec = report.recommendation
    return {
        "experiment_id": report.experiment_id,
        "generated_time_ms": report.generated_ms,
        "verdict": rec.verdict.value, "verdict_variant": rec.variant, "reasons": list(rec.reasons),
        "notes": list(rec.notes),
        "stream_rule_verdict": report.decision.verdict.value, "stream_rule_reason": report.decision.reason,
        "units": dict(report.decision.exposures), "weights": dict(report.config.weights),
        "srm": {"sequential_p_value": None if math.isnan(report.decision.srm_p_value) else report.decision.srm_p_value,
                "chi2_p_value": report.srm_chi2_p_value, "alpha": report.decision.srm_alpha,
                "flag": report.decision.srm_flag},
        "time": {"first_ms": report.rows.first_ms, "last_ms": report.rows.last_ms, "bucket_ms": report.rows.bucket_ms},
        "comparisons": [{
            "metric": c.metric, "kind": c.kind, "primary": c.primary, "variant": c.variant,
            "control_units": c.control.n, "treatment_units": c.treatment.n,
            "control_mean": _mean(c.control), "treatment_mean": _mean(c.treatment),
            "fixed": _result(c.fixed), "anytime_valid": _result(c.sequential), "bayesian": _result(c.bayesian),
            "adjusted_p_value": c.adjusted_p_value, "cuped": _result(c.cuped),
            "cuped_variance_reduction": c.cuped_variance_reduction,
            "bootstrap": c.bootstrap.to_dict() if c.bootstrap else None,
            "mann_whitney": ({"u": c.mann_whitney.statistic, "p_value": c.mann_whitney.p_value,
                              "prob_superiority": c.mann_whitney.prob_superiority} if c.mann_whitney else None),
            "skewness": c.skewness,
        } for c in report.comparisons],
        "segments": [{"key": s.key, "value": s.value, "variant": s.variant, "units": s.units,
                      "srm_p_value": s.srm_p_value, "srm_adjusted_p_value": s.srm_adjusted_p_value,
                      "lift": _result(s.lift), "adjusted_p_value": s.adjusted_p_value} for s in report.segments],
        "novelty": [{"days_since_exposure": p.days_since_exposure, "units": p.units,
                     "lifts": {v: _result(r) for v, r in p.lifts.items()}} for p in report.novelty],
        "latency": report.rows.latency,
        "shadow": report.rows.shadow,
        "drift": {v: [{"bucket": b, "psi": x, "scores": n} for b, x, n in points] for v, points in report.drift.items()},
        "alerts": report.rows.alerts,
        "decisions": len(report.rows.decisions),
    }


# --------------------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


_TIME_UNITS = ((60_000, 1_000, "seconds"), (3_600_000, 60_000, "minutes"), (offline.DAY_MS, 3_600_000, "hours"))


def _time_unit(report: Report) -> tuple[float, str]:
    for below, unit_ms, name in _TIME_UNITS:
        if report.rows.bucket_ms < below:
            return unit_ms, name
    return offline.DAY_MS, "days"


def _minutes(report: Report, ms: float) -> float:
    return (ms - report.rows.first_ms) / _time_unit(report)[0]


def _time_label(report: Report) -> str:
    start = datetime.datetime.fromtimestamp(report.rows.first_ms / 1000, datetime.timezone.utc)
    return f"{_time_unit(report)[1]} since the first exposure ({start:%Y-%m-%d %H:%M:%S} UTC)"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plots(report: Report) -> dict[str, bytes]:
    """Return name -> PNG bytes of the report's five plots."""
    out = {}
    metric = report.config.primary_metric.name
    plt, fig, ax = _figure()
    for variant in sorted({v for p in report.timeline for v in p.lifts}):
        points = [(p.end_ms, p.lifts[variant]) for p in report.timeline if p.lifts.get(variant)]
        if points:
            xs = [_minutes(report, t) for t, _ in points]
            ax.plot(xs, [r.estimate for _, r in points], marker="o", label=f"{variant}: lift (units exposed so far)")
            ax.fill_between(xs, [r.ci_low for _, r in points], [r.ci_high for _, r in points], alpha=0.2,
                            label=f"{variant}: {report.policy.method} confidence sequence")
    streamed = [d for d in report.rows.decisions if d["lift"] is not None]
    if streamed:
        ax.errorbar([_minutes(report, d["watermark_ms"]) for d in streamed], [d["lift"] for d in streamed],
                    yerr=[[d["lift"] - d["ci_low"] for d in streamed], [d["ci_high"] - d["lift"] for d in streamed]],
                    fmt="x", color="black", alpha=0.6, label="stream's decisions (at their watermark)")
    ax.axhline(0, color="grey", lw=1)
    ax.set_title(f"{report.experiment_id}: relative lift of {metric} over time")
    ax.set_xlabel(_time_label(report))
    ax.set_ylabel("relative lift")
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:+.0%}")
    _legend(ax)
    out["lift_over_time"] = _png(plt, fig)

    plt, fig, ax = _figure()
    variants = sorted({v for p in report.timeline for v in p.new_units})
    xs = [_minutes(report, p.end_ms) for p in report.timeline]
    for variant in variants:
        shares = [p.new_units.get(variant, 0) / max(1, sum(p.new_units.values())) for p in report.timeline]
        ax.plot(xs, shares, marker="o", label=f"{variant} (new units)")
        ax.axhline(report.config.weights.get(variant, 0), ls="--", lw=1, color=ax.lines[-1].get_color(),
                   label=f"{variant} planned {report.config.weights.get(variant, 0):.0%}")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.experiment_id}: traffic split over time")
    ax.set_xlabel(_time_label(report))
    ax.set_ylabel("share of new units")
    _legend(ax)
    out["traffic_split"] = _png(plt, fig)

    plt, fig, ax = _figure()
    for variant in sorted({r["variant"] for r in report.rows.latency_buckets}):
        rows = [r for r in report.rows.latency_buckets if r["variant"] == variant]
        xs = [_minutes(report, report.rows.first_ms + (int(r["bucket"]) + 0.5) * report.rows.bucket_ms) for r in rows]
        for q, style in (("p50_ms", ":"), ("p95_ms", "-"), ("p99_ms", "--")):
            ax.plot(xs, [r[q] for r in rows], ls=style, marker=".", label=f"{variant} {q[:-3]}")
    if not report.rows.latency_buckets:
        ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
    ax.set_title(f"{report.experiment_id}: prediction latency quantiles by variant")
    ax.set_xlabel(_time_label(report))
    ax.set_ylabel("latency (ms)")
    if report.rows.latency_buckets:
        ax.legend(fontsize=8, ncol=2)
    out["latency"] = _png(plt, fig)

    plt, fig, ax = _figure()
    for challenger in sorted({r["challenger"] for r in report.rows.shadow_buckets}):
        rows = [r for r in report.rows.shadow_buckets if r["challenger"] == challenger and r["compared_runs"]]
        xs = [_minutes(report, report.rows.first_ms + (int(r["bucket"]) + 0.5) * report.rows.bucket_ms) for r in rows]
        ax.plot(xs, [1 - r["disagreements"] / r["compared_runs"] for r in rows], marker="o", label=f"{challenger}")
    if not report.rows.shadow_buckets:
        ax.text(0.5, 0.5, "no shadow runs", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{report.experiment_id}: shadow agreement with the champion")
    ax.set_xlabel(_time_label(report))
    ax.set_ylabel("agreement rate")
    _legend(ax)
    out["shadow_agreement"] = _png(plt, fig)

    plt, fig, ax = _figure()
    for variant, points in report.drift.items():
        xs = [_minutes(report, report.rows.first_ms + (b + 0.5) * report.rows.bucket_ms) for b, _, _ in points]
        ax.plot(xs, [x for _, x, _ in points], marker="o", label=variant)
    for level, name in ((0.1, "moderate"), (0.2, "shifted")):
        ax.axhline(level, ls="--", lw=1, color="grey")
        ax.text(0, level, f" {name}", va="bottom", fontsize=8, color="grey")
    if not report.drift:
        ax.text(0.5, 0.5, "no scores", ha="center", transform=ax.transAxes)
    ax.set_title(f"{report.experiment_id}: score drift (PSI against the first time bucket)")
    ax.set_xlabel(_time_label(report))
    ax.set_ylabel("PSI")
    _legend(ax)
    out["drift"] = _png(plt, fig)
    return out


# --------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2%}"


def _num(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def _interval(r: ComparisonResult | Any | None) -> str:
    return "n/a" if r is None else f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}]"


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


Block = tuple  # ("p", text) | ("table", headers, rows) | ("img", name, caption)


def sections(report: Report) -> list[tuple[str, list[Block]]]:
    """Return the report as titled sections of paragraphs, tables and images."""
    cfg, rec, d = report.config, report.recommendation, report.decision
    out: list[tuple[str, list[Block]]] = []
    verdict = rec.verdict.value + (f" {rec.variant}" if rec.variant and rec.verdict.value in ("ship",) else "")
    summary: list[Block] = [("p", f"**Verdict: {verdict}.** " + " ".join(r[0].upper() + r[1:] + "." for r in rec.reasons))]
    for note in rec.notes:
        summary.append(("p", f"Note: {note}."))
    summary.append(("p", f"Exposures from {_when(report.rows.first_ms)}, data to {_when(report.rows.last_ms)}; "
                         f"config version {cfg.version}, status {cfg.status.value}; primary metric "
                         f"{cfg.primary_metric.name} ({cfg.primary_metric.kind.value}, {cfg.primary_metric.direction.value} "
                         f"is better); attribution window {cfg.attribution_window_s} s; alpha {cfg.alpha}"
                         + (f", MDE {cfg.mde:+.1%}" if cfg.mde is not None else ", no MDE") + "."))
    summary.append(("p", f"The stream's rule on the same numbers (analysis.verdict): {d.verdict.value} -- {d.reason}."))
    out.append(("Summary", summary))

    srm_rows = [[v, f"{d.exposures.get(v, 0):,}", f"{cfg.weights.get(v, 0):.1%}",
                 f"{d.exposures.get(v, 0) / max(1, sum(d.exposures.values())):.2%}"] for v in sorted(cfg.weights)]
    traffic: list[Block] = [("table", ["variant", "units", "planned", "observed"], srm_rows),
                            ("p", f"Sample ratio: sequential p = {_num(d.srm_p_value, '.3g')} (Lindon and Malek; the "
                                  f"stream's test, flagged below {d.srm_alpha}), chi-square p = "
                                  f"{_num(report.srm_chi2_p_value, '.3g')}" + (" -- **MISMATCH**" if d.srm_flag else "") + "."),
                            ("img", "traffic_split", "traffic split over time")]
    seg_srm = {(s.key, s.value): s for s in report.segments}
    worst = sorted(seg_srm.values(), key=lambda s: s.srm_p_value if s.srm_p_value is not None else 1)[:8]
    if worst:
        traffic.append(("p", "SRM by segment (chi-square, Holm-adjusted across segments), smallest p first:"))
        traffic.append(("table", ["segment", "units", "p", "adjusted p"],
                        [[f"{s.key}={s.value}", ", ".join(f"{v} {n:,}" for v, n in s.units.items()),
                          _num(s.srm_p_value, ".3g"), _num(s.srm_adjusted_p_value, ".3g")] for s in worst]))
    out.append(("Traffic and sample ratio", traffic))

    for primary in (True, False):
        rows = []
        for c in (c for c in report.comparisons if c.primary is primary):
            p_fixed = c.fixed.p_value if c.fixed else None
            rows.append([c.metric, c.kind, c.variant, f"{c.control.n:,} / {c.treatment.n:,}",
                         f"{_num(_mean(c.control))} / {_num(_mean(c.treatment))}",
                         _pct(c.fixed.estimate if c.fixed else None), _interval(c.fixed), _num(p_fixed, ".3g")
                         + ("" if primary else f" (Holm {_num(c.adjusted_p_value, '.3g')})"),
                         _interval(c.sequential), _num(c.sequential.p_value if c.sequential else None, ".3g"),
                         _interval(c.bayesian), _num(c.bayesian.chance_to_win if c.bayesian else None, ".1%")])
        if not rows:
            continue
        blocks: list[Block] = [("table", ["metric", "kind", "variant", "units c / t", "mean c / t", "lift",
                                          "fixed CI", "fixed p", "anytime-valid CI", "anytime p",
                                          "Bayesian CI", "P(better)"], rows)]
        if primary:
            blocks.append(("p", f"Lifts are relative to {cfg.control}. Fixed horizon: two-proportion z (binary) or Welch t "
                                "(continuous, ratio by the delta method); anytime-valid: the stream's "
                                f"{report.policy.method} test on the same sums (valid at every look); Bayesian: "
                                "Beta-Binomial (binary) or Gaussian on the lift. The primary metric is tested at "
                                "alpha / treatments, as the stream does."))
            blocks.append(("img", "lift_over_time", "lift over time with its confidence sequence"))
        out.append(("Primary metric" if primary else "Secondary metrics (Holm-adjusted)", blocks))

    cuped = [c for c in report.comparisons if c.cuped]
    if cuped:
        out.append((f"CUPED (covariate {cfg.cuped_covariate})", [("table", ["metric", "variant", "lift", "CI", "p",
                                                                             "variance reduction"],
            [[c.metric, c.variant, _pct(c.cuped.estimate), _interval(c.cuped), _num(c.cuped.p_value, ".3g"),
              _num(c.cuped_variance_reduction, ".1%")] for c in cuped])]))
    heavy = [c for c in report.comparisons if c.bootstrap or c.mann_whitney]
    if heavy:
        out.append(("Heavy-tailed metrics: bootstrap and rank test", [
            ("table", ["metric", "variant", "skewness", "bootstrap lift", "bootstrap CI", "Mann-Whitney p",
                       "P(T > C)"],
             [[c.metric, c.variant, _num(c.skewness, ".2f"), _pct(c.bootstrap.estimate if c.bootstrap else None),
               _interval(c.bootstrap), _num(c.mann_whitney.p_value if c.mann_whitney else None, ".3g"),
               _num(c.mann_whitney.prob_superiority if c.mann_whitney else None, ".3f")] for c in heavy]),
            ("p", "Percentile bootstrap of the relative lift (2,000 resamples per arm, seeded), on at most "
                  f"{offline.UNIT_SAMPLE_CAP:,} units per arm chosen by unit hash; Mann-Whitney U with tie correction.")]))

    seg_rows = [[f"{s.key}={s.value}", s.variant, ", ".join(f"{v} {n:,}" for v, n in s.units.items()),
                 _pct(s.lift.estimate if s.lift else None), _interval(s.lift),
                 _num(s.lift.p_value if s.lift else None, ".3g"), _num(s.adjusted_p_value, ".3g")]
                for s in report.segments]
    out.append(("Segments", [("table", ["segment", "variant", "units", "lift", "CI", "p", "BH-adjusted p"], seg_rows)
                             if seg_rows else ("p", "No segment attributes on the assignments."),
                             ("p", f"Primary metric by segment attribute (fixed horizon at alpha {cfg.alpha}); "
                                   "p-values adjusted by Benjamini-Hochberg across all cells. Segments are "
                                   "exploratory: act on the overall result.")]))

    nov_rows = [[str(p.days_since_exposure), ", ".join(f"{v} {n:,}" for v, n in sorted(p.units.items())),
                 "; ".join(f"{v} {_pct(r.estimate)} {_interval(r)}" for v, r in p.lifts.items() if r)]
                for p in report.novelty]
    out.append(("Novelty: effect by days since exposure", [
        ("table", ["day since exposure", "units observed", "lift [CI]"], nov_rows) if nov_rows else
        ("p", "No unit has been observed for a whole day since its exposure yet."),
        ("p", "Outcomes in each day after a unit's exposure, over the units observed for that whole day. "
              "A lift that shrinks from day 0 onwards is a novelty effect."
              + (" Only one day: the attribution window or the data is shorter than two days."
                 if len(nov_rows) == 1 else ""))]))

    lat_rows = [[r["variant"], f"{r['predictions']:,}", _num(r["errors"] / r["predictions"] if r["predictions"] else None, ".2%"),
                 _num(r["timeouts"] / r["predictions"] if r["predictions"] else None, ".2%"),
                 _num(r["p50_ms"], ".1f"), _num(r["p95_ms"], ".1f"), _num(r["p99_ms"], ".1f")]
                for r in report.rows.latency]
    out.append(("Predictions: latency and errors", [
        ("table", ["variant", "predictions", "error rate", "timeout rate", "p50 ms", "p95 ms", "p99 ms"], lat_rows)
        if lat_rows else ("p", "No predictions."), ("img", "latency", "latency quantiles by variant")]))

    shadow_blocks: list[Block] = []
    if report.rows.shadow:
        shadow_blocks.append(("table", ["challenger", "runs", "ok", "errors", "timeouts", "compared", "disagreement",
                                        "mean abs score diff", "latency diff ms (mean / p95)"],
                              [[r["challenger"], f"{r['runs']:,}", f"{r['ok']:,}", f"{r['errors']:,}", f"{r['timeouts']:,}",
                                f"{r['compared_runs']:,}", _num(r["disagreements"] / r["compared_runs"] if r["compared_runs"] else None, ".2%"),
                                _num(r["mean_abs_score_diff"], ".3f"),
                                f"{_num(r['mean_latency_diff_ms'], '.1f')} / {_num(r['p95_latency_diff_ms'], '.1f')}"]
                               for r in report.rows.shadow]))
        if report.rows.shadow_examples:
            shadow_blocks.append(("p", "Largest disagreements:"))
            shadow_blocks.append(("table", ["time", "unit", "request", "champion", "challenger", "scores", "labels"],
                                  [[_when(int(r["time_ms"])), r["unit_id"], r["request_id"], r["champion"], r["challenger"],
                                    f"{_num(r['champion_score'], '.3f')} vs {_num(r['challenger_score'], '.3f')}",
                                    f"{r['champion_label']} vs {r['challenger_label']}"]
                                   for r in report.rows.shadow_examples]))
    else:
        shadow_blocks.append(("p", "No shadow runs for this experiment."))
    shadow_blocks.append(("img", "shadow_agreement", "shadow agreement over time"))
    out.append(("Shadow runs", shadow_blocks))

    drift_rows = [[v, _num(max(x for _, x, _ in pts), ".3f"), offline.psi_band(max(x for _, x, _ in pts)),
                   f"{sum(n for _, _, n in pts):,}"] for v, pts in report.drift.items()]
    out.append(("Score drift", [
        ("table", ["variant", "max PSI", "reading", "scores"], drift_rows) if drift_rows else ("p", "No scores."),
        ("p", f"PSI of each time bucket's score histogram (20 bins over [0, 1]) against the variant's first bucket; "
              f"buckets of {report.rows.bucket_ms / 1000:g} s."),
        ("img", "drift", "score drift")]))

    guard: list[Block] = []
    if report.rows.alerts is None:
        guard.append(("p", "No alerts table in this database (guardrail alerts are not sunk to ClickHouse here)."))
    elif not report.rows.alerts:
        guard.append(("p", "No guardrail alert fired."))
    else:
        guard.append(("table", ["time", "guardrail", "kind", "variant", "state", "severity", "action", "observed",
                                "threshold", "evidence"],
                      [[_when(int(a["time_ms"])), a["guardrail"], a["kind"], a["variant"], a["state"], a["severity"],
                        a["action"], _num(a["observed"]), _num(a["threshold"]), a["evidence"]] for a in report.rows.alerts]))
    changes, last = [], None
    for row in report.rows.decisions:
        key = (row["verdict"], row["verdict_variant"])
        if key != last:
            changes.append([_when(int(row["decision_ms"])), row["verdict"] + (f" {row['verdict_variant']}" if row["verdict_variant"] else ""),
                            row["reason"]])
            last = key
    guard.append(("p", f"{len({r['decision_ms'] for r in report.rows.decisions}):,} streaming decisions recorded; "
                       "verdict changes:" if changes else "No streaming decision recorded in ClickHouse."))
    if changes:
        guard.append(("table", ["time", "verdict", "reason"], changes))
    out.append(("Guardrails, alerts and decision history", guard))
    return out


def render_markdown(report: Report, image_files: Mapping[str, str]) -> str:
    """Return the report as Markdown, images linked to ``image_files`` (name -> path)."""
    lines = [f"# Experiment report: {report.experiment_id}", "", f"Generated {_when(report.generated_ms)} by "
             "`abstream report` from ClickHouse.", ""]
    for title, blocks in sections(report):
        lines += [f"## {title}", ""]
        for block in blocks:
            if block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
                lines.append("")
            else:
                lines += [f"![{block[2]}]({image_files[block[1]]})", ""]
    return "\n".join(lines)


def render_html(report: Report, pngs: Mapping[str, bytes]) -> str:
    """Return the report as one self-contained HTML page (PNGs embedded as base64)."""
    def inline(text: str) -> str:
        escaped = html.escape(text)
        parts = escaped.split("**")
        return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))

    body = [f"<h1>Experiment report: {html.escape(report.experiment_id)}</h1>",
            f"<p>Generated {_when(report.generated_ms)} by <code>abstream report</code> from ClickHouse.</p>"]
    for title, blocks in sections(report):
        body.append(f"<h2>{html.escape(title)}</h2>")
        for block in blocks:
            if block[0] == "p":
                body.append(f"<p>{inline(block[1])}</p>")
            elif block[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                data = base64.b64encode(pngs[block[1]]).decode()
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em}"
             "th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:.85em;color:#666}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Experiment report: "
            f"{html.escape(report.experiment_id)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, report.json and the PNGs into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(report)
    paths = {}
    for name, data in pngs.items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(data)
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(render_markdown(report, {n: f"{n}.png" for n in pngs}))
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(render_html(report, pngs))
    paths["json"] = out_dir / "report.json"
    paths["json"].write_text(json.dumps(to_json(report), indent=2, default=str))
    return paths

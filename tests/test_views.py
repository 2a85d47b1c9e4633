"""The analyst views (infra/clickhouse/003_views.sql) and the README's five analyst queries,
run on the session's in-process chDB against references computed here from the raw events."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from streams.codec import EventKind
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events
from streams.warehouse import RAW_TABLES, Warehouse, event_columns

DAY_MS = 86_400_000
WINDOW_S = 3 * 86_400
# Two thousand units over about 28 hours, outcomes up to days later: several days since exposure.
SCENARIO = ExperimentScenario("ranker", {"control": ArmTruth(0.20), "treatment": ArmTruth(0.26)},
                              {"control": 0.5, "treatment": 0.5}, units=2000, exposures_per_s=0.02,
                              window_s=WINDOW_S, mean_lag_s=86_400, seed=5)

# The README's queries, verbatim ({db} is the database; `abstream query` substitutes it).
LIFT_BY_SEGMENT = """
SELECT segment_key, segment_value,
       countIf(variant = 'control') AS n_c, countIf(variant = 'treatment') AS n_t,
       avgIf(totals['conversion'] > 0, variant = 'control') AS p_c,
       avgIf(totals['conversion'] > 0, variant = 'treatment') AS p_t,
       p_t / p_c - 1 AS lift,
       (p_t - p_c) / sqrt(p_c * (1 - p_c) / n_c + p_t * (1 - p_t) / n_t) AS z,
       erfc(abs(z) / sqrt(2)) AS p_value
FROM {db}.unit_metrics(experiment_id = 'ranker', window_ms = 259200000)
ARRAY JOIN mapKeys(segment) AS segment_key, mapValues(segment) AS segment_value
GROUP BY segment_key, segment_value
ORDER BY segment_key, segment_value"""

LATENCY_BY_VARIANT = """
SELECT variant, count() AS predictions, countIf(status != 'ok') / count() AS failure_rate,
       quantileExact(0.5)(latency_ms) AS p50_ms, quantileExact(0.95)(latency_ms) AS p95_ms,
       quantileExact(0.99)(latency_ms) AS p99_ms
FROM {db}.predictions
WHERE experiment_id = 'ranker'
GROUP BY variant
ORDER BY variant"""

NOVELTY = """
WITH (SELECT max(toUnixTimestamp64Milli(event_time)) FROM {db}.outcomes WHERE experiment_id = 'ranker') AS end_ms
SELECT days_since_exposure, variant, units, converting, converting / units AS conversion
FROM (SELECT d AS days_since_exposure, variant, count() AS units
      FROM {db}.exposures ARRAY JOIN range(3) AS d
      WHERE experiment_id = 'ranker' AND toUnixTimestamp64Milli(exposed_time) + (d + 1) * 86400000 <= end_ms
      GROUP BY days_since_exposure, variant) AS e
LEFT JOIN (SELECT days_since_exposure, variant, countIf(totals['conversion'] > 0) AS converting
           FROM {db}.unit_day_metrics(experiment_id = 'ranker', window_ms = 259200000)
           WHERE toUnixTimestamp64Milli(exposed_time) + (days_since_exposure + 1) * 86400000 <= end_ms
           GROUP BY days_since_exposure, variant) AS c USING (days_since_exposure, variant)
ORDER BY days_since_exposure, variant"""

SHADOW_DISAGREEMENTS = """
SELECT event_time, unit_id, request_id, champion, challenger, champion_score, challenger_score, score_diff
FROM {db}.shadow_pairs
WHERE experiment_id = 'ranker' AND disagree = 1
ORDER BY abs(score_diff) DESC, request_id
LIMIT 10"""

SRM_BY_SEGMENT = """
SELECT segment_key, segment_value,
       countIf(variant = 'control') AS n_c, countIf(variant = 'treatment') AS n_t,
       (n_c + n_t) * 0.5 AS expected,
       pow(n_c - expected, 2) / expected + pow(n_t - expected, 2) / expected AS chi2,
       erfc(sqrt(chi2 / 2)) AS p_value
FROM {db}.exposures
ARRAY JOIN mapKeys(segment) AS segment_key, mapValues(segment) AS segment_value
WHERE experiment_id = 'ranker'
GROUP BY segment_key, segment_value
ORDER BY p_value"""


def shadow_events(events: list, seed: int) -> list[tuple[int, EventKind, dict]]:
    """A shadow run for about half the predictions: the challenger's score is the
    champion's plus noise; some runs time out, some models answer with labels."""
    rng = np.random.default_rng(seed)
    out = []
    for arrival, kind, r in events:
        if kind is not EventKind.PREDICTION or r["score"] is None or rng.random() < 0.5:
            continue
        status = "timeout" if rng.random() < 0.05 else "ok"
        labelled = rng.random() < 0.1
        champion = r["score"]
        challenger = float(np.clip(champion + rng.normal(0, 0.08), 0, 1)) if status == "ok" else None
        out.append((arrival, EventKind.SHADOW, {
            "event_id": "s" + r["event_id"], "event_time": r["event_time"], "experiment_id": r["experiment_id"],
            "unit_id": r["unit_id"], "request_id": r["request_id"], "champion_model": "ranker",
            "champion_version": "v1", "challenger_model": "ranker", "challenger_version": "v2",
            "champion_score": champion, "challenger_score": challenger,
            "champion_label": ("buy" if champion >= 0.4 else "skip") if labelled else None,
            "challenger_label": ("buy" if (challenger or 0) >= 0.4 else "skip") if labelled and status == "ok" else None,
            "champion_latency_ms": 30.0 + float(rng.random()) * 10,
            "challenger_latency_ms": 45.0 + float(rng.random()) * 10 if status == "ok" else None,
            "challenger_status": status}))
    return out


def insert_events(warehouse: Warehouse, events) -> None:
    """Write events to the raw tables once each, as the sink does."""
    seen, by_kind = set(), defaultdict(list)
    for _, kind, record in events:
        if (kind, record["unit_id"], record["event_id"]) not in seen:
            seen.add((kind, record["unit_id"], record["event_id"]))
            by_kind[kind].append(record)
    for kind, records in by_kind.items():
        columns = event_columns(kind)
        warehouse.insert(RAW_TABLES[kind], columns, [[r.get(c) for r in records] for c in columns])


def attribution_truth(events, window_s: float) -> dict:
    """The stream's rules applied by hand (streams/units.py), in arrival order."""
    seen, exposure, outcomes = set(), {}, []
    for _, kind, r in events:
        if (kind, r["unit_id"], r["event_id"]) in seen:
            continue
        seen.add((kind, r["unit_id"], r["event_id"]))
        if kind is EventKind.ASSIGNMENT and r["unit_id"] not in exposure:
            exposure[r["unit_id"]] = (r["variant"], r["event_time"], r["segment"])
        elif kind is EventKind.OUTCOME:
            outcomes.append(r)
    totals, by_day = defaultdict(float), defaultdict(float)
    fates = defaultdict(lambda: [0, 0, 0])
    for o in outcomes:
        if o["unit_id"] not in exposure:
            continue
        t0 = exposure[o["unit_id"]][1]
        if o["event_time"] < t0:
            fates[o["unit_id"]][1] += 1
        elif o["event_time"] >= t0 + window_s * 1000:
            fates[o["unit_id"]][2] += 1
        else:
            fates[o["unit_id"]][0] += 1
            totals[(o["unit_id"], o["metric"])] += o["value"]
            by_day[(o["unit_id"], (o["event_time"] - t0) // DAY_MS, o["metric"])] += o["value"]
    end_ms = max(o["event_time"] for o in outcomes)
    return {"exposure": exposure, "totals": totals, "by_day": by_day, "fates": fates, "end_ms": end_ms}


@pytest.fixture(scope="module")
def ranker_events():
    events = scenario_events(SCENARIO)
    return events + shadow_events(events, seed=6)


@pytest.fixture
def warehouse(settings, ranker_events) -> Warehouse:
    w = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
    w.apply_schema()
    insert_events(w, ranker_events)
    return w


@pytest.fixture(scope="module")
def truth(ranker_events):
    return attribution_truth(ranker_events, WINDOW_S)


def rows(warehouse: Warehouse, sql: str, parameters=None) -> list[dict]:
    result = warehouse.query(sql, parameters)
    return [dict(zip(result.column_names, r)) for r in result.rows]


def test_apply_schema_is_idempotent(warehouse):
    warehouse.apply_schema()
    names = {r["name"] for r in rows(warehouse, "SELECT name FROM system.tables WHERE database = {d:String}",
                                     {"d": warehouse.database})}
    assert {"exposures", "unit_metrics", "unit_day_metrics", "experiment_daily", "shadow_pairs"} <= names


def test_unit_metrics_follow_the_streams_attribution_rules(warehouse, truth):
    got = rows(warehouse, "SELECT unit_id, variant, toUnixTimestamp64Milli(exposed_time) AS t, segment, totals, "
                          "attributed_outcomes, before_exposure_outcomes, after_window_outcomes "
                          "FROM {db}.unit_metrics(experiment_id = {e:String}, window_ms = {w:UInt64})",
               {"e": "ranker", "w": WINDOW_S * 1000})
    assert len(got) == len(truth["exposure"])
    for r in got:
        variant, t0, segment = truth["exposure"][r["unit_id"]]
        assert (r["variant"], r["t"], r["segment"]) == (variant, t0, segment)
        expected = {m: truth["totals"][(r["unit_id"], m)] for m in ("conversion", "revenue")
                    if (r["unit_id"], m) in truth["totals"]}
        assert r["totals"] == expected
        assert [r["attributed_outcomes"], r["before_exposure_outcomes"], r["after_window_outcomes"]] \
            == truth["fates"].get(r["unit_id"], [0, 0, 0])
    assert sum(r["before_exposure_outcomes"] for r in got) > 0 and sum(r["after_window_outcomes"] for r in got) > 0


def test_views_take_a_hostile_experiment_id_as_a_value(warehouse, truth):
    hostile = "x' OR 1=1 --"
    for sql in ("SELECT count() FROM {db}.unit_metrics(experiment_id = {e:String}, window_ms = {w:UInt64})",
                "SELECT count() FROM {db}.exposures WHERE experiment_id = {e:String}"):
        assert warehouse.query(sql, {"e": hostile, "w": 1000}).rows == [(0,)]
        assert warehouse.query(sql, {"e": "ranker", "w": 1000}).rows == [(len(truth["exposure"]),)]


def test_experiment_daily(warehouse, ranker_events, truth):
    got = rows(warehouse, "SELECT toString(day) AS day, variant, new_units, predictions, errors "
                          "FROM {db}.experiment_daily WHERE experiment_id = 'ranker'")
    new_units, predictions = defaultdict(int), defaultdict(lambda: [0, 0])
    for unit, (variant, t0, _) in truth["exposure"].items():
        new_units[(np.datetime64(t0, "ms").astype("datetime64[D]").astype(str), variant)] += 1
    seen = set()
    for _, kind, r in ranker_events:
        if kind is EventKind.PREDICTION and r["event_id"] not in seen:
            seen.add(r["event_id"])
            key = (np.datetime64(r["event_time"], "ms").astype("datetime64[D]").astype(str), r["variant"])
            predictions[key][0] += 1
            predictions[key][1] += r["status"] == "error"
    assert {(r["day"], r["variant"]): r["new_units"] for r in got} == dict(new_units)
    assert {(r["day"], r["variant"]): [r["predictions"], r["errors"]] for r in got} == {k: v for k, v in predictions.items()}


def test_readme_lift_by_segment(warehouse, truth):
    got = rows(warehouse, LIFT_BY_SEGMENT)
    assert len(got) == 6
    for r in got:
        units = [(u, v) for u, (v, _, seg) in truth["exposure"].items() if seg[r["segment_key"]] == r["segment_value"]]
        x = {arm: np.array([truth["totals"].get((u, "conversion"), 0) > 0 for u, v in units if v == arm], dtype=float)
             for arm in ("control", "treatment")}
        assert (r["n_c"], r["n_t"]) == (x["control"].size, x["treatment"].size)
        assert r["lift"] == pytest.approx(x["treatment"].mean() / x["control"].mean() - 1, rel=1e-12)
        se = np.sqrt(x["control"].var() / x["control"].size + x["treatment"].var() / x["treatment"].size)
        z = (x["treatment"].mean() - x["control"].mean()) / se
        assert r["z"] == pytest.approx(z, rel=1e-9)
        assert r["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-6)


def test_readme_latency_quantiles_by_variant(warehouse, ranker_events):
    got = rows(warehouse, LATENCY_BY_VARIANT)
    seen, latency, failed = set(), defaultdict(list), defaultdict(int)
    for _, kind, r in ranker_events:
        if kind is EventKind.PREDICTION and r["event_id"] not in seen:
            seen.add(r["event_id"])
            latency[r["variant"]].append(r["latency_ms"])
            failed[r["variant"]] += r["status"] != "ok"
    assert [r["variant"] for r in got] == sorted(latency)
    for r in got:
        values = np.sort(latency[r["variant"]])
        assert r["predictions"] == values.size
        assert r["failure_rate"] == pytest.approx(failed[r["variant"]] / values.size)
        # quantileExact returns the element at index floor(q n) of the sorted values
        for q, column in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            assert r[column] == values[int(q * values.size)]


def test_readme_novelty_by_days_since_exposure(warehouse, truth):
    got = rows(warehouse, NOVELTY)
    assert {r["days_since_exposure"] for r in got} == {0, 1, 2}
    for r in got:
        d = r["days_since_exposure"]
        units = [u for u, (v, t0, _) in truth["exposure"].items()
                 if v == r["variant"] and t0 + (d + 1) * DAY_MS <= truth["end_ms"]]
        converting = sum(truth["by_day"].get((u, d, "conversion"), 0) > 0 for u in units)
        assert (r["units"], r["converting"]) == (len(units), converting)


def test_readme_shadow_disagreement_examples(warehouse, ranker_events):
    got = rows(warehouse, SHADOW_DISAGREEMENTS)
    shadows = list({r["event_id"]: r for _, kind, r in ranker_events if kind is EventKind.SHADOW}.values())

    def disagree(s: dict) -> bool | None:
        if s["challenger_status"] != "ok":
            return None
        if s["champion_label"] is not None and s["challenger_label"] is not None:
            return s["champion_label"] != s["challenger_label"]
        return (s["champion_score"] >= 0.5) != (s["challenger_score"] >= 0.5)

    disagreeing = [s for s in shadows if disagree(s)]
    expected = sorted(disagreeing, key=lambda s: (-abs(s["challenger_score"] - s["champion_score"]), s["request_id"]))[:10]
    assert len(got) == 10 and [r["request_id"] for r in got] == [s["request_id"] for s in expected]
    assert all(r["challenger"] == "ranker:v2" for r in got)
    compared = rows(warehouse, "SELECT countIf(compared) AS c, countIf(disagree = 1) AS d FROM {db}.shadow_pairs")[0]
    assert (compared["c"], compared["d"]) == (sum(disagree(s) is not None for s in shadows), len(disagreeing))


def test_readme_srm_by_segment(warehouse, truth):
    got = rows(warehouse, SRM_BY_SEGMENT)
    assert len(got) == 6
    for r in got:
        counts = [sum(1 for v, _, seg in truth["exposure"].values()
                      if v == arm and seg[r["segment_key"]] == r["segment_value"]) for arm in ("control", "treatment")]
        assert [r["n_c"], r["n_t"]] == counts
        assert r["p_value"] == pytest.approx(stats.chisquare(counts).pvalue, rel=1e-9)

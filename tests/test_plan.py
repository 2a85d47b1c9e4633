"""`abstream plan`: fixed-horizon sample sizes against statsmodels, durations, and the
sequential penalty against a Monte Carlo run of the engine's own confidence sequence."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from analysis.sequential import confidence_sequence
from analysis.stats import ProportionStats
from streams.cli import main


def plan(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_acceptance_case_agrees_with_statsmodels_within_one_percent(capsys):
    result = plan(capsys, "--baseline", "0.18", "--mde", "-0.10", "--simulations", "0")
    expected = NormalIndPower().solve_power(proportion_effectsize(0.162, 0.18), alpha=0.05, power=0.8, ratio=1.0)
    for variant in ("control", "treatment"):
        assert abs(result["n_per_variant"][variant] / expected - 1) < 0.01
    assert result["n_per_variant"]["control"] == math.ceil(expected)


def test_duration_follows_from_daily_traffic_and_split(capsys):
    result = plan(capsys, "--baseline", "0.18", "--mde", "-0.10", "--daily-traffic", "5000", "--simulations", "0")
    n = result["n_per_variant"]["control"]
    assert result["duration_days"] == math.ceil(n / 2500)
    assert main(["plan", "--baseline", "0.18", "--mde", "-0.10", "--daily-traffic", "5000", "--simulations", "0"]) == 0
    out = capsys.readouterr().out
    assert f"duration at 5,000 units/day split 50%/50%: {math.ceil(n / 2500)} days" in out
    assert f"control {n:,}" in out


@pytest.mark.parametrize("args, effect, ratio, alternative, alpha", [
    (["--baseline", "0.10", "--mde", "0.02", "--absolute", "--split", "30/70"],
     proportion_effectsize(0.12, 0.10), 70 / 30, "two-sided", 0.05),
    (["--baseline", "0.10", "--mde", "0.15", "--one-sided", "--alpha", "0.1", "--power", "0.9"],
     proportion_effectsize(0.115, 0.10), 1.0, "larger", 0.1),
    (["--baseline", "50", "--mde", "0.04", "--sd", "30"], 2.0 / 30, 1.0, "two-sided", 0.05),
])
def test_other_designs_agree_with_statsmodels(capsys, args, effect, ratio, alternative, alpha):
    result = plan(capsys, *args, "--simulations", "0")
    power = 0.9 if "--power" in args else 0.8
    n_control = NormalIndPower().solve_power(effect, alpha=alpha, power=power, ratio=ratio, alternative=alternative)
    assert abs(result["n_per_variant"]["control"] / n_control - 1) < 0.01
    assert abs(result["n_per_variant"]["treatment"] / (n_control * ratio) - 1) < 0.01


def test_sequential_bound_gives_the_planned_power_read_once_at_the_end(capsys):
    """Monte Carlo with analysis.sequential.confidence_sequence itself (the engine's test)."""
    result = plan(capsys, "--baseline", "0.18", "--mde", "-0.10", "--simulations", "0")
    seq = result["comparisons"][0]["sequential"]
    n = seq["n_control_max"]
    assert seq["extra_fraction"] > 0 and seq["width_ratio"] > 1
    rng = np.random.default_rng(7)
    draws = 2000
    rejected = 0
    for xc, xt in zip(rng.binomial(n, 0.18, draws), rng.binomial(n, 0.162, draws)):
        test = confidence_sequence(ProportionStats(n, int(xc)), ProportionStats(n, int(xt)), relative=True)
        rejected += test.ci_high < 0 or test.ci_low > 0
    power = rejected / draws
    se = math.sqrt(0.8 * 0.2 / draws)
    assert abs(power - 0.8) < 4 * se, power


def test_simulation_is_seeded_and_says_what_it_did(capsys):
    args = ["--baseline", "0.18", "--mde", "-0.10", "--simulations", "300"]
    first, second = plan(capsys, *args), plan(capsys, *args)
    assert first == second
    sim = first["comparisons"][0]["sequential"]["simulation"]
    assert sim["experiments"] == 300 and 0.6 < sim["power"] <= 1.0
    assert 0 < sim["mean_total_units_at_stop"] <= first["comparisons"][0]["sequential"]["n_control_max"] * 2


@pytest.mark.parametrize("args", [
    ["--baseline", "0.95", "--mde", "0.10"],
    ["--baseline", "0.1", "--mde", "0.1", "--split", "50"],
    ["--baseline", "0.1", "--mde", "0.1", "--split", "a/b"],
    ["--baseline", "0.1", "--mde", "0"],
    ["--baseline", "0.1", "--mde", "0.1", "--alpha", "2"],
    ["--baseline", "0.1", "--mde", "0.1", "--daily-traffic", "0"],
])
def test_bad_plans_fail_in_one_line(capsys, args):
    assert main(["plan", *args, "--simulations", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("abstream: error: ") and len(err.strip().splitlines()) == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    assert "--daily-traffic" in capsys.readouterr().out

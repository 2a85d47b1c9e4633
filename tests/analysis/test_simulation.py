"""A small fixed-seed run of the A/A and A/B simulation study (analysis/simulation.py)."""
import json
import math

import pytest
from statsmodels.stats.power import NormalIndPower

from analysis.simulation import SimulationConfig, format_table, main, run_study

ANYTIME_VALID = ("msprt", "confidence_sequence", "group_sequential", "sequential_srm")

# 500 experiments, a look every 100 units per arm up to 6,000; design effect +20% on 0.10
# (fixed horizon about 3,840 per arm), large effect +40%.
CONFIG = SimulationConfig(experiments=500, max_units=6000, batch=100, seed=7, alpha=0.05,
                          baseline=0.10, design_lift=0.20)


@pytest.fixture(scope="module")
def study():
    return run_study(CONFIG)


def test_fixed_horizon_sample_size_matches_statsmodels():
    p_c, p_t = 0.10, 0.12
    effect_size = (p_t - p_c) / math.sqrt((p_c * (1 - p_c) + p_t * (1 - p_t)) / 2)
    n = NormalIndPower().solve_power(effect_size=effect_size, alpha=0.05, power=0.8, ratio=1.0)
    assert CONFIG.fixed_horizon_units == pytest.approx(n, abs=1.0)


def test_anytime_valid_methods_keep_the_false_positive_rate(study):
    aa = study["scenarios"]["aa"]["methods"]
    for method in ANYTIME_VALID:
        assert aa[method]["looks"] >= 5
        assert aa[method]["rejection_rate"] <= 0.05 + 3 * aa[method]["mc_se"], method


def test_peeking_at_a_fixed_horizon_test_inflates_the_false_positive_rate(study):
    aa = study["scenarios"]["aa"]["methods"]
    assert aa["naive_z"]["looks"] == 60
    assert aa["naive_z"]["rejection_rate"] > 2 * 0.05
    # read once, at its planned sample, the same test is fine
    assert aa["fixed_horizon_z"]["rejection_rate"] <= 0.05 + 3 * aa["fixed_horizon_z"]["mc_se"]


def test_power_at_the_design_effect_and_above(study):
    ab = study["scenarios"]["ab"]["methods"]
    # the fixed horizon is sized for 80% power at the design effect
    assert ab["fixed_horizon_z"]["rejection_rate"] == pytest.approx(0.8, abs=3 * 0.018)
    for method in ("msprt", "confidence_sequence", "group_sequential"):
        assert ab[method]["rejection_rate"] > 0.6, method
    large = study["scenarios"]["ab_large"]["methods"]
    for method in ("msprt", "confidence_sequence", "group_sequential", "fixed_horizon_z"):
        assert large[method]["rejection_rate"] > 0.95, method


def test_sequential_methods_stop_earlier_than_the_fixed_horizon_when_the_effect_is_large(study):
    large = study["scenarios"]["ab_large"]["methods"]
    fixed_units = large["fixed_horizon_z"]["mean_units_per_arm_at_stop"]
    assert fixed_units == pytest.approx(CONFIG.fixed_horizon_units, abs=2 * CONFIG.batch)
    for method in ("msprt", "confidence_sequence", "group_sequential"):
        assert large[method]["mean_units_per_arm_at_stop"] < 0.75 * fixed_units, method


def test_command_line_writes_the_table(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["--out", str(out), "--experiments", "50", "--max-units", "5000",
                 "--batch", "250", "--seed", "3", "--lift", "0.25"]) == 0
    result = json.loads(out.read_text())
    assert set(result["scenarios"]) == {"aa", "ab", "ab_large"}
    assert result["config"]["experiments"] == 50
    assert "naive_z" in capsys.readouterr().out
    assert "sequential_srm" in format_table(result)


def test_command_line_refuses_a_horizon_beyond_max_units(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.json"), "--max-units", "1000", "--lift", "0.15"])

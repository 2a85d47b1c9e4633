"""A/A and A/B simulation study: what peeking does to each test, and what it costs.

Run (this produced analysis/simulation_results.json)::

    python -m analysis.simulation --out analysis/simulation_results.json \\
        --experiments 2000 --max-units 10000 --batch 100 --seed 20240601 --alpha 0.05

Setting. A binary metric (conversion) with baseline rate 0.10. Units arrive in batches of
2 x ``batch``; each unit goes to control or treatment by a fair coin, so the arms hold
about ``batch`` more units each per look and the split itself is random (which is what
the sequential SRM test watches). Every method is read after every batch, up to about
``max_units`` units per arm (``max_units / batch`` looks), except the fixed-horizon test
(one look at its planned sample) and the group-sequential test (its planned looks).

The design effect is +15% relative (0.100 -> 0.115). For it the fixed-horizon two-sided
z test at alpha = 0.05 with 80% power needs about 6,700 units per arm
(n = (z_{1-alpha/2} + z_{0.8})^2 (p_c (1 - p_c) + p_t (1 - p_t)) / (p_t - p_c)^2).
Three scenarios: A/A (no effect: false positive rate under continuous monitoring), A/B at
the design effect (power against the fixed horizon) and A/B at twice the design effect
(where the anytime-valid tests should stop well before the fixed horizon).

Methods (all two-sided, Wald z with unpooled variance for the z statistics):

- ``naive_z``: the fixed-horizon z test read at every look -- what peeking does;
- ``fixed_horizon_z``: the same test read once, at the planned sample;
- ``msprt``: mixture SPRT (analysis.sequential), tau2 = (design effect)^2, i.e. mixing
  distribution N(0, 0.015^2) on the absolute difference, fixed before the experiment;
- ``confidence_sequence``: asymptotic CS (GrowthBook's sequential test) with N* set to
  the total units of the fixed-horizon design (GrowthBook advises N* near the expected
  sample). Both are normal mixtures; with these two tunings the CS's implied mixing
  variance rho^2 s^2 (about 2.27e-4) is within 1% of the mSPRT's 0.015^2, so their rows
  nearly coincide -- the same test reached from two tuning recipes, not two tests;
- ``group_sequential``: Lan-DeMets O'Brien-Fleming-type bounds at 5 equally spaced looks
  over ``max_units`` per arm (information fractions 0.2, ..., 1.0);
- ``sequential_srm``: Lindon-Malek sequential SRM test of the 50/50 split (A/A only; it
  tests the allocation, not the metric).

The table reports, per method, the rejection rate (false positive rate under A/A, power
under A/B) with its Monte Carlo standard error sqrt(r (1 - r) / experiments), and the mean
units per arm at stopping (the look where the test rejected, or the last look it makes).
Everything is vectorised across experiments with numpy (cumulative sums per batch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm

from analysis.sequential import (GroupSequentialBounds, confidence_sequence_p_value,
                                 group_sequential_bounds, mixture_p_value, srm_log_bayes_factor)

@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of one simulation study (see the module docstring)."""

    experiments: int = 2000
    max_units: int = 10_000
    batch: int = 100
    seed: int = 20240601
    alpha: float = 0.05
    baseline: float = 0.10
    design_lift: float = 0.15
    large_lift_factor: float = 2.0
    power: float = 0.80
    gs_looks: int = 5
    srm_concentration: float = 100.0

    @property
    def looks(self) -> int:
        """Return the number of looks of the continuously monitored tests."""
        return self.max_units // self.batch

    @property
    def design_effect(self) -> float:
        """Return the absolute design effect p_t - p_c."""
        return self.baseline * self.design_lift

    @property
    def fixed_horizon_units(self) -> int:
        """Return the units per arm of the fixed-horizon z test for the design effect."""
        p_c, p_t = self.baseline, self.baseline + self.design_effect
        z = norm.isf(self.alpha / 2.0) + norm.ppf(self.power)
        return math.ceil(z * z * (p_c * (1 - p_c) + p_t * (1 - p_t)) / self.design_effect**2)

    def validate(self) -> None:
        """Raise ValueError, in one line, when the study cannot run as configured."""
        if self.experiments < 1 or self.batch < 1:
            raise ValueError("experiments and batch must be positive")
        if self.looks < self.gs_looks:
            raise ValueError(f"max-units / batch gives {self.looks} looks; need at least "
                             f"{self.gs_looks} for the group-sequential design")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        p_large = self.baseline * (1 + self.design_lift * self.large_lift_factor)
        if not (0 < self.baseline < 1 and 0 < p_large < 1):
            raise ValueError("baseline and lifted rates must lie in (0, 1)")
        if self.fixed_horizon_units > self.looks * self.batch:
            raise ValueError(f"the fixed horizon needs {self.fixed_horizon_units} units per arm; "
                             f"raise --max-units to at least that")


@dataclass(frozen=True)
class Arms:
    """Cumulative units and conversions per arm, shape (experiments, looks)."""

    n_control: np.ndarray
    conversions_control: np.ndarray
    n_treatment: np.ndarray
    conversions_treatment: np.ndarray

    @property
    def units_per_arm(self) -> np.ndarray:
        """Return (n_c + n_t) / 2 per experiment and look."""
        return (self.n_control + self.n_treatment) / 2.0


def simulate_arms(rng: np.random.Generator, experiments: int, looks: int, batch: int,
                  p_control: float, p_treatment: float) -> Arms:
    """Return cumulative per-arm counts of Bernoulli streams, fair-coin assignment."""
    n_t = rng.binomial(2 * batch, 0.5, size=(experiments, looks))
    n_c = 2 * batch - n_t
    x_c = rng.binomial(n_c, p_control)
    x_t = rng.binomial(n_t, p_treatment)
    return Arms(np.cumsum(n_c, axis=1), np.cumsum(x_c, axis=1),
                np.cumsum(n_t, axis=1), np.cumsum(x_t, axis=1))


def _wald(arms: Arms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (difference, its unpooled variance, valid mask) per experiment and look."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p_c = arms.conversions_control / arms.n_control
        p_t = arms.conversions_treatment / arms.n_treatment
        variance = p_c * (1 - p_c) / arms.n_control + p_t * (1 - p_t) / arms.n_treatment
    valid = np.isfinite(variance) & (variance > 0)
    return np.where(valid, p_t - p_c, 0.0), np.where(valid, variance, 1.0), valid


def group_sequential_design(cfg: SimulationConfig) -> GroupSequentialBounds:
    """Return the O'Brien-Fleming-type design with ``cfg.gs_looks`` equally spaced looks."""
    return group_sequential_bounds(np.arange(1, cfg.gs_looks + 1) / cfg.gs_looks, alpha=cfg.alpha)


def method_rejections(arms: Arms, cfg: SimulationConfig, design: GroupSequentialBounds, *,
                      with_srm: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return, per method, (rejected at look: bool (experiments, its looks), look indices).

    A look with zero variance (no conversions yet in either arm) never rejects.
    """
    d, v, valid = _wald(arms)
    z = d / np.sqrt(v)
    z_crit = norm.isf(cfg.alpha / 2.0)
    every = np.arange(cfg.looks)
    n_total = arms.n_control + arms.n_treatment
    fixed_look = math.ceil(cfg.fixed_horizon_units / cfg.batch) - 1
    gs_looks = np.round(cfg.looks * np.arange(1, cfg.gs_looks + 1) / cfg.gs_looks).astype(int) - 1
    out = {
        "naive_z": (valid & (np.abs(z) >= z_crit), every),
        "fixed_horizon_z": (valid[:, [fixed_look]] & (np.abs(z[:, [fixed_look]]) >= z_crit),
                            np.array([fixed_look])),
        "msprt": (valid & (mixture_p_value(d, v, cfg.design_effect**2) <= cfg.alpha), every),
        "confidence_sequence": (valid & (confidence_sequence_p_value(
            d, v, n_total, alpha=cfg.alpha, n_star=2 * cfg.fixed_horizon_units) <= cfg.alpha),
            every),
        "group_sequential": (valid[:, gs_looks] & (np.abs(z[:, gs_looks]) >= np.asarray(design.z)),
                             gs_looks),
    }
    if with_srm:
        counts = np.stack([arms.n_control, arms.n_treatment], axis=-1)
        log_bf = srm_log_bayes_factor(counts, (0.5, 0.5), concentration=cfg.srm_concentration)
        out["sequential_srm"] = (log_bf >= math.log(1.0 / cfg.alpha), every)
    return out


def summarise(rejected: np.ndarray, look_indices: np.ndarray, arms: Arms) -> dict[str, Any]:
    """Return rejection rate, its MC standard error and mean units per arm at stopping."""
    experiments = rejected.shape[0]
    ever = rejected.any(axis=1)
    stop = np.where(ever, rejected.argmax(axis=1), rejected.shape[1] - 1)
    units = arms.units_per_arm[np.arange(experiments), look_indices[stop]]
    rate = float(ever.mean())
    return {"looks": int(look_indices.size), "rejection_rate": rate,
            "mc_se": math.sqrt(rate * (1 - rate) / experiments),
            "mean_units_per_arm_at_stop": float(units.mean()),
            "mean_units_se": float(units.std(ddof=1) / math.sqrt(experiments))
            if experiments > 1 else 0.0}


def run_study(cfg: SimulationConfig) -> dict[str, Any]:
    """Return the JSON-ready table of the study described by ``cfg``."""
    cfg.validate()
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    design = group_sequential_design(cfg)
    lifts = {"aa": 0.0, "ab": cfg.design_lift, "ab_large": cfg.design_lift * cfg.large_lift_factor}
    scenarios = {}
    for (name, lift), seed in zip(lifts.items(), seeds):
        p_t = cfg.baseline * (1 + lift)
        arms = simulate_arms(np.random.default_rng(seed), cfg.experiments, cfg.looks, cfg.batch,
                             cfg.baseline, p_t)
        methods = method_rejections(arms, cfg, design, with_srm=(name == "aa"))
        scenarios[name] = {"p_control": cfg.baseline, "p_treatment": p_t, "relative_lift": lift,
                           "methods": {m: summarise(r, idx, arms)
                                       for m, (r, idx) in methods.items()}}
    return {
        "config": asdict(cfg),
        "design": {
            "fixed_horizon_units_per_arm": cfg.fixed_horizon_units,
            "design_effect_absolute": cfg.design_effect,
            "msprt_tau2": cfg.design_effect**2,
            "confidence_sequence_n_star": 2 * cfg.fixed_horizon_units,
            "group_sequential": design.to_dict(),
            "group_sequential_units_per_arm": [cfg.batch * round(cfg.looks * k / cfg.gs_looks)
                                               for k in range(1, cfg.gs_looks + 1)],
        },
        "scenarios": scenarios,
    }


def format_table(result: dict[str, Any]) -> str:
    """Return a short human-readable table of a :func:`run_study` result."""
    cfg, sc = result["config"], result["scenarios"]
    lines = [f"{cfg['experiments']} experiments, look every {cfg['batch']} units/arm up to "
             f"{cfg['max_units']}/arm, alpha {cfg['alpha']}; fixed horizon "
             f"{result['design']['fixed_horizon_units_per_arm']}/arm for "
             f"+{cfg['design_lift']:.0%} on {cfg['baseline']}",
             f"{'method':<20} {'looks':>5} {'A/A FPR (se)':>16} "
             f"{'power +' + format(sc['ab']['relative_lift'], '.0%'):>14} {'units/arm':>9} "
             f"{'power +' + format(sc['ab_large']['relative_lift'], '.0%'):>14} {'units/arm':>9}"]
    for method, aa in sc["aa"]["methods"].items():
        row = f"{method:<20} {aa['looks']:>5} {aa['rejection_rate']:>8.3f} ({aa['mc_se']:.3f})"
        for name in ("ab", "ab_large"):
            m = sc[name]["methods"].get(method)
            row += (f" {m['rejection_rate']:>14.3f} {m['mean_units_per_arm_at_stop']:>9.0f}"
                    if m else f" {'-':>14} {'-':>9}")
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the study, write the JSON table, print the human table."""
    parser = argparse.ArgumentParser(prog="python -m analysis.simulation",
                                     description="A/A and A/B simulation of sequential tests.")
    defaults = SimulationConfig()
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--experiments", type=int, default=defaults.experiments)
    parser.add_argument("--max-units", type=int, default=defaults.max_units,
                        help="units per arm at the last look")
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="units per arm between looks")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--baseline", type=float, default=defaults.baseline)
    parser.add_argument("--lift", type=float, default=defaults.design_lift,
                        help="relative design effect (0.15 = +15%%)")
    args = parser.parse_args(argv)
    cfg = SimulationConfig(experiments=args.experiments, max_units=args.max_units,
                           batch=args.batch, seed=args.seed, alpha=args.alpha,
                           baseline=args.baseline, design_lift=args.lift)
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    result = {"command": ("python -m analysis.simulation " + " ".join(
        f"--{k} {v}" for k, v in (("out", args.out), ("experiments", cfg.experiments),
                                  ("max-units", cfg.max_units), ("batch", cfg.batch),
                                  ("seed", cfg.seed), ("alpha", cfg.alpha),
                                  ("baseline", cfg.baseline), ("lift", cfg.design_lift)))),
              **run_study(cfg)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(format_table(result))
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

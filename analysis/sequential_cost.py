"""What anytime validity costs in sample size: the plan's sequential penalty. Pure.

The engine decides with an anytime-valid test on the relative lift (analysis.verdict:
the asymptotic confidence sequence with N* = :data:`DEFAULT_N_STAR`, or the mixture SPRT
with its default mixing variance). Its rejection boundary, in standard errors of the
estimate, is c(N) = half width / se, which depends only on the total units N (not on the
metric): ``confidence_sequence_halfwidth`` or ``mixture_halfwidth`` at variance 1. A
fixed-horizon test's boundary is z_(1-alpha/2) at every N.

Two honest numbers, both computed from the engine's own kernels:

- :func:`sequential_cost` ``n_*_max``: the units per arm at which the anytime-valid test,
  read once at the end, has the planned power against the MDE: the smallest n with
  Phi(|effect| / se(n) - c(N(n))) >= power. Reading it continuously can only reject
  earlier, so this bounds the sample the experiment needs; ``extra_fraction`` is how much
  larger it is than the fixed-horizon sample (the price of peeking safely).
- :func:`simulate_stopping`: a seeded vectorised simulation of experiments with the MDE as
  true effect, looked at ``looks`` times up to that bound: the power and the mean units per
  arm at stopping (an anytime-valid test usually stops before the bound; against the
  fixed horizon it is then cheaper or dearer depending on the effect).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize
from scipy.stats import norm

from analysis.planning import SamplePlan
from analysis.sequential import (DEFAULT_N_STAR, confidence_sequence_halfwidth,
                                 confidence_sequence_p_value, default_tau2, mixture_halfwidth,
                                 mixture_p_value)

SEQUENTIAL_METHODS = ("sequential", "msprt")


def boundary_z(method: str, n_total: float, alpha: float, n_star: float = DEFAULT_N_STAR) -> float:
    """Return the anytime-valid rejection boundary in standard errors at ``n_total`` units.

    "sequential": the asymptotic confidence sequence (Waudby-Smith et al., gbstats);
    "msprt": the normal-mixture SPRT with :func:`analysis.sequential.default_tau2`
    (Johari et al.). Both as analysis.verdict runs them.
    """
    if method == "sequential":
        return float(confidence_sequence_halfwidth(1.0, n_total, alpha=alpha, n_star=n_star))
    if method == "msprt":
        return float(mixture_halfwidth(1.0, default_tau2(n_total, n_star=n_star), alpha))
    raise ValueError(f"unknown sequential method {method!r}; valid: {', '.join(SEQUENTIAL_METHODS)}")


@dataclass(frozen=True)
class SequentialCost:
    """The anytime-valid test's sample for the plan's power, against the fixed horizon."""

    method: str
    n_star: float
    boundary_z_at_fixed_n: float
    fixed_z: float
    n_control_max: int
    n_treatment_max: int
    extra_fraction: float

    @property
    def width_ratio(self) -> float:
        """Return the anytime-valid interval's width over the fixed one at the fixed n."""
        return self.boundary_z_at_fixed_n / self.fixed_z

    def to_dict(self) -> dict[str, Any]:
        """Return the fields (and the width ratio) as a plain dict."""
        return {**asdict(self), "width_ratio": self.width_ratio}


def sequential_cost(plan: SamplePlan, method: str = "sequential", *,
                    n_star: float = DEFAULT_N_STAR) -> SequentialCost:
    """Return the units per arm the anytime-valid ``method`` needs for the plan's power.

    The effect in standard errors at n control units is |h| sqrt(n / (1 + 1/r)) (h the
    plan's effect size, r = n_t / n_c); the test read at the end rejects with probability
    about Phi(that - c(N)), N = n (1 + r). The plan's alpha is used two-sided, as the
    engine's tests are.
    """
    r = plan.treatment_share / (1.0 - plan.treatment_share)
    z_beta = norm.ppf(plan.power)
    fixed_n = plan.n_control

    def shortfall(n: float) -> float:
        return (abs(plan.effect_size) * math.sqrt(n / (1.0 + 1.0 / r))
                - boundary_z(method, n * (1.0 + r), plan.alpha, n_star) - z_beta)

    high = float(fixed_n)
    while shortfall(high) < 0:
        high *= 2.0
    n_max = optimize.brentq(shortfall, 1.0, high, xtol=1e-6) if shortfall(1.0) < 0 else 1.0
    n_control = math.ceil(n_max)
    return SequentialCost(method, n_star, boundary_z(method, fixed_n * (1.0 + r), plan.alpha, n_star),
                          float(norm.ppf(1.0 - plan.alpha / (2.0 if plan.two_sided else 1.0))),
                          n_control, math.ceil(n_max * r), n_control / fixed_n - 1.0)


@dataclass(frozen=True)
class SimulatedStopping:
    """Simulated experiments at the MDE, looked at ``looks`` times up to the bound."""

    experiments: int
    looks: int
    seed: int
    power: float
    mean_total_units_at_stop: float
    mean_total_units_at_stop_se: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return asdict(self)


def simulate_stopping(baseline: float, change: float, cost: SequentialCost, *, alpha: float,
                      treatment_share: float = 0.5, sd: float | None = None,
                      experiments: int = 1000, looks: int = 50,
                      seed: int = 20240601) -> SimulatedStopping:
    """Return power and mean total units (both arms) at stopping of the engine's test at the MDE.

    Units arrive in ``looks`` equal batches up to ``cost``'s bound; each unit goes to the
    treatment with probability ``treatment_share``. Proportions (``sd`` None) are Bernoulli
    with rates baseline and baseline + change; means are normal with sd ``sd``. At each look
    the relative lift and its delta-method variance (analysis.fixed.lift) feed the engine's
    current p-value (:func:`confidence_sequence_p_value` or :func:`mixture_p_value`); an
    experiment stops at its first p <= alpha. Vectorised over experiments, as
    analysis.simulation.
    """
    rng = np.random.default_rng(seed)
    total_max = cost.n_control_max + cost.n_treatment_max
    batch = math.ceil(total_max / looks)
    n_t = np.cumsum(rng.binomial(batch, treatment_share, size=(experiments, looks)), axis=1)
    n_c = batch * np.arange(1, looks + 1) - n_t
    mu_c, mu_t = baseline, baseline + change
    if sd is None:
        m_c = rng.binomial(np.diff(n_c, axis=1, prepend=0), mu_c).cumsum(axis=1) / n_c
        m_t = rng.binomial(np.diff(n_t, axis=1, prepend=0), mu_t).cumsum(axis=1) / n_t
        v_c, v_t = m_c * (1 - m_c), m_t * (1 - m_t)
    else:
        dc, dt = np.diff(n_c, axis=1, prepend=0), np.diff(n_t, axis=1, prepend=0)
        m_c = (rng.normal(mu_c * dc, sd * np.sqrt(dc))).cumsum(axis=1) / n_c
        m_t = (rng.normal(mu_t * dt, sd * np.sqrt(dt))).cumsum(axis=1) / n_t
        v_c = v_t = np.full(m_c.shape, sd * sd)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = m_t / m_c - 1.0
        v = v_t / (n_t * m_c**2) + v_c * m_t**2 / (n_c * m_c**4)
        valid = np.isfinite(d) & np.isfinite(v) & (v > 0)
        d, v = np.where(valid, d, 0.0), np.where(valid, v, 1.0)
        n_total = n_c + n_t
        if cost.method == "sequential":
            p = confidence_sequence_p_value(d, v, n_total, alpha=alpha, n_star=cost.n_star)
        else:
            p = mixture_p_value(d, v, default_tau2(v * n_total, n_star=cost.n_star))
    rejected = valid & (p <= alpha)
    ever = rejected.any(axis=1)
    stop = np.where(ever, rejected.argmax(axis=1), looks - 1)
    units = n_total[np.arange(experiments), stop].astype(float)
    return SimulatedStopping(experiments, looks, seed, float(ever.mean()), float(units.mean()),
                             float(units.std(ddof=1) / math.sqrt(experiments)))

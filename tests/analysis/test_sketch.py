"""Quantile sketch against numpy quantiles on raw data; histogram against numpy.histogram."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.sketch import Histogram, QuantileSketch

QS = [0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]


def assert_within_relative_error(sketch, values):
    for q in QS:
        exact = np.quantile(values, q, method="lower")
        assert abs(sketch.quantile(q) - exact) <= sketch.relative_accuracy * exact * (1 + 1e-9)


@pytest.mark.parametrize("accuracy", [0.01, 0.05])
@pytest.mark.parametrize("draw", ["lognormal", "pareto", "with_zeros"])
def test_quantiles_within_stated_relative_error_of_numpy(accuracy, draw):
    rng = np.random.default_rng(42)
    values = {"lognormal": rng.lognormal(3.0, 1.5, 100_000),
              "pareto": (rng.pareto(1.2, 100_000) + 1) * 5.0,
              "with_zeros": np.where(rng.random(50_000) < 0.3, 0.0,
                                     rng.exponential(100.0, 50_000))}[draw]
    sketch = QuantileSketch(accuracy).update(values)
    assert sketch.count == values.size
    assert_within_relative_error(sketch, values)


def test_merged_sketches_equal_the_sketch_of_concatenated_data():
    rng = np.random.default_rng(1)
    parts = [rng.lognormal(2, 1, int(rng.integers(1, 5000))) for _ in range(5)]
    merged = QuantileSketch()
    for part in parts:
        merged = merged + QuantileSketch().update(part)
    whole = QuantileSketch().update(np.concatenate(parts))
    assert merged == whole
    assert_within_relative_error(merged, np.concatenate(parts))


sketch_values = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e9)), max_size=50)


@settings(max_examples=100, deadline=None)
@given(sketch_values, sketch_values, sketch_values)
def test_sketch_merge_is_associative_commutative_and_round_trips(a, b, c):
    sa, sb, sc = (QuantileSketch().update(v) for v in (a, b, c))
    assert (sa + sb) + sc == sa + (sb + sc) == QuantileSketch().update(a + b + c)
    assert sa + sb == sb + sa
    assert QuantileSketch.from_dict(json.loads(json.dumps(sa.to_dict()))) == sa


def test_sketch_rejects_negative_values_and_mixed_accuracy():
    with pytest.raises(ValueError):
        QuantileSketch().update([1.0, -2.0])
    with pytest.raises(ValueError):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))
    with pytest.raises(ValueError):
        QuantileSketch().quantile(0.5)


EDGES = (-np.inf, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def test_histogram_counts_match_numpy_histogram():
    values = np.random.default_rng(3).beta(2, 5, 10_000)
    values[:10] = [0.0, 1.0, 0.1, 0.25, 0.5, -3.0, 0.9, 0.75, 1.0, 0.0]
    got = Histogram(EDGES).update(values)
    want, _ = np.histogram(values, bins=np.asarray(EDGES))
    assert got.counts == tuple(want)


ints = st.lists(st.integers(0, 100).map(lambda i: i / 100), max_size=50)


@settings(max_examples=100, deadline=None)
@given(ints, ints, ints)
def test_histogram_merge_is_associative_commutative_and_round_trips(a, b, c):
    ha, hb, hc = (Histogram(EDGES).update(v) for v in (a, b, c))
    assert (ha + hb) + hc == ha + (hb + hc) == Histogram(EDGES).update(a + b + c)
    assert ha + hb == hb + ha
    assert Histogram.from_dict(json.loads(json.dumps(ha.to_dict()))) == ha


def test_histogram_rejects_values_outside_edges_and_different_edges():
    with pytest.raises(ValueError, match="outside"):
        Histogram((0.0, 0.5, 1.0)).update([1.5])
    with pytest.raises(ValueError):
        Histogram((0.0, 1.0)).merge(Histogram((0.0, 2.0)))

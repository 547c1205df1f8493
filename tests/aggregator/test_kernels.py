"""The compiled paths of the aggregator's write path against their references.

* ``group_edges`` (hash group-by) against a per-row Python dict, compiled and as plain Python.
* ``wire.graph_arrays_from_proto`` with the compiled graph scan against the attribute-by-attribute
  read, on graphs with every unit shape (absent optionals, negative ints, logit tokens), and the
  same refusals for bad graphs (the scan's own byte-level checks: test_graph_scan.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from circuits_aggregator import _kernels
from circuits_aggregator.store import group_edges
from circuits_aggregator.testing import random_graph
from circuits_core import _graph_scan, wire
from circuits_core.aggregator_types import graph_fingerprint
from circuits_core.errors import InvalidArgument

compiled = pytest.mark.skipif(not (_graph_scan.available() and _kernels.COMPILED), reason="numba not installed")


def _brute(observe, sl, sn, tl, tn, w):
    out: dict[tuple, list] = {}
    for *key, x in zip(sl.tolist(), sn.tolist(), tl.tolist(), tn.tolist(), w.tolist()):
        observe(out, tuple(key), x)
    return out


def _unpack(k):
    k = np.asarray(k, dtype=np.int64)
    return list(zip(((k >> 52) & 0x7FF).tolist(), ((k >> 31) & 0x1FFFFF).tolist(), ((k >> 21) & 0x3FF).tolist(),
                    (k & 0x1FFFFF).tolist()))  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 7, 5000, 100_000])
def test_group_edges_matches_a_dict(brute, n):
    rng = np.random.default_rng(n)
    sl, tl = rng.integers(0, 3, n).astype(np.int32), rng.integers(0, 3, n).astype(np.int32)
    sn, tn = rng.integers(0, 9, n).astype(np.int32), rng.integers(0, 2_000_000, n).astype(np.int32) % 7
    w = rng.normal(size=n).round(3)  # dyadic-free but short: sums compared with a tolerance
    edges, single = group_edges(sl, sn, tl, tn, w)
    expected = _brute(brute.observe, sl, sn, tl, tn, w)
    got: dict[tuple, list] = {}
    for key, c, s, a, q, lo, hi in zip(_unpack(edges["k"].to_numpy()), *(edges[c].to_numpy().tolist() for c in (
            "count", "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max"))):  # fmt: skip
        got[key] = [c, s, a, q, lo, hi]
    for key, x in zip(_unpack(single["k"].to_numpy()), single["w"].to_numpy().tolist()):
        assert key not in got
        got[key] = [1, x, abs(x), x * x, x, x]
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert got[key][0] == want[0]
        assert got[key][1:] == pytest.approx(want[1:], rel=1e-12, abs=1e-12)
    assert sum(v[0] for v in got.values()) == n


@compiled
def test_group_by_key_compiled_equals_plain_python_and_numpy():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 50, 2000).astype(np.int64) << 40
    weights = rng.normal(size=2000)
    compiled = _kernels.group_by_key(keys, weights)
    with np.errstate(over="ignore"):  # the hash multiplies wrap on purpose
        plain = _kernels.group_by_key.py_func(keys, weights)
    g = compiled[0]
    assert g == plain[0] == len(np.unique(keys))
    for a, b in zip(compiled[1:], plain[1:]):
        np.testing.assert_array_equal(a[:g], b[:g])  # same row order -> bit-identical sums
    # the numpy fallback (no numba installed): the same groups and statistics, ordered by key
    sorted_ = _kernels.group_by_key_sorted(keys, weights)
    assert sorted_[0] == g
    order = np.argsort(compiled[1][:g])
    np.testing.assert_array_equal(compiled[1][:g][order], sorted_[1])
    np.testing.assert_array_equal(compiled[2][:g][order], sorted_[2])
    for a, b in zip(compiled[3:], sorted_[3:]):
        np.testing.assert_allclose(a[:g][order], b, rtol=1e-12, atol=1e-12)


def _proto(seed: int, **kw):
    g = random_graph(np.random.default_rng(seed), **{"n_neurons": 80, "n_edges": 400, "pool": 50, **kw})
    return wire.graph_to_proto(g)


def _same(a, b):
    assert graph_fingerprint(a) == graph_fingerprint(b)
    for name in ("graph_id", "source", "corpus_index", "logit_tokens", "model", "num_layers", "d_mlp"):
        assert getattr(a, name) == getattr(b, name), name


@compiled
@pytest.mark.parametrize("seed", range(6))
def test_scanned_units_equal_attribute_reads(seed):
    msg = _proto(seed)
    # shapes the scan must get right: negative layers, a large index, absent optionals, tokens
    assert msg.units[-2].layer == -1  # the embedding unit
    msg.units[1].ClearField("position")
    msg.units[2].ClearField("activation")
    msg.units[3].index = 2_000_000
    msg.units[4].label = "a label ünïcode"
    msg.units[5].labels.add(text="x", score_detection=0.5)
    msg.units[-1].token = " Paris ünï"
    fast = wire.graph_arrays_from_proto(msg, source="t", fast=True)
    slow = wire.graph_arrays_from_proto(msg, source="t", fast=False)
    _same(fast, slow)
    assert fast.logit_tokens and fast.logit_tokens[0][1] == " Paris ünï"


@pytest.mark.parametrize("spoil", ["nan_activation", "no_kind", "inf_probability", "big_layer"])
def test_scan_refuses_what_the_reference_refuses(spoil):
    msg = _proto(11)
    u = msg.units[7]
    if spoil == "nan_activation":
        u.activation = float("nan")
    elif spoil == "no_kind":
        u.kind = 0
    elif spoil == "inf_probability":
        u.probability = float("inf")
    else:
        u.layer = 5000
    errors = []
    for fast in (True, False):
        with pytest.raises(InvalidArgument) as info:
            wire.graph_arrays_from_proto(msg, source="t", fast=fast)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("n", [0, 1, 3000, 70_000])  # 70k rows: the 256-partition path
def test_merge_partials_equals_regrouping_the_observations(n):
    """Partials of random slices of observations, merged, equal grouping all observations at once
    (counts, minima and maxima exactly; sums to rounding); compiled, plain Python and numpy agree."""
    rng = np.random.default_rng(n)
    keys = rng.integers(0, max(n // 3, 1), n).astype(np.int64) << 21
    weights = rng.normal(size=n)
    cuts = np.sort(rng.integers(0, n + 1, 4))
    parts = [_kernels.group_by_key_sorted(keys[a:b], weights[a:b]) for a, b in zip([0, *cuts], [*cuts, n])]
    columns = [np.concatenate([p[i + 1][: p[0]] for p in parts]) for i in range(7)]
    want = _kernels.group_by_key_sorted(keys, weights)
    results = [_kernels.merge_partials(*columns), _kernels.merge_partials_sorted(*columns)]
    if _kernels.COMPILED:
        with np.errstate(over="ignore"):  # the hash multiplies wrap on purpose
            results.append(_kernels.merge_partials.py_func(*columns))
    for got in results:
        g = got[0]
        assert g == want[0]
        order = np.argsort(got[1][:g])
        np.testing.assert_array_equal(got[1][:g][order], want[1])
        np.testing.assert_array_equal(got[2][:g][order], want[2])
        for a, b in zip(got[3:6], want[3:6]):
            np.testing.assert_allclose(a[:g][order], b, rtol=1e-12, atol=1e-12)
        for a, b in zip(got[6:], want[6:]):
            np.testing.assert_array_equal(a[:g][order], b)

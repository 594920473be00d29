"""Adversarial numerics: normlab is no less accurate than torch.nn on every row of the table.

The table in docs/reliability.md is ``benchmarks/numerics.py``'s output; this test runs the same
``measure()`` (same cases, dtypes, seed and error metric) and asserts, for every row and every
normlab front end measured there (``nn``, ``layers``, ``kernels``)::

    err_normlab <= max(1.5 * err_torch, err_torch + 2 * eps_dtype)

The slack: the errors are of the order of the dtype's rounding (eps_dtype = 2**-23 for float32,
2**-10 for float16, 2**-7 for bfloat16), where two correct implementations land a few roundings
apart depending on summation order; "no worse" means no worse beyond that noise. A row where
torch is finite and normlab is not (inf/NaN) always fails.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "numerics.py"
_spec = importlib.util.spec_from_file_location("normlab_bench_numerics", _PATH)
numerics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(numerics)

EPS_OF = {name: torch.finfo(t).eps for name, (t, _) in numerics.DTYPES.items()}
ULPS = 2
RATIO = 1.5
FRONT_ENDS = ("nn", "layers", "kernels")


def allowed(torch_err: float, dtype: str) -> float:
    return max(RATIO * torch_err, torch_err + ULPS * EPS_OF[dtype])


@pytest.fixture(scope="module")
def rows():
    return numerics.measure()


def test_table_covers_every_case_dtype_and_quantity(rows):
    keys = {(r["case"], r["dtype"], r["quantity"]) for r in rows}
    for case in numerics.CASES:
        for dtype in numerics.DTYPES:
            if (dtype, case) in numerics.SKIP:
                continue
            for q in ("batch_norm", "batch_norm dx", "layer_norm", "group_norm"):
                assert (case, dtype, q) in keys
    assert all(r["nn"] is not None and r["torch"] is not None for r in rows)
    # layers run every NumPy dtype, kernels float32
    assert all(r["layers"] is not None for r in rows if r["dtype"] != "bfloat16")
    assert all(r["kernels"] is not None for r in rows if r["dtype"] == "float32")


def test_normlab_no_worse_than_torch(rows):
    worse = []
    for r in rows:
        bound = allowed(r["torch"], r["dtype"])
        for fe in FRONT_ENDS:
            e = r[fe]
            if e is None:
                continue
            if math.isinf(e) or math.isnan(e) or e > bound:
                worse.append(f"{r['case']} / {r['dtype']} / {r['quantity']}: normlab {fe} "
                             f"{e:.3g} > allowed {bound:.3g} (torch {r['torch']:.3g})")
    assert not worse, "normlab less accurate than torch.nn:\n" + "\n".join(worse)


def test_float32_offsets_keep_full_accuracy(rows):
    """The point of the float64-accumulating kernels: a mean/std ratio up to 1e7 costs nothing
    in float32 (error a few float32 roundings), where one-pass float32 statistics lose digits."""
    for r in rows:
        if r["dtype"] == "float32" and r["case"].startswith("offset"):
            for fe in FRONT_ENDS:
                assert r[fe] <= 4 * EPS_OF["float32"], (r, fe)


def test_measure_detects_a_wrong_result(monkeypatch):
    """The metric is not blind: a normlab batch_norm off by 1% shows up as a 1e-2 error."""
    good = numerics.NORMLAB_NN["batch_norm"]
    monkeypatch.setitem(numerics.NORMLAB_NN, "batch_norm", lambda x: good(x) * 1.01)
    (row,) = [r for r in numerics.measure(cases=["offset 1e2"], dtypes=["float32"])
              if r["quantity"] == "batch_norm"]
    assert row["nn"] > 5e-3
    assert row["nn"] > allowed(row["torch"], "float32")

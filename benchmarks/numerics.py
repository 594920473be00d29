"""Adversarial numerics: normlab vs torch.nn against the float64 reference; prints a markdown table.

    python benchmarks/numerics.py            # the table published in docs/reliability.md

For every case (a data distribution that breaks naive normalization) and dtype, the input is
drawn in float64, rounded to the dtype, and each implementation normalizes that same rounded
tensor. The float64 reference (``normlab.reference``) normalizes it too (in float64), and the
error of an implementation is the normwise relative error

    err = max |y - y_ref| / max |y_ref|

(elementwise relative error is meaningless where y_ref crosses 0). Measured:

* ``nn``: ``normlab.nn.functional`` (fused numba ops for float32, the torch composite for
  16-bit dtypes), the forward output and, for batch norm, the input gradient ``dx``;
* ``layers``: ``normlab.layers`` (float16 too; NumPy has no bfloat16);
* ``kernels``: the numba backend directly (float32);
* ``torch``: ``torch.nn.functional`` on the same tensor.

tests/test_adversarial.py imports ``measure`` from here and asserts normlab <= torch (with
slack) for every row, so the published table and the test are the same computation.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as TF

from normlab import layers as L
from normlab import reference as R
from normlab.kernels import get_backend
from normlab.nn import functional as NF

EPS = 1e-5
SHAPE = (16, 4, 32)     # (N, C, L): 512 values per channel for BN, 128 per row for LN

# name -> (description, generator(rng, shape) -> float64 array)
CASES = {
    "offset 1e2": ("mean/std = 1e2", lambda g, s: 1e2 + g.standard_normal(s)),
    "offset 1e4": ("mean/std = 1e4", lambda g, s: 1e4 + g.standard_normal(s)),
    "offset 1e5": ("mean/std = 1e5", lambda g, s: 1e5 + g.standard_normal(s)),
    "offset 1e7": ("mean/std = 1e7 (float32 keeps ~1 bit of the spread)",
                   lambda g, s: 1e7 + 4 * g.standard_normal(s)),
    "near-constant": ("5 + 1e-3 * N(0, 1): var 1e-6 ~ eps",
                      lambda g, s: 5.0 + 1e-3 * g.standard_normal(s)),
    "huge 1e30": ("1e30 * N(0, 1): squares overflow float32",
                  lambda g, s: 1e30 * g.standard_normal(s)),
    "tiny 1e-30": ("1e-30 * N(0, 1): squares underflow float32",
                   lambda g, s: 1e-30 * g.standard_normal(s)),
    "wide range": ("N(0, 1) * 10^U(-8, 8) per element",
                   lambda g, s: g.standard_normal(s) * 10.0 ** g.uniform(-8, 8, s)),
}

DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
          "bfloat16": (torch.bfloat16, None)}

# 16-bit dtypes cannot hold some cases at all (1e30 and 1e-30 are outside float16's range,
# 1e4 + N(0,1) in float16 has a spacing of 8): those rows measure nothing and are left out.
SKIP = {("float16", c) for c in ("huge 1e30", "tiny 1e-30", "offset 1e4", "offset 1e5", "offset 1e7",
                                 "wide range")} | \
       {("bfloat16", c) for c in ("offset 1e4", "offset 1e5", "offset 1e7", "wide range")}

METHODS = ("batch_norm", "layer_norm", "group_norm")


def _err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    scale = float(np.max(np.abs(ref)))
    if not np.all(np.isfinite(y)):
        return math.inf
    if scale == 0.0:
        return float(np.max(np.abs(y)))
    return float(np.max(np.abs(y - ref)) / scale)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _case_data(case: str, seed: int = 0):
    gen = CASES[case][1]
    return gen(np.random.default_rng(seed), SHAPE)


def _references(x64: np.ndarray, dy64: np.ndarray, C: int):
    ref = {}
    y, cache = R.batch_norm_forward(x64, eps=EPS)
    ref["batch_norm"] = y
    ref["batch_norm dx"] = R.batch_norm_backward(dy64, cache)[0]
    ref["layer_norm"] = R.layer_norm_forward(x64, (x64.shape[-1],), eps=EPS)[0]
    ref["group_norm"] = R.group_norm_forward(x64, 2, eps=EPS)[0]
    return ref


def _torch_like(x: torch.Tensor, dy: torch.Tensor, fns) -> dict:
    """Forward of the three methods and BN's dx with a torch.nn.functional-like API ``fns``."""
    out = {}
    xr = x.clone().requires_grad_(True)
    y = fns["batch_norm"](xr)
    (dx,) = torch.autograd.grad(y, xr, dy)
    out["batch_norm"], out["batch_norm dx"] = _np(y), _np(dx)
    out["layer_norm"] = _np(fns["layer_norm"](x))
    out["group_norm"] = _np(fns["group_norm"](x))
    return out


TORCH = {
    "batch_norm": lambda x: TF.batch_norm(x, None, None, training=True, eps=EPS),
    "layer_norm": lambda x: TF.layer_norm(x, (x.shape[-1],), eps=EPS),
    "group_norm": lambda x: TF.group_norm(x, 2, eps=EPS),
}
NORMLAB_NN = {
    "batch_norm": lambda x: NF.batch_norm(x, None, None, training=True, eps=EPS),
    "layer_norm": lambda x: NF.layer_norm(x, (x.shape[-1],), eps=EPS),
    "group_norm": lambda x: NF.group_norm(x, 2, eps=EPS),
}


def _layers(xn: np.ndarray, dyn: np.ndarray) -> dict:
    C = xn.shape[1]
    bn = L.BatchNorm(C, eps=EPS, affine=False, track_running_stats=False, dtype=xn.dtype)
    y = bn.forward(xn)
    dx = bn.backward(dyn)
    ln = L.LayerNorm(xn.shape[-1], eps=EPS, elementwise_affine=False, dtype=xn.dtype)
    gn = L.GroupNorm(2, C, eps=EPS, affine=False, dtype=xn.dtype)
    return {"batch_norm": y, "batch_norm dx": dx, "layer_norm": ln.forward(xn),
            "group_norm": gn.forward(xn)}


def _kernels(xn: np.ndarray, dyn: np.ndarray) -> dict:
    be = get_backend("numba", dtype=xn.dtype)
    y, mean, var, rstd = be.batch_norm_forward(xn, None, None, EPS)
    dx, _, _ = be.batch_norm_backward(dyn, xn, None, mean, rstd, training=True,
                                      need_weight_grad=False, need_bias_grad=False)
    return {"batch_norm": y, "batch_norm dx": dx,
            "layer_norm": be.layer_norm_forward(xn, (xn.shape[-1],), None, None, EPS)[0],
            "group_norm": be.group_norm_forward(xn, 2, None, None, EPS)[0]}


def measure(cases=None, dtypes=None, seed: int = 0) -> list:
    """One dict per (case, dtype, quantity): errors of nn, layers, kernels and torch (None: n/a)."""
    rows = []
    for case in (cases or CASES):
        for dname in (dtypes or DTYPES):
            if (dname, case) in SKIP:
                continue
            tdtype, ndtype = DTYPES[dname]
            x = torch.from_numpy(_case_data(case, seed)).to(tdtype)
            dy = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(SHAPE)).to(tdtype)
            x64, dy64 = _np(x), _np(dy)      # the rounded input, exactly, in float64
            ref = _references(x64, dy64, SHAPE[1])
            with np.errstate(all="ignore"):
                impl = {"nn": _torch_like(x, dy, NORMLAB_NN), "torch": _torch_like(x, dy, TORCH)}
                if ndtype is not None:
                    impl["layers"] = _layers(x64.astype(ndtype), dy64.astype(ndtype))
                if dname == "float32":
                    impl["kernels"] = _kernels(x64.astype(ndtype), dy64.astype(ndtype))
            for q in ("batch_norm", "batch_norm dx", "layer_norm", "group_norm"):
                row = {"case": case, "dtype": dname, "quantity": q}
                for name in ("nn", "layers", "kernels", "torch"):
                    row[name] = _err(impl[name][q], ref[q]) if name in impl else None
                rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "**inf/NaN**"
    return "0" if v == 0 else f"{v:.1e}"


def markdown(rows) -> str:
    lines = ["| case | dtype | quantity | normlab nn | normlab layers | normlab kernels | torch.nn |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['quantity']} | {_fmt(r['nn'])} | "
                     f"{_fmt(r['layers'])} | {_fmt(r['kernels'])} | {_fmt(r['torch'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"<!-- generated by `python benchmarks/numerics.py` (torch {torch.__version__}, "
          f"numpy {np.__version__}); shape (N, C, L) = {SHAPE}, eps = {EPS}; "
          f"error = max|y - y_ref| / max|y_ref| vs normlab.reference in float64 -->")
    print(markdown(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

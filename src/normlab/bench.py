r"""``normlab bench``: our kernels against torch.nn.functional and against the memory-copy limit.

What is measured (``/work/shared/design/PERFORMANCE.md``; the method in ``benchmarks/README.md``)::

    ours      normlab.kernels.get_backend(--backend) called on NumPy arrays (arrays in, arrays out)
    torch     torch.nn.functional on tensors that share ours' memory: same dtype, same layout
              (channels-last = torch.channels_last / channels_last_3d memory format)
    copy      np.copyto(dst, x) for the same number of bytes, measured in the same run
    numpy     tabular cases only: the BN-tutorial NumPy code (np.mean, np.var, broadcasting)
              and scikit-learn's StandardScaler, against our train / eval forward

    modes     eval (BN with given statistics), fwd (training forward: statistics from x),
              bwd (gradients of x, weight, bias from a saved forward), fwd+bwd
    bytes     units * x.nbytes, units = 2 (eval, fwd: read x, write y), 3 (bwd: read x, dy,
              write dx), 5 (fwd+bwd); per-channel and per-row vectors are ignored
    GB/s      bytes / median time;  % copy = GB/s / copy GB/s (copy moves 2 * x.nbytes)
    speedup   torch time / our time (> 1: ours is faster)

Timing: each case first runs ours on a small input of the same method, dtype, layout and rank
(the numba JIT compile, or its cache load, lands there: reported as compile time), then checks
once that ours matches torch (and the NumPy peers) on the benchmarked inputs, a disagreement
being settled by the float64 reference; then ``--repeat`` samples per implementation,
interleaved ours / torch / peers, each sample the mean of enough back-to-back calls to last
``--min-time`` seconds; the figure is the median sample.
Threads: torch and numba both use ``--threads`` (default: the cores this process may use).

Entry points: ``main(argv) -> exit code``, ``add_arguments(parser)`` (the CLI's subcommand reuses
the options) and ``run(args)``; ``build_suite``, ``run_suite`` and ``write_report`` for scripts
and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from normlab._machine import cpu_model, version

__all__ = ["Case", "add_arguments", "build_suite", "main", "run", "run_suite", "write_report",
           "TutorialBatchNorm"]

MiB = 1 << 20
BANDWIDTH_BYTES = 64 * MiB        # tensors at least this big count for the bandwidth summary
EPS = 1e-5                        # every method, ours and torch alike (RMSNorm too: explicit)
UNITS = {"eval": 2, "fwd": 2, "bwd": 3, "fwd+bwd": 5}
MODES = ("eval", "fwd", "bwd", "fwd+bwd")
# Parity of ours with torch, per dtype: max|ours - torch| / max(1, max|torch|) per output.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}
SKLEARN_TOLERANCE = 1e-4          # StandardScaler has no eps: (var + 1e-5) vs var, var ~ 4
SHORT = {"float32": "fp32", "float64": "fp64"}
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "KMP_BLOCKTIME",
              "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NORMLAB_BACKEND")
NOISY = 0.25                      # samples spread more than this (max - min over median): marked ~

# The suite of PERFORMANCE.md, sized for a CPU (benchmarks/README.md, "The suite and its sizes").
ROW_N = (256, 1024, 4096, 16384, 1000, 2041, 4005)
DECODE_M = (1, 8, 64)
DECODE_N = 4096
RESNET50_BN = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
RESNET_N = 32
GN_C = (320, 640, 1280)
GN_HW = (64, 32)
GN_GROUPS = 32
IN3D = (2, 32, 64, 64, 64)
TABULAR_M = (65536, 1 << 20)
TABULAR_C = (16, 128, 1024)
MAX_MB = 256                      # default cap on one tensor (tabular 1M-row cases are capped)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmarked input.

    ``shape`` is logical and channels-first: ``(N, C, *spatial)`` for the conv norms,
    ``(M, C)`` for tabular BN, ``(M, N)`` for the row norms (normalized over the last axis).
    With ``channels_last`` the arrays are stored ``(N, *spatial, C)`` and torch sees the same
    memory as a channels-last tensor.
    """

    method: str                   # batch_norm, layer_norm, rms_norm, group_norm, instance_norm
    shape: tuple
    dtype: str = "float32"
    channels_last: bool = False
    groups: int = 0               # group_norm only
    suite: str = "row"            # row, decode, conv, tabular, overhead
    quick: bool = False           # part of --quick
    note: str = ""                # e.g. why a size differs from the nominal one

    @property
    def layout(self) -> str:
        nd = len(self.shape)
        if self.method in ("layer_norm", "rms_norm") or nd == 2:
            return ""
        spatial = "DHW"[3 - (nd - 2):] if nd <= 5 else "S" * (nd - 2)
        return "N" + spatial + "C" if self.channels_last else "NC" + spatial

    @property
    def storage_shape(self) -> tuple:
        if self.channels_last:
            return (self.shape[0],) + tuple(self.shape[2:]) + (self.shape[1],)
        return tuple(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def name(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        parts = [self.method]
        if self.method == "batch_norm" and len(self.shape) == 2:
            parts.append("1d")
        if self.layout:
            parts.append(self.layout)
        parts.append(dims)
        if self.groups:
            parts.append(f"G={self.groups}")
        parts.append(SHORT.get(self.dtype, self.dtype))
        return " ".join(parts)

    @property
    def modes(self) -> tuple:
        return MODES if self.method == "batch_norm" else MODES[1:]


def _rows_for(n: int, itemsize: int, target: int) -> int:
    return max(1, -(-target // (n * itemsize)))


def build_suite(*, dtype: str = "suite", quick: bool = False, max_mb: float = MAX_MB,
                cases: str | None = None) -> list[Case]:
    """The case list: the full suite, or the ``--quick`` subset; then the ``--cases`` regex.

    ``dtype``: ``"suite"`` (fp32 everywhere, and fp64 too for tabular BN, as PERFORMANCE.md
    lists), ``"float32"``, ``"float64"`` or ``"both"``. Sizes are chosen in fp32 so that fp32 and
    fp64 run the same shapes, except that no tensor may exceed ``max_mb`` MiB: tabular cases
    above it lose rows (the case's note says from how many) and a capped case that lands on
    another case's shape is dropped.
    """
    if dtype not in ("suite", "float32", "float64", "both"):
        raise ValueError(f"dtype must be suite, float32, float64 or both, got {dtype!r}")

    def dtypes(suite: str) -> tuple:
        if dtype == "suite":
            return ("float32", "float64") if suite == "tabular" else ("float32",)
        return ("float32", "float64") if dtype == "both" else (dtype,)

    out: list[Case] = []
    # Row norms at bandwidth size: M rows so that the fp32 tensor is >= 64 MiB.
    for method in ("layer_norm", "rms_norm"):
        for n in ROW_N:
            m = _rows_for(n, 4, BANDWIDTH_BYTES)
            for dt in dtypes("row"):
                out.append(Case(method, (m, n), dt, suite="row",
                                quick=(method, n) in (("layer_norm", 1024), ("rms_norm", 4096))))
    # Decode-like: a handful of rows of a wide hidden state (per-call overhead dominates).
    for method in ("layer_norm", "rms_norm"):
        for m in DECODE_M:
            for dt in dtypes("decode"):
                out.append(Case(method, (m, DECODE_N), dt, suite="decode",
                                quick=(method == "layer_norm" and m == 8)))
    # Conv norms, NCHW and channels-last.
    for chw in RESNET50_BN:
        for cl in (False, True):
            for dt in dtypes("conv"):
                out.append(Case("batch_norm", (RESNET_N,) + chw, dt, channels_last=cl, suite="conv",
                                quick=chw == (256, 56, 56)))
    for c in GN_C:
        for hw in GN_HW:
            n = _rows_for(c * hw * hw, 4, BANDWIDTH_BYTES)
            for cl in (False, True):
                for dt in dtypes("conv"):
                    out.append(Case("group_norm", (n, c, hw, hw), dt, channels_last=cl,
                                    groups=GN_GROUPS, suite="conv", quick=(c, hw) == (320, 64)))
    for cl in (False, True):
        for dt in dtypes("conv"):
            out.append(Case("instance_norm", IN3D, dt, channels_last=cl, suite="conv",
                            quick=not cl))
    # Tabular BN (N, C): the scaler's job, with the NumPy tutorial code and StandardScaler.
    cap = int(max_mb * MiB)
    seen = set()
    for dt in dtypes("tabular"):
        item = np.dtype(dt).itemsize
        for m in TABULAR_M:
            for c in TABULAR_C:
                rows, note = m, ""
                if m * c * item > cap:
                    rows = max(1, cap // (c * item))
                    note = f"rows capped from {m} (one tensor <= {max_mb:g} MiB)"
                if (rows, c, dt) in seen:
                    continue
                seen.add((rows, c, dt))
                out.append(Case("batch_norm", (rows, c), dt, suite="tabular", note=note,
                                quick=(m, c, dt) == (65536, 128, "float32")))
    # Per-call overhead: tiny inputs.
    for method, shape, groups in (("layer_norm", (8, 64), 0), ("rms_norm", (8, 64), 0),
                                  ("batch_norm", (8, 64), 0), ("batch_norm", (8, 64, 4, 4), 0),
                                  ("group_norm", (8, 64, 4, 4), GN_GROUPS),
                                  ("instance_norm", (8, 64, 4, 4), 0)):
        for dt in dtypes("overhead"):
            out.append(Case(method, shape, dt, groups=groups, suite="overhead",
                            quick=shape == (8, 64) and method != "rms_norm"))
    if quick:
        out = [c for c in out if c.quick]
    if cases:
        pattern = re.compile(cases, re.IGNORECASE)
        out = [c for c in out if pattern.search(f"{c.suite} {c.name}")]
    return out


# ---------------------------------------------------------------------------------------------
# The NumPy peers of the tabular cases
# ---------------------------------------------------------------------------------------------

class TutorialBatchNorm:
    """The Batch Normalization a reader of a BN tutorial writes: np.mean, np.var, broadcasting.

    ``fit(X)`` normalizes a batch with its own statistics and moves the running averages
    toward them (``running = momentum * running + (1 - momentum) * batch``, the tutorial's
    convention); ``transform(X)`` normalizes with the running averages. Parameters and running
    statistics are kept in X's dtype, so fp32 in gives fp32 out, as ours does.
    """

    def __init__(self, gamma, beta, running_mean, running_var, *, eps: float = EPS,
                 momentum: float = 0.9):
        self.gamma, self.beta = gamma, beta
        self.running_mean, self.running_var = running_mean, running_var
        self.eps, self.momentum = eps, momentum

    def fit(self, X):
        mu = np.mean(X, axis=0)                                   # (C,)
        sigma2 = np.var(X, axis=0)                                # (C,)
        keep = X.dtype.type(self.momentum)
        self.running_mean = keep * self.running_mean + (1 - keep) * mu
        self.running_var = keep * self.running_var + (1 - keep) * sigma2
        return self.gamma * ((X - mu) / np.sqrt(sigma2 + X.dtype.type(self.eps))) + self.beta

    def transform(self, X):
        denom = np.sqrt(self.running_var + X.dtype.type(self.eps))
        return self.gamma * ((X - self.running_mean) / denom) + self.beta


# ---------------------------------------------------------------------------------------------
# One case: inputs, the callables of every implementation and mode, the parity check
# ---------------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    ours: dict[str, Callable] = field(default_factory=dict)
    torch: dict[str, Callable] = field(default_factory=dict)
    peers: dict[str, dict[str, Callable]] = field(default_factory=dict)   # mode -> peer -> fn
    check: list[dict] = field(default_factory=list)
    first_call_s: dict[str, float] = field(default_factory=dict)
    x: Any = None


def _torch_view(a: np.ndarray, case: Case):
    """The (N, C, *spatial) tensor over ``a``'s memory (channels-last when ``a`` is)."""
    import torch

    t = torch.from_numpy(a)
    return t.movedim(-1, 1) if case.channels_last else t


def _to_storage(t, case: Case) -> np.ndarray:
    t = t.detach()
    if case.channels_last:
        t = t.movedim(1, -1)
    return t.contiguous().numpy()


def _err(ours, ref) -> float:
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(b))))
    e = float(np.max(np.abs(a - b))) / scale
    return e if math.isfinite(e) else math.inf


class _Parity:
    """Ours against a peer, per output; a disagreement is settled by the float64 reference.

    When ``err(ours, peer) > tol`` the case's float64 reference (``normlab.reference``) is
    computed once, and the output passes if ours is within ``tol`` of it: then the peer is the
    one that is off (torch's fp32 statistics over a million rows are, by about 1e-4), and the
    item says so instead of blaming ours.
    """

    def __init__(self, reference: Callable[[], dict]):
        self.items: list[dict] = []
        self._reference, self._ref = reference, None

    def compare(self, output: str, against: str, ours, peer, tol: float) -> None:
        e = _err(ours, peer)
        item = dict(output=output, against=against, err=e, tol=tol, ok=bool(e <= tol))
        if not item["ok"]:
            if self._ref is None:
                self._ref = self._reference()
            ref = self._ref.get(output)
            if ref is not None:
                eo, ep = _err(ours, ref), _err(peer, ref)
                item.update(ours_vs_float64=eo, peer_vs_float64=ep, ok=bool(eo <= tol))
                item["detail"] = (f"vs the float64 reference: ours {eo:.2g}, {against} {ep:.2g}"
                                  + (f" ({against} is the one off)" if item["ok"] else ""))
        self.items.append(item)


def _reference_outputs(case: Case, x, dy, w, b, rm, rv) -> dict:
    """The float64 reference's outputs on the benchmarked inputs, in storage layout."""
    from normlab import reference as R

    m, cl = case.method, case.channels_last
    out = {}
    if m == "batch_norm":
        y, c = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl)
        out["y (eval)"] = R.batch_norm_forward(x, w, b, mean=rm, var=rv, eps=EPS, channels_last=cl)[0]
        grads = R.batch_norm_backward(dy, c)
    elif m == "layer_norm":
        y, c = R.layer_norm_forward(x, case.shape[-1:], w, b, eps=EPS)
        grads = R.layer_norm_backward(dy, c)
    elif m == "rms_norm":
        y, c = R.rms_norm_forward(x, case.shape[-1:], w, eps=EPS)
        grads = R.rms_norm_backward(dy, c)
    elif m == "group_norm":
        y, c = R.group_norm_forward(x, case.groups, w, b, eps=EPS, channels_last=cl)
        grads = R.group_norm_backward(dy, c)
    else:
        y, c = R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl)
        grads = R.instance_norm_backward(dy, c)
    del c
    out["y (fwd)"] = y
    out.update((k, g) for k, g in zip(("dx", "dweight", "dbias"), grads) if g is not None)
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _prepare(case: Case, be, rng: np.random.Generator) -> _Prepared:
    """Inputs, callables and the once-per-case parity check (whose first calls are timed)."""
    import torch
    import torch.nn.functional as F

    dt = np.dtype(case.dtype)
    x = rng.standard_normal(case.storage_shape, dtype=dt)
    x *= 2.0
    x += 1.0                                                 # mean 1, std 2: centering matters
    dy = rng.standard_normal(case.storage_shape, dtype=dt)
    m = case.method
    C = case.shape[1] if m not in ("layer_norm", "rms_norm") else case.shape[-1]
    w = (0.5 + rng.random(C)).astype(dt)
    b = (rng.random(C) - 0.5).astype(dt)
    rm = (rng.random(C) - 0.5).astype(dt)                     # given statistics (eval mode)
    rv = (0.5 + 3.0 * rng.random(C)).astype(dt)
    cl, eps, tol = case.channels_last, EPS, TOLERANCE[case.dtype]
    p = _Prepared(x=x)

    # --- ours: the kernel contract of normlab.kernels -------------------------------------
    if m == "batch_norm":
        fwd = lambda: be.batch_norm_forward(x, w, b, eps, channels_last=cl)  # noqa: E731
        p.ours["eval"] = lambda: be.batch_norm_forward(x, w, b, eps, channels_last=cl, mean=rm, var=rv)

        def bwd_of(out):
            return be.batch_norm_backward(dy, x, w, out[1], out[3], channels_last=cl)
    elif m == "layer_norm":
        ns = (case.shape[-1],)
        fwd = lambda: be.layer_norm_forward(x, ns, w, b, eps)  # noqa: E731

        def bwd_of(out):
            return be.layer_norm_backward(dy, x, ns, w, out[1], out[2])
    elif m == "rms_norm":
        ns = (case.shape[-1],)
        fwd = lambda: be.rms_norm_forward(x, ns, w, eps)  # noqa: E731

        def bwd_of(out):
            return be.rms_norm_backward(dy, x, ns, w, out[1])
    elif m == "group_norm":
        G = case.groups
        fwd = lambda: be.group_norm_forward(x, G, w, b, eps, channels_last=cl)  # noqa: E731

        def bwd_of(out):
            return be.group_norm_backward(dy, x, G, w, out[1], out[2], channels_last=cl)
    elif m == "instance_norm":
        fwd = lambda: be.instance_norm_forward(x, w, b, eps, channels_last=cl)  # noqa: E731

        def bwd_of(out):
            return be.instance_norm_backward(dy, x, w, out[1], out[3], channels_last=cl)
    else:
        raise ValueError(f"unknown method {m!r}")

    # First calls: the JIT compile (or the on-disk cache load) happens here, so time them.
    saved, p.first_call_s["fwd"] = _timed(fwd)
    ours_y = saved[0]
    if "eval" in case.modes:
        ours_eval, p.first_call_s["eval"] = _timed(p.ours["eval"])
    ours_grads, p.first_call_s["bwd"] = _timed(lambda: bwd_of(saved))
    _, p.first_call_s["fwd+bwd"] = _timed(lambda: bwd_of(fwd()))
    p.ours["fwd"] = fwd
    p.ours["bwd"] = lambda: bwd_of(saved)
    p.ours["fwd+bwd"] = lambda: bwd_of(fwd())

    # --- torch.nn.functional on the same memory -------------------------------------------
    xt, dyt = _torch_view(x, case), _torch_view(dy, case)
    wt, bt, rmt, rvt = (torch.from_numpy(v) for v in (w, b, rm, rv))
    if m == "batch_norm":
        def tf(xx, ww, bb):
            return F.batch_norm(xx, None, None, ww, bb, True, 0.0, eps)
        p.torch["eval"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, False, 0.0, eps)
    elif m == "layer_norm":
        def tf(xx, ww, bb):
            return F.layer_norm(xx, ns, ww, bb, eps)
    elif m == "rms_norm":
        def tf(xx, ww, bb):
            return F.rms_norm(xx, ns, ww, eps)
    elif m == "group_norm":
        def tf(xx, ww, bb):
            return F.group_norm(xx, G, ww, bb, eps)
    else:
        def tf(xx, ww, bb):
            return F.instance_norm(xx, None, None, ww, bb, True, 0.0, eps)
    xr = xt.detach().requires_grad_(True)
    wr = wt.detach().clone().requires_grad_(True)
    br = bt.detach().clone().requires_grad_(True)
    leaves = (xr, wr) if m == "rms_norm" else (xr, wr, br)
    p.torch["fwd"] = lambda: tf(xt, wt, bt)                 # no tensor requires grad: no graph
    graph = {"y": tf(xr, wr, br)}
    p.torch["bwd"] = lambda: torch.autograd.grad(graph["y"], leaves, dyt, retain_graph=True)
    p.torch["fwd+bwd"] = lambda: torch.autograd.grad(tf(xr, wr, br), leaves, dyt)

    # --- parity: ours vs torch, once, on the benchmarked inputs ----------------------------
    chk = _Parity(lambda: _reference_outputs(case, x, dy, w, b, rm, rv))
    if ours_y.dtype != dt:
        chk.items.append(dict(output="y dtype", against="x dtype", err=math.inf, tol=0.0, ok=False,
                              detail=f"ours returned {ours_y.dtype} for {dt} input"))
    chk.compare("y (fwd)", "torch", ours_y, _to_storage(p.torch["fwd"](), case), tol)
    if "eval" in case.modes:
        chk.compare("y (eval)", "torch", ours_eval[0], _to_storage(p.torch["eval"](), case), tol)
    for i, (o, t) in enumerate(zip(ours_grads, p.torch["bwd"]())):
        chk.compare(("dx", "dweight", "dbias")[i], "torch", o,
                    _to_storage(t, case) if i == 0 else t.detach().numpy(), tol)

    # --- tabular: the tutorial NumPy code and StandardScaler --------------------------------
    if case.suite == "tabular":
        from sklearn.preprocessing import StandardScaler

        tut = TutorialBatchNorm(w, b, rm.copy(), rv.copy())
        chk.compare("y (eval)", "tutorial", ours_eval[0], tut.transform(x), tol)
        chk.compare("y (fwd)", "tutorial", ours_y, tut.fit(x), tol)
        chk.compare("y (fwd)", "sklearn", ours_y, StandardScaler().fit_transform(x) * w + b,
                    max(tol, SKLEARN_TOLERANCE))
        fitted = StandardScaler().fit(x)
        p.peers["fwd"] = {"tutorial": lambda: tut.fit(x),
                          "sklearn": lambda: StandardScaler().fit_transform(x)}
        p.peers["eval"] = {"tutorial": lambda: tut.transform(x),
                           "sklearn": lambda: fitted.transform(x)}
    p.check = chk.items
    return p


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _sample(fn: Callable, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _calibrate(fn: Callable, min_time: float) -> int:
    """Calls per sample so that one sample lasts about ``min_time`` (one call when longer)."""
    t = _sample(fn, 1)
    if t >= min_time:
        return 1
    n = max(1, math.ceil(min_time / max(t, 1e-7)))
    if n > 1:                                      # refine on a batch: one call is noisy when tiny
        t = _sample(fn, min(n, 1000))
        n = max(1, math.ceil(min_time / max(t, 1e-9)))
    return min(n, 1_000_000)


def _time_many(fns: dict[str, Callable], repeat: int, min_time: float) -> dict[str, dict]:
    """Median of ``repeat`` samples per callable, the samples interleaved across callables."""
    numbers = {k: _calibrate(f, min_time) for k, f in fns.items()}
    samples: dict[str, list] = {k: [] for k in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for k, f in fns.items():
                samples[k].append(_sample(f, numbers[k]))
    finally:
        if was_enabled:
            gc.enable()
    return {k: dict(median_s=float(np.median(v)), min_s=float(min(v)), spread=_spread(v),
                    samples_s=[float(s) for s in v], number=numbers[k]) for k, v in samples.items()}


def _spread(v) -> float:
    """(max - min) / median of the samples: how noisy one figure is."""
    med = float(np.median(v))
    return float((max(v) - min(v)) / med) if med > 0 else 0.0


def copy_time(nbytes: int, dtype, repeat: int, min_time: float, src=None) -> float:
    """Median seconds of ``np.copyto(dst, src)`` for ``nbytes`` (dst allocated and touched first)."""
    if src is None:
        src = np.ones(max(1, nbytes // np.dtype(dtype).itemsize), dtype=dtype)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return _time_many({"copy": lambda: np.copyto(dst, src)}, repeat, min_time)["copy"]["median_s"]


# ---------------------------------------------------------------------------------------------
# Machine record
# ---------------------------------------------------------------------------------------------

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # not on Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> dict:
    """torch and numba both on ``n`` threads; returns what each actually uses."""
    import torch

    torch.set_num_threads(n)
    numba_threads: Any
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        numba_threads = numba.get_num_threads()
    except Exception as e:  # numba missing or its threading layer refused: say so
        numba_threads = f"unavailable ({e})"
    try:
        import numba

        layer = numba.threading_layer()             # known once a parallel kernel has run
    except Exception:
        layer = "not chosen yet"
    return {"requested": n, "torch": torch.get_num_threads(), "numba": numba_threads,
            "numba_threading_layer": layer,
            "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}


def _git_commit() -> str | None:
    """The checkout's short commit, ``-dirty`` when files differ from it (read-only git calls).

    ``NORMLAB_GIT_COMMIT``, if set, names it instead: for a copy of the tree on another machine,
    whose ``.git`` (if any) need not match the files."""
    told = os.environ.get("NORMLAB_GIT_COMMIT", "").strip() or None
    if told:
        return told
    try:
        root = str(Path(__file__).resolve().parents[2])
        r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        d = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "src"],
                           capture_output=True, text=True, timeout=5)
        u = subprocess.run(["git", "-C", root, "ls-files", "--others", "--exclude-standard", "--", "src"],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() + ("-dirty" if d.stdout.strip() or u.stdout.strip() else "")
    except Exception:
        return None


def machine_record(threads: dict, repeat: int, min_time: float) -> dict:
    """CPU, versions, threads and this run's reference copy bandwidth (64 MiB, fp32)."""
    import normlab

    t = copy_time(BANDWIDTH_BYTES, np.float32, repeat, min_time)
    src = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    t_alloc = _time_many({"c": lambda: src.copy()}, repeat, min_time)["c"]["median_s"]
    import torch

    ts, td = torch.from_numpy(src), torch.empty(src.shape, dtype=torch.float32)
    td.copy_(ts)
    t_torch = _time_many({"c": lambda: td.copy_(ts)}, repeat, min_time)["c"]["median_s"]
    return {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"normlab": normlab.__version__, "numpy": np.__version__,
                     "numba": version("numba"), "torch": version("torch"),
                     "scikit-learn": version("scikit-learn")},
        "threads": threads, "git_commit": _git_commit(),
        "copy_64MiB_GBps": 2 * BANDWIDTH_BYTES / t / 1e9,
        "copy_alloc_64MiB_GBps": 2 * BANDWIDTH_BYTES / t_alloc / 1e9,
        "copy_torch_64MiB_GBps": 2 * BANDWIDTH_BYTES / t_torch / 1e9,
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _fmt_t(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _case_record(case: Case) -> dict:
    return dict(name=case.name, suite=case.suite, method=case.method, shape=list(case.shape),
                storage_shape=list(case.storage_shape), dtype=case.dtype, layout=case.layout,
                channels_last=case.channels_last, groups=case.groups, nbytes=case.nbytes,
                bandwidth_sized=case.nbytes >= BANDWIDTH_BYTES, note=case.note)


def _probe_shape(case: Case) -> tuple:
    """The case with its leading (batch / row) axis cut down: same method, dtype, layout, rank
    and inner sizes, so that the backend dispatches to the same compiled kernels (the numba
    backend picks row or column kernels by plane size)."""
    lead = 64 if case.suite == "tabular" or len(case.shape) == 2 and case.method == "batch_norm" else 2
    return (min(case.shape[0], lead),) + tuple(case.shape[1:])


def _compile_probe(case: Case, be, seed: int) -> dict:
    """Compile time per mode: ours' first call minus its second on a small input (``_probe_shape``)
    of the case's method, dtype, layout and rank, so that no page-fault or cache cost of the big
    input (first touches are slow on a VM) is taken for compilation. Zero once numba has compiled (or loaded
    from its cache) that signature earlier in the run."""
    probe = _prepare(dataclasses.replace(case, shape=_probe_shape(case)), be,
                     np.random.default_rng(seed))
    return {m: max(0.0, probe.first_call_s[m] - _sample(probe.ours[m], 1)) for m in case.modes}


def run_case(case: Case, be, *, repeat: int, min_time: float, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Check, then time every mode of one case; a record for the JSON report."""
    rec = _case_record(case)
    rec.update(check={"ok": False, "items": []}, error=None, modes={})
    t_case = time.perf_counter()
    try:
        compile_s = _compile_probe(case, be, seed)
        p = _prepare(case, be, np.random.default_rng(seed))
    except Exception as e:  # a backend that cannot run this case: report it, go on
        rec["error"] = f"{type(e).__name__}: {e}"
        log(f"{case.name:<46} ERROR {rec['error']}")
        return rec
    rec["check"] = {"ok": all(i["ok"] for i in p.check), "items": p.check}
    if not rec["check"]["ok"]:
        bad = "; ".join(f"{i['output']} vs {i['against']}: err {i['err']:.2g} > tol {i['tol']:.0e}"
                        for i in p.check if not i["ok"])
        log(f"{case.name:<46} MISMATCH {bad}")
    t_copy = copy_time(case.nbytes, case.dtype, repeat, min_time, src=p.x)
    copy_gbps = 2 * case.nbytes / t_copy / 1e9
    rec.update(copy_s=t_copy, copy_GBps=copy_gbps)
    for mode in case.modes:
        fns = {"ours": p.ours[mode], "torch": p.torch[mode]}
        for peer, fn in p.peers.get(mode, {}).items():
            fns[peer] = fn
        timed = _time_many(fns, repeat, min_time)
        o, t = timed["ours"]["median_s"], timed["torch"]["median_s"]
        moved = UNITS[mode] * case.nbytes
        r = dict(units=UNITS[mode], bytes=moved, ours_s=o, torch_s=t, speedup=t / o,
                 ours_GBps=moved / o / 1e9, torch_GBps=moved / t / 1e9,
                 ours_pct_copy=100 * moved / o / 1e9 / copy_gbps,
                 torch_pct_copy=100 * moved / t / 1e9 / copy_gbps,
                 compile_s=compile_s[mode], ours_first_call_s=p.first_call_s[mode],
                 first_call_excess_s=max(0.0, p.first_call_s[mode] - o),
                 timings=timed, peers={})
        for peer in p.peers.get(mode, {}):
            ps = timed[peer]["median_s"]
            r["peers"][peer] = dict(s=ps, ratio=ps / o, GBps=moved / ps / 1e9)
        rec["modes"][mode] = r
        extra = "".join(f"  {k} {_fmt_t(v['s'])} (x{v['ratio']:.1f})" for k, v in r["peers"].items())
        log(f"{case.name:<46} {mode:<7} ours {_fmt_t(o):>10}  torch {_fmt_t(t):>10}  "
            f"x{r['speedup']:5.2f}  {r['ours_GBps']:6.1f} GB/s {r['ours_pct_copy']:4.0f}% copy{extra}")
    rec["wall_s"] = time.perf_counter() - t_case
    del p
    gc.collect()
    return rec


def _median(v):
    return float(np.median(v)) if v else None


def summarize(results: list[dict]) -> dict:
    """Suite-level figures: speedups vs torch, % of copy on bandwidth-sized cases, peers, checks."""
    rows = [(r, mode, d) for r in results if not r["error"] for mode, d in r["modes"].items()]
    sp = [(d["speedup"], r["name"], mode) for r, mode, d in rows]
    s: dict[str, Any] = {
        "cases": len(results), "errors": [r["name"] for r in results if r["error"]],
        "mismatches": [r["name"] for r in results if not r["error"] and not r["check"]["ok"]],
        "speedup_median": _median([v for v, _, _ in sp]),
        "speedup_min": min(sp)[0] if sp else None,
        "speedup_min_at": f"{min(sp)[1]} [{min(sp)[2]}]" if sp else None,
        "speedup_median_by_mode": {m: _median([d["speedup"] for _, mode, d in rows if mode == m])
                                   for m in MODES},
        "speedup_median_by_suite": {},
        "compile_s_total": sum(d["compile_s"] for _, _, d in rows),
        "noisy_figures": sum(t["spread"] > NOISY for _, _, d in rows for t in d["timings"].values()),
        "figures": sum(len(d["timings"]) for _, _, d in rows),
    }
    for suite in ("row", "decode", "conv", "tabular", "overhead"):
        v = [d["speedup"] for r, _, d in rows if r["suite"] == suite]
        if v:
            s["speedup_median_by_suite"][suite] = _median(v)
    bw = {}
    for mode in MODES:
        ours = [d["ours_pct_copy"] for r, m, d in rows if m == mode and r["bandwidth_sized"]]
        theirs = [d["torch_pct_copy"] for r, m, d in rows if m == mode and r["bandwidth_sized"]]
        if ours:
            bw[mode] = dict(cases=len(ours), ours_median=_median(ours), ours_min=min(ours),
                            torch_median=_median(theirs))
    s["pct_copy_bandwidth_sized"] = bw
    peers = {}
    for mode in ("fwd", "eval"):
        for peer in ("tutorial", "sklearn"):
            v = [d["peers"][peer]["ratio"] for _, m, d in rows if m == mode and peer in d["peers"]]
            if v:
                peers[f"{peer}/ours {mode}"] = dict(median=_median(v), min=min(v), cases=len(v))
    s["numpy_peers"] = peers
    ov = [(r["name"], d["ours_s"], d["torch_s"]) for r, m, d in rows
          if r["suite"] == "overhead" and m == "fwd"]
    s["overhead_fwd_us"] = [dict(case=n, ours=o * 1e6, torch=t * 1e6) for n, o, t in ov]
    s["peers_off_reference"] = [f"{r['name']}: {i['against']} {i['output']} off the float64 "
                                f"reference by {i['peer_vs_float64']:.2g} (ours {i['ours_vs_float64']:.2g})"
                                for r in results if not r["error"] for i in r["check"]["items"]
                                if i["ok"] and "peer_vs_float64" in i]
    return s


def summary_lines(s: dict) -> list[str]:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    out = [f"cases: {s['cases']}, parity mismatches: {len(s['mismatches'])}, errors: {len(s['errors'])}; "
           f"noisy figures (samples spread > {NOISY:.0%}): {s['noisy_figures']} of {s['figures']}"]
    for name in s["mismatches"]:
        out.append(f"  MISMATCH {name}")
    for name in s["errors"]:
        out.append(f"  ERROR {name}")
    out.append(f"speedup vs torch (torch time / ours): median x{f(s['speedup_median'])}, "
               f"min x{f(s['speedup_min'])} ({s['speedup_min_at']})")
    out.append("  median by mode: " + ", ".join(f"{m} x{f(v)}" for m, v in
                                                 s["speedup_median_by_mode"].items() if v is not None))
    out.append("  median by suite: " + ", ".join(f"{k} x{f(v)}" for k, v in
                                                  s["speedup_median_by_suite"].items()))
    for mode, d in s["pct_copy_bandwidth_sized"].items():
        out.append(f"% of copy bandwidth, {mode}, {d['cases']} cases >= 64 MiB: ours median "
                   f"{d['ours_median']:.0f}%, min {d['ours_min']:.0f}% "
                   f"(torch median {d['torch_median']:.0f}%)")
    for k, d in s["numpy_peers"].items():
        out.append(f"{k}: median x{d['median']:.1f}, min x{d['min']:.1f} ({d['cases']} cases)")
    if s["overhead_fwd_us"]:
        out.append("per-call overhead, forward: " + "; ".join(
            f"{d['case']} ours {d['ours']:.1f} us / torch {d['torch']:.1f} us" for d in s["overhead_fwd_us"]))
    for line in s["peers_off_reference"]:
        out.append(f"peer off, ours right: {line}")
    out.append(f"compile (first calls on small probe inputs, see the report): "
               f"{s['compile_s_total']:.1f} s in all")
    return out


def _backend_name(be) -> str:
    for attr in ("name", "NAME", "__name__"):
        v = getattr(be, attr, None)
        if isinstance(v, str) and v:
            return v
    return type(be).__name__


def run_suite(cases: list[Case], backend, *, repeat: int = 5, min_time: float = 0.05,
              threads: int | None = None, log: Callable[[str], None] = print,
              settings: dict | None = None) -> dict:
    """Run ``cases`` against ``backend`` (an object with the normlab.kernels functions)."""
    t0 = time.perf_counter()
    th = set_threads(threads or usable_cores())
    machine = machine_record(th, repeat, min_time)
    log(f"normlab bench: {len(cases)} cases on {machine['cpu']}, threads torch={th['torch']} "
        f"numba={th['numba']}; copy {machine['copy_64MiB_GBps']:.1f} GB/s (64 MiB np.copyto)")
    results = [run_case(c, backend, repeat=repeat, min_time=min_time, log=log) for c in cases]
    try:
        import numba

        th["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        pass
    report = {
        "schema": "normlab-bench/1",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu",
        "backend": _backend_name(backend),
        "settings": dict(settings or {}, repeat=repeat, min_time_s=min_time, eps=EPS,
                         bandwidth_min_bytes=BANDWIDTH_BYTES, tolerance=TOLERANCE),
        "machine": machine,
        "results": results,
    }
    report["summary"] = summarize(results)
    report["wall_s"] = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

_SUITE_TITLES = {
    "row": "Row norms (LayerNorm, RMSNorm), M rows x N, >= 64 MiB",
    "conv": "Conv norms, NCHW and channels-last",
    "tabular": "Tabular BatchNorm (M, C), with the NumPy tutorial code and StandardScaler",
    "decode": "Decode-like row norms (few rows)",
    "overhead": "Per-call overhead (tiny inputs)",
}


def _noisy(d: dict, who: str) -> str:
    return " ~" if d["timings"][who]["spread"] > NOISY else ""


def markdown(report: dict) -> str:
    m, s = report["machine"], report["summary"]
    v = m["versions"]
    L = [f"# normlab bench, {report['device']}, {report['created']}", "",
         f"- machine: {m['cpu']}; {m['usable_cores']} usable of {m['logical_cores']} logical cores; "
         f"{m['platform']}",
         f"- threads: torch {m['threads']['torch']}, numba {m['threads']['numba']} "
         f"(threading layer {m['threads'].get('numba_threading_layer')}); environment: "
         + (", ".join(f"{k}={v}" for k, v in m["threads"].get("env", {}).items())
            or "no thread variables set"),
         f"- versions: normlab {v['normlab']} (commit {m['git_commit']}), numpy {v['numpy']}, "
         f"numba {v['numba']}, torch {v['torch']}, scikit-learn {v['scikit-learn']}, "
         f"python {m['python']}",
         f"- backend (ours): `{report['backend']}`; settings: "
         + ", ".join(f"{k}={val}" for k, val in report["settings"].items() if k != "tolerance"),
         f"- copy bandwidth (np.copyto, 64 MiB fp32, 2 x bytes / time): "
         f"{m['copy_64MiB_GBps']:.1f} GB/s, the denominator of % copy (for reference: allocating "
         f"`x.copy()` {m['copy_alloc_64MiB_GBps']:.1f} GB/s, torch `y.copy_(x)` on "
         f"{m['threads']['torch']} threads {m['copy_torch_64MiB_GBps']:.1f} GB/s)",
         f"- wall time: {report['wall_s']:.0f} s", "",
         "speedup = torch time / our time; GB/s from the byte model (eval, fwd 2 x bytes(x), "
         "bwd 3x, fwd+bwd 5x); % copy = our GB/s / the same case's np.copyto GB/s. Times are "
         f"medians of interleaved samples; `~` marks a figure whose samples spread more than "
         f"{NOISY:.0%} (max - min over median: a noisy machine). Method: benchmarks/README.md.", "",
         "## Summary", ""]
    L += [f"- {line}" for line in summary_lines(s)]
    results = report["results"]
    for suite, title in _SUITE_TITLES.items():
        rs = [r for r in results if r["suite"] == suite]
        if not rs:
            continue
        L += ["", f"## {title}", ""]
        tab = suite == "tabular"
        if suite == "overhead":
            L += ["| case | mode | ours us/call | torch us/call | speedup | check |",
                  "|---|---|---|---|---|---|"]
        else:
            head = "| case | MiB | mode | ours | torch | speedup | ours GB/s | ours % copy | torch % copy |"
            if tab:
                head += " tutorial | tutorial/ours | sklearn | sklearn/ours |"
            L += [head + " check |", "|" + "---|" * head.count("|")]
        for r in rs:
            chk = "ERROR" if r["error"] else ("ok" if r["check"]["ok"] else "MISMATCH")
            if r["error"]:
                L.append(f"| {r['name']} | ERROR: {r['error']} |")
                continue
            for mode, d in r["modes"].items():
                no, nt = (_noisy(d, k) for k in ("ours", "torch"))
                if suite == "overhead":
                    L.append(f"| {r['name']} | {mode} | {d['ours_s'] * 1e6:.1f}{no} | "
                             f"{d['torch_s'] * 1e6:.1f}{nt} | {d['speedup']:.2f} | {chk} |")
                    continue
                row = (f"| {r['name']} | {r['nbytes'] / MiB:.0f} | {mode} | {_fmt_t(d['ours_s'])}{no} | "
                       f"{_fmt_t(d['torch_s'])}{nt} | {d['speedup']:.2f} | {d['ours_GBps']:.1f} | "
                       f"{d['ours_pct_copy']:.0f}% | {d['torch_pct_copy']:.0f}% |")
                if tab:
                    for peer in ("tutorial", "sklearn"):
                        pd = d["peers"].get(peer)
                        row += (f" {_fmt_t(pd['s'])}{_noisy(d, peer)} | {pd['ratio']:.1f} |" if pd
                                else " - | - |")
                L.append(row + f" {chk} |")
        notes = [f"- {r['name']}: {r['note']}" for r in rs if r["note"]]
        if notes:
            L += [""] + notes
    flagged = [(r, i) for r in results if not r["error"] for i in r["check"]["items"]
               if not i["ok"] or "detail" in i]
    L += ["", "## Parity checks (ours vs torch and the NumPy peers, once per case before timing)", "",
          f"Error = max|ours - peer| / max(1, max|peer|); tolerance {report['settings']['tolerance']} "
          f"(StandardScaler {SKLEARN_TOLERANCE:g}: it has no eps). Where ours and a peer disagree, "
          f"the float64 reference decides: ours passes if it is within tolerance of it."]
    if flagged:
        L += ["", "| case | output | against | error | tolerance | verdict |", "|---|---|---|---|---|---|"]
        L += [f"| {r['name']} | {i['output']} | {i['against']} | {i['err']:.3g} | {i['tol']:.0e} | "
              f"{'ok' if i['ok'] else 'MISMATCH'}{': ' + i['detail'] if 'detail' in i else ''} |"
              for r, i in flagged]
    if not any(not i["ok"] for _, i in flagged):
        L += ["", "All outputs of all cases within tolerance"
              + (" (of the float64 reference where a peer is off)." if flagged else ".")]
    comp = [(r["name"], mode, d["compile_s"], d["ours_first_call_s"], d["first_call_excess_s"])
            for r in results if not r["error"] for mode, d in r["modes"].items()
            if d["compile_s"] >= 0.05 or d["first_call_excess_s"] >= 0.05]
    L += ["", "## Compile time", "",
          "compile = ours' first call minus its second on a probe: the case cut to 2 samples (64 rows "
          "for tabular), same method, dtype, "
          "layout and rank (numba compiles there, or loads its on-disk cache); first call = ours' "
          "first call on the case itself, and its excess over the steady median (page faults of "
          "fresh memory, caches, any compile the probe did not trigger). Rows with either "
          ">= 50 ms.", ""]
    if comp:
        L += ["| case | mode | compile | first call | first-call excess |", "|---|---|---|---|---|"]
        L += [f"| {n} | {mode} | {_fmt_t(c)} | {_fmt_t(fc)} | {_fmt_t(ex)} |" for n, mode, c, fc, ex in comp]
    L.append(f"\nTotal: {s['compile_s_total']:.1f} s.")
    return "\n".join(L) + "\n"


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_report(report: dict, out_dir, tag: str) -> tuple[Path, Path]:
    """``<out_dir>/cpu-<tag>.md`` and ``.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['device']}-{tag}"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    text = markdown(report)
    if report.get("frontends"):
        from normlab import bench_frontends

        text += "\n" + bench_frontends.markdown(report["frontends"])
    md.write_text(text)
    js.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    return md, js


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``normlab bench`` (the CLI's subparser reuses them)."""
    parser.add_argument("--quick", action="store_true",
                        help="a subset that finishes in about a minute, compile included")
    parser.add_argument("--cases", metavar="REGEX", default=None,
                        help="keep the cases whose '<suite> <name>' matches this regular "
                             "expression (case-insensitive), e.g. 'layer_norm', 'NHWC', "
                             "'tabular.*fp64', 'overhead'; see --list")
    parser.add_argument("--dtype", choices=("suite", "float32", "float64", "both", "bfloat16", "float16"),
                        default="suite",
                        help="suite (default): fp32, plus fp64 for tabular BN; or one dtype, or both "
                             "for every case. With --device cuda: suite/both = bf16 and fp32, or "
                             "float32, bfloat16, float16")
    parser.add_argument("--backend", default=None,
                        help="normlab.kernels backend for 'ours' (default: the device's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (cuda is reserved for the GPU suite)")
    parser.add_argument("--peers", default=None, metavar="LIST",
                        help="--device cuda: the implementations timed against ours, comma-separated "
                             "from eager, compile, liger (default: all three; torch.compile "
                             "compiles each case anew, so leave it out of long runs)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="--device cuda: time the replay of each call captured in a CUDA graph "
                             "(the GPU's time alone, without host overhead; no compile peer)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timing samples per implementation and mode (default 5, --quick 3)")
    parser.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                        help="least duration of one sample; small cases loop inside it "
                             "(default 0.05, --quick 0.02)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and numba threads (default: the cores this process may use)")
    parser.add_argument("--max-mb", type=float, default=MAX_MB,
                        help=f"largest tensor in MiB; bigger tabular cases lose rows (default {MAX_MB})")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR",
                        help="where cpu-<tag>.md and .json go (default benchmarks/results)")
    parser.add_argument("--tag", default=None,
                        help="file name tag (default: the date, plus -quick / -cases)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--no-frontends", action="store_true",
                        help="skip the front-end tables (normlab.nn modules vs torch.nn, a ResNet "
                             "training step, the NumPy layers and BatchNormalizer vs the tutorial "
                             "code and StandardScaler); they are skipped anyway with --cases")
    return parser


def _load_backend(name, device: str):
    from normlab.kernels import get_backend

    return get_backend(name, device=device)


def _why_not(name: str, device: str) -> str:
    try:
        from normlab.kernels import available_backends

        return available_backends(device).get(name, {}).get("reason") or "no reason given"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def run(args: argparse.Namespace) -> int:
    """``normlab bench`` with parsed options; the exit code (1 when a parity check failed)."""
    err = sys.stderr
    if args.device == "cuda":
        from normlab import bench_gpu

        return bench_gpu.run(args)
    if args.dtype in ("bfloat16", "float16"):
        print(f"normlab bench: --dtype {args.dtype} is for --device cuda; the CPU suite takes "
              f"suite, float32, float64 or both", file=err)
        return 2
    for flag, given in (("--peers", args.peers is not None), ("--cuda-graphs", args.cuda_graphs)):
        if given:
            print(f"normlab bench: {flag} is for --device cuda; the CPU suite always times torch "
                  f"(and, for tabular cases, the tutorial code and StandardScaler)", file=err)
            return 2
    for opt in ("repeat", "threads"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            print(f"normlab bench: --{opt} must be >= 1, got {v}", file=err)
            return 2
    if args.min_time is not None and args.min_time <= 0:
        print(f"normlab bench: --min-time must be > 0 seconds, got {args.min_time}", file=err)
        return 2
    try:
        cases = build_suite(dtype=args.dtype, quick=args.quick, max_mb=args.max_mb, cases=args.cases)
    except re.error as e:
        print(f"normlab bench: --cases {args.cases!r} is not a valid regular expression ({e})", file=err)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.suite:<9} {c.name:<46} {c.nbytes / MiB:9.2f} MiB  modes {','.join(c.modes)}"
                  + (f"  ({c.note})" if c.note else ""))
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print(f"normlab bench: no case matches --cases {args.cases!r}; see --list", file=err)
        return 2
    try:
        backend = _load_backend(args.backend, args.device)
    except Exception as e:
        print(f"normlab bench: cannot load the kernel backend {args.backend!r} for {args.device} "
              f"({type(e).__name__}: {e})", file=err)
        return 2
    name = _backend_name(backend)
    if args.backend is None and name != "numba":
        env = os.environ.get("NORMLAB_BACKEND", "").strip()
        why = f"NORMLAB_BACKEND={env}" if env else _why_not("numba", args.device)
        print(f"normlab bench: warning: 'ours' resolved to the {name!r} backend, not numba "
              f"({why}); pass --backend numba to make that an error", file=err)
    repeat = args.repeat or (3 if args.quick else 5)
    min_time = args.min_time or (0.02 if args.quick else 0.05)
    settings = dict(quick=args.quick, cases=args.cases, dtype=args.dtype, backend=args.backend,
                    max_mb=args.max_mb,
                    command=" ".join(["normlab", "bench"] + list(getattr(args, "argv", None) or [])))
    report = run_suite(cases, backend, repeat=repeat, min_time=min_time, threads=args.threads,
                       settings=settings)
    if not (args.no_frontends or args.cases):
        from normlab import bench_frontends

        print("front ends:")
        report["frontends"] = bench_frontends.run_frontends(
            _time_many, quick=args.quick, repeat=repeat, min_time=min_time)
    tag = args.tag or (_dt.date.today().isoformat() + ("-quick" if args.quick else "")
                       + ("-cases" if args.cases else ""))
    md, js = write_report(report, args.out, tag)
    print("\n" + "\n".join(summary_lines(report["summary"])))
    if "frontends" in report:
        from normlab import bench_frontends

        print("\n".join(bench_frontends.summary_lines(report["frontends"])))
    print(f"wall time {report['wall_s']:.0f} s; wrote {md} and {js}")
    s = report["summary"]
    fr = report.get("frontends") or {}
    fr_bad = [r for r in fr.get("modules", []) + fr.get("tabular", []) if not r.get("ok")]
    if fr.get("train_step") and not fr["train_step"].get("ok"):
        fr_bad.append(fr["train_step"])
    return 1 if s["mismatches"] or s["errors"] or fr_bad else 0


def main(argv: list[str] | None = None) -> int:
    """``normlab bench [options]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="normlab bench",
        description="Time normlab's kernels against torch.nn.functional, the NumPy tutorial code, "
                    "scikit-learn and memory-copy bandwidth (benchmarks/README.md).")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

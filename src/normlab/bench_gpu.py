r"""``normlab bench --device cuda``: the Triton kernels against torch eager, torch.compile and
Liger-Kernel, and against the GPU's measured device-to-device copy bandwidth.

What is measured (PERFORMANCE.md, GPU targets)::

    ours      normlab.kernels' ``triton`` backend called on CUDA tensors (fwd, eval, bwd from a
              saved forward) and normlab.nn.functional through autograd (fwd+bwd)
    eager     torch.nn.functional on the same tensors (bwd: torch.autograd.grad of a recorded
              graph, retain_graph=True)
    compile   torch.compile of the same torch.nn.functional call (fwd, fwd+bwd)
    liger     Liger-Kernel's LayerNorm / RMSNorm / GroupNorm (channels-first) autograd
              functions, when ``liger_kernel`` is importable
    copy      ``dst.copy_(src)`` for the same number of bytes, measured in the same run

    bytes     units * x.nbytes, units = 2 (eval, fwd), 3 (bwd), 5 (fwd+bwd)
    GB/s      bytes / median time;  % copy = GB/s / copy GB/s (the copy moves 2 * x.nbytes)
    x peer    peer time / our time (> 1: ours is faster)

Timing uses CUDA events: each implementation is warmed up (Triton and torch.compile compile
there), then ``--repeat`` samples, each the mean of enough back-to-back calls to last
``--min-time`` seconds between two events; the figure is the median sample. Before timing,
ours is checked against torch in float64 on the same inputs (forward output and dx).

Without CUDA, ``run`` exits with status 2 and says why: no figure is made up. The parts that do
not touch a GPU (the suite, the byte model, the summary against the targets, the Markdown
table) are plain functions, tested on CPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

MiB = 1 << 20
EPS = 1e-5
UNITS = {"eval": 2, "fwd": 2, "bwd": 3, "fwd+bwd": 5}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TOLERANCE = {"float32": 1e-4, "float16": 6e-3, "bfloat16": 4e-2}
PEERS = ("eager", "compile", "liger")

# The GPU suite (PERFORMANCE.md): row norms over hidden sizes, decode-like row counts,
# ResNet-50 BatchNorm layers, Stable-Diffusion-like GroupNorm, 3-d InstanceNorm.
ROW_N = (256, 1024, 4096, 8192, 16384, 1000, 2041, 4005)
DECODE_M = (1, 8, 64)
DECODE_N = 4096
RESNET50_BN = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
RESNET_N = 32
GN_C = (320, 640, 1280)
GN_HW = (64, 32)
GN_N = 8
GN_GROUPS = 32
IN3D = (2, 32, 64, 64, 64)
#: default size of one row-norm tensor: 4x an H100's 50 MiB L2 (``--max-mb`` overrides)
ROW_BYTES = 256 * MiB


@dataclass(frozen=True)
class GpuCase:
    method: str                   # layer_norm, rms_norm, batch_norm, group_norm, instance_norm
    shape: tuple                  # logical, channels-first; (M, N) for the row norms
    dtype: str = "bfloat16"
    channels_last: bool = False
    groups: int = 0
    suite: str = "row"            # row, decode, conv
    quick: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def modes(self) -> tuple:
        return ("eval", "fwd", "bwd", "fwd+bwd") if self.method == "batch_norm" else ("fwd", "bwd", "fwd+bwd")

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.method not in ("layer_norm", "rms_norm"):
            nd = len(self.shape) - 2
            sp = "DHW"[3 - nd:] if nd <= 3 else "S" * nd
            parts.append("N" + sp + "C" if self.channels_last else "NC" + sp)
        parts.append("x".join(str(d) for d in self.shape))
        if self.groups:
            parts.append(f"G={self.groups}")
        parts.append(SHORT[self.dtype])
        return " ".join(parts)


def build_gpu_suite(*, dtypes=("bfloat16",), quick: bool = False, row_bytes: int = ROW_BYTES,
                    cases: Optional[str] = None) -> list:
    """The cases, in order; ``quick``: one or two per family; ``cases``: a regex on the name."""
    import re

    out = []
    for dt in dtypes:
        it = ITEMSIZE[dt]
        for method in ("layer_norm", "rms_norm"):
            for n in ROW_N:
                m = max(1, row_bytes // (n * it))
                out.append(GpuCase(method, (m, n), dt, quick=n == 4096))
            for m in DECODE_M:
                out.append(GpuCase(method, (m, DECODE_N), dt, suite="decode", quick=m == 8))
        for c, h, w in RESNET50_BN:
            for cl in (False, True):
                out.append(GpuCase("batch_norm", (RESNET_N, c, h, w), dt, cl, suite="conv",
                                   quick=c == 256))
        for c in GN_C:
            for hw in GN_HW:
                for cl in (False, True):
                    out.append(GpuCase("group_norm", (GN_N, c, hw, hw), dt, cl, GN_GROUPS,
                                       suite="conv", quick=c == 640 and hw == 64))
        for cl in (False, True):
            out.append(GpuCase("instance_norm", IN3D, dt, cl, suite="conv", quick=True))
    if quick:
        out = [c for c in out if c.quick]
    if cases:
        rx = re.compile(cases)
        out = [c for c in out if rx.search(c.name)]
    return out


def gbps(nbytes: int, mode: str, seconds: Optional[float]) -> Optional[float]:
    if not seconds or seconds <= 0:
        return None
    return UNITS[mode] * nbytes / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# summary and table (no GPU needed)
# ---------------------------------------------------------------------------------------------

def _target(rec: dict, mode: str) -> Optional[tuple]:
    """(what, the check's value, the target, met) for a record and mode, or None."""
    m = rec["method"]
    row = rec["modes"].get(mode) or {}
    if m in ("layer_norm", "rms_norm") and rec["suite"] == "row" and rec["shape"][1] >= 4096:
        pct = row.get("pct_copy")
        goal = {"fwd": 90.0, "bwd": 70.0}.get(mode)
        if goal is None or pct is None:
            return None
        return (f"% copy >= {goal:.0f}", pct, goal, pct >= goal)
    if mode == "fwd+bwd" and (m == "group_norm" or (m in ("batch_norm", "instance_norm")
                                                    and rec["channels_last"])):
        x = (row.get("x") or {}).get("eager")
        if x is None:
            return None
        return ("x eager >= 3", x, 3.0, x >= 3.0)
    return None


def summarize(results: list) -> dict:
    """Targets of PERFORMANCE.md met or missed, and parity failures."""
    checks, bad = [], []
    for rec in results:
        if not rec.get("parity_ok", False):
            bad.append(rec["name"])
        for mode in rec["modes"]:
            t = _target(rec, mode)
            if t is not None:
                checks.append(dict(case=rec["name"], mode=mode, check=t[0], value=t[1], met=t[3]))
    return dict(checks=checks, met=sum(c["met"] for c in checks), total=len(checks),
                parity_failures=bad)


def _f(v, fmt="{:.2f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _ms(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def markdown(report: dict) -> str:
    """The report as a Markdown page: machine, one table row per case and mode, targets."""
    m = report["machine"]
    L = [f"# normlab bench, cuda ({m.get('gpu', '?')}), {report['created']}", "",
         f"GPU {m.get('gpu')}, {m.get('sms')} SMs, {_f(m.get('memory_gib'), '{:.0f}')} GiB, "
         f"L2 {_f(m.get('l2_mib'), '{:.0f}')} MiB; measured copy bandwidth "
         f"{_f(m.get('copy_GBps'), '{:.0f}')} GB/s (dst.copy_(src), 256 MiB); "
         + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
         + f"; commit {m.get('git_commit')}.", "",
         ("Every call was captured once in a CUDA graph and the replay timed: GPU time only, "
          "no host overhead (--cuda-graphs). " if report.get("settings", {}).get("cuda_graphs")
          else "") +
         "Times are medians of CUDA-event samples; GB/s counts 2 (fwd, eval), 3 (bwd) or "
         "5 (fwd+bwd) tensor passes; % copy is ours against the copy bandwidth of the same run; "
         "x peer = peer time / our time.", "",
         "| case | mode | ours | GB/s | % copy | eager | x eager | compile | x compile | liger | x liger |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in report["results"]:
        flag = "" if rec.get("parity_ok") else " (PARITY FAILED)"
        for mode, r in rec["modes"].items():
            p, x = r.get("peers") or {}, r.get("x") or {}
            L.append(f"| {rec['name']}{flag} | {mode} | {_ms(r.get('ours_s'))} | "
                     f"{_f(r.get('GBps'), '{:.0f}')} | {_f(r.get('pct_copy'), '{:.0f}%')} | "
                     + " | ".join(f"{_ms(p.get(k))} | {_f(x.get(k))}" for k in PEERS) + " |")
    s = report.get("summary") or summarize(report["results"])
    L += ["", f"## Targets (PERFORMANCE.md): {s['met']} of {s['total']} met", ""]
    for c in s["checks"]:
        L.append(f"- {'met' if c['met'] else 'MISSED'}: {c['case']} {c['mode']}: {c['check']} "
                 f"(measured {_f(c['value'], '{:.1f}')})")
    if s["parity_failures"]:
        L += ["", "Parity failures: " + ", ".join(s["parity_failures"])]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------
# the GPU run
# ---------------------------------------------------------------------------------------------

def time_cuda(fn: Callable, repeat: int, min_time: float) -> dict:
    """Median seconds per call of ``fn`` from CUDA events (warm-up and calibration first)."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample(number):
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    number = 1
    while True:
        t = sample(number)
        if t >= min_time or number >= 1 << 16:
            break
        number = min(1 << 16, max(number * 2, int(number * min_time / max(t, 1e-7) * 1.2)))
    samples = sorted(sample(number) / number for _ in range(repeat))
    med = samples[len(samples) // 2]
    return dict(median_s=med, spread=(samples[-1] - samples[0]) / med if med else 0.0,
                number=number)


def time_cuda_graph(fn: Callable, repeat: int, min_time: float) -> dict:
    """``time_cuda`` of the replay of a CUDA graph that captured one call of ``fn``.

    The replay runs the captured kernels with no Python, dispatcher or launch cost in between:
    the figure is the GPU's time for the work, the bound that host overhead hides in eager
    timing. Capture fails (and the caller records why) for anything that synchronizes with the
    host, e.g. ``.item()`` or a check of a CUDA tensor's values."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up off the default stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, repeat, min_time)


def graph_warmup() -> Optional[str]:
    """Capture one small autograd step before the timed captures, or say why it failed.

    On the H200 of 2026-12-04 the first capture of an autograd backward in the process failed
    and left the next captures of that case failing too; later ones captured. This capture
    takes that first one."""
    import torch

    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    y = x.sin().sum()
    step = lambda: torch.autograd.grad(y, [x], retain_graph=True)      # noqa: E731
    try:
        time_cuda_graph(step, 1, 1e-4)
        return None
    except Exception as e:                                   # reported in the run's log
        return f"{type(e).__name__}: {e}"[:200]


def copy_bandwidth(nbytes: int, repeat: int, min_time: float) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), repeat, min_time)["median_s"]
    return 2 * nbytes / t / 1e9


def _liger(method: str):
    """Liger-Kernel's autograd function for ``method`` and how to call it, or None."""
    try:
        if method == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction as Fn

            return lambda x, w, b, case: Fn.apply(x, w, b, EPS)
        if method == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction as Fn

            # in_place=False: Liger's default writes dx into dy, which the next timed call reuses
            return lambda x, w, b, case: Fn.apply(x, w, EPS, 0.0, "llama", False)
        if method == "group_norm":
            from liger_kernel.ops.group_norm import LigerGroupNormFunction as Fn

            return lambda x, w, b, case: Fn.apply(x, w, b, case.shape[1], case.groups, EPS)
    except ImportError:
        return None
    return None


def _torch_fn(case: GpuCase):
    import torch.nn.functional as TF

    m = case.method
    if m == "layer_norm":
        return lambda x, w, b: TF.layer_norm(x, (case.shape[1],), w, b, EPS)
    if m == "rms_norm":
        return lambda x, w, b: TF.rms_norm(x, (case.shape[1],), w, EPS)
    if m == "batch_norm":
        return lambda x, w, b: TF.batch_norm(x, None, None, w, b, True, 0.1, EPS)
    if m == "group_norm":
        return lambda x, w, b: TF.group_norm(x, case.groups, w, b, EPS)
    return lambda x, w, b: TF.instance_norm(x, None, None, w, b, True, 0.1, EPS)


def _ours_fn(case: GpuCase):
    from normlab.nn import functional as F

    m = case.method
    if m == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (case.shape[1],), w, b, EPS)
    if m == "rms_norm":
        return lambda x, w, b: F.rms_norm(x, (case.shape[1],), w, EPS)
    if m == "batch_norm":
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS)
    if m == "group_norm":
        return lambda x, w, b: F.group_norm(x, case.groups, w, b, EPS)
    return lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, EPS)


def _kernel_calls(case: GpuCase, be, x, w, b, dy):
    """ours' forward (training), eval forward and backward kernel calls on the backend."""
    m, cl = case.method, case.channels_last
    xk = x.movedim(1, -1) if cl else x          # the kernels take the (N, *S, C) view
    dyk = dy.movedim(1, -1) if cl else dy
    if m == "layer_norm":
        ns = (case.shape[1],)
        fwd = lambda: be.layer_norm_forward(x, ns, w, b, EPS)          # noqa: E731
        _, mean, rstd = fwd()
        return fwd, None, lambda: be.layer_norm_backward(dy, x, ns, w, mean, rstd)
    if m == "rms_norm":
        ns = (case.shape[1],)
        fwd = lambda: be.rms_norm_forward(x, ns, w, EPS)               # noqa: E731
        _, rstd = fwd()
        return fwd, None, lambda: be.rms_norm_backward(dy, x, ns, w, rstd)
    if m == "batch_norm":
        fwd = lambda: be.batch_norm_forward(xk, w, b, EPS, channels_last=cl)   # noqa: E731
        _, mean, var, rstd = fwd()
        ev = lambda: be.batch_norm_forward(xk, w, b, EPS, channels_last=cl, mean=mean, var=var)  # noqa: E731
        return fwd, ev, lambda: be.batch_norm_backward(dyk, xk, w, mean, rstd, channels_last=cl)
    if m == "group_norm":
        fwd = lambda: be.group_norm_forward(xk, case.groups, w, b, EPS, channels_last=cl)  # noqa: E731
        _, mean, rstd = fwd()
        return fwd, None, lambda: be.group_norm_backward(dyk, xk, case.groups, w, mean, rstd,
                                                         channels_last=cl)
    fwd = lambda: be.instance_norm_forward(xk, w, b, EPS, channels_last=cl)   # noqa: E731
    _, mean, _, rstd = fwd()
    return fwd, None, lambda: be.instance_norm_backward(dyk, xk, w, mean, rstd, channels_last=cl)


def _err(a, ref) -> float:
    return float((a.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


def run_case(case: GpuCase, be, *, repeat: int, min_time: float, copy_GBps: float,
             log: Callable[[str], None] = print, device: str = "cuda", timer=None,
             peers=PEERS) -> dict:
    """Check, then time every mode of one case with ``timer`` (default ``time_cuda``).

    ``device``, ``timer`` and ``peers`` exist so that tests can run the plumbing on CPU tensors
    in the Triton interpreter with a timer that times nothing; real figures come only from
    CUDA events.
    """
    import torch

    timer = timer or time_cuda
    dt = getattr(torch, case.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).mul_(2).add_(1).to(dt)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4
                         else torch.channels_last_3d)
    dy = torch.randn(x.shape, generator=g, device=device, dtype=torch.float32).to(dt)
    if case.channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last if x.ndim == 4
                           else torch.channels_last_3d)
    P = (case.shape[1],)
    w = (torch.rand(P, generator=g, device=device) + 0.5).to(dt)
    b = None if case.method == "rms_norm" else (torch.rand(P, generator=g, device=device) - 0.5).to(dt)
    tf, of = _torch_fn(case), _ours_fn(case)
    rec = dict(name=case.name, method=case.method, shape=list(case.shape), dtype=case.dtype,
               channels_last=case.channels_last, suite=case.suite, nbytes=case.nbytes, modes={})

    # parity: ours (autograd front end) against torch in float64 on the same values
    xr = x.detach().double().requires_grad_(True)
    wr = w.double()
    br = None if b is None else b.double()
    yr = tf(xr, wr, br)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    xo = x.detach().requires_grad_(True)
    yo = of(xo, w, b)
    (dxo,) = torch.autograd.grad(yo, xo, dy)
    errs = dict(y=_err(yo.detach(), yr.detach()), dx=_err(dxo, dxr))
    rec["parity"] = errs
    rec["parity_ok"] = all(e <= TOLERANCE[case.dtype] for e in errs.values())
    del xr, yr, dxr, yo, dxo

    fwd, ev, bwd = _kernel_calls(case, be, x, w, b, dy)
    wg = w.detach().requires_grad_(True)
    bg = None if b is None else b.detach().requires_grad_(True)
    xg = x.detach().requires_grad_(True)
    leaves = [t for t in (xg, wg, bg) if t is not None]

    def fwd_bwd(fn):
        def run():
            y = fn(xg, wg, bg)
            torch.autograd.grad(y, leaves, dy)
        return run

    def bwd_of(fn):
        y = fn(xg, wg, bg)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    impls = {"ours": {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd(of)},
             "eager": {"fwd": lambda: tf(x, w, b), "bwd": bwd_of(tf), "fwd+bwd": fwd_bwd(tf)}}
    if ev is not None:
        rm, rv = torch.zeros(P, device=device, dtype=dt), torch.ones(P, device=device, dtype=dt)
        import torch.nn.functional as TF

        impls["ours"]["eval"] = ev
        impls["eager"]["eval"] = lambda: TF.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)
    if "compile" in peers:
        try:
            ctf = torch.compile(tf)
            impls["compile"] = {"fwd": lambda: ctf(x, w, b), "fwd+bwd": fwd_bwd(ctf)}
        except Exception as e:                               # report, do not hide
            rec["compile_error"] = f"{type(e).__name__}: {e}"
    lg = _liger(case.method) if not case.channels_last and "liger" in peers else None
    if lg is not None:
        lf = lambda xx, ww, bb: lg(xx, ww, bb, case)                   # noqa: E731
        impls["liger"] = {"fwd": lambda: lf(x, w, b), "bwd": bwd_of(lf), "fwd+bwd": fwd_bwd(lf)}
    for mode in case.modes:
        times = {}
        for who, fns in impls.items():
            if mode not in fns:
                continue
            try:
                times[who] = timer(fns[mode], repeat, min_time)["median_s"]
            except Exception as e:                           # e.g. a peer that cannot take it
                rec.setdefault("errors", {})[f"{who} {mode}"] = f"{type(e).__name__}: {e}"[:300]
        ours = times.pop("ours", None)
        bw = gbps(case.nbytes, mode, ours)
        rec["modes"][mode] = dict(
            ours_s=ours, GBps=bw, pct_copy=None if bw is None else 100 * bw / copy_GBps,
            peers=times, x={k: (v / ours if ours else None) for k, v in times.items()})
        r = rec["modes"][mode]
        log(f"  {case.name:<44} {mode:<8} ours {_ms(ours):>12} {_f(r['pct_copy'], '{:.0f}%'):>5} "
            + " ".join(f"{k} x{_f(v)}" for k, v in r["x"].items()))
    return rec


def machine() -> dict:
    import torch

    from normlab import __version__
    from normlab._machine import version

    p = torch.cuda.get_device_properties(0)
    return dict(gpu=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                l2_mib=getattr(p, "L2_cache_size", 0) / MiB, cuda=torch.version.cuda,
                platform=platform.platform(),
                versions={"normlab": __version__, "torch": version("torch"),
                          "triton": version("triton"), "liger-kernel": version("liger-kernel")})


def run(args) -> int:
    """``normlab bench --device cuda`` (options of ``normlab.bench.add_arguments``)."""
    err = sys.stderr
    try:
        import torch
    except ImportError as e:
        print(f"normlab bench: --device cuda needs torch ({e})", file=err)
        return 2
    if not torch.cuda.is_available():
        print(f"normlab bench: --device cuda asked for, but torch {torch.__version__} sees no CUDA "
              f"device (torch.cuda.is_available() is False); run on a machine with a CUDA GPU and a "
              f"CUDA build of torch, or use --device cpu", file=err)
        return 2
    from normlab.kernels import get_backend

    try:
        be = get_backend(args.backend or "triton", device="cuda")
    except ValueError as e:
        print(f"normlab bench: {e}", file=err)
        return 2
    dtypes = {"suite": ("bfloat16", "float32"), "both": ("bfloat16", "float32"),
              "float32": ("float32",), "bfloat16": ("bfloat16",), "float16": ("float16",)}
    if args.dtype not in dtypes:
        print(f"normlab bench: --dtype {args.dtype} is not a GPU dtype here; use one of "
              f"{', '.join(dtypes)}", file=err)
        return 2
    cases = build_gpu_suite(dtypes=dtypes[args.dtype], quick=args.quick,
                            row_bytes=int(min(args.max_mb, ROW_BYTES / MiB) * MiB), cases=args.cases)
    if args.list:
        for c in cases:
            print(f"{c.suite:<7} {c.name:<46} {c.nbytes / MiB:9.2f} MiB  modes {','.join(c.modes)}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print(f"normlab bench: no case matches --cases {args.cases!r}; see --list", file=err)
        return 2
    peers = tuple(p.strip() for p in (args.peers or ",".join(PEERS)).split(",") if p.strip())
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        print(f"normlab bench: --peers {args.peers!r}: choose from {', '.join(PEERS)}, "
              f"comma-separated", file=err)
        return 2
    graphs = args.cuda_graphs
    if graphs and "compile" in peers:
        print("normlab bench: --cuda-graphs leaves out the compile peer (torch.compile has its own "
              "CUDA-graph mode)", file=err)
        peers = tuple(p for p in peers if p != "compile")
    repeat = args.repeat or (5 if args.quick else 10)
    min_time = args.min_time or (0.01 if args.quick else 0.05)
    t0 = time.time()
    mach = machine()
    mach["copy_GBps"] = copy_bandwidth(256 * MiB, repeat, min_time)
    print(f"{mach['gpu']}: copy {mach['copy_GBps']:.0f} GB/s")
    if graphs:
        mach["graph_warmup"] = graph_warmup() or "captured"
        print(f"warm-up capture: {mach['graph_warmup']}")
    results = []
    for case in cases:
        try:
            results.append(run_case(case, be, repeat=repeat, min_time=min_time,
                                    copy_GBps=mach["copy_GBps"], peers=peers,
                                    timer=time_cuda_graph if graphs else None))
        except Exception as e:                                 # one case must not sink the run
            print(f"  {case.name}: ERROR {type(e).__name__}: {e}", file=err)
            results.append(dict(name=case.name, method=case.method, shape=list(case.shape),
                                dtype=case.dtype, channels_last=case.channels_last,
                                suite=case.suite, modes={}, parity_ok=False,
                                error=f"{type(e).__name__}: {e}"))
        finally:
            torch.cuda.empty_cache()
    from normlab.bench import _git_commit

    mach["git_commit"] = _git_commit()
    settings = dict(quick=args.quick, cases=args.cases, dtype=args.dtype, peers=list(peers),
                    cuda_graphs=graphs, repeat=repeat, min_time=min_time)
    report = dict(schema="normlab-bench-cuda/1", device="cuda",
                  created=_dt.datetime.now().isoformat(timespec="seconds"), machine=mach,
                  settings=settings, results=results, wall_s=time.time() - t0)
    report["summary"] = summarize(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in mach["gpu"]).strip("-").lower()
    tag = args.tag or (_dt.date.today().isoformat() + ("-quick" if args.quick else ""))
    md, js = out / f"cuda-{slug}-{tag}.md", out / f"cuda-{slug}-{tag}.json"
    md.write_text(markdown(report))
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    s = report["summary"]
    print(f"targets met: {s['met']} of {s['total']}; parity failures: {len(s['parity_failures'])}; "
          f"wrote {md} and {js}")
    return 1 if s["parity_failures"] else 0

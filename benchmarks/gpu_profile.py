"""Where the time of one call goes on a CUDA GPU: wall time against GPU kernel time.

For a few cases of the GPU suite, ours (normlab's Triton backend, kernel level and through
normlab.nn.functional with autograd) and torch eager are timed back to back with CUDA events
(wall per call, as ``normlab bench --device cuda`` does), then profiled with torch.profiler: the
GPU kernels one call launches, their count and summed device time. Wall much above kernel time
means the call is bound by host work (Python, dispatch, launches), not by the GPU.

Usage (repository root, a CUDA machine): python benchmarks/gpu_profile.py [--calls 20]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from normlab import bench_gpu as G  # noqa: E402
from normlab.kernels import get_backend  # noqa: E402

CASES = [G.GpuCase("layer_norm", (32768, 4096)), G.GpuCase("layer_norm", (8, 4096), suite="decode"),
         G.GpuCase("batch_norm", (32, 256, 56, 56), suite="conv"),
         G.GpuCase("batch_norm", (32, 256, 56, 56), channels_last=True, suite="conv"),
         G.GpuCase("group_norm", (8, 640, 64, 64), channels_last=True, groups=32, suite="conv"),
         G.GpuCase("instance_norm", G.IN3D, channels_last=True, suite="conv")]


def kernels_of(fn, calls: int):
    """{kernel name: (launches per call, device us per call)} of ``calls`` calls of ``fn``."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            k = out[e.name[:60]]
            k[0] += 1
            k[1] += e.device_time_total
    return {name: (n / calls, us / calls) for name, (n, us) in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    be = get_backend("triton", device="cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'case':<44} {'who':<14} {'wall us':>9} {'GPU us':>9} {'GPU %':>6} {'kernels':>7}")
    for case in CASES:
        dt = getattr(torch, case.dtype)
        x = torch.randn(case.shape, device="cuda").to(dt)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4
                             else torch.channels_last_3d)
        dy = torch.randn_like(x)
        P = (case.shape[1],)
        w = torch.rand(P, device="cuda").add_(0.5).to(dt)
        b = None if case.method == "rms_norm" else torch.rand(P, device="cuda").to(dt)
        fwd, _, bwd = G._kernel_calls(case, be, x, w, b, dy)
        xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        bg = None if b is None else b.detach().requires_grad_(True)
        leaves = [t for t in (xg, wg, bg) if t is not None]

        def through(fn):
            return lambda: torch.autograd.grad(fn(xg, wg, bg), leaves, dy)

        runs = {"ours fwd": fwd, "ours bwd": bwd, "ours F fwd+bwd": through(G._ours_fn(case)),
                "eager fwd": lambda: G._torch_fn(case)(x, w, b),
                "eager fwd+bwd": through(G._torch_fn(case))}
        for who, fn in runs.items():
            try:
                wall = G.time_cuda(fn, 5, 0.01)["median_s"] * 1e6
                ks = kernels_of(fn, args.calls)
            except Exception as e:                      # report and go on with the next
                print(f"{case.name:<44} {who:<14} ERROR {type(e).__name__}: {e}"[:300])
                continue
            gpu = sum(us for _, us in ks.values())
            print(f"{case.name:<44} {who:<14} {wall:9.1f} {gpu:9.1f} {100 * gpu / wall:5.0f}% "
                  f"{sum(n for n, _ in ks.values()):7.1f}")
            if who.startswith("ours"):
                for name, (n, us) in sorted(ks.items(), key=lambda kv: -kv[1][1])[:6]:
                    print(f"{'':<60} {us:8.1f} us x{n:.0f}  {name}")
        del x, dy, xg
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

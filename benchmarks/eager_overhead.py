"""Where the time of a small normlab.nn call goes on CPU: layer_norm forward + backward.

    python benchmarks/eager_overhead.py [--threads 1]

Prints the per-call time (us; the least of three medians of 1000 calls: the development
machine is shared, and single medians moved by up to 50% between runs) of ``normlab.nn.functional.layer_norm`` forward + backward
on the eager path and through the custom ops (``_fused.EAGER = False``), torch's, and the
pieces of the eager path: ``_fused.layer_norm`` (no functional checks), the method's
``autograd.Function`` alone, a bare Function around ``_run_forward`` / ``_run_backward``, an
empty Function with two saved tensors, and the two run functions alone. The figures are
additive to a few us; the _fused module docstring quotes them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

from normlab.nn import _fused
from normlab.nn import functional as NF


def median_us(f, n=1000, warmup=300, rounds=3):
    for _ in range(warmup):
        f()
    best = float("inf")
    for _ in range(rounds):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        best = min(best, float(np.median(ts)))
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meth = _fused.METHODS["layer_norm"]
    for shape in ((8, 64), (32, 1024)):
        L = shape[-1]
        x = torch.randn(shape, requires_grad=True)
        w, b = torch.ones(L, requires_grad=True), torch.zeros(L, requires_grad=True)
        dy = torch.randn(shape)
        be = _fused._backend(x)

        class Bare(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                y, m, _, r = _fused._run_forward(meth, x, w, b, None, None, [L], 1e-5, be)
                ctx.save_for_backward(x, w)
                ctx.stats = m, r                 # NumPy arrays on the eager path
                return y

            @staticmethod
            def backward(ctx, g):
                x, w = ctx.saved_tensors
                m, r = ctx.stats
                return _fused._run_backward(meth, g, x, w, m, r, [L], True, True, be)

        class Empty(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                ctx.save_for_backward(x, w)
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                ctx.saved_tensors
                return g, g[0], g[0]

        def fb(make):
            def step():
                x.grad = w.grad = b.grad = None
                make().backward(dy)
            return step

        fn = _fused.EAGER_FUNCTIONS["layer_norm"]
        rows = {
            "functional, eager path": fb(lambda: NF.layer_norm(x, (L,), w, b)),
            "functional, custom ops": fb(lambda: NF.layer_norm(x, (L,), w, b)),
            "torch.nn.functional": fb(lambda: TF.layer_norm(x, (L,), w, b)),
            "_fused.layer_norm": fb(lambda: _fused.layer_norm(x, (L,), w, b, 1e-5, be)),
            "the method's Function": fb(lambda: fn.apply(x, w, b, None, None, [L], 1e-5, be)),
            "bare Function + run functions": fb(lambda: Bare.apply(x, w, b)),
            "empty Function": fb(lambda: Empty.apply(x, w, b)),
        }
        print(f"layer_norm {shape[0]}x{L}, fwd+bwd, {args.threads} thread(s), median us:")
        for name, f in rows.items():
            _fused.EAGER = name != "functional, custom ops"
            print(f"  {name:32s} {median_us(f):8.1f}")
        _fused.EAGER = True
        y, m, _, r = _fused._run_forward(meth, x, w, b, None, None, [L], 1e-5, be)
        print(f"  {'_run_forward':32s} "
              f"{median_us(lambda: _fused._run_forward(meth, x, w, b, None, None, [L], 1e-5, be)):8.1f}")
        print(f"  {'_run_backward':32s} "
              f"{median_us(lambda: _fused._run_backward(meth, dy, x, w, m, r, [L], True, True, be)):8.1f}")


if __name__ == "__main__":
    main()

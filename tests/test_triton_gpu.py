"""The Triton kernels on a real GPU: every method, dtype and layout through normlab.nn.functional
(forward and every gradient) against torch in float64 on the same device. Skipped without CUDA.

It runs in a fresh process: test_triton_kernels.py builds the kernels for the interpreter in
this one. ``GPU_CHECK`` also runs on CPU tensors in the interpreter with ``--small``: the one
test here that runs without a GPU does that, so the script stays runnable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

GPU_CHECK = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as TF
    from normlab import kernels
    from normlab.nn import functional as F

    device = sys.argv[1]
    small = "--small" in sys.argv
    assert kernels.get_backend(device=device, dtype=torch.bfloat16).name == "triton"
    TOL = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 4e-2}
    R = 8 if small else 512
    cases = [("layer_norm", (R, 48 if small else 4096), False),
             ("layer_norm", (3, 40 if small else 20000), False),          # looped when big
             ("rms_norm", (R, 40 if small else 4096), False),
             ("batch_norm", (4, 6, 5, 5) if small else (32, 64, 28, 28), False),
             ("batch_norm", (4, 6, 5, 5) if small else (32, 64, 28, 28), True),
             ("batch_norm", (16, 6) if small else (4096, 256), False),
             ("batch_norm_eval", (4, 6, 5, 5) if small else (32, 64, 28, 28), False),
             ("batch_norm_eval", (4, 6, 5, 5) if small else (32, 64, 28, 28), True),
             ("group_norm", (2, 8, 4, 4) if small else (8, 320, 32, 32), False),
             ("group_norm", (2, 8, 4, 4) if small else (8, 320, 32, 32), True),
             ("instance_norm", (2, 3, 2, 3, 4) if small else (2, 32, 16, 16, 16), False),
             ("instance_norm", (2, 3, 2, 3, 4) if small else (2, 32, 16, 16, 16), True),
             ("add_layer_norm", (R, 48 if small else 4096), False),
             ("add_rms_norm", (R, 48 if small else 4096), False)]

    def fns(method, shape):
        n = shape[-1]
        C = shape[1]
        G = 4 if small else 32
        if method == "layer_norm":
            return (lambda x, w, b: F.layer_norm(x, (n,), w, b),
                    lambda x, w, b: TF.layer_norm(x, (n,), w, b), n)
        if method == "rms_norm":
            return (lambda x, w, b: F.rms_norm(x, (n,), w, 1e-5),
                    lambda x, w, b: TF.rms_norm(x, (n,), w, 1e-5), n)
        if method == "batch_norm":
            return (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                    lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), C)
        if method == "batch_norm_eval":                # given (running) statistics
            rm = torch.linspace(-1, 1, C, device=device)
            rv = torch.linspace(0.5, 2, C, device=device)
            return (lambda x, w, b: F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False),
                    lambda x, w, b: TF.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False),
                    C)
        if method == "group_norm":
            return (lambda x, w, b: F.group_norm(x, G, w, b),
                    lambda x, w, b: TF.group_norm(x, G, w, b), C)
        if method == "instance_norm":
            return (lambda x, w, b: F.instance_norm(x, None, None, w, b),
                    lambda x, w, b: TF.instance_norm(x, None, None, w, b), C)
        if method == "add_layer_norm":
            return (lambda x, w, b: torch.cat(F.add_layer_norm(x, x.flip(0), (n,), w, b)),
                    lambda x, w, b: torch.cat([TF.layer_norm(x + x.flip(0), (n,), w, b),
                                               x + x.flip(0)]), n)
        return (lambda x, w, b: torch.cat(F.add_rms_norm(x, x.flip(0), (n,), w, 1e-5)),
                lambda x, w, b: torch.cat([TF.rms_norm(x + x.flip(0), (n,), w, 1e-5),
                                           x + x.flip(0)]), n)

    failures = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for method, shape, cl in cases:
            ours, ref, P = fns(method, shape)
            g = torch.Generator(device=device).manual_seed(0)
            x = (torch.randn(shape, generator=g, device=device) * 2 + 1).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4
                                 else torch.channels_last_3d)
            w = (torch.rand(P, generator=g, device=device) + 0.5).to(dtype)
            b = None if "rms" in method else (torch.rand(P, generator=g, device=device) - 0.5).to(dtype)
            leaves = [t.detach().requires_grad_(True) for t in (x, w, b) if t is not None]
            y = ours(*leaves, *(() if b is not None else (None,)))
            assert y.dtype == dtype, (method, y.dtype)
            dy = torch.randn(y.shape, generator=g, device=device).to(dtype)
            got = [y.detach()] + list(torch.autograd.grad(y, leaves, dy))
            leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
            y64 = ref(*leaves64, *(() if b is not None else (None,)))
            want = [y64.detach()] + list(torch.autograd.grad(y64, leaves64, dy.double()))
            for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
                err = float((a.double() - e).abs().max() / max(1.0, float(e.abs().max())))
                ok = err <= TOL[dtype]
                print(f"{method:<14} {str(shape):<22} cl={cl!s:<5} {str(dtype):<15} {name:<7} "
                      f"{err:.2e} {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append((method, shape, cl, dtype, name, err))
    print("failures:", len(failures))
    sys.exit(1 if failures else 0)
""")


def _run(script, *args, timeout=900, **env):
    """``script`` in a fresh interpreter with ``args``; the environment without TRITON_INTERPRET
    and NORMLAB_BACKEND unless ``env`` sets them."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_BACKEND")}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=timeout)


def test_the_gpu_check_itself_runs_in_the_interpreter():
    """GPU_CHECK on small CPU tensors in the Triton interpreter: the script (its cases, calls
    and tolerances) stays runnable for the next machine with a GPU (about 5 s)."""
    out = _run(GPU_CHECK, "cpu", "--small", timeout=300, TRITON_INTERPRET="1",
               NORMLAB_BACKEND="triton")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "failures: 0" in out.stdout and out.stdout.count(" ok") >= 150, out.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_method_dtype_and_layout_on_the_gpu_matches_float64_torch():
    out = _run(GPU_CHECK, "cuda")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "failures: 0" in out.stdout


# torch.compile on the GPU: the small CNN (both layouts) and transformer block of
# test_nn_fused.py, on CUDA in float32 (TF32 off). aot_eager records that the normlab ops stay in
# the forward and backward graphs (no graph break: fullgraph=True); inductor is the real compiler,
# generating Triton for everything around our ops.
GPU_COMPILE_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_nn_fused as T
    from normlab import kernels

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    assert kernels.get_backend(device="cuda", dtype=torch.float32).name == "triton"
    for name, (make_model, make_input, ops) in T.MODELS.items():
        to_gpu = lambda g, make=make_input: make(g).cuda()
        torch.manual_seed(0)
        graphs = []
        T._compare_compiled(make_model().cuda(), to_gpu, T._recording_backend(graphs), tol=1e-5)
        fw = set().union(*(t for kind, t in graphs if kind == "fw"))
        bw = set().union(*(t for kind, t in graphs if kind == "bw"))
        assert {f"normlab.{op}.default" for op in ops} <= fw, fw
        assert {f"normlab.{op}_backward.default" for op in ops} <= bw, bw
        print(name, "aot_eager ok", flush=True)
        torch.manual_seed(0)
        T._compare_compiled(make_model().cuda(), to_gpu, "inductor", tol=1e-4)
        print(name, "inductor ok", flush=True)
    print("compile checks: ok")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_fullgraph_on_the_gpu_matches_eager():
    out = _run(GPU_COMPILE_CHECK, os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "compile checks: ok" in out.stdout

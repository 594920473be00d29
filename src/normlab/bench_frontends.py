r"""The front ends in ``normlab bench``: what a user calls, against what they would call instead.

Three tables, each ratio measured in the same run (interleaved samples, median; see bench.py):

* **modules**: a ``normlab.nn`` module's forward + backward through autograd (``y =
  m(x); y.backward(dy)``) against its ``torch.nn`` twin, same input, same layout, training mode.
* **training step**: one SGD step (forward, loss, backward, update) of a small ResNet whose
  norms are normlab's against the same network with torch.nn's norms.
* **recurrent**: one training step (forward + backward) of a 2-layer ``LayerNormLSTM`` (hidden
  256, batch 32, 100 steps; 25 with ``--quick``, float32) on its fused path (the numba
  step kernels of ``kernels._numba_rnn``, the default) and on its composite torch path, against
  the same model written the naive way (``nn.Linear`` projections, ``nn.LayerNorm`` modules and
  a Python loop over time, same weights) and torch.nn.LSTM without LayerNorm (the floor); wall
  and thread CPU time.
* **tabular**: the NumPy front ends on (M, C) data: ``normlab.layers.BatchNorm.forward`` and
  ``normlab.estimators.BatchNormalizer.fit_transform`` / ``.transform`` against the tutorial
  NumPy code (np.mean, np.var, broadcasting) and scikit-learn's StandardScaler.

The modules and the training step take ``SAMPLES_FACTOR`` times the samples of a kernel case:
one sample of a training step is one or two calls, and on a busy 2-core machine five such
samples spread more than 25% (measured: the ResNet step ratio moved from x0.83 to x1.09 between
runs with five).

Before timing, each pair is checked to compute the same thing (outputs and gradients within
float32 tolerance, relative to the size of tensors larger than 1); a disagreement is recorded
and shown, not timed silently.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ATOL = 2e-3     # float32, random data; ours and torch's summation orders differ
SAMPLES_FACTOR = 3


def _module_cases(quick: bool):
    import torch

    import normlab.nn as nln

    cl = torch.channels_last
    cases = [
        ("BatchNorm2d 32x64x56x56", lambda: (nln.BatchNorm2d(64), torch.nn.BatchNorm2d(64)), (32, 64, 56, 56), None),
        ("BatchNorm2d 32x64x56x56 NHWC", lambda: (nln.BatchNorm2d(64), torch.nn.BatchNorm2d(64)), (32, 64, 56, 56), cl),
        ("BatchNorm1d 16384x256", lambda: (nln.BatchNorm1d(256), torch.nn.BatchNorm1d(256)), (16384, 256), None),
        ("LayerNorm 8192x1024", lambda: (nln.LayerNorm(1024), torch.nn.LayerNorm(1024)), (8192, 1024), None),
        ("RMSNorm 8192x1024", lambda: (nln.RMSNorm(1024), torch.nn.RMSNorm(1024)), (8192, 1024), None),
        ("GroupNorm 8x256x32x32 G=32", lambda: (nln.GroupNorm(32, 256), torch.nn.GroupNorm(32, 256)), (8, 256, 32, 32), None),
        ("InstanceNorm2d 16x64x32x32", lambda: (nln.InstanceNorm2d(64, affine=True), torch.nn.InstanceNorm2d(64, affine=True)), (16, 64, 32, 32), None),
        ("BatchNorm2d 8x32x8x8 (small)", lambda: (nln.BatchNorm2d(32), torch.nn.BatchNorm2d(32)), (8, 32, 8, 8), None),
        ("LayerNorm 8x64 (tiny)", lambda: (nln.LayerNorm(64), torch.nn.LayerNorm(64)), (8, 64), None),
    ]
    if quick:
        keep = ("BatchNorm2d 32x64x56x56", "LayerNorm 8192x1024", "BatchNorm2d 8x32x8x8 (small)")
        cases = [c for c in cases if c[0] in keep]
    return cases


def _resnet(norm: Callable, width: int = 16):
    """A small CIFAR-style ResNet (3 stages of 2 basic blocks) with ``norm(channels)``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.n1 = norm(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.n2 = norm(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

        def forward(self, x):
            y = torch.relu(self.n1(self.c1(x)))
            y = self.n2(self.c2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _max_diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _scaled_diff(a, b) -> float:
    """max |a - b| / max(1, max |b|): an absolute difference for O(1) tensors (outputs, dx),
    relative to the size of large ones (a BatchNorm dweight sums 10^5 products: torch's float32
    sum is off by ~3e-3 on a value of ~800, ours by ~4e-5, measured against float64)."""
    if not a.numel():
        return 0.0
    return _max_diff(a, b) / max(1.0, float(b.detach().double().abs().max()))


def run_frontends(time_many: Callable, *, quick: bool, repeat: int, min_time: float,
                  log: Callable[[str], None] = print) -> dict:
    """Time the three tables; returns ``{"modules": [...], "train_step": {...}, "tabular": [...]}``."""
    import torch

    import normlab.nn as nln

    out = {"modules": [], "train_step": None, "tabular": []}
    g = torch.Generator().manual_seed(0)
    for name, make, shape, fmt in _module_cases(quick):
        ours, theirs = make()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(shape, generator=g)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=g)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(dy), yt.backward(dy)
        err = max(_scaled_diff(yo, yt), _scaled_diff(xo.grad, xt.grad),
                  _scaled_diff(ours.weight.grad, theirs.weight.grad))
        rec = dict(case=name, max_abs_diff=err, ok=err <= ATOL)
        if rec["ok"]:
            xr = x.clone().requires_grad_()

            def step(m):
                xr.grad = None
                m(xr).backward(dy)

            t = time_many({"ours": lambda: step(ours), "torch": lambda: step(theirs)},
                          SAMPLES_FACTOR * repeat, min_time)
            rec.update(ours_s=t["ours"]["median_s"], torch_s=t["torch"]["median_s"],
                       spread=max(t["ours"]["spread"], t["torch"]["spread"]))
            rec["speedup"] = rec["torch_s"] / rec["ours_s"]
        out["modules"].append(rec)
        log(f"  module {name}: " + (f"x{rec['speedup']:.2f}" if rec["ok"] else f"MISMATCH {err:.2e}"))

    # one SGD step of a small ResNet
    batch = 16 if quick else 32
    torch.manual_seed(0)
    ours_net = _resnet(nln.BatchNorm2d)
    theirs_net = _resnet(torch.nn.BatchNorm2d)
    theirs_net.load_state_dict(ours_net.state_dict())
    x = torch.randn(batch, 3, 32, 32, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    lo = torch.nn.functional.cross_entropy(ours_net(x), target)
    lt = torch.nn.functional.cross_entropy(theirs_net(x), target)
    opts = {id(ours_net): torch.optim.SGD(ours_net.parameters(), lr=1e-3),
            id(theirs_net): torch.optim.SGD(theirs_net.parameters(), lr=1e-3)}

    def train_step(net):
        opt = opts[id(net)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), target).backward()
        opt.step()

    err = abs(lo.item() - lt.item())
    ts = dict(case=f"ResNet (3 stages, widths 16-64) SGD step, batch {batch}x3x32x32",
              loss_diff=err, ok=err <= ATOL)
    if ts["ok"]:
        t = time_many({"ours": lambda: train_step(ours_net), "torch": lambda: train_step(theirs_net)},
                      SAMPLES_FACTOR * repeat, min_time)
        ts.update(ours_s=t["ours"]["median_s"], torch_s=t["torch"]["median_s"],
                  speedup=t["torch"]["median_s"] / t["ours"]["median_s"],
                  spread=max(t["ours"]["spread"], t["torch"]["spread"]))
    out["train_step"] = ts
    log(f"  train step: " + (f"x{ts['speedup']:.2f}" if ts["ok"] else f"MISMATCH {err:.2e}"))

    out["recurrent"] = _recurrent(time_many, quick=quick, repeat=repeat, min_time=min_time, log=log)

    # tabular NumPy front ends
    from sklearn.preprocessing import StandardScaler

    from normlab.bench import TutorialBatchNorm
    from normlab.estimators import BatchNormalizer
    from normlab.layers import BatchNorm

    rows = 16384 if quick else 65536
    for dtype in (np.float32,) if quick else (np.float32, np.float64):
        X = np.random.default_rng(1).normal(3.0, 2.0, size=(rows, 256)).astype(dtype)
        layer = BatchNorm(256, dtype=dtype)
        ones, zeros = np.ones(256, dtype), np.zeros(256, dtype)
        tut = TutorialBatchNorm(ones, zeros, zeros.copy(), ones.copy())
        fitted_ours, fitted_sk = BatchNormalizer().fit(X), StandardScaler().fit(X)
        ref = StandardScaler().fit_transform(X)
        err = max(float(np.abs(layer.forward(X) - ref).max()),
                  float(np.abs(BatchNormalizer().fit_transform(X) - ref).max()))
        rec = dict(case=f"tabular {rows}x256 {np.dtype(dtype).name}", max_abs_diff=err, ok=err <= 1e-3)
        if rec["ok"]:
            t = time_many({
                "layer.forward": lambda: layer.forward(X),
                "BatchNormalizer.fit_transform": lambda: BatchNormalizer().fit_transform(X),
                "BatchNormalizer.transform": lambda: fitted_ours.transform(X),
                "tutorial fit": lambda: tut.fit(X),
                "StandardScaler.fit_transform": lambda: StandardScaler().fit_transform(X),
                "StandardScaler.transform": lambda: fitted_sk.transform(X),
            }, repeat, min_time)
            rec["times_s"] = {k: v["median_s"] for k, v in t.items()}
            T = rec["times_s"]
            rec["ratios"] = {
                "tutorial / layer.forward": T["tutorial fit"] / T["layer.forward"],
                "StandardScaler.fit_transform / layer.forward":
                    T["StandardScaler.fit_transform"] / T["layer.forward"],
                "StandardScaler.fit_transform / BatchNormalizer.fit_transform":
                    T["StandardScaler.fit_transform"] / T["BatchNormalizer.fit_transform"],
                "StandardScaler.transform / BatchNormalizer.transform":
                    T["StandardScaler.transform"] / T["BatchNormalizer.transform"],
            }
        out["tabular"].append(rec)
        log(f"  {rec['case']}: " + (", ".join(f"{k} x{v:.1f}" for k, v in rec["ratios"].items())
                                    if rec["ok"] else f"MISMATCH {err:.2e}"))
    return out


class _NaiveLNLSTM:
    """A 2-layer LayerNorm LSTM as a user writes it: nn.Linear + nn.LayerNorm + a Python loop."""

    def __init__(self, input_size, hidden, layers, norm_functional):
        import torch
        from torch import nn

        self.F = norm_functional
        self.layers = []
        for k in range(layers):
            cin = input_size if k == 0 else hidden
            mods = dict(ih=nn.Linear(cin, 4 * hidden), hh=nn.Linear(hidden, 4 * hidden),
                        ln_ih=nn.LayerNorm(4 * hidden), ln_hh=nn.LayerNorm(4 * hidden),
                        ln_c=nn.LayerNorm(hidden))
            self.layers.append(mods)
        self.params = [p for m in self.layers for mod in m.values() for p in mod.parameters()]
        self.hidden = hidden
        self.torch = torch

    def _ln(self, mod, a):
        return self.F.layer_norm(a, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    def __call__(self, x):                      # x: (T, B, input)
        torch = self.torch
        for m in self.layers:
            B = x.shape[1]
            h = x.new_zeros(B, self.hidden)
            c = x.new_zeros(B, self.hidden)
            outs = []
            for t in range(x.shape[0]):
                g = self._ln(m["ln_ih"], m["ih"](x[t])) + self._ln(m["ln_hh"], m["hh"](h))
                i, f, gg, o = g.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(self._ln(m["ln_c"], c))
                outs.append(h)
            x = torch.stack(outs)
        return x


def _naive_from(ours, H, layers):
    """The naive loop with the weights of ``ours`` (a LayerNormLSTM), computing the same model:
    the Linear biases are 0 and the LN biases carry b_ih / b_hh (LN removes any bias before it)."""
    import torch
    import torch.nn.functional as TF

    naive = _NaiveLNLSTM(H, H, layers, TF)
    with torch.no_grad():
        for k, m in enumerate(naive.layers):
            for w in ("ih", "hh"):
                m[w].weight.copy_(getattr(ours, f"weight_{w}_l{k}"))
                m[w].bias.zero_()
                m["ln_" + w].weight.copy_(getattr(ours, f"ln_weight_{w}_l{k}"))
                m["ln_" + w].bias.copy_(getattr(ours, f"bias_{w}_l{k}"))
            m["ln_c"].weight.copy_(getattr(ours, f"ln_weight_c_l{k}"))
            m["ln_c"].bias.copy_(getattr(ours, f"ln_bias_c_l{k}"))
    return naive


def _recurrent(time_many, *, quick, repeat, min_time, log) -> dict:
    """Training step (forward + backward) of a 2-layer LayerNormLSTM: the fused path (default),
    the composite torch path (``recurrent._FUSED = False``), the naive nn.Linear + nn.LayerNorm
    loop with the same weights, and torch.nn.LSTM (no LayerNorm: the floor). Each call is timed
    interleaved with the others, both wall time and this thread's CPU time (``time.thread_time``,
    which a loaded machine inflates less); medians. (Its own loop rather than ``time_many``,
    which reads one clock; ``min_time`` does not apply: one call is a fraction of a second.)"""
    import copy
    import time

    import torch

    from normlab.nn import recurrent

    T, B, H, layers = (25 if quick else 100), 32, 256, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, H, generator=g)
    torch.manual_seed(3)
    ours = recurrent.LayerNormLSTM(H, H, num_layers=layers)
    with torch.no_grad():                      # LN parameters away from 1 / 0, so parity means something
        for name, p in ours.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    naive = _naive_from(ours, H, layers)
    lstm = torch.nn.LSTM(H, H, num_layers=layers)

    def step_ours(fused):
        saved, recurrent._FUSED = recurrent._FUSED, fused
        try:
            ours.zero_grad()
            ours(x)[0].sum().backward()
        finally:
            recurrent._FUSED = saved

    def step_naive():
        for p in naive.params:
            p.grad = None
        naive(x).sum().backward()

    def step_lstm():
        lstm.zero_grad()
        lstm(x)[0].sum().backward()

    # parity, in float64 on copies (in float32 the three drift apart by ~1e-3 over 100 steps, each
    # from the float64 result too: rounding amplified by the recurrence): the three LayerNorm
    # LSTMs compute the same outputs and weight_hh gradients
    ours64 = copy.deepcopy(ours).double()
    naive64 = _naive_from(ours64, H, layers)
    for m in naive64.layers:
        for mod in m.values():
            mod.double()
    x64 = x.double()
    results = []
    for fused in (True, False):
        saved, recurrent._FUSED = recurrent._FUSED, fused
        try:
            ours64.zero_grad()
            y = ours64(x64)[0]
            y.sum().backward()
        finally:
            recurrent._FUSED = saved
        results.append((y.detach(), ours64.weight_hh_l0.grad.clone()))
    y_n = naive64(x64)
    y_n.sum().backward()
    results.append((y_n.detach(), naive64.layers[0]["hh"].weight.grad))
    y_f, gw_f = results[0]
    diff = max(max(float((y_f - y).abs().max()), float((gw_f - gw).abs().max() / gw.abs().max()))
               for y, gw in results[1:])
    fns = {"LayerNormLSTM (fused kernels)": lambda: step_ours(True),
           "LayerNormLSTM (composite torch path)": lambda: step_ours(False),
           "naive loop (nn.Linear + nn.LayerNorm)": step_naive,
           "torch.nn.LSTM (no LayerNorm, floor)": step_lstm}
    rec = dict(case=f"2-layer LayerNormLSTM, hidden {H}, batch {B}, {T} steps, fwd+bwd, float32",
               max_abs_diff=diff, ok=diff <= 1e-9, threads=torch.get_num_threads())
    if not rec["ok"]:
        log(f"  recurrent: MISMATCH {diff:.2e}")
        return rec
    reps = 3 if quick else max(3, repeat)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for fn in fns.values():                    # warm-up (numba compile / load, allocator)
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    rec["times_s"] = {k: float(np.median(v)) for k, v in wall.items()}
    rec["thread_times_s"] = {k: float(np.median(v)) for k, v in cpu.items()}
    naive_k, fused_k = "naive loop (nn.Linear + nn.LayerNorm)", "LayerNormLSTM (fused kernels)"
    rec["speedup"] = rec["times_s"][naive_k] / rec["times_s"][fused_k]
    rec["speedup_thread_time"] = rec["thread_times_s"][naive_k] / rec["thread_times_s"][fused_k]
    log(f"  recurrent: naive / fused x{rec['speedup']:.2f} wall, x{rec['speedup_thread_time']:.2f} thread time")
    return rec


def _ms(s) -> str:
    return "-" if s is None else (f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us")


def summary_lines(fr: dict) -> list[str]:
    mods = [r for r in fr["modules"] if r.get("ok")]
    out = []
    if mods:
        sp = sorted(r["speedup"] for r in mods)
        worst = min(mods, key=lambda r: r["speedup"])
        out.append(f"nn modules fwd+bwd vs torch.nn: median x{float(np.median(sp)):.2f}, "
                   f"min x{worst['speedup']:.2f} ({worst['case']}) over {len(mods)} cases")
    bad = [r["case"] for r in fr["modules"] if not r.get("ok")]
    if bad:
        out.append(f"  MODULE MISMATCH: {', '.join(bad)}")
    ts = fr.get("train_step")
    if ts:
        out.append(f"training step, normlab norms vs torch.nn norms: "
                   + (f"x{ts['speedup']:.2f} ({ts['case']})" if ts.get("ok") else "MISMATCH"))
    rr = fr.get("recurrent")
    if rr and rr.get("ok"):
        out.append(f"{rr['case']}: " + "; ".join(f"{k} {_ms(v)}" for k, v in rr["times_s"].items())
                   + f" (naive / fused x{rr['speedup']:.2f} wall, x{rr['speedup_thread_time']:.2f} thread time)")
    elif rr:
        out.append(f"{rr['case']}: MISMATCH ({rr['max_abs_diff']:.1e})")
    for r in fr["tabular"]:
        if r.get("ok"):
            out.append(f"{r['case']}: " + ", ".join(f"{k} x{v:.1f}" for k, v in r["ratios"].items()))
    return out


def markdown(fr: dict) -> str:
    L = ["## Front ends", "",
         "### normlab.nn modules vs torch.nn (forward + backward through autograd, training mode)", "",
         "| case | ours | torch.nn | speedup | max diff (scaled) |", "|---|---|---|---|---|"]
    for r in fr["modules"]:
        L.append(f"| {r['case']} | {_ms(r.get('ours_s'))} | {_ms(r.get('torch_s'))} | "
                 + (f"x{r['speedup']:.2f}" if r.get("ok") else "MISMATCH") + f" | {r['max_abs_diff']:.1e} |")
    ts = fr.get("train_step")
    if ts:
        L += ["", "### One SGD training step", "", "| case | normlab norms | torch.nn norms | speedup |",
              "|---|---|---|---|",
              f"| {ts['case']} | {_ms(ts.get('ours_s'))} | {_ms(ts.get('torch_s'))} | "
              + (f"x{ts['speedup']:.2f}" if ts.get("ok") else "MISMATCH") + " |"]
    rr = fr.get("recurrent")
    if rr and rr.get("ok"):
        L += ["", "### Recurrent: one training step", "",
              f"{rr['case']}, torch threads {rr['threads']} (medians of interleaved calls; the three "
              f"LayerNorm LSTMs agree to {rr['max_abs_diff']:.1e} in float64):", "",
              "| implementation | wall time | thread CPU time" + (" (calling thread only)" if rr["threads"] > 1 else "")
              + " |", "|---|---|---|"]
        L += [f"| {k} | {_ms(v)} | {_ms(rr['thread_times_s'][k])} |" for k, v in rr["times_s"].items()]
        L.append(f"\nnaive loop / fused LayerNormLSTM: x{rr['speedup']:.2f} (wall), "
                 f"x{rr['speedup_thread_time']:.2f} (thread time)")
    elif rr:
        L += ["", f"### Recurrent: MISMATCH ({rr['case']}: {rr['max_abs_diff']:.1e})"]
    if fr["tabular"]:
        L += ["", "### NumPy front ends on tabular data", ""]
        for r in fr["tabular"]:
            if not r.get("ok"):
                L.append(f"- {r['case']}: MISMATCH ({r['max_abs_diff']:.1e})")
                continue
            L.append(f"- {r['case']}: " + "; ".join(f"{k} {_ms(v)}" for k, v in r["times_s"].items()))
            L.append("  - ratios: " + "; ".join(f"{k} x{v:.1f}" for k, v in r["ratios"].items()))
    return "\n".join(L) + "\n"

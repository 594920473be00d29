"""The benchmark harness behind ``normlab bench``: structure and parity, never timings.

The harness runs in-process on tiny cases against a stand-in backend (the float64 reference
behind the kernel contract of ``normlab.kernels``), so these tests hold whether or not the numba
kernels are built; one test runs the real default backend when it imports.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab import bench
from normlab import reference as R
from normlab.bench import Case

FAST = dict(repeat=1, min_time=1e-4)


class ReferenceStandIn:
    """``normlab.kernels``' contract on top of ``normlab.reference`` (slow, exact)."""

    name = "reference stand-in (tests)"
    eps = bench.EPS

    @staticmethod
    def _cast(x, *vs):
        return tuple(np.asarray(v).astype(x.dtype) if v is not None else None for v in vs)

    def batch_norm_forward(self, x, weight, bias, eps, *, channels_last=False, mean=None, var=None):
        y, c = R.batch_norm_forward(x, weight, bias, mean=mean, var=var, eps=eps,
                                    channels_last=channels_last)
        return y.astype(x.dtype), c["mean"], c["var"], 1.0 / np.sqrt(c["var"] + eps)

    def batch_norm_backward(self, dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                            need_weight_grad=True, need_bias_grad=True):
        _, c = R.batch_norm_forward(x, weight, np.zeros_like(weight), eps=self.eps,
                                    channels_last=channels_last)
        return self._cast(x, *R.batch_norm_backward(dy, c))

    def layer_norm_forward(self, x, normalized_shape, weight, bias, eps):
        y, c = R.layer_norm_forward(x, normalized_shape, weight, bias, eps=eps)
        return y.astype(x.dtype), c["mean"], c["rstd"]

    def layer_norm_backward(self, dy, x, normalized_shape, weight, mean, rstd):
        _, c = R.layer_norm_forward(x, normalized_shape, weight, np.zeros_like(weight), eps=self.eps)
        return self._cast(x, *R.layer_norm_backward(dy, c))

    def rms_norm_forward(self, x, normalized_shape, weight, eps):
        y, c = R.rms_norm_forward(x, normalized_shape, weight, eps=eps)
        return y.astype(x.dtype), c["rstd"]

    def rms_norm_backward(self, dy, x, normalized_shape, weight, rstd):
        _, c = R.rms_norm_forward(x, normalized_shape, weight, eps=self.eps)
        return self._cast(x, *R.rms_norm_backward(dy, c)[:2])

    def group_norm_forward(self, x, num_groups, weight, bias, eps, *, channels_last=False):
        y, c = R.group_norm_forward(x, num_groups, weight, bias, eps=eps, channels_last=channels_last)
        return y.astype(x.dtype), c["mean"], 1.0 / np.sqrt(c["var"] + eps)

    def group_norm_backward(self, dy, x, num_groups, weight, mean, rstd, *, channels_last=False):
        _, c = R.group_norm_forward(x, num_groups, weight, np.zeros_like(weight), eps=self.eps,
                                    channels_last=channels_last)
        return self._cast(x, *R.group_norm_backward(dy, c))

    def instance_norm_forward(self, x, weight, bias, eps, *, channels_last=False):
        y, c = R.instance_norm_forward(x, weight, bias, eps=eps, channels_last=channels_last)
        return y.astype(x.dtype), c["mean"], c["var"], 1.0 / np.sqrt(c["var"] + eps)

    def instance_norm_backward(self, dy, x, weight, mean, rstd, *, channels_last=False):
        _, c = R.instance_norm_forward(x, weight, np.zeros_like(weight), eps=self.eps,
                                       channels_last=channels_last)
        return self._cast(x, *R.instance_norm_backward(dy, c))


class OffByOne(ReferenceStandIn):
    """A broken backend: layer norm's forward output is shifted by 1."""

    def layer_norm_forward(self, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = super().layer_norm_forward(x, normalized_shape, weight, bias, eps)
        return y + 1, mean, rstd


TINY = [
    Case("layer_norm", (16, 40), suite="row"),
    Case("rms_norm", (16, 40), "float64", suite="row"),
    Case("batch_norm", (4, 6, 5, 3), channels_last=True, suite="conv"),
    Case("group_norm", (2, 8, 5, 5), groups=4, suite="conv"),
    Case("group_norm", (2, 8, 5, 5), groups=4, channels_last=True, suite="conv"),
    Case("instance_norm", (2, 3, 4, 4, 4), channels_last=True, suite="conv"),
    Case("batch_norm", (64, 5), "float64", suite="tabular"),
    Case("layer_norm", (8, 64), suite="overhead"),
]


def _kernels():
    """The real default backend, or None when normlab.kernels is not there / does not load."""
    try:
        from normlab.kernels import get_backend

        return get_backend(None, device="cpu")
    except Exception:
        return None


@pytest.fixture(scope="module")
def report():
    return bench.run_suite(TINY, ReferenceStandIn(), log=lambda s: None, **FAST)


def test_suite_covers_performance_md_and_respects_the_size_rules():
    cases = bench.build_suite()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {c.suite for c in cases} == {"row", "decode", "conv", "tabular", "overhead"}
    rows = [c for c in cases if c.suite == "row"]
    assert {c.shape[1] for c in rows} == {256, 1024, 4096, 16384, 1000, 2041, 4005}
    assert all(c.nbytes >= bench.BANDWIDTH_BYTES for c in rows)
    conv = [c for c in cases if c.suite == "conv"]
    for method in ("batch_norm", "group_norm", "instance_norm"):
        assert {c.channels_last for c in conv if c.method == method} == {False, True}
    assert any(c.layout == "NHWC" for c in conv) and any(c.layout == "NDHWC" for c in conv)
    tab = [c for c in cases if c.suite == "tabular"]
    assert {c.dtype for c in tab} == {"float32", "float64"}
    assert all(c.nbytes <= bench.MAX_MB * bench.MiB for c in cases)
    assert any("capped" in c.note for c in tab)
    assert {c.shape[0] for c in cases if c.suite == "decode"} == {1, 8, 64}

    quick = bench.build_suite(quick=True)
    assert 0 < len(quick) < len(cases) and {c.name for c in quick} <= set(names)
    assert len({c.suite for c in quick}) == 5

    only = bench.build_suite(cases="tabular.*fp64")
    assert only and all(c.suite == "tabular" and c.dtype == "float64" for c in only)
    assert all(c.dtype == "float64" for c in bench.build_suite(dtype="float64"))


def test_report_structure_and_parity_with_torch(report):
    assert report["schema"] == "normlab-bench/1" and report["device"] == "cpu"
    m = report["machine"]
    for key in ("cpu", "logical_cores", "usable_cores", "threads", "copy_64MiB_GBps"):
        assert key in m
    assert set(m["versions"]) >= {"numpy", "numba", "torch", "scikit-learn"}
    assert m["threads"]["torch"] >= 1
    assert len(report["results"]) == len(TINY)
    for case, r in zip(TINY, report["results"]):
        assert r["error"] is None, r["error"]
        assert r["check"]["ok"], [i for i in r["check"]["items"] if not i["ok"]]
        assert set(r["modes"]) == set(case.modes)
        outputs = {i["output"] for i in r["check"]["items"]}
        assert {"y (fwd)", "dx", "dweight"} <= outputs
        for mode, d in r["modes"].items():
            assert d["units"] == bench.UNITS[mode]
            assert d["bytes"] == bench.UNITS[mode] * case.nbytes
            for key in ("ours_s", "torch_s", "speedup", "ours_GBps", "ours_pct_copy", "compile_s"):
                assert math.isfinite(d[key]) and d[key] >= 0
    tab = report["results"][TINY.index(next(c for c in TINY if c.suite == "tabular"))]
    assert set(tab["modes"]["fwd"]["peers"]) == {"tutorial", "sklearn"}
    assert set(tab["modes"]["eval"]["peers"]) == {"tutorial", "sklearn"}
    assert {i["against"] for i in tab["check"]["items"]} == {"torch", "tutorial", "sklearn"}
    s = report["summary"]
    assert s["mismatches"] == [] and s["errors"] == []
    assert s["speedup_min"] <= s["speedup_median"]
    assert "tutorial/ours fwd" in s["numpy_peers"] and "sklearn/ours fwd" in s["numpy_peers"]
    assert s["overhead_fwd_us"] and s["overhead_fwd_us"][0]["case"] == TINY[-1].name


def test_written_files(report, tmp_path):
    md, js = bench.write_report(report, tmp_path / "results", "test")
    assert md.name == "cpu-test.md" and js.name == "cpu-test.json"
    data = json.loads(js.read_text())
    assert data["summary"]["cases"] == len(TINY)
    text = md.read_text()
    for heading in ("## Summary", "## Row norms", "## Conv norms", "## Tabular", "## Per-call overhead",
                    "## Parity checks", "## Compile time"):
        assert heading in text
    assert "All outputs of all cases within tolerance." in text
    assert "MISMATCH" not in text


def test_a_mismatch_is_flagged_not_hidden(tmp_path):
    rep = bench.run_suite([TINY[0]], OffByOne(), log=lambda s: None, **FAST)
    r = rep["results"][0]
    assert not r["check"]["ok"]
    assert [i["output"] for i in r["check"]["items"] if not i["ok"]] == ["y (fwd)"]
    assert rep["summary"]["mismatches"] == [TINY[0].name]
    md, _ = bench.write_report(rep, tmp_path, "bad")
    assert "MISMATCH" in md.read_text()


def test_tutorial_code_is_batch_norm():
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(50, 4))
    w, b = np.linspace(0.5, 1.5, 4), np.linspace(-1, 1, 4)
    tut = bench.TutorialBatchNorm(w, b, np.zeros(4), np.ones(4))
    np.testing.assert_allclose(tut.fit(x), R.batch_norm_forward(x, w, b)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tut.running_mean, 0.1 * x.mean(axis=0))
    f32 = [v.astype(np.float32) for v in (w, b, np.zeros(4), np.ones(4))]
    assert bench.TutorialBatchNorm(*f32).fit(x.astype(np.float32)).dtype == np.float32


def test_main_writes_both_files_and_exits_zero(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "_load_backend", lambda name, device: ReferenceStandIn())
    rc = bench.main(["--cases", "overhead.*layer_norm", "--out", str(tmp_path), "--tag", "t",
                     "--repeat", "1", "--min-time", "0.0001"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "cpu-t.md").exists() and (tmp_path / "cpu-t.json").exists()
    assert "speedup vs torch" in out and "% of copy" not in out.split("speedup vs torch")[0]


def test_list_and_bad_options(capsys):
    assert bench.main(["--list", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "cases" in out
    assert bench.main(["--cases", "no-such-case"]) == 2
    assert bench.main(["--cases", "("]) == 2
    assert bench.main(["--repeat", "0"]) == 2
    assert "--repeat" in capsys.readouterr().err


def test_cuda_is_refused_clearly(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU suite would run")
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_add_arguments_reuses_the_options():
    import argparse

    parser = bench.add_arguments(argparse.ArgumentParser(prog="normlab bench"))
    args = parser.parse_args(["--quick", "--dtype", "float64", "--backend", "numba", "--out", "x"])
    assert args.quick and args.dtype == "float64" and args.backend == "numba" and args.out == "x"
    assert args.device == "cpu" and args.cases is None


def test_real_kernels_match_torch_on_benchmarked_inputs():
    be = _kernels()
    if be is None:
        pytest.skip("normlab.kernels is not available")
    # One row-pattern and one column-pattern case: enough to prove the wiring, few compiles.
    rep = bench.run_suite([TINY[0], TINY[2]], be, log=lambda s: None, **FAST)
    for r in rep["results"]:
        assert r["error"] is None, (r["name"], r["error"])
        assert r["check"]["ok"], (r["name"], [i for i in r["check"]["items"] if not i["ok"]])


def test_a_disagreement_is_settled_by_the_float64_reference():
    ref = np.linspace(-3, 3, 50)
    chk = bench._Parity(lambda: {"y (fwd)": ref})
    chk.compare("y (fwd)", "torch", ref, ref + 1e-3, 1e-4)          # the peer is off: ours passes
    chk.compare("y (fwd)", "torch", ref + 1e-3, ref, 1e-4)          # ours is off: a mismatch
    chk.compare("dx", "torch", ref, ref + 1e-3, 1e-4)               # no reference for dx: a mismatch
    first, second, third = chk.items
    assert first["ok"] and "torch is the one off" in first["detail"]
    assert not second["ok"] and second["ours_vs_float64"] > 1e-4
    assert not third["ok"] and "detail" not in third


def test_compile_probe_keeps_everything_but_the_batch():
    for case in bench.build_suite():
        probe = bench._probe_shape(case)
        assert probe[1:] == tuple(case.shape[1:]) and probe[0] <= case.shape[0]
        assert probe[0] <= (64 if case.suite == "tabular" else 2) or case.suite == "overhead"

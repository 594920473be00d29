"""normlab.bench_gpu without a GPU: the suite, the byte model, the summary against PERFORMANCE.md's
targets and the Markdown table (from hand-written records: made-up numbers that exercise the
arithmetic and the formatting, never reported anywhere), and the clear refusal without CUDA.
No GPU figure is produced or checked here."""

from __future__ import annotations

import pytest

from normlab import bench, bench_gpu as G


def test_suite_covers_every_method_layout_and_dtype():
    cases = G.build_gpu_suite(dtypes=("bfloat16", "float32"))
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {c.method for c in cases} == {"layer_norm", "rms_norm", "batch_norm", "group_norm",
                                         "instance_norm"}
    for m in ("batch_norm", "group_norm", "instance_norm"):
        assert {c.channels_last for c in cases if c.method == m} == {False, True}
    assert {c.dtype for c in cases} == {"bfloat16", "float32"}
    rows = [c for c in cases if c.suite == "row"]
    assert {c.shape[1] for c in rows} == set(G.ROW_N)
    for c in rows:              # sized to the target within one row
        assert G.ROW_BYTES - c.shape[1] * G.ITEMSIZE[c.dtype] < c.nbytes <= G.ROW_BYTES
    assert {c.shape[0] for c in cases if c.suite == "decode"} == set(G.DECODE_M)
    assert "batch_norm NHWC 32x256x56x56 bf16" in names
    assert "group_norm NCHW 8x640x64x64 G=32 bf16" in names
    bn = next(c for c in cases if c.method == "batch_norm")
    assert bn.modes == ("eval", "fwd", "bwd", "fwd+bwd")


def test_quick_and_regex_select_subsets():
    full = G.build_gpu_suite()
    quick = G.build_gpu_suite(quick=True)
    assert 0 < len(quick) < len(full) and set(c.name for c in quick) <= set(c.name for c in full)
    assert {c.method for c in quick} == {c.method for c in full}
    only = G.build_gpu_suite(cases="NHWC")
    assert only and all(c.channels_last for c in only)
    small = G.build_gpu_suite(row_bytes=1 << 20, cases=r"^layer_norm \d+x256 ")
    assert [c.shape for c in small] == [(2048, 256)]


def test_byte_model():
    assert G.gbps(10**9, "fwd", 1.0) == 2.0
    assert G.gbps(10**9, "bwd", 1.0) == 3.0
    assert G.gbps(10**9, "fwd+bwd", 0.5) == 10.0
    assert G.gbps(10**9, "fwd", None) is None


def _rec(name, method, shape, modes, channels_last=False, suite="row", parity_ok=True):
    return dict(name=name, method=method, shape=list(shape), channels_last=channels_last,
                suite=suite, modes=modes, parity_ok=parity_ok)


def test_summary_checks_the_targets_and_the_table_shows_them():
    results = [
        _rec("layer_norm 16384x4096 bf16", "layer_norm", (16384, 4096),
             {"fwd": dict(ours_s=1e-3, GBps=2900.0, pct_copy=95.0, peers={"eager": 2e-3},
                          x={"eager": 2.0}),
              "bwd": dict(ours_s=2e-3, GBps=1500.0, pct_copy=50.0, peers={}, x={})}),
        _rec("rms_norm 65536x1024 bf16", "rms_norm", (65536, 1024),      # N < 4096: no target
             {"fwd": dict(ours_s=1e-3, GBps=100.0, pct_copy=10.0, peers={}, x={})}),
        _rec("group_norm NHWC 8x640x64x64 G=32 bf16", "group_norm", (8, 640, 64, 64),
             {"fwd+bwd": dict(ours_s=1e-3, GBps=100.0, pct_copy=10.0,
                              peers={"eager": 3.5e-3, "liger": 1e-3}, x={"eager": 3.5, "liger": 1.0})},
             channels_last=True, suite="conv"),
        _rec("batch_norm NCHW 32x64x112x112 bf16", "batch_norm", (32, 64, 112, 112),  # NCHW BN: none
             {"fwd+bwd": dict(ours_s=1e-3, GBps=1.0, pct_copy=1.0, peers={"eager": 1e-3},
                              x={"eager": 1.0})}, suite="conv", parity_ok=False),
    ]
    s = G.summarize(results)
    got = {(c["case"], c["mode"]): c["met"] for c in s["checks"]}
    assert got == {("layer_norm 16384x4096 bf16", "fwd"): True,
                   ("layer_norm 16384x4096 bf16", "bwd"): False,
                   ("group_norm NHWC 8x640x64x64 G=32 bf16", "fwd+bwd"): True}
    assert (s["met"], s["total"]) == (2, 3)
    assert s["parity_failures"] == ["batch_norm NCHW 32x64x112x112 bf16"]
    report = dict(created="now", machine=dict(gpu="(test)", sms=1, memory_gib=1.0, l2_mib=1.0,
                                              copy_GBps=3000.0, versions={}, git_commit=None),
                  results=results, summary=s)
    md = G.markdown(report)
    assert "| layer_norm 16384x4096 bf16 | fwd | 1.000 ms | 2900 | 95% | 2.000 ms | 2.00 |" in md
    assert "2 of 3 met" in md and "MISSED: layer_norm 16384x4096 bf16 bwd" in md
    assert "PARITY FAILED" in md and "Parity failures: batch_norm NCHW" in md


def test_cuda_bench_refuses_clearly_without_cuda(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "torch.cuda.is_available() is False" in err


def test_gpu_dtypes_are_refused_on_cpu(capsys):
    assert bench.main(["--dtype", "bfloat16", "--list"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--peers", "eager"], ["--cuda-graphs"]], ids=["peers", "graphs"])
def test_gpu_options_are_refused_on_cpu(flag, capsys):
    assert bench.main(flag + ["--list"]) == 2
    assert f"{flag[0]} is for --device cuda" in capsys.readouterr().err

"""`normlab study`: end to end on a tiny plan, resume, determinism, reports, verdicts, bad arguments.

Tiny plans use scikit-learn's digits with the MLP (tens of steps per run), one thread, one
process, so the whole file runs in well under a minute.
"""

import json
import re

import numpy as np
import pytest

from normlab import cli
from normlab.study import runner, studies
from normlab.study.models import available_norms

TINY = ["--dataset", "digits", "--model", "mlp", "--seeds", "2", "--epochs", "1", "--jobs", "1",
        "--no-progress"]


def _study(tmp_path, *extra):
    return cli.main(["study", *extra, *TINY, "--out", str(tmp_path)])


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_end_to_end_tiny_batch_size_study_writes_every_output(tmp_path, capsys):
    rc = _study(tmp_path, "batch-size", "--norms", "none,bn,gn", "--batch-sizes", "16,64")
    out = capsys.readouterr().out
    assert rc == 0
    recs = _lines(tmp_path / "results.jsonl")
    assert len(recs) == 3 * 2 * 2
    assert {r["config"]["norm"] for r in recs} == {"none", "bn", "gn"}
    assert all(0.0 <= r["metrics"]["test_acc"] <= 1.0 for r in recs)
    png = (tmp_path / "batch-size.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "batch-size" in html and "<table>" in html
    md = (tmp_path / "report.md").read_text()
    assert "## batch-size" in md and "![batch-size](batch-size.png)" in md
    # the verdict is printed with its numbers
    assert re.search(r"\[batch-size\] [A-Z ]+:", out)
    assert re.search(r"error\(B=16\) - error\(B=64\): [+-]\d+\.\d ± \d+\.\d pts", out)


def test_resume_runs_only_the_missing_runs(tmp_path, capsys):
    args = ("batch-size", "--norms", "bn,gn", "--batch-sizes", "32,64")
    assert _study(tmp_path, *args) == 0
    path = tmp_path / "results.jsonl"
    recs = _lines(path)
    assert len(recs) == 8
    # an interruption: the last two runs are lost and the third-to-last was cut mid-line
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:5]) + text[5][:40])
    capsys.readouterr()
    assert _study(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert "8 planned, 5 already in" in out and "3 to run" in out
    again = _lines(path)
    assert len(again) == 8
    assert {r["key"] for r in again} == {r["key"] for r in recs}
    assert again[:5] == recs[:5]  # the kept runs were not redone
    # rerunning a complete study runs nothing
    assert _study(tmp_path, *args) == 0
    assert "0 to run" in capsys.readouterr().out


def test_same_seed_same_numbers_and_other_seed_other_numbers():
    cfg = {"study": "t", "dataset": "digits", "model": "mlp", "norm": "bn", "batch_size": 16,
           "lr": 0.05, "epochs": 1, "seed": 3, "order": "sorted", "measure": ["batch_stats"]}
    a, b = runner.execute(cfg), runner.execute(dict(cfg))
    assert a == b
    c = runner.execute(dict(cfg, seed=4))
    assert c["train_loss"] != a["train_loss"]


def test_jobs_do_not_change_the_numbers(tmp_path, capsys):
    cfgs = [{"study": "t", "dataset": "digits", "model": "mlp", "norm": n, "batch_size": 32,
             "lr": 0.05, "epochs": 1, "seed": s} for n in ("bn", "none") for s in (0, 1)]
    one = runner.run_plan(cfgs, tmp_path / "one", jobs=1, progress=False)
    two = runner.run_plan(cfgs, tmp_path / "two", jobs=2, progress=False)
    assert {k: r["metrics"] for k, r in one.items()} == {k: r["metrics"] for k, r in two.items()}


def test_batches_iid_and_class_sorted():
    import torch

    labels = torch.arange(10).repeat_interleave(20)
    gen = torch.Generator().manual_seed(0)
    iid = runner._batches(200, 16, "iid", labels, gen)
    assert len(iid) == 12 and all(len(b) == 16 for b in iid)
    assert len(torch.unique(torch.cat(iid))) == 192  # a permutation, last incomplete batch dropped
    srt = runner._batches(200, 16, "sorted", labels, gen)
    assert len(srt) == 10 and all(len(torch.unique(labels[b])) <= 2 for b in srt)  # 2 runs of 8 per class
    assert np.mean([len(torch.unique(labels[b])) for b in iid]) > 5


def test_mnist1d_matches_the_packages_generator():
    from mnist1d.data import make_dataset

    from normlab.study import data

    ds = data.load("mnist1d")
    ref = make_dataset()  # default args, generated locally (no download)
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    np.testing.assert_allclose(ds.x_train[:, 0], ref["x"], atol=1e-6)
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


# ------------------------------------------------------------------ verdicts from records
def _rec(study, metrics, seed, **config):
    return {"key": "", "config": dict(study=study, seed=seed, **config), "metrics": metrics}


def _verdict(study, records):
    return studies.STUDIES[study].analyze(records)


@pytest.mark.parametrize("flip", [False, True])
def test_batch_size_verdict_follows_the_records(flip):
    rng = np.random.default_rng(0)
    recs = []
    for s in range(4):
        for b in (2, 8, 32):
            bn_err = 0.1 + (0.3 if (b == 2 and not flip) else 0.0)
            for norm, err in (("bn", bn_err), ("gn", 0.15), ("ln", 0.2)):
                recs.append(_rec("batch-size", {"test_acc": 1 - err - 0.002 * rng.random()}, s, norm=norm, batch_size=b))
    a = _verdict("batch-size", recs)
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]
    assert len(a.checks) == 3
    assert "B=2" in a.table[0][1] and len(a.table) == 4


@pytest.mark.parametrize("flip", [False, True])
def test_train_eval_gap_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        for order, bs in studies.TrainEvalGap.CONDITIONS.values():
            run = 0.6 + 0.01 * s
            better = run - 0.1 if flip else run + 0.1
            recs.append(_rec("train-eval-gap", {"test_acc": run, "test_acc_batch_stats": better + 0.01 * s,
                                                "test_acc_recalibrated": better}, s, norm="bn", order=order, batch_size=bs))
            recs.append(_rec("train-eval-gap", {"test_acc": better - 0.005 * s}, s, norm="brn", order=order, batch_size=bs))
    a = _verdict("train-eval-gap", recs)
    assert len(a.checks) == 6
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]


@pytest.mark.parametrize("flip", [False, True])
def test_learning_rate_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        for lr in (0.01, 0.1, 1.0, 3.0):
            good = 0.8 + 0.01 * s
            bad = 0.1 + 0.02 * s if lr >= 1.0 else good - 0.2
            bn, none = (good, bad) if not flip else (bad, good)
            recs.append(_rec("learning-rate", {"test_acc": bn}, s, norm="bn", lr=lr))
            recs.append(_rec("learning-rate", {"test_acc": none}, s, norm="none", lr=lr))
    a = _verdict("learning-rate", recs)
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]
    assert any("within 5 points" in n for n in a.notes)


@pytest.mark.parametrize("flip", [False, True])
def test_init_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        for k, scale in enumerate((0.1, 1.0, 10.0)):
            flat, steep = 0.8 + 0.01 * s, 0.3 + 0.25 * k + 0.01 * s if k < 2 else 0.2 + 0.01 * s
            bn, none = (flat, steep) if not flip else (steep, flat)
            recs.append(_rec("init", {"test_acc": bn}, s, norm="bn", init_scale=scale))
            recs.append(_rec("init", {"test_acc": none}, s, norm="none", init_scale=scale))
    a = _verdict("init", recs)
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]


@pytest.mark.parametrize("flip", [False, True])
def test_regularization_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        for d in ("digits", "mnist1d"):
            small, big = 0.02 + 0.005 * s, 0.15 + 0.01 * s
            g_bn, g_none = (small, big) if not flip else (big, small)
            recs.append(_rec("regularization", {"train_acc": 0.99, "test_acc": 0.99 - g_bn}, s, norm="bn", dataset=d))
            recs.append(_rec("regularization", {"train_acc": 0.99, "test_acc": 0.99 - g_none}, s, norm="none", dataset=d))
    a = _verdict("regularization", recs)
    assert len(a.checks) == 2
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]


@pytest.mark.parametrize("flip", [False, True])
def test_domain_shift_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        before = 0.4 + 0.01 * s
        after = before - 0.05 if flip else before + 0.3
        src = before - 0.05 if flip else 0.9
        recs.append(_rec("domain-shift", {"test_acc": src, "target_acc": before, "target_acc_adapted": after}, s, norm="bn"))
    a = _verdict("domain-shift", recs)
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]


def test_few_seeds_or_noise_give_inconclusive():
    recs = [_rec("domain-shift", {"test_acc": 0.9, "target_acc": 0.5, "target_acc_adapted": 0.8}, 0, norm="bn")]
    assert _verdict("domain-shift", recs).status == "inconclusive"  # one seed: no interval
    recs = [_rec("domain-shift", {"test_acc": 0.9, "target_acc": 0.5, "target_acc_adapted": 0.5 + d}, s, norm="bn")
            for s, d in enumerate((0.2, -0.2, 0.1))]
    a = _verdict("domain-shift", recs)
    assert a.checks[1].status == "inconclusive"


def test_end_to_end_tiny_rnn_study(tmp_path, capsys):
    rc = cli.main(["study", "rnn", "--dataset", "digits", "--norms", "none,ln,bn", "--batch-sizes", "64,256",
                   "--seeds", "2", "--epochs", "1", "--jobs", "1", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    recs = _lines(tmp_path / "results.jsonl")
    assert sorted((r["config"]["norm"], r["config"]["batch_size"]) for r in recs) == sorted(
        (n, b) for n in ("none", "ln", "bn") for b in (64, 256) for _ in range(2)), out
    assert {r["config"]["model"] for r in recs} == {"lstm"}
    assert all(0.0 <= r["metrics"]["test_acc"] <= 1.0 for r in recs)
    assert (tmp_path / "rnn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "## rnn" in md and "recurrent BN (BNLSTM)" in md and "16 steps of 4 values" in md
    assert re.search(r"\[rnn\] [A-Z ]+:", out)


def test_rnn_gru_plan_leaves_out_recurrent_bn():
    plan = studies.STUDIES["rnn"].plan(studies.Options(model="gru", seeds=1))
    assert {c["norm"] for c in plan} == {"none", "ln"} and {c["model"] for c in plan} == {"gru"}
    plan = studies.STUDIES["rnn"].plan(studies.Options(model="mlp", seeds=1))   # a feed-forward --model
    assert {c["model"] for c in plan} == {"lstm"}                                 # leaves rnn on its own


@pytest.mark.parametrize("flip", [False, True])
def test_rnn_verdict_follows_the_records(flip):
    recs = []
    for s in range(3):
        for b in (8, 32):
            e = {"none": 0.6, "ln": 0.3, "bn": 0.3 if b == 32 else 0.55}
            if flip:
                e = {"none": 0.3, "ln": 0.6, "bn": 0.6 if b == 32 else 0.4}
            for n, err in e.items():
                recs.append(_rec("rnn", {"test_acc": 1 - err - 0.01 * s}, s, norm=n, batch_size=b))
    a = _verdict("rnn", recs)
    assert len(a.checks) == 3
    assert a.status == ("not supported" if flip else "supported"), [c.detail for c in a.checks]


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("argv, words", [
    (["study", "frobnicate"], ["unknown study 'frobnicate'", "batch-size", "domain-shift"]),
    (["study", "rnn", "--norms", "bn,gn"], ["norm 'gn' has no recurrent form", "none, ln, bn"]),
    (["study", "rnn", "--model", "cnn"], ["--model cnn does not fit the rnn study", "lstm or gru"]),
    (["study", "--model", "lstm"], ["--model lstm does not fit", "normlab study rnn --model lstm"]),
    (["study", "batch-size", "--norms", "bn,xyz"], ["unknown norm 'xyz'", "gn", "ln"]),
    (["study", "batch-size", "--batch-sizes", "2,5000", "--dataset", "digits"], ["larger than the 1348", "2..1348"]),
    (["study", "batch-size", "--batch-sizes", "1"], ["at least 2"]),
    (["study", "--dataset", "cifar"], ["unknown dataset 'cifar'", "mnist1d", "digits"]),
    (["study", "--profile", "huge"], ["unknown profile 'huge'", "quick", "full"]),
    (["study", "--seeds", "0"], ["--seeds must be a positive"]),
])
def test_bad_arguments_exit_2_with_the_valid_choices(argv, words, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not (tmp_path / "results.jsonl").exists()


# ------------------------------------------------------------------ optional pieces
def test_optional_norms_are_skipped_loudly_or_used(tmp_path, capsys):
    usable, skipped = available_norms()
    assert set(usable) | set(skipped) == {"none", "bn", "brn", "ghost", "gn", "ln", "in"}
    plan = studies.STUDIES["batch-size"].plan(studies.Options(seeds=1))
    assert {c["norm"] for c in plan} == set(usable)
    if skipped:
        assert _study(tmp_path, "batch-size", "--norms", "bn", "--batch-sizes", "64") == 0
        err = capsys.readouterr().err
        for n in skipped:
            assert f"norm {n!r} skipped" in err


def test_batch_renorm_and_ghost_bn_run(tmp_path):
    import normlab.nn as nlnn

    if not (hasattr(nlnn, "BatchRenorm1d") and hasattr(nlnn, "GhostBatchNorm1d")):
        pytest.skip("normlab.nn.BatchRenorm1d / GhostBatchNorm1d not landed yet")
    assert _study(tmp_path, "batch-size", "--norms", "brn,ghost", "--batch-sizes", "32") == 0
    recs = _lines(tmp_path / "results.jsonl")
    assert {r["config"]["norm"] for r in recs} == {"brn", "ghost"}
    assert all(r["metrics"]["test_acc"] > 0.2 for r in recs)  # 10 classes: chance is 0.1


def test_train_eval_gap_and_domain_shift_end_to_end(tmp_path, capsys):
    tools = pytest.importorskip("normlab.nn.tools", reason="normlab.nn.tools not landed yet")
    if not (hasattr(tools, "recalibrate_batchnorm") and hasattr(tools, "adapt_batchnorm")):
        pytest.skip("recalibrate_batchnorm / adapt_batchnorm not landed yet")
    rc = cli.main(["study", "train-eval-gap", "domain-shift", "--dataset", "digits", "--model", "mlp",
                   "--seeds", "2", "--epochs", "1",
                   "--jobs", "1", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    recs = _lines(tmp_path / "results.jsonl")
    gap = [r["metrics"] for r in recs if r["config"]["study"] == "train-eval-gap" and r["config"]["norm"] == "bn"]
    shift = [r["metrics"] for r in recs if r["config"]["study"] == "domain-shift" and r["config"]["norm"] == "bn"]
    assert len(gap) == 4 and all("test_acc_batch_stats" in m and "test_acc_recalibrated" in m for m in gap)
    assert len(shift) == 2 and all("target_acc" in m and "target_acc_adapted" in m for m in shift)
    assert {r["config"]["dataset"] for r in recs if r["config"]["study"] == "domain-shift"} == {"mnist1d"}
    assert "[train-eval-gap]" in out and "[domain-shift]" in out
    assert (tmp_path / "train-eval-gap.png").exists() and (tmp_path / "domain-shift.png").exists()

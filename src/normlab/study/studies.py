"""The studies: for each, a claim, the runs that measure it (``plan``), and a verdict computed
from the recorded results (``analyze``), plus its figure (``plot``).

A verdict is a list of *checks*. Each check compares two arms seed by seed (same seed = same
data order and same initial weights where the arms share a model), takes the mean difference
and its 95% interval over seeds, and reads:

- ``supported``: the whole interval lies above ``MIN_EFFECT`` (1 point of accuracy or error)
  in the direction the claim predicts;
- ``not supported``: the whole interval lies below it (no effect, a negligible one, or the
  reverse);
- ``inconclusive``: the interval contains it (more seeds or epochs would be needed).

A study's overall verdict is ``supported`` / ``not supported`` when every check agrees,
``mixed`` when some checks are supported and some not, ``partly supported`` / ``partly not
supported`` when the rest are inconclusive, and ``inconclusive`` when none is decided.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from . import runner
from .models import NORM_LABELS, available_norms
from .stats import fmt_pm, mean_ci, paired, status_of

BASE_LR = 0.1          # SGD learning rate at batch 32; scaled linearly with the batch (Goyal et al.)
REF_BATCH = 32
MIN_EFFECT = 0.01      # a difference of accuracy below 1 point is not an effect worth a claim


@dataclass
class Options:
    profile: str = "quick"
    seeds: int | None = None
    epochs: int | None = None
    norms: list[str] | None = None
    batch_sizes: list[int] | None = None
    dataset: str | None = None
    model: str | None = None


@dataclass
class Check:
    claim: str
    status: str
    detail: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Analysis:
    study: str
    claim: str
    status: str
    checks: list[Check]
    table: list[list[str]]           # first row = header
    notes: list[str] = field(default_factory=list)


def overall(checks: list[Check]) -> str:
    s = {c.status for c in checks}
    if not checks or s == {"inconclusive"}:
        return "inconclusive"
    if s == {"supported"}:
        return "supported"
    if s == {"not supported"}:
        return "not supported"
    if "supported" in s and "not supported" in s:
        return "mixed"
    return "partly supported" if "supported" in s else "partly not supported"


def _by_seed(records, metric, **match):
    """{seed: metric} of the records whose config matches every ``match`` item."""
    out = {}
    for r in records:
        c = r["config"]
        if all(c.get(k) == v for k, v in match.items()) and r["metrics"].get(metric) is not None:
            out[c["seed"]] = r["metrics"][metric]
    return out


def _pct(m, h, n):
    if n == 0 or not math.isfinite(m):
        return "n/a"
    return f"{100 * m:.1f} ± {'inf' if not math.isfinite(h) else f'{100 * h:.1f}'}"


def _check(claim, a, b, what, min_effect=MIN_EFFECT):
    m, h, n = paired(a, b)
    st = status_of(m, h, n, min_effect=min_effect)
    return Check(claim, st, f"{what}: {fmt_pm(m, h)} (95% interval over {n} seeds; needs > {100 * min_effect:g} pts)",
                 {"mean": m, "half_width": h, "n": n})


class Study:
    name = ""
    title = ""
    claim = ""
    default_model = "cnn"
    default_dataset = "mnist1d"
    models = ("mlp", "cnn")           # the models this study can train (--model)

    def base(self, opts: Options, **kw):
        prof = PROFILES[opts.profile][self.name]
        cfg = {"study": self.name, "dataset": opts.dataset or self.default_dataset,
               "model": opts.model if opts.model in self.models else self.default_model,
               "epochs": opts.epochs or prof["epochs"]}
        if prof.get("train_subset"):
            cfg["train_subset"] = prof["train_subset"]
        cfg.update(kw)
        return cfg

    def seeds(self, opts):
        return range(opts.seeds or PROFILES[opts.profile][self.name]["seeds"])

    def plan(self, opts: Options) -> list[dict]:
        raise NotImplementedError

    def analyze(self, records: list[dict]) -> Analysis:
        raise NotImplementedError

    def plot(self, records: list[dict], path) -> None:
        raise NotImplementedError


def _lr(bs):
    return BASE_LR * bs / REF_BATCH


# ---------------------------------------------------------------- 1. batch size
class BatchSize(Study):
    name = "batch-size"
    title = "Test error vs batch size (Wu & He 2018, Fig. 1)"
    claim = ("BatchNorm's error grows as the batch shrinks, while batch-independent norms "
             "(GroupNorm, LayerNorm, InstanceNorm) stay flat and beat it at the smallest batch.")
    labels = NORM_LABELS

    def plan(self, opts):
        norms = opts.norms or PROFILES[opts.profile][self.name]["norms"]
        norms = [n for n in norms if n in available_norms()[0]]
        bss = opts.batch_sizes or PROFILES[opts.profile][self.name]["batch_sizes"]
        return [self.base(opts, norm=n, batch_size=b, lr=_lr(b), seed=s)
                for n in norms for b in bss for s in self.seeds(opts)]

    def analyze(self, records):
        norms = [n for n in NORM_LABELS if any(r["config"]["norm"] == n for r in records)]
        bss = sorted({r["config"]["batch_size"] for r in records})
        table = [["norm"] + [f"B={b}" for b in bss]]
        for n in norms:
            table.append([NORM_LABELS[n]] + [_pct(*mean_ci(1 - v for v in _by_seed(records, "test_acc", norm=n, batch_size=b).values()))
                                              for b in bss])
        checks = []
        if bss:
            small = bss[0]
            ref = REF_BATCH if REF_BATCH in bss and REF_BATCH != small else bss[-1]
            err = lambda n, b: {s: 1 - v for s, v in _by_seed(records, "test_acc", norm=n, batch_size=b).items()}
            if "bn" in norms and ref != small:
                checks.append(_check(f"BatchNorm's test error at batch {small} is higher than at batch {ref}",
                                     err("bn", small), err("bn", ref), f"error(B={small}) - error(B={ref})"))
            free = [n for n in ("gn", "ln", "in") if n in norms]
            if "bn" in norms and free:
                best = min(free, key=lambda n: mean_ci(err(n, small).values())[0])
                checks.append(_check(f"at batch {small} the best batch-independent norm ({NORM_LABELS[best]}) "
                                     f"has lower error than BatchNorm", err("bn", small), err(best, small),
                                     f"error(BN) - error({NORM_LABELS[best]}) at B={small}"))
                if ref != small:
                    dbn = {s: err("bn", small)[s] - err("bn", ref)[s] for s in set(err("bn", small)) & set(err("bn", ref))}
                    dfree = {s: err(best, small)[s] - err(best, ref)[s] for s in set(err(best, small)) & set(err(best, ref))}
                    checks.append(_check(f"going from batch {ref} to {small}, BatchNorm loses more than {NORM_LABELS[best]}",
                                         dbn, dfree, "increase of BN error - increase of its error"))
        notes = [f"learning rate {BASE_LR} x batch/{REF_BATCH} (linear scaling), same number of epochs for every batch size; "
                 f"GhostBN equals BatchNorm for batches <= its virtual batch."]
        if bss and records and "epochs" in records[0]["config"]:
            c = records[0]["config"]
            n = min(len(runner.get_dataset(c["dataset"]).y_train), c.get("train_subset") or 10**9)
            steps = {b: c["epochs"] * (n // b) for b in (bss[0], bss[-1])}
            notes.append(f"{c['epochs']} epochs of {n} training samples: {steps[bss[0]]} SGD steps at batch {bss[0]}, "
                         f"{steps[bss[-1]]} at batch {bss[-1]}. With few epochs the large batches are undertrained for "
                         f"every norm, so compare norms at the same batch size; --profile full trains longer.")
        return Analysis(self.name, self.claim, overall(checks), checks, table, notes)

    def plot(self, records, path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        norms = [n for n in self.labels if any(r["config"]["norm"] == n for r in records)]
        bss = sorted({r["config"]["batch_size"] for r in records})
        for n in norms:
            ms, hs = [], []
            for b in bss:
                m, h, _ = mean_ci(1 - v for v in _by_seed(records, "test_acc", norm=n, batch_size=b).values())
                ms.append(100 * m)
                hs.append(100 * h if math.isfinite(h) else 0)
            ax.errorbar(bss, ms, yerr=hs, marker="o", capsize=3, label=self.labels[n])
        ax.set_xscale("log", base=2)
        ax.set_xticks(bss, [str(b) for b in bss])
        ax.set_xlabel("batch size")
        ax.set_ylabel("test error (%)")
        ax.set_title(self.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, path)


# ---------------------------------------------------------------- 2. train/eval gap
class TrainEvalGap(Study):
    name = "train-eval-gap"
    title = "Batch statistics vs running statistics, and the fixes"
    claim = ("With small or non-i.i.d. (class-sorted) batches, BatchNorm evaluated with its running "
             "statistics does worse than with batch statistics; recalibrating the statistics "
             "(precise BN) and Batch Renorm close the gap.")
    default_model = "mlp"

    CONDITIONS = {"small batch (B=4, i.i.d.)": ("iid", 4),
                  "class-sorted batches (B=32, 2 classes per batch)": ("sorted", 32)}

    def plan(self, opts):
        have = available_norms()[0]
        recal = runner.tool_available("recalibrate_batchnorm")
        out = []
        for order, bs in self.CONDITIONS.values():
            for s in self.seeds(opts):
                out.append(self.base(opts, norm="bn", batch_size=bs, lr=_lr(bs), seed=s, order=order,
                                     measure=["batch_stats"] + (["recalibrate"] if recal else [])))
                if "brn" in have:
                    out.append(self.base(opts, norm="brn", batch_size=bs, lr=_lr(bs), seed=s, order=order))
        return out

    def analyze(self, records):
        checks, table = [], [["condition", "BN running stats", "BN batch stats", "BN recalibrated", "BatchRenorm"]]
        for cond, (order, bs) in self.CONDITIONS.items():
            run = _by_seed(records, "test_acc", norm="bn", order=order, batch_size=bs)
            bat = _by_seed(records, "test_acc_batch_stats", norm="bn", order=order, batch_size=bs)
            rec = _by_seed(records, "test_acc_recalibrated", norm="bn", order=order, batch_size=bs)
            brn = _by_seed(records, "test_acc", norm="brn", order=order, batch_size=bs)
            table.append([cond] + [_pct(*mean_ci(d.values())) for d in (run, bat, rec, brn)])
            if run and bat:
                checks.append(_check(f"{cond}: BN's batch-stat accuracy exceeds its running-stat accuracy",
                                     bat, run, "acc(batch stats) - acc(running stats)"))
            if run and rec:
                checks.append(_check(f"{cond}: recalibration raises BN's accuracy", rec, run,
                                     "acc(recalibrated) - acc(running stats)"))
            if run and brn:
                checks.append(_check(f"{cond}: BatchRenorm beats BN (both with running stats)", brn, run,
                                     "acc(BatchRenorm) - acc(BN)"))
        notes = ["batch-stat accuracy: the test set in batches of the training size formed like the training "
                 "batches (class-sorted batches see one class at a time, so they carry label information).",
                 "recalibration: normlab.nn.tools.recalibrate_batchnorm over the training set in i.i.d. batches of 256."]
        if not runner.tool_available("recalibrate_batchnorm"):
            notes.append("recalibration skipped: normlab.nn.tools.recalibrate_batchnorm is not importable yet.")
        if "brn" not in available_norms()[0]:
            notes.append("BatchRenorm skipped: " + available_norms()[1]["brn"])
        return Analysis(self.name, self.claim, overall(checks), checks, table, notes)

    def plot(self, records, path):
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 4.5))
        arms = [("BN running stats", "bn", "test_acc"), ("BN batch stats", "bn", "test_acc_batch_stats"),
                ("BN recalibrated", "bn", "test_acc_recalibrated"), ("BatchRenorm", "brn", "test_acc")]
        conds = list(self.CONDITIONS.items())
        w = 0.2
        for i, (label, norm, metric) in enumerate(arms):
            ms, hs = [], []
            for _, (order, bs) in conds:
                m, h, _ = mean_ci(_by_seed(records, metric, norm=norm, order=order, batch_size=bs).values())
                ms.append(100 * m if math.isfinite(m) else 0)
                hs.append(100 * h if math.isfinite(h) else 0)
            ax.bar(np.arange(len(conds)) + (i - 1.5) * w, ms, w, yerr=hs, capsize=3, label=label)
        ax.set_xticks(np.arange(len(conds)), [c for c, _ in conds])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(self.title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        _save(fig, path)


# ---------------------------------------------------------------- sweeps with and without BN
class _Sweep(Study):
    param = ""
    xlabel = ""
    default_model = "mlp"
    batch_size = 64

    def values(self, opts):
        return PROFILES[opts.profile][self.name]["values"]

    def plan(self, opts):
        return [self.base(opts, norm=n, batch_size=self.batch_size, seed=s,
                          **self.params(v))
                for n in ("none", "bn") for v in self.values(opts) for s in self.seeds(opts)]

    def params(self, v):
        raise NotImplementedError

    def curves(self, records):
        xs = sorted({r["config"][self.param] for r in records})
        return xs, {n: {x: _by_seed(records, "test_acc", norm=n, **{self.param: x}) for x in xs}
                    for n in ("none", "bn")}

    def table_of(self, records):
        xs, cur = self.curves(records)
        table = [[self.param] + [NORM_LABELS[n] for n in cur]]
        for x in xs:
            table.append([f"{x:g}"] + [_pct(*mean_ci(cur[n][x].values())) for n in cur])
        return xs, cur, table

    def plot(self, records, path):
        import matplotlib.pyplot as plt

        xs, cur = self.curves(records)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, c in cur.items():
            st = [mean_ci(c[x].values()) for x in xs]
            ax.errorbar(xs, [100 * m for m, _, _ in st], yerr=[100 * h if math.isfinite(h) else 0 for _, h, _ in st],
                        marker="o", capsize=3, label=NORM_LABELS[n])
        ax.set_xscale("log")
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(self.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, path)


def _per_seed_reduce(curve: dict, xs, fn):
    seeds = set.intersection(*(set(curve[x]) for x in xs)) if xs else set()
    return {s: fn([curve[x][s] for x in xs]) for s in seeds}


class LearningRate(_Sweep):
    name = "learning-rate"
    title = "Final test accuracy vs learning rate, with and without BatchNorm"
    claim = "BatchNorm allows higher learning rates: it trains well over a wider range of them."
    param = "lr"
    xlabel = "learning rate (SGD, momentum 0.9, batch 64)"

    def params(self, v):
        return {"lr": v}

    def analyze(self, records):
        xs, cur, table = self.table_of(records)
        checks = []
        if xs:
            high = xs[len(xs) // 2:]
            checks.append(_check(f"at the high learning rates ({', '.join(f'{x:g}' for x in high)}) BN's mean "
                                 f"accuracy exceeds no-norm's",
                                 _per_seed_reduce(cur["bn"], high, lambda v: sum(v) / len(v)),
                                 _per_seed_reduce(cur["none"], high, lambda v: sum(v) / len(v)),
                                 "mean acc over high LRs, BN - no norm"))
            checks.append(_check("BN's best accuracy over the sweep is at least no-norm's best",
                                 _per_seed_reduce(cur["bn"], xs, max), _per_seed_reduce(cur["none"], xs, max),
                                 "best acc, BN - no norm"))
        notes = []
        for n in cur:
            m = [mean_ci(cur[n][x].values())[0] for x in xs]
            if m and all(math.isfinite(v) for v in m):
                best = max(m)
                good = [f"{x:g}" for x, v in zip(xs, m) if v >= best - 0.05]
                notes.append(f"{NORM_LABELS[n]}: learning rates within 5 points of its best ({100 * best:.1f}%): "
                             f"{', '.join(good)}")
        div = [r for r in records if r["metrics"].get("diverged")]
        if div:
            notes.append("diverged (non-finite loss): " + ", ".join(
                f"{NORM_LABELS[r['config']['norm']]} lr={r['config']['lr']:g} seed {r['config']['seed']}" for r in div))
        return Analysis(self.name, self.claim, overall(checks), checks, table, notes)


class Init(_Sweep):
    name = "init"
    title = "Test accuracy vs weight-init scale, with and without BatchNorm"
    claim = "BatchNorm makes training insensitive to the scale of the initial weights."
    param = "init_scale"
    xlabel = "initial weights x scale (torch default init = 1)"

    def params(self, v):
        return {"init_scale": v, "lr": _lr(self.batch_size) / 2}

    def analyze(self, records):
        xs, cur, table = self.table_of(records)
        checks = []
        if xs:
            checks.append(_check("BN's worst accuracy over the init scales exceeds no-norm's worst",
                                 _per_seed_reduce(cur["bn"], xs, min), _per_seed_reduce(cur["none"], xs, min),
                                 "worst acc, BN - no norm"))
            spread = lambda v: max(v) - min(v)
            checks.append(_check("BN's accuracy varies less across init scales (max - min) than no-norm's",
                                 _per_seed_reduce(cur["none"], xs, spread), _per_seed_reduce(cur["bn"], xs, spread),
                                 "spread(no norm) - spread(BN)"))
        return Analysis(self.name, self.claim, overall(checks), checks, table, [])


# ---------------------------------------------------------------- 5. regularization
class Regularization(Study):
    name = "regularization"
    title = "Train/test gap with and without BatchNorm"
    claim = "BatchNorm regularizes: with it, the gap between train and test accuracy is smaller."
    default_model = "mlp"

    def datasets(self, opts):
        return [opts.dataset] if opts.dataset else PROFILES[opts.profile][self.name]["datasets"]

    def plan(self, opts):
        return [dict(self.base(opts, norm=n, batch_size=32, lr=_lr(32) / 2, seed=s), dataset=d)
                for d in self.datasets(opts) for n in ("none", "bn") for s in self.seeds(opts)]

    def _gap(self, records, **m):
        tr, te = _by_seed(records, "train_acc", **m), _by_seed(records, "test_acc", **m)
        return {s: tr[s] - te[s] for s in set(tr) & set(te)}

    def analyze(self, records):
        ds = sorted({r["config"]["dataset"] for r in records})
        table = [["dataset", "norm", "train acc", "test acc", "gap (train - test)"]]
        checks = []
        for d in ds:
            for n in ("none", "bn"):
                table.append([d, NORM_LABELS[n], _pct(*mean_ci(_by_seed(records, "train_acc", dataset=d, norm=n).values())),
                              _pct(*mean_ci(_by_seed(records, "test_acc", dataset=d, norm=n).values())),
                              _pct(*mean_ci(self._gap(records, dataset=d, norm=n).values()))])
            checks.append(_check(f"{d}: the train/test gap is smaller with BN", self._gap(records, dataset=d, norm="none"),
                                 self._gap(records, dataset=d, norm="bn"), "gap(no norm) - gap(BN)"))
        return Analysis(self.name, self.claim, overall(checks), checks, table,
                        ["train accuracy: eval mode on the whole training set after the last epoch."])

    def plot(self, records, path):
        import matplotlib.pyplot as plt
        import numpy as np

        ds = sorted({r["config"]["dataset"] for r in records})
        fig, axes = plt.subplots(1, max(1, len(ds)), figsize=(4 * max(1, len(ds)), 4), squeeze=False)
        for ax, d in zip(axes[0], ds):
            for i, (metric, label) in enumerate((("train_acc", "train"), ("test_acc", "test"))):
                st = [mean_ci(_by_seed(records, metric, dataset=d, norm=n).values()) for n in ("none", "bn")]
                ax.bar(np.arange(2) + (i - 0.5) * 0.35, [100 * m for m, _, _ in st], 0.35,
                       yerr=[100 * h if math.isfinite(h) else 0 for _, h, _ in st], capsize=3, label=label)
            ax.set_xticks(np.arange(2), [NORM_LABELS["none"], NORM_LABELS["bn"]])
            ax.set_title(f"{d}", fontsize=10)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        fig.suptitle(self.title, fontsize=10)
        _save(fig, path)


# ---------------------------------------------------------------- 6. domain shift
class DomainShift(Study):
    name = "domain-shift"
    title = "Shifted MNIST-1D: accuracy before and after AdaBN"
    claim = ("On a shifted domain, re-estimating BatchNorm's statistics on unlabeled target data "
             "(AdaBN) recovers accuracy lost to the shift.")

    def plan(self, opts):
        if not runner.tool_available("adapt_batchnorm"):
            return []
        return [self.base(opts, norm=n, batch_size=32, lr=_lr(32), seed=s, target="mnist1d-shifted",
                          measure=["adabn"], dataset="mnist1d")
                for n in ("bn", "gn", "none") for s in self.seeds(opts)]

    def analyze(self, records):
        table = [["norm", "source test acc", "target acc", "target acc after AdaBN"]]
        for n in ("bn", "gn", "none"):
            table.append([NORM_LABELS[n]] + [_pct(*mean_ci(_by_seed(records, m, norm=n).values()))
                                             for m in ("test_acc", "target_acc", "target_acc_adapted")])
        checks = []
        before, after = _by_seed(records, "target_acc", norm="bn"), _by_seed(records, "target_acc_adapted", norm="bn")
        if before:
            checks.append(_check("the shift costs BN accuracy (source test - target)",
                                 _by_seed(records, "test_acc", norm="bn"), before, "acc(source) - acc(target)"))
        if after:
            checks.append(_check("AdaBN raises BN's accuracy on the target domain", after, before,
                                 "acc(after AdaBN) - acc(before)"))
        notes = ["target domain: the MNIST-1D generator with corr_noise_scale 0.6, iid_noise_scale 0.1, "
                 "shear_scale 1.5, scale_coeff 0.8 and another seed, standardized with the source's mean/std; "
                 "AdaBN re-estimates BN statistics on the 4000 unlabeled target training inputs, accuracy is on "
                 "the 1000 target test samples."]
        if not runner.tool_available("adapt_batchnorm"):
            notes.append("skipped: normlab.nn.tools.adapt_batchnorm is not importable yet.")
        return Analysis(self.name, self.claim, overall(checks), checks, table, notes)

    def plot(self, records, path):
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 4.5))
        norms = ("bn", "gn", "none")
        for i, (metric, label) in enumerate((("test_acc", "source test"), ("target_acc", "target"),
                                             ("target_acc_adapted", "target after AdaBN"))):
            st = [mean_ci(_by_seed(records, metric, norm=n).values()) for n in norms]
            ax.bar(np.arange(3) + (i - 1) * 0.27, [100 * m if math.isfinite(m) else 0 for m, _, _ in st], 0.27,
                   yerr=[100 * h if math.isfinite(h) else 0 for _, h, _ in st], capsize=3, label=label)
        ax.set_xticks(np.arange(3), [NORM_LABELS[n] for n in norms])
        ax.set_ylabel("accuracy (%)")
        ax.set_title(self.title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        _save(fig, path)

# ---------------------------------------------------------------- 7. recurrent networks
class Recurrent(BatchSize):
    name = "rnn"
    title = "LSTM on MNIST-1D read as a sequence: test error vs batch size"
    claim = ("In a recurrent network, normalization speeds up training (LayerNorm: Ba et al. 2016; "
             "recurrent BatchNorm: Cooijmans et al. 2016), but recurrent BatchNorm's per-step batch "
             "statistics degrade as the batch shrinks, while LayerNorm does not depend on the batch.")
    default_model = "lstm"
    models = ("lstm", "gru")
    labels = {"none": "no norm (torch.nn.LSTM)", "ln": "LayerNorm LSTM", "bn": "recurrent BN (BNLSTM)"}

    def plan(self, opts):
        from .models import RNN_NORMS

        prof = PROFILES[opts.profile][self.name]
        model = opts.model if opts.model in self.models else self.default_model
        norms = [n for n in (opts.norms or prof["norms"]) if n in RNN_NORMS]
        if model != "lstm":
            norms = [n for n in norms if n != "bn"]       # recurrent BN exists for the LSTM only
        bss = opts.batch_sizes or prof["batch_sizes"]
        return [self.base(opts, norm=n, batch_size=b, lr=prof["lr"] * b / REF_BATCH, seed=s)
                for n in norms for b in bss for s in self.seeds(opts)]

    def analyze(self, records):
        norms = [n for n in self.labels if any(r["config"]["norm"] == n for r in records)]
        bss = sorted({r["config"]["batch_size"] for r in records})
        table = [["model"] + [f"B={b}" for b in bss]]
        err = lambda n, b: {s: 1 - v for s, v in _by_seed(records, "test_acc", norm=n, batch_size=b).items()}
        for n in norms:
            table.append([self.labels[n]] + [_pct(*mean_ci(err(n, b).values())) for b in bss])
        checks = []
        if bss:
            small = bss[0]
            ref = REF_BATCH if REF_BATCH in bss else bss[-1]
            for n in ("ln", "bn"):
                if n in norms and "none" in norms:
                    checks.append(_check(f"at batch {ref}, the {self.labels[n]} has lower test error than "
                                         f"the plain LSTM", err("none", ref), err(n, ref),
                                         f"error(no norm) - error({self.labels[n]}) at B={ref}"))
            if "bn" in norms and "ln" in norms and ref != small:
                d = lambda n: {s: err(n, small)[s] - err(n, ref)[s] for s in set(err(n, small)) & set(err(n, ref))}
                checks.append(_check(f"going from batch {ref} to {small}, recurrent BN loses more than the "
                                     f"LayerNorm LSTM", d("bn"), d("ln"),
                                     "increase of BN-LSTM error - increase of LN-LSTM error"))
        notes = []
        if records and "dataset" in records[0]["config"]:
            c = records[0]["config"]
            from .models import RNN

            ds = runner.get_dataset(c["dataset"])
            n = min(len(ds.y_train), c.get("train_subset") or 10**9)
            notes.append(f"{c['model'].upper()} with hidden size {RNN.HIDDEN}, reading the {ds.length}-sample signal "
                         f"as {ds.length // RNN.STEP} steps of {RNN.STEP} values; {c['epochs']} epochs of {n} training "
                         f"samples, SGD (momentum 0.9) at learning rate {PROFILES['quick'][self.name]['lr']:g} "
                         f"x batch/{REF_BATCH}. Recurrent BN keeps statistics for every step (max_steps = "
                         f"the sequence length).")
        return Analysis(self.name, self.claim, overall(checks), checks, table, notes)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


STUDIES = {s.name: s for s in (BatchSize(), TrainEvalGap(), LearningRate(), Init(), Regularization(), DomainShift(),
                                Recurrent())}
NOT_IN_SCOPE: dict[str, str] = {}     # studies named by the design but not runnable in this version

PROFILES = {
    "quick": {
        "batch-size": {"norms": list(NORM_LABELS), "batch_sizes": [2, 4, 8, 16, 32, 64, 128],
                       "seeds": 3, "epochs": 3, "train_subset": 2000},
        "train-eval-gap": {"seeds": 3, "epochs": 5},
        "learning-rate": {"values": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "seeds": 3, "epochs": 5},
        "init": {"values": [0.1, 0.3, 1.0, 3.0, 10.0], "seeds": 3, "epochs": 5},
        "regularization": {"datasets": ["mnist1d", "digits"], "seeds": 3, "epochs": 15},
        "domain-shift": {"seeds": 3, "epochs": 5},
        "rnn": {"norms": ["none", "ln", "bn"], "batch_sizes": [8, 32, 128], "seeds": 2, "epochs": 5,
                "train_subset": 2000, "lr": 0.3},
    },
    "full": {
        "batch-size": {"norms": list(NORM_LABELS), "batch_sizes": [2, 4, 8, 16, 32, 64, 128],
                       "seeds": 5, "epochs": 10},
        "train-eval-gap": {"seeds": 5, "epochs": 15},
        "learning-rate": {"values": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "seeds": 5, "epochs": 15},
        "init": {"values": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], "seeds": 5, "epochs": 15},
        "regularization": {"datasets": ["mnist1d", "digits"], "seeds": 5, "epochs": 40},
        "domain-shift": {"seeds": 5, "epochs": 15},
        "rnn": {"norms": ["none", "ln", "bn"], "batch_sizes": [4, 8, 16, 32, 64, 128], "seeds": 5,
                "epochs": 20, "lr": 0.3},
    },
}

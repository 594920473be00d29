"""``normlab study``: measure the claims made about BatchNorm on real data, with a verdict each.

Studies (see ``studies.py``): batch-size, train-eval-gap, learning-rate, init, regularization,
domain-shift. Results go to ``--out`` (default ``study-out/``): ``results.jsonl`` (one line per
finished run; a rerun resumes), one PNG per study, ``report.md`` and a self-contained
``report.html``. Each claim's verdict is printed at the end with its numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .studies import NOT_IN_SCOPE, PROFILES, STUDIES, Options

__all__ = ["add_arguments", "run", "STUDIES"]


def _csv(kind):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list of {kind}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", nargs="*", metavar="STUDY",
                   help=f"studies to run (default: all): {', '.join(STUDIES)}")
    p.add_argument("--profile", default="quick", help="quick (about 10 min on 2 cores) or full")
    p.add_argument("--norms", type=_csv("norms"), help="batch-size and rnn studies: comma list of norms "
                   "(none, bn, brn, ghost, gn, ln, in)")
    p.add_argument("--batch-sizes", type=_csv("batch sizes"), help="batch-size and rnn studies: comma list, e.g. 2,8,32")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1) per configuration")
    p.add_argument("--epochs", type=int, help="epochs per run (overrides the profile)")
    p.add_argument("--dataset", help="mnist1d or digits (default: the study's own; domain-shift is always mnist1d)")
    p.add_argument("--model", help="mlp or cnn for the feed-forward studies, lstm or gru for rnn "
                                    "(default: the study's own)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores, 1 on cuda)")
    p.add_argument("--out", default="study-out", help="output folder (default: study-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _BadArgs(Exception):
    pass


def _choose(value, valid, what):
    if value not in valid:
        raise _BadArgs(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, valid))}")
    return value


def _options(args):
    from .data import DATASETS
    from .models import ALL_NORMS, MODELS, RNN_NORMS, available_norms
    from .runner import get_dataset

    names = args.studies or list(STUDIES)
    if names == ["all"]:
        names = list(STUDIES)
    for n in names:
        if n in NOT_IN_SCOPE:
            raise _BadArgs(f"study {n!r} is not available: {NOT_IN_SCOPE[n]}")
        _choose(n, list(STUDIES), "study")
    _choose(args.profile, list(PROFILES), "profile")
    if args.dataset is not None:
        _choose(args.dataset, DATASETS, "dataset")
    if args.model is not None:
        _choose(args.model, MODELS, "model")
        wrong = [n for n in names if args.model not in STUDIES[n].models]
        # with no study named, a feed-forward --model leaves the rnn study on its own model
        if wrong and (args.studies or not any(args.model in STUDIES[n].models for n in names if n != "rnn")):
            fits = [n for n in STUDIES if args.model in STUDIES[n].models]
            raise _BadArgs(f"--model {args.model} does not fit the {', '.join(wrong)} stud"
                           f"{'y' if len(wrong) == 1 else 'ies'} (they train "
                           f"{' or '.join(dict.fromkeys(m for n in wrong for m in STUDIES[n].models))}); "
                           f"name the studies it fits: normlab study {' '.join(fits)} --model {args.model}")
    _choose(args.device, ["cpu", "cuda"], "device")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _BadArgs("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    for k in ("seeds", "epochs", "jobs"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise _BadArgs(f"--{k} must be a positive integer, got {v}")
    norms = None
    if args.norms:
        usable, skipped = available_norms()
        for n in args.norms:
            _choose(n, ALL_NORMS, "norm")
            if args.studies and "rnn" in names and n not in RNN_NORMS:
                raise _BadArgs(f"norm {n!r} has no recurrent form for the rnn study; choose from "
                               f"{', '.join(RNN_NORMS)} (or run the rnn study on its own)")
            if n in skipped:
                raise _BadArgs(f"norm {n!r} cannot run: {skipped[n]}; usable norms: {', '.join(usable)}")
        if args.model == "mlp" and "in" in args.norms:
            raise _BadArgs("norm 'in' (InstanceNorm) needs the cnn model; drop it or use --model cnn")
        norms = list(dict.fromkeys(args.norms))
    bss = None
    if args.batch_sizes:
        try:
            bss = sorted({int(b) for b in args.batch_sizes})
        except ValueError:
            raise _BadArgs(f"--batch-sizes must be integers, got {','.join(args.batch_sizes)}") from None
        datasets = [args.dataset] if args.dataset else ["mnist1d"]
        for b in bss:
            if b < 2:
                raise _BadArgs(f"batch size {b} is too small: BatchNorm needs at least 2 samples per batch")
            for d in datasets:
                n = len(get_dataset(d).y_train)
                if b > n:
                    raise _BadArgs(f"batch size {b} is larger than the {n} training samples of {d}; "
                                   f"valid batch sizes: 2..{n}")
    opts = Options(profile=args.profile, seeds=args.seeds, epochs=args.epochs, norms=norms,
                   batch_sizes=bss, dataset=args.dataset, model=args.model)
    return names, opts


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> int:
    t0 = time.perf_counter()
    try:
        names, opts = _options(args)
    except _BadArgs as e:
        print(f"normlab study: error: {e}", file=sys.stderr)
        return 2
    import torch

    from . import report, runner
    from .models import available_norms

    usable, skipped = available_norms()
    notes = []
    for n, why in skipped.items():
        msg = f"norm {n!r} skipped: {why}"
        print(msg, file=sys.stderr)
        notes.append(msg)
    for tool, study in (("recalibrate_batchnorm", "train-eval-gap (recalibration arm)"),
                        ("adapt_batchnorm", "domain-shift")):
        if not runner.tool_available(tool) and study.split()[0] in names:
            msg = f"{study} skipped: normlab.nn.tools.{tool} is not importable in this version of normlab"
            print(msg, file=sys.stderr)
            notes.append(msg)
    plans = {n: STUDIES[n].plan(opts) for n in names}
    if opts.model == "mlp" and "batch-size" in plans:
        plans["batch-size"] = [c for c in plans["batch-size"] if c["norm"] != "in"]
    configs = [c for cs in plans.values() for c in cs]
    out = Path(args.out)
    jobs = args.jobs or (1 if args.device == "cuda" else max(1, os.cpu_count() or 1))
    before = runner.load_results(out / "results.jsonl")
    try:
        done = runner.run_plan(configs, out, jobs=jobs, device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    sections, lines = [], []
    for n, cs in plans.items():
        keys = {runner.config_key(c) for c in cs}
        recs = [done[k] for k in keys if k in done]
        a = STUDIES[n].analyze(recs)
        png = None
        if recs:
            png = out / f"{n}.png"
            STUDIES[n].plot(recs, png)
        sections.append((n, a, png, len(recs)))
        lines += report.verdict_lines(a)
    all_keys = {runner.config_key(c) for c in configs}
    meta = {"profile": opts.profile, "device": args.device, "jobs": jobs, "runs": len(all_keys & set(done)),
            "new_runs": len((all_keys & set(done)) - set(before)), "wall_s": time.perf_counter() - t0,
            "torch": torch.__version__, "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores",
            "notes": notes}
    md, ht = report.write(out, sections, meta)
    print()
    print("\n".join(lines))
    print(f"\nreport: {ht} and {md}; results: {out / 'results.jsonl'}; "
          f"wall time {time.perf_counter() - t0:.0f} s")
    return 0

"""Run one configuration, and a plan of many: resumable, deterministic, in K processes.

A *run* is a flat JSON-able dict (``config``) that fully describes one training: study,
dataset, model, norm, batch size, learning rate, epochs, seed, weight-init scale, batch order,
plus study-specific switches. Its key is the canonical JSON of that dict, so ``results.jsonl``
(one ``{"key", "config", "metrics", "seconds"}`` line per finished run, appended and flushed as
each run finishes) tells a rerun exactly which runs are missing.

Training: SGD with momentum 0.9, learning rate ``lr`` (already scaled by the plan), cosine decay
to zero over all steps, cross-entropy, the last incomplete batch dropped (a BatchNorm batch of
one sample has no variance). Each run seeds ``torch.manual_seed(seed)`` before building the
model and shuffles with its own ``torch.Generator`` seeded from ``seed``; on CPU each run uses
one torch thread (tiny models are overhead-bound, and one thread keeps numbers identical however
many ``--jobs`` run side by side).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as _data
from .models import build_model

MOMENTUM = 0.9
_DATASETS: dict[str, _data.Dataset] = {}


def config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def get_dataset(name: str) -> _data.Dataset:
    if name not in _DATASETS:
        _DATASETS[name] = _data.load(name)
    return _DATASETS[name]


def train_size(config: dict) -> int:
    n = len(get_dataset(config["dataset"]).y_train)
    return min(n, config.get("train_subset") or n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def estimated_cost(config: dict, n_train: int) -> float:
    """Estimated milliseconds of one CPU core, for scheduling and the progress bar (fitted to
    measured runs on a 2-core AMD EPYC under load; only the relative sizes matter for the ETA)."""
    b = config["batch_size"]
    if config["model"] in ("lstm", "gru"):
        per_step = 2.3 * ((2.5 if config["norm"] == "none" else 5.0) + 0.03 * b)
    else:
        per_step = 2.3 * ((1.8 + 0.02 * b) if config["model"] == "cnn" else (1.0 + 0.006 * b))
    if config["norm"] in ("gn", "in", "ghost", "brn"):
        per_step *= 1.25
    return config["epochs"] * steps_per_epoch(n_train, b) * per_step + 50.0


def _batches(n, batch_size, order, labels, gen):
    """Index batches of one epoch. 'iid': a random permutation cut into batches. 'sorted'
    (non-i.i.d.): each class (in random order) is cut into runs of ``batch_size // 2`` samples
    (a class's last incomplete run is dropped) and each batch joins two random runs, so a batch
    holds one or two classes; the runs come in a random order."""
    if order == "iid":
        perm = torch.randperm(n, generator=gen)
        return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n // batch_size)]
    if order == "sorted":
        perm = torch.randperm(n, generator=gen)
        perm = perm[torch.argsort(labels[perm], stable=True)]
        run = max(1, batch_size // 2)
        runs = []
        for cls in perm.split(torch.bincount(labels[perm]).tolist()):  # one class each
            runs += [cls[i * run:(i + 1) * run] for i in range(len(cls) // run)]
        runs = [runs[i] for i in torch.randperm(len(runs), generator=gen).tolist()]
        per = batch_size // run
        return [torch.cat(runs[i * per:(i + 1) * per]) for i in range(len(runs) // per)]
    raise ValueError(f"unknown batch order {order!r}; choose from iid, sorted")


@torch.no_grad()
def accuracy(model, x, y, *, batch_size=None):
    """Accuracy of ``model`` in its current mode; full batch unless ``batch_size`` is given."""
    if batch_size is None:
        return float((model(x).argmax(1) == y).float().mean())
    correct = 0
    for i in range(0, len(y) - len(y) % batch_size, batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / (len(y) - len(y) % batch_size)


@torch.no_grad()
def batch_stat_accuracy(model, x, y, batch_size, order, seed):
    """Test accuracy with every BN layer normalizing by the statistics of the test batch (train
    mode, on a copy so no running statistic moves), batches formed like the training ones."""
    m = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed + 7919)
    correct = total = 0
    for idx in _batches(len(y), batch_size, order, y, gen):
        correct += int((m(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
    return correct / total


def _tools():
    try:
        from normlab.nn import tools
    except ImportError:
        return None
    return tools


def tool_available(name: str) -> bool:
    t = _tools()
    return t is not None and hasattr(t, name)


def execute(config: dict, device: str = "cpu") -> dict:
    """Train one configuration and return its metrics (floats; NaN never hides a divergence:
    ``diverged`` says so and accuracies are then measured as they are)."""
    ds = get_dataset(config["dataset"])
    dev = torch.device(device)
    n = train_size(config)
    xtr = torch.from_numpy(ds.x_train[:n]).to(dev)
    ytr = torch.from_numpy(ds.y_train[:n]).to(dev)
    xte = torch.from_numpy(ds.x_test).to(dev)
    yte = torch.from_numpy(ds.y_test).to(dev)
    bs, epochs, seed = config["batch_size"], config["epochs"], config["seed"]
    if bs > n:
        raise ValueError(f"batch size {bs} is larger than the {n} training samples of {config['dataset']}")
    total_steps = epochs * steps_per_epoch(n, bs)
    torch.manual_seed(seed)
    model = build_model(config["model"], ds.length, ds.num_classes, config["norm"],
                        init_scale=config.get("init_scale", 1.0),
                        brn_warmup_steps=max(1, total_steps // 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    order = config.get("order", "iid")
    labels_cpu = ytr.cpu()
    diverged = False
    last_loss = float("nan")
    model.train()
    for _ in range(epochs):
        running = 0.0
        batches = _batches(n, bs, order, labels_cpu, gen)
        for idx in batches:
            idx = idx.to(dev)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        last_loss = running / max(1, len(batches))
        if not math.isfinite(last_loss):
            diverged = True
            break
    model.eval()
    metrics = {"train_loss": last_loss, "diverged": diverged,
               "train_acc": accuracy(model, xtr, ytr), "test_acc": accuracy(model, xte, yte)}
    extra = config.get("measure", [])
    if "batch_stats" in extra:
        metrics["test_acc_batch_stats"] = batch_stat_accuracy(model, xte, yte, bs, order, seed)
    if "recalibrate" in extra:
        tools = _tools()
        m2 = copy.deepcopy(model)
        # exact population statistics over the training set, in i.i.d. batches of 256
        tools.recalibrate_batchnorm(m2, [xtr[i:i + 256] for i in range(0, n, 256)])
        m2.eval()
        metrics["test_acc_recalibrated"] = accuracy(m2, xte, yte)
    if "adabn" in extra:
        tgt = get_dataset(config["target"])
        xt_tr = torch.from_numpy(tgt.x_train).to(dev)
        xt_te, yt_te = torch.from_numpy(tgt.x_test).to(dev), torch.from_numpy(tgt.y_test).to(dev)
        metrics["target_acc"] = accuracy(model, xt_te, yt_te)
        if config["norm"] in ("bn", "brn", "ghost"):
            tools = _tools()
            m2 = copy.deepcopy(model)
            tools.adapt_batchnorm(m2, [xt_tr[i:i + 256] for i in range(0, len(xt_tr), 256)])
            m2.eval()
            metrics["target_acc_adapted"] = accuracy(m2, xt_te, yt_te)
    return metrics


def _set_threads(threads: int) -> tuple:
    """One thread for torch and for numba (normlab's CPU kernels); returns the previous counts."""
    prev = (torch.get_num_threads(), None)
    torch.set_num_threads(threads)
    try:
        import numba

        prev = (prev[0], numba.get_num_threads())
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return prev


def _init_worker(threads: int):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it saves and stops us
    _set_threads(threads)


def _work(item):
    key, config, device = item
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        metrics = execute(config, device)
        err = None
    except Exception as e:  # recorded, not fatal: one broken run must not lose the others
        metrics, err = None, f"{type(e).__name__}: {e}"
    return key, config, metrics, (time.perf_counter() - t0, time.process_time() - c0), err


def load_results(path: Path) -> dict[str, dict]:
    """Records of ``results.jsonl`` by key. A line cut short by an interruption is dropped and
    the file rewritten without it (so the next append starts on a clean line)."""
    if not path.exists():
        return {}
    good, bad = [], 0
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec["key"], rec["config"], rec["metrics"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        good.append(rec)
    if bad or (text and not text.endswith("\n")):
        if bad:
            print(f"results: dropped {bad} damaged line(s) of {path} (an interrupted write); "
                  f"those runs will be redone", file=sys.stderr)
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for rec in good:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    return {rec["key"]: rec for rec in good}


def run_plan(configs: list[dict], out: Path, *, jobs: int = 1, device: str = "cpu",
             progress: bool = True) -> dict[str, dict]:
    """Run every config not already in ``out/results.jsonl``; return all records by key."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = load_results(path)
    todo, seen = [], set()
    for c in configs:
        k = config_key(c)
        if k not in done and k not in seen:
            seen.add(k)
            todo.append((k, c))
    for name in sorted({c["dataset"] for _, c in todo} | {c["target"] for _, c in todo if "target" in c}):
        get_dataset(name)  # generate/cache once here, not in every worker at the same time
    costs = {k: estimated_cost(c, train_size(c)) for k, c in todo}
    todo.sort(key=lambda kc: -costs[kc[0]])  # longest first: K workers finish together
    print(f"runs: {len(configs)} planned, {len(configs) - len(todo)} already in {path}, "
          f"{len(todo)} to run on {device} with {jobs} process(es)", flush=True)
    if not todo:
        return done
    items = [(k, c, device) for k, c in todo]
    errors = []
    units = {k: max(1, round(c / 1000)) for k, c in costs.items()}  # integer: n never passes total
    bar = tqdm(total=sum(units.values()), unit="cpu-s", disable=not progress, mininterval=1.0,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} estimated cpu-s [{elapsed}<{remaining}]")
    threads = 1 if device == "cpu" else torch.get_num_threads()
    pool = None
    prev_threads = None
    try:
        if jobs > 1:
            import multiprocessing as mp

            # the workers' thread pools are sized at import from the environment they inherit
            saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
            os.environ.update({k: str(threads) for k in saved})
            try:
                pool = mp.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(threads,))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            results = pool.imap_unordered(_work, items)
        else:
            prev_threads = _set_threads(threads)
            results = map(_work, items)
        with open(path, "a") as f:
            for key, config, metrics, (seconds, cpu), err in results:
                bar.update(units[key])
                if err is not None:
                    errors.append((config, err))
                    bar.write(f"run failed: {err}  config={key}")
                    continue
                rec = {"key": key, "config": config, "metrics": metrics, "seconds": round(seconds, 3),
                       "cpu_seconds": round(cpu, 3)}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[key] = rec
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {len(done)} runs saved in {path}; run the same command again to resume",
              file=sys.stderr)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if prev_threads is not None:
            torch.set_num_threads(prev_threads[0])
            if prev_threads[1] is not None:
                import numba

                numba.set_num_threads(prev_threads[1])
        bar.close()
    if errors:
        print(f"{len(errors)} run(s) failed; they are not recorded and will be retried on the next run",
              file=sys.stderr)
    return done


__all__ = ["config_key", "execute", "run_plan", "load_results", "estimated_cost", "accuracy",
           "tool_available"]

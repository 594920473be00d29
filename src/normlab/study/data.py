"""Datasets of the study, all made locally (nothing is downloaded).

- ``mnist1d``: MNIST-1D from the ``mnist1d`` package's own generator with its default
  arguments (5000 samples, 4000 train / 1000 test, sequence length 40, seed 42).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 samples), pixels as a length-64
  sequence scaled to [0, 1], split 1347 train / 450 test with a fixed permutation.
- ``mnist1d-shifted``: the target domain of the domain-shift study. The same generator with
  stronger correlated noise, i.i.d. noise, shear and scale jitter (``SHIFT``) and another seed,
  standardized with the *source* domain's mean and std, so the shift stays visible to a model.

``mnist1d.data.make_dataset`` standardizes its output with the statistics of the set it just
generated, which would hide a global change of scale. So the generation loop is reproduced here
(``_generate_raw``, the same random calls in the same order) and ``load('mnist1d')`` is checked
to equal ``make_dataset(get_dataset_args())`` by the tests. The global NumPy random state that
the generator seeds is saved and restored around it.

Arrays are cached as ``.npz`` files (default ``~/.cache/normlab/study``), keyed by the generator
arguments, because generation takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("mnist1d", "digits")

# Target domain of the domain-shift study: the generator's own noise / shift / scale knobs.
SHIFT = {"corr_noise_scale": 0.6, "iid_noise_scale": 0.1, "shear_scale": 1.5,
         "scale_coeff": 0.8, "seed": 4242}


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (N, 1, L) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def length(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "normlab")
    return Path(root) / "study"


def mnist1d_default_args() -> dict:
    """The generator's default arguments (no download: ``get_dataset_args`` only builds a dict)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    return args


def _generate_raw(args: dict):
    """``mnist1d.data.make_dataset`` without its final standardization: (xs, ys) unsplit."""
    from mnist1d.data import get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import ObjectView

    a = ObjectView(dict(args))
    templates = get_templates()
    state = np.random.get_state()
    try:
        np.random.seed(a.seed)
        import random
        random.seed(a.seed)
        xs, ys = [], []
        per_class = a.num_samples // len(templates["y"])
        for label in range(len(templates["y"])):
            for _ in range(per_class):
                x, _t = transform(templates["x"][label], templates["t"], a)
                xs.append(x)
                ys.append(templates["y"][label])
        perm = np.random.permutation(len(ys))
        xs = np.stack(xs)[perm]
        ys = np.stack(ys)[perm]
        if a.shuffle_seq:
            xs = xs[..., np.random.permutation(a.final_seq_length)]
    finally:
        np.random.set_state(state)
    return xs, ys


def _split(xs, ys, train_split, mean, std, name):
    xs = ((xs - mean) / std).astype(np.float32)[:, None, :]
    ys = ys.astype(np.int64)
    k = int(len(ys) * train_split)
    return Dataset(name, xs[:k], ys[:k], xs[k:], ys[k:])


def _cached(name: str, spec: dict, build):
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return Dataset(name, z["x_train"], z["y_train"], z["x_test"], z["y_test"])
        except Exception:  # a damaged cache file is rebuilt, not trusted
            pass
    ds = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
        os.replace(tmp, path)
    except OSError:  # a read-only home still runs the study, only slower
        pass
    return ds


def _mnist1d_pair():
    src_args = mnist1d_default_args()
    xs, ys = _generate_raw(src_args)
    return src_args, xs, ys


def load(name: str) -> Dataset:
    """One of ``DATASETS`` or ``'mnist1d-shifted'`` (see the module docstring)."""
    if name == "mnist1d":
        args = mnist1d_default_args()

        def build():
            xs, ys = _generate_raw(args)
            return _split(xs, ys, args["train_split"], xs.mean(), xs.std(), name)
        return _cached(name, args, build)
    if name == "mnist1d-shifted":
        src = mnist1d_default_args()
        tgt = dict(src, **SHIFT)

        def build():
            xs_src, _ = _generate_raw(src)
            xs, ys = _generate_raw(tgt)
            return _split(xs, ys, tgt["train_split"], xs_src.mean(), xs_src.std(), name)
        return _cached(name, {"source": src, "target": tgt}, build)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)[:, None, :]
        y = d.target.astype(np.int64)
        perm = np.random.default_rng(0).permutation(len(y))
        x, y = x[perm], y[perm]
        k = int(round(len(y) * 0.75))
        return Dataset(name, x[:k], y[:k], x[k:], y[k:])
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")

"""The non-finite policy: a training batch with NaN/inf never poisons running statistics silently.

Every front end with running statistics (normlab.nn modules and variants, SyncBatchNorm, the
NumPy layers, BatchNormalizer.partial_fit) under the three policies:

* "skip" (default): the output is what the batch gives (IEEE: NaN where it belongs), the running
  statistics and num_batches_tracked are bit-for-bit unchanged, a NonFiniteWarning names the
  layer; the run then continues exactly as if the bad batch had never been seen;
* "raise": NonFiniteError (a ValueError), nothing written;
* "propagate": torch.nn's behaviour, the statistics are folded in.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import NonFiniteError, NonFiniteWarning
from normlab import layers as L
from normlab import nn as nl
from normlab.estimators import BatchNormalizer
from normlab.nn import functional as NF
from normlab.nn import sync_batch_norm as sbn

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

# name -> (factory, input shape, kind) ; kind "bn": a bad value in sample 1 poisons its channel's
# batch statistics; "in": only its (sample, channel) instance; "ghost": its channel in its
# virtual batch (samples 0 and 1)
MODULES = {
    "BatchNorm1d": (lambda: nl.BatchNorm1d(3), (6, 3), "bn"),
    "BatchNorm1d-ncl": (lambda: nl.BatchNorm1d(3), (4, 3, 5), "bn"),
    "BatchNorm2d": (lambda: nl.BatchNorm2d(3), (4, 3, 3, 3), "bn"),
    "BatchNorm2d-cumulative": (lambda: nl.BatchNorm2d(3, momentum=None), (4, 3, 3, 3), "bn"),
    "BatchNorm2d-float64": (lambda: nl.BatchNorm2d(3, dtype=torch.float64), (4, 3, 3, 3), "bn"),
    "BatchNorm3d": (lambda: nl.BatchNorm3d(3), (2, 3, 2, 3, 2), "bn"),
    "InstanceNorm1d": (lambda: nl.InstanceNorm1d(3, track_running_stats=True), (4, 3, 6), "in"),
    "InstanceNorm2d": (lambda: nl.InstanceNorm2d(3, affine=True, track_running_stats=True),
                       (4, 3, 3, 3), "in"),
    "BatchRenorm2d": (lambda: nl.BatchRenorm2d(3), (4, 3, 3, 3), "bn"),
    "BatchRenorm1d-cumulative": (lambda: nl.BatchRenorm1d(3, momentum=None), (8, 3), "bn"),
    "GhostBatchNorm2d": (lambda: nl.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 3, 3), "ghost"),
    "SyncBatchNorm": (lambda: nl.SyncBatchNorm(3), (4, 3, 5), "bn"),
}


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_state(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k     # bit for bit (and num_batches_tracked)


def _batches(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) * 2 + 1 for _ in range(3)]


def _poison(x, value, channel=1):
    x = x.clone()
    idx = (1, channel) + (0,) * (x.ndim - 2)
    x[idx] = value
    return x, idx


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(MODULES))
def test_skip_keeps_state_warns_and_the_run_continues_as_if_the_batch_was_never_seen(name, bad):
    make, shape, kind = MODULES[name]
    m, twin = make(), make()
    twin.load_state_dict(m.state_dict())
    dtype = next(iter(m.buffers())).dtype
    clean1, clean2, base = _batches(shape, dtype=dtype)
    x, idx = _poison(base, BAD[bad])
    m.train(), twin.train()
    m(clean1), twin(clean1)
    before = _state(m)
    with pytest.warns(NonFiniteWarning, match=rf"{type(m).__name__}\(3.*channel\(s\) \[1\].*not folded") as rec:
        y = m(x)
    assert rec[0].message.owner is m and rec[0].message.channels == [1]
    _assert_same_state(m, before)
    # the output follows IEEE semantics: non-finite where the bad value reaches, finite elsewhere
    region = {"bn": (slice(None), 1), "in": (idx[0], 1), "ghost": (slice(0, 2), 1)}[kind]
    assert not torch.isfinite(y[region]).any()
    good = torch.ones_like(y, dtype=torch.bool)
    good[region] = False
    assert torch.isfinite(y[good]).all()
    m(clean2), twin(clean2)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", list(MODULES))
def test_raise_changes_nothing(name):
    make, shape, _ = MODULES[name]
    m = make().train()
    dtype = next(iter(m.buffers())).dtype
    x, _ = _poison(_batches(shape, dtype=dtype)[0], float("nan"))
    before = _state(m)
    m.nonfinite_policy = "raise"
    with pytest.raises(NonFiniteError, match=rf"{type(m).__name__}.*channel\(s\) \[1\].*left unchanged"):
        m(x)
    assert isinstance(NonFiniteError("x"), ValueError)
    _assert_same_state(m, before)


@pytest.mark.parametrize("name", ["BatchNorm1d-ncl", "BatchNorm2d", "BatchNorm2d-cumulative",
                                  "InstanceNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "SyncBatchNorm"])
def test_propagate_folds_the_batch_in_like_torch(name):
    make, shape, kind = MODULES[name]
    m = make().train()
    x, _ = _poison(_batches(shape)[0], float("nan"))
    with normlab.nonfinite_policy("propagate"), warnings.catch_warnings():
        warnings.simplefilter("error")            # no warning under "propagate"
        m(x)
    assert torch.isnan(m.running_mean[1]) and torch.isfinite(m.running_mean[[0, 2]]).all()
    if kind != "in":
        assert int(m.num_batches_tracked) == 1
    if name in ("BatchNorm1d-ncl", "BatchNorm2d", "BatchNorm2d-cumulative", "InstanceNorm2d"):
        cls = {"BatchNorm1d-ncl": nn.BatchNorm1d}.get(name, getattr(nn, type(m).__name__))
        ref = cls(3, **({"affine": True, "track_running_stats": True} if kind == "in" else
                        {"momentum": m.momentum})).train()
        ref(x)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, equal_nan=True, msg=k)


def test_eval_mode_never_touches_state_and_keeps_nan_in_place():
    m = nl.BatchNorm2d(3).eval()
    x, idx = _poison(_batches((4, 3, 3, 3))[0], float("nan"))
    before = _state(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x)
    _assert_same_state(m, before)
    assert torch.isnan(y[idx]) and torch.isfinite(y).sum() == y.numel() - 1


def test_resolution_order_call_then_module_then_context_then_default():
    x, _ = _poison(_batches((4, 3))[0], float("nan"))
    assert normlab.get_nonfinite_policy() == "skip"
    rm, rv = torch.zeros(3), torch.ones(3)
    # the per-call argument beats the context
    with normlab.nonfinite_policy("raise"):
        NF.batch_norm(x, rm, rv, training=True, nonfinite="propagate")
    assert torch.isnan(rm[1])
    rm, rv = torch.zeros(3), torch.ones(3)
    with normlab.nonfinite_policy("raise"), pytest.raises(NonFiniteError, match=r"batch_norm"):
        NF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    # the module attribute beats the context
    m = nl.BatchNorm1d(3)
    m.nonfinite_policy = "propagate"
    with normlab.nonfinite_policy("raise"):
        m(x)
    assert torch.isnan(m.running_mean[1])
    # contexts nest and restore; the process default is settable and restored
    with normlab.nonfinite_policy("raise"):
        with normlab.nonfinite_policy("propagate"):
            assert normlab.get_nonfinite_policy() == "propagate"
        assert normlab.get_nonfinite_policy() == "raise"
    previous = normlab.set_nonfinite_policy("raise")
    try:
        assert previous == "skip" and normlab.get_nonfinite_policy() == "raise"
        with pytest.raises(NonFiniteError):
            nl.BatchNorm1d(3)(x)
    finally:
        normlab.set_nonfinite_policy(previous)
    assert normlab.get_nonfinite_policy() == "skip"


def test_the_context_is_local_to_its_thread():
    seen = []
    with normlab.nonfinite_policy("raise"):
        t = threading.Thread(target=lambda: seen.append(normlab.get_nonfinite_policy()))
        t.start(), t.join()
    assert seen == ["skip"]


@pytest.mark.parametrize("call", [
    lambda: normlab.nonfinite_policy("ignore").__enter__(),
    lambda: normlab.set_nonfinite_policy(None),
    lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, nonfinite="warn"),
    lambda: NF.instance_norm(torch.randn(4, 3, 5), nonfinite=1),
    lambda: L.BatchNorm(3).forward(np.ones((4, 3), np.float32), nonfinite="Skip"),
])
def test_an_unknown_policy_is_named(call):
    with pytest.raises(ValueError, match=r"must be one of \['skip', 'propagate', 'raise'\].*got"):
        call()


def test_an_unknown_module_policy_is_named():
    m = nl.BatchNorm1d(3)
    m.nonfinite_policy = "never"
    with pytest.raises(ValueError, match=r"BatchNorm1d.nonfinite_policy.*'never'"):
        m(torch.randn(4, 3))


def test_the_warning_lets_a_user_find_the_layer_in_a_model():
    model = nn.Sequential(nn.Linear(4, 3), nl.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 3),
                          nl.BatchNorm1d(3))
    x = torch.randn(8, 4)
    x[0, 0] = float("inf")     # reaches every channel of the first BN through the Linear
    with pytest.warns(NonFiniteWarning) as rec:
        model(x)
    names = {n for r in rec for n, mod in model.named_modules() if mod is r.message.owner}
    assert "1" in names


def test_compiled_module_skips_without_a_branch():
    """torch.compile(fullgraph=True): the skip is a torch.where, no graph break, no warning."""
    torch._dynamo.reset()
    m = nl.BatchNorm2d(3).train()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    clean = _batches((4, 3, 3, 3))[0]
    cm(clean)
    before = _state(m)
    x, _ = _poison(clean, float("nan"))
    cm(x)
    _assert_same_state(m, before)
    cm(clean)
    assert int(m.num_batches_tracked) == 2


# --------------------------------------------------------------------------- SyncBatchNorm ranks


def _fake_two_ranks(monkeypatch, calls):
    """Two ranks holding the same local batch: all_gather returns the local statistics twice."""
    monkeypatch.setattr(sbn, "_group_size", lambda pg: 2)

    def all_gather(out, local, group=None):
        calls.append("all_gather")
        for o in out:
            o.copy_(local)

    monkeypatch.setattr(sbn.dist, "all_gather", all_gather)


@pytest.mark.parametrize("policy", ["skip", "raise", "propagate"])
def test_sync_batch_norm_decides_on_the_gathered_statistics(monkeypatch, policy):
    calls = []
    _fake_two_ranks(monkeypatch, calls)
    m = nl.SyncBatchNorm(3, momentum=None).train()
    clean, _, _ = _batches((4, 3, 5))
    m(clean)
    assert calls == ["all_gather"] and int(m.num_batches_tracked) == 1
    # the global batch is two copies of the local one: same mean, var * 2n / (2n - 1) unbiased
    torch.testing.assert_close(m.running_mean, clean.mean((0, 2)))
    torch.testing.assert_close(m.running_var, clean.var((0, 2), correction=0) * 40 / 39)
    before = _state(m)
    x, _ = _poison(clean, float("nan"))
    m.nonfinite_policy = policy
    if policy == "skip":
        with pytest.warns(NonFiniteWarning, match=r"SyncBatchNorm.*\[1\]"):
            m(x)
        _assert_same_state(m, before)
    elif policy == "raise":
        with pytest.raises(NonFiniteError, match=r"SyncBatchNorm.*\[1\]"):
            m(x)
        _assert_same_state(m, before)
    else:
        m(x)
        assert torch.isnan(m.running_mean[1]) and int(m.num_batches_tracked) == 2
    assert calls == ["all_gather"] * 2      # the decision needs no extra collective


# --------------------------------------------------------------------------- NumPy layers


def _np_state(layer):
    return {k: np.copy(v) for k, v in layer.state_dict().items()}


LAYERS = {
    "BatchNorm": (lambda: L.BatchNorm(3), (6, 3, 4), "bn"),
    "BatchNorm-cumulative": (lambda: L.BatchNorm(3, momentum=None), (6, 3), "bn"),
    "BatchRenorm": (lambda: L.BatchRenorm(3), (6, 3), "bn"),
    "InstanceNorm": (lambda: L.InstanceNorm(3, track_running_stats=True), (4, 3, 5), "in"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(LAYERS))
def test_numpy_layers_follow_the_policy(name, bad):
    make, shape, kind = LAYERS[name]
    rng = np.random.default_rng(0)
    clean1, clean2, base = (rng.normal(1, 2, size=shape).astype(np.float32) for _ in range(3))
    x = base.copy()
    x[(1, 1) + (0,) * (x.ndim - 2)] = BAD[bad]
    layer, twin = make(), make()
    layer.forward(clean1), twin.forward(clean1)
    before = _np_state(layer)
    with pytest.warns(NonFiniteWarning, match=rf"{type(layer).__name__}\(num_features=3.*\[1\]"):
        y = layer.forward(x)
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)
    assert not np.isfinite(y[:, 1] if kind == "bn" else y[1, 1]).any()
    assert np.isfinite(y[:, [0, 2]]).all()
    layer.backward(np.ones_like(y))             # the skipped forward still has a backward
    with pytest.raises(NonFiniteError, match=r"left unchanged"):
        layer.forward(x, nonfinite="raise")
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)
    layer.forward(clean2), twin.forward(clean2)
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=k)
    layer.nonfinite_policy = "propagate"
    layer.forward(x)
    assert np.isnan(layer.running_var[1]) or np.isinf(layer.running_var[1])


# --------------------------------------------------------------------------- BatchNormalizer


def test_batch_normalizer_partial_fit_follows_the_policy():
    rng = np.random.default_rng(1)
    X1, X2 = rng.normal(3, 2, size=(20, 3)), rng.normal(3, 2, size=(15, 3))
    bad = X2.copy()
    bad[4, 2] = np.inf
    ref = BatchNormalizer().fit(X1).partial_fit(X2)
    est = BatchNormalizer().fit(X1)
    with pytest.warns(NonFiniteWarning, match=r"BatchNormalizer.*feature\(s\) \[2\].*mean_, var_"):
        est.partial_fit(bad)
    est.partial_fit(X2)
    for k in ("mean_", "var_", "scale_", "n_samples_seen_"):
        np.testing.assert_array_equal(getattr(est, k), getattr(ref, k), err_msg=k)
    est = BatchNormalizer(nonfinite_policy="raise").fit(X1)
    with pytest.raises(NonFiniteError, match=r"feature\(s\) \[2\]"):
        est.partial_fit(bad)
    np.testing.assert_array_equal(est.mean_, BatchNormalizer().fit(X1).mean_)
    est = BatchNormalizer(nonfinite_policy="propagate").fit(X1).partial_fit(bad)
    assert np.isinf(est.mean_[2]) and np.isfinite(est.mean_[:2]).all()
    # a first partial_fit that is skipped leaves the estimator unfitted; fit raises
    with pytest.warns(NonFiniteWarning):
        est = BatchNormalizer().partial_fit(bad)
    assert not hasattr(est, "n_features_in_")
    with pytest.raises(NonFiniteError):
        BatchNormalizer().fit(bad)


def test_batch_normalizer_overflow_counts_as_non_finite_and_nan_stays_missing():
    X = np.random.default_rng(2).normal(size=(10, 2))
    est = BatchNormalizer().fit(X)
    huge = X.copy()
    huge[:, 0] *= 1e300                     # finite values whose squares overflow
    with pytest.warns(NonFiniteWarning, match=r"feature\(s\) \[0\]"):
        est.partial_fit(huge)
    assert est.n_samples_seen_ == 10
    missing = X.copy()
    missing[3, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.partial_fit(missing)            # NaN is a missing value, not a non-finite batch
    np.testing.assert_array_equal(est.n_samples_seen_, [20, 19])

"""Checkpoints: torch.nn state_dicts (also version-1 ones without num_batches_tracked) load into
normlab.nn modules and back; normlab state_dicts carry torch's ``_version`` metadata and load
across versions; a failed load (size mismatch, non-tensor entry, missing keys under strict)
raises an error naming the key, the shapes and the fix, and leaves the module exactly as it was
(same tensor objects, same values). Covers nn/modules.py, nn/variants.py, nn/sync_batch_norm.py.
"""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from torch import nn

import normlab.nn as N

torch.manual_seed(0)

C = 4

# name -> (normlab factory(C), torch twin factory(C) or None, input shape for C channels)
MODULES = {
    "BatchNorm1d": (lambda c: N.BatchNorm1d(c), lambda c: nn.BatchNorm1d(c), (6, C, 5)),
    "BatchNorm2d": (lambda c: N.BatchNorm2d(c), lambda c: nn.BatchNorm2d(c), (6, C, 3, 3)),
    "BatchNorm3d": (lambda c: N.BatchNorm3d(c), lambda c: nn.BatchNorm3d(c), (4, C, 2, 3, 3)),
    "BatchNorm2d(momentum=None)": (lambda c: N.BatchNorm2d(c, momentum=None),
                                   lambda c: nn.BatchNorm2d(c, momentum=None), (6, C, 3, 3)),
    "InstanceNorm1d": (lambda c: N.InstanceNorm1d(c, affine=True, track_running_stats=True),
                       lambda c: nn.InstanceNorm1d(c, affine=True, track_running_stats=True),
                       (3, C, 7)),
    "InstanceNorm2d": (lambda c: N.InstanceNorm2d(c, affine=True, track_running_stats=True),
                       lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
                       (3, C, 4, 4)),
    "InstanceNorm3d": (lambda c: N.InstanceNorm3d(c, affine=True, track_running_stats=True),
                       lambda c: nn.InstanceNorm3d(c, affine=True, track_running_stats=True),
                       (2, C, 2, 3, 3)),
    "LayerNorm": (lambda c: N.LayerNorm(c), lambda c: nn.LayerNorm(c), (3, 5, C)),
    "GroupNorm": (lambda c: N.GroupNorm(2, c), lambda c: nn.GroupNorm(2, c), (3, C, 5)),
    "RMSNorm": (lambda c: N.RMSNorm(c), lambda c: nn.RMSNorm(c), (3, 5, C)),
    "SyncBatchNorm": (lambda c: N.SyncBatchNorm(c), lambda c: nn.SyncBatchNorm(c), (6, C, 3, 3)),
    "BatchRenorm2d": (lambda c: N.BatchRenorm2d(c), lambda c: nn.BatchNorm2d(c), (6, C, 3, 3)),
    "GhostBatchNorm2d": (lambda c: N.GhostBatchNorm2d(c, virtual_batch_size=3),
                         lambda c: nn.BatchNorm2d(c), (6, C, 3, 3)),
    "FrozenBatchNorm2d": (lambda c: N.FrozenBatchNorm2d(c), lambda c: nn.BatchNorm2d(c),
                          (6, C, 3, 3)),
}
WITH_RUNNING = [k for k in MODULES if not k.startswith(("LayerNorm", "GroupNorm", "RMSNorm"))]
BN_STATE = [k for k in MODULES if k.startswith(("BatchNorm", "SyncBatchNorm", "BatchRenorm",
                                                 "GhostBatchNorm"))]


def _randomize(m: nn.Module) -> nn.Module:
    """Distinct, non-default values in every parameter and buffer."""
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.dtype == torch.long:
                t.fill_(int(torch.randint(3, 50, ())))
            elif "var" in name:
                t.uniform_(0.5, 2.0)
            else:
                t.uniform_(-1.0, 1.0)
    return m


def _snapshot(m: nn.Module):
    return {k: (v, v.detach().clone()) for k, v in
            list(m.named_parameters()) + list(m.named_buffers())}


def _assert_unchanged(m: nn.Module, snap):
    now = dict(list(m.named_parameters()) + list(m.named_buffers()))
    assert now.keys() == snap.keys()
    for k, (obj, value) in snap.items():
        assert now[k] is obj, f"{k} was replaced"
        assert torch.equal(now[k].detach(), value), f"{k} was changed"


def _eval_out(m, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return m.eval()(x)


# ---------------------------------------------------------------------- torch <-> normlab


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_checkpoint_loads_into_normlab_and_back(name):
    make, make_torch, shape = MODULES[name]
    src = _randomize(make_torch(C))
    ours = make(C)
    result = ours.load_state_dict(src.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in ours.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    if not name.startswith("FrozenBatchNorm"):
        assert ours.state_dict().keys() == src.state_dict().keys()
    torch.testing.assert_close(_eval_out(ours, shape), _eval_out(src, shape), rtol=1e-5, atol=1e-5)
    # and back: a normlab checkpoint loads into the torch.nn twin
    back = make_torch(C)
    back.load_state_dict(_randomize(make(C)).state_dict(), strict=not name.startswith("Frozen"))


@pytest.mark.parametrize("name", list(MODULES))
def test_state_dict_carries_torch_version(name):
    make, make_torch, _ = MODULES[name]
    m = make(C)
    sd = m.state_dict()
    assert sd._metadata[""]["version"] == m._version
    twin = make_torch(C)
    if not name.startswith(("FrozenBatchNorm", "BatchRenorm", "GhostBatchNorm")):
        assert m._version == twin._version          # same format as the twin: loads both ways
    if name in BN_STATE or name.startswith("InstanceNorm"):
        assert m._version == 2                      # version 2 added num_batches_tracked


@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip_through_torch_save(name):
    make, _, shape = MODULES[name]
    m = _randomize(make(C))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd._metadata[""]["version"] == m._version
    fresh = make(C)
    fresh.load_state_dict(sd)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    torch.testing.assert_close(_eval_out(fresh, shape), _eval_out(m, shape), rtol=0, atol=0)


# ---------------------------------------------------------------------- old versions


def _version1(sd, prefix=""):
    """A torch version-1 BatchNorm checkpoint: no num_batches_tracked, metadata version 1."""
    old = collections.OrderedDict((k, v) for k, v in sd.items()
                                  if not k.endswith("num_batches_tracked"))
    old._metadata = copy.deepcopy(sd._metadata)
    old._metadata[prefix.rstrip(".")] = {"version": 1}
    return old


@pytest.mark.parametrize("name", WITH_RUNNING)
def test_version1_checkpoint_without_num_batches_tracked_loads(name):
    make, make_torch, shape = MODULES[name]
    src = _randomize(make_torch(C))
    old = _version1(src.state_dict())
    ours = make(C)
    result = ours.load_state_dict(old)                       # strict=True
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(ours.running_mean, src.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, src.running_var, rtol=0, atol=0)
    if hasattr(ours, "num_batches_tracked"):
        assert int(ours.num_batches_tracked) == 0             # a fresh module's count
    # the upgraded module saves a version-2 checkpoint again
    if name in BN_STATE or name.startswith("InstanceNorm"):
        assert "num_batches_tracked" in ours.state_dict()
        assert ours.state_dict()._metadata[""]["version"] == 2
    torch.testing.assert_close(_eval_out(ours, shape), _eval_out(src, shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BN_STATE)
def test_unversioned_plain_dict_checkpoint_loads(name):
    """A plain dict (no _metadata: e.g. rebuilt with a dict comprehension) is read as version 1."""
    make, make_torch, _ = MODULES[name]
    src = _randomize(make_torch(C))
    plain = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    ours = make(C)
    ours.load_state_dict(plain)
    assert torch.equal(ours.running_var, src.running_var)
    assert int(ours.num_batches_tracked) == 0
    with_count = dict(src.state_dict())
    ours.load_state_dict(with_count)
    assert int(ours.num_batches_tracked) == int(src.num_batches_tracked)


def test_version1_checkpoint_inside_a_model():
    torch_model = _randomize(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(),
                                           nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)))
    sd = torch_model.state_dict()
    old = collections.OrderedDict((k, v) for k, v in sd.items() if "num_batches_tracked" not in k)
    old._metadata = copy.deepcopy(sd._metadata)
    old._metadata["1"] = {"version": 1}
    old._metadata["4"] = {"version": 1}
    ours = nn.Sequential(nn.Conv2d(3, C, 3), N.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                         N.BatchRenorm2d(C))
    ours.load_state_dict(old)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours.eval()(x), torch_model.eval()(x), rtol=1e-5, atol=1e-5)
    # a version-2 entry that lacks num_batches_tracked is a broken checkpoint, not an old one
    broken = collections.OrderedDict(old)
    broken._metadata = copy.deepcopy(sd._metadata)
    fresh = nn.Sequential(nn.Conv2d(3, C, 3), N.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                          N.BatchRenorm2d(C))
    with pytest.raises(RuntimeError, match="Missing key.*1.num_batches_tracked"):
        fresh.load_state_dict(broken)
    # loaded on its own, the module refuses it and stays as it was
    bn = _randomize(N.BatchNorm2d(C))
    snap = _snapshot(bn)
    one = collections.OrderedDict((k[2:], v) for k, v in broken.items() if k.startswith("1."))
    one._metadata = {"": {"version": 2}}
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        bn.load_state_dict(one)
    _assert_unchanged(bn, snap)


def test_old_instance_norm_checkpoint_with_running_stats_is_refused_atomically():
    """torch's InstanceNorm rule for unversioned checkpoints: running stats in the checkpoint but
    track_running_stats=False is an error; with it, nothing (not even weight/bias) is loaded."""
    src = _randomize(nn.InstanceNorm2d(C, affine=True, track_running_stats=True))
    plain = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    ours = N.InstanceNorm2d(C, affine=True)
    snap = _snapshot(ours)
    with pytest.raises(RuntimeError, match="track_running_stats"):
        ours.load_state_dict(plain)
    _assert_unchanged(ours, snap)


def test_batch_renorm_resumes_its_schedule_from_the_checkpoint():
    a = N.BatchRenorm2d(C, warmup_steps=2, ramp_steps=4)
    a.train()
    for _ in range(4):
        a(torch.randn(6, C, 3, 3))
    b = N.BatchRenorm2d(C, warmup_steps=2, ramp_steps=4)
    b.load_state_dict(a.state_dict())
    assert int(b.num_batches_tracked) == 4
    assert (b.current_r_max, b.current_d_max) == (a.current_r_max, a.current_d_max)


# ---------------------------------------------------------------------- failed loads: atomic


def _bigger(name):
    make, make_torch, _ = MODULES[name]
    return _randomize(make_torch(C + 4)).state_dict()


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("strict", [True, False])
def test_size_mismatch_names_key_shapes_and_fix_and_changes_nothing(name, strict):
    make, make_torch, shape = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    before = _eval_out(m, shape)
    # only one entry has the wrong size: torch.nn would copy all the others first
    sd = _randomize(make_torch(C)).state_dict()
    key = "running_var" if "running_var" in sd else "weight"
    sd[key] = torch.ones(C + 4)
    with pytest.raises(RuntimeError) as info:
        m.load_state_dict(sd, strict=strict)
    msg = str(info.value)
    assert f"size mismatch for {key}" in msg
    assert f"({C + 4},)" in msg and f"({C},)" in msg
    fix = {"LayerNorm": "normalized_shape=(8,)", "RMSNorm": "normalized_shape=(8,)",
           "GroupNorm": "num_channels=8"}.get(name, "num_features=8")
    assert fix in msg
    assert "Nothing was loaded" in msg
    _assert_unchanged(m, snap)
    torch.testing.assert_close(_eval_out(m, shape), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODULES))
def test_checkpoint_of_other_size_changes_nothing(name):
    make, _, _ = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(_bigger(name))
    _assert_unchanged(m, snap)


@pytest.mark.parametrize("name", list(MODULES))
def test_size_mismatch_with_assign_changes_nothing(name):
    make, _, _ = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(_bigger(name), assign=True)
    _assert_unchanged(m, snap)


@pytest.mark.parametrize("name", list(MODULES))
def test_non_tensor_entry_is_refused_and_changes_nothing(name):
    make, make_torch, _ = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    sd = dict(_randomize(make_torch(C)).state_dict())
    key = "bias" if "bias" in sd else "weight"
    sd[key] = [0.0] * C
    with pytest.raises(RuntimeError, match=f"'{key}' is a list, expected a tensor of shape \\({C},\\)"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


@pytest.mark.parametrize("name", list(MODULES))
def test_missing_key_strict_changes_nothing_nonstrict_loads_the_rest(name):
    make, make_torch, _ = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    src = _randomize(make_torch(C))
    sd = dict(src.state_dict())
    drop = "running_mean" if "running_mean" in sd else "weight"
    del sd[drop]
    with pytest.raises(RuntimeError, match=f"Missing key.*{drop}"):
        m.load_state_dict(sd)                       # strict: the load fails, nothing changes
    _assert_unchanged(m, snap)
    result = m.load_state_dict(sd, strict=False)    # non-strict: the rest is loaded
    assert result.missing_keys == [drop]
    for k, v in sd.items():
        if k in m.state_dict():
            assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(getattr(m, drop), snap[drop][1])


@pytest.mark.parametrize("name", list(MODULES))
def test_unexpected_key_strict_changes_nothing(name):
    make, make_torch, _ = MODULES[name]
    m = _randomize(make(C))
    snap = _snapshot(m)
    sd = dict(_randomize(make_torch(C)).state_dict())
    sd["running_median"] = torch.zeros(C)
    with pytest.raises(RuntimeError, match="Unexpected key.*running_median"):
        m.load_state_dict(sd)
    _assert_unchanged(m, snap)


def test_failed_load_in_a_model_leaves_normlab_modules_unchanged():
    """In a model, each normlab module loads all or nothing (torch.nn's own modules keep
    torch's rule: they are copied before the error is raised)."""
    model = _randomize(nn.Sequential(nn.Linear(3, C), N.BatchNorm1d(C), N.LayerNorm(C),
                                     N.GroupNorm(2, C), N.SyncBatchNorm(C)))
    sd = _randomize(nn.Sequential(nn.Linear(3, C), nn.BatchNorm1d(C), nn.LayerNorm(C),
                                  nn.GroupNorm(2, C), nn.SyncBatchNorm(C))).state_dict()
    sd["1.running_var"] = torch.ones(2 * C)
    sd["4.bias"] = torch.ones(C + 1)
    snaps = {i: _snapshot(model[i]) for i in (1, 4)}
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    assert "size mismatch for 1.running_var" in str(info.value)
    assert "size mismatch for 4.bias" in str(info.value)
    for i, snap in snaps.items():
        _assert_unchanged(model[i], snap)
    # the modules whose entries were fine loaded (torch's rule for the model as a whole)
    assert torch.equal(model[2].weight, sd["2.weight"])


def test_dtype_and_device_conversion_on_load():
    """A float64 checkpoint loads into a float32 module (copied with conversion, as torch)."""
    src = _randomize(nn.BatchNorm2d(C).double())
    m = N.BatchNorm2d(C)
    m.load_state_dict(src.state_dict())
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean, src.running_mean.float())

"""normlab.nn.tools: each tool does its job on a real small model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normlab.nn as nl
from normlab.nn import tools


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _train_stats(model, shape, steps=4, seed=0):
    """A few training-mode forwards so the running statistics are non-default."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(torch.randn(shape, generator=g) * (1 + i) + i)
    return model


# ============================================================================ create_norm

SHAPES = {1: (4, 6), 2: (3, 6, 4, 5), 3: (2, 6, 3, 3, 2)}


@pytest.mark.parametrize("name", sorted(tools.available_norms()))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_every_registered_norm_is_a_drop_in_for_batch_norm(name, dim):
    if name == "rmsnorm" and dim != 1:
        with pytest.raises(ValueError, match="layernorm"):
            nl.create_norm(name, 6, dim=dim)
        return
    m = nl.create_norm(name, 6, dim=dim)
    shape = (4, 6, 5) if (name, dim) == ("instancenorm", 1) else SHAPES[dim]   # IN needs spatial values
    x = torch.randn(shape, generator=torch.Generator().manual_seed(dim)) * 3 + 1
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # identity and frozen BN (fresh: mean 0, var 1) pass x through; so does a fresh BatchRenorm
    # whose r, d are not clipped: it then normalizes with the running statistics (0, 1)
    if name not in ("identity", "frozenbatchnorm", "batchrenorm"):
        assert not torch.allclose(y, x)                  # it does normalize


def test_names_aliases_suffixes_and_keywords():
    assert type(nl.create_norm("BatchNorm2d", 4)) is nl.BatchNorm2d
    assert type(nl.create_norm("bn", 4, dim=3)) is nl.BatchNorm3d
    assert type(nl.create_norm("ghost_batch_norm_1d", 4)) is nl.GhostBatchNorm1d
    assert type(nl.create_norm("brn", 4, dim=2)) is nl.BatchRenorm2d
    assert type(nl.create_norm("frozen-bn", 4, dim=2)) is nl.FrozenBatchNorm2d
    assert isinstance(nl.create_norm("none", 4), nn.Identity)
    assert nl.create_norm("gbn", 4, dim=1, virtual_batch_size=8).virtual_batch_size == 8
    assert nl.create_norm("brn", 4, dim=1, r_max=2.0).r_max == 2.0
    assert nl.create_norm("in", 4, dim=2).affine                      # BN's drop-in: affine on
    assert nl.create_norm("gn", 64).num_groups == 32                  # Wu & He's default
    assert nl.create_norm("gn", 24).num_groups == 8                   # gcd(32, 24)
    assert nl.create_norm("gn", 24, num_groups=3).num_groups == 3
    assert nl.create_norm("bn", 4, dim=1, dtype=torch.float64).weight.dtype == torch.float64


def test_layernorm_is_group_norm_with_one_group_and_equals_nn_layernorm_on_features():
    m = nl.create_norm("layernorm", 5)
    assert isinstance(m, nn.GroupNorm) and m.num_groups == 1
    x = torch.randn(7, 5)
    torch.testing.assert_close(m(x), nn.LayerNorm(5)(x))
    x4 = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(m(x4), nn.functional.layer_norm(x4, (5, 3, 3)))


def test_create_norm_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown norm 'battchnorm'.*'batchnorm'.*'groupnorm'"):
        nl.create_norm("battchnorm", 4)
    with pytest.raises(ValueError, match="needs dim in"):
        nl.create_norm("batchnorm", 4)
    with pytest.raises(ValueError, match="the name says dim=2"):
        nl.create_norm("batchnorm2d", 4, dim=1)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['momentum'\].*num_groups"):
        nl.create_norm("groupnorm", 4, momentum=0.1)
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide num_channels=4; choose one of \[1, 2, 4\]"):
        nl.create_norm("gn", 4, num_groups=3)
    with pytest.raises(ValueError, match="num_channels"):
        nl.create_norm("bn", 0, dim=1)
    with pytest.raises(TypeError, match="string"):
        nl.create_norm(nn.BatchNorm2d, 4)


# ============================================================================ convert_norms


def _cnn(bn=nn):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), bn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), bn.BatchNorm1d(4))


def test_convert_to_group_norm_replaces_every_bn_and_carries_the_affine():
    torch.manual_seed(0)
    model = _train_stats(_cnn(), (6, 3, 5, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
    w1 = model[1].weight.detach().clone()
    model, replaced = nl.convert_norms(model, "groupnorm", num_groups=4)
    assert replaced == [("1", "BatchNorm2d", "GroupNorm"), ("4", "BatchNorm2d", "GroupNorm"),
                        ("9", "BatchNorm1d", "GroupNorm")]
    assert _count(model, _BatchNorm) == 0 and model[1].num_groups == 4
    torch.testing.assert_close(model[1].weight.detach(), w1)
    y = model(torch.randn(2, 3, 5, 5))            # GN works with tiny batches
    assert y.shape == (2, 4)


@pytest.mark.parametrize("to, cls", [("frozenbatchnorm", nl.FrozenBatchNorm2d), ("batchrenorm", nl.BatchRenorm2d),
                                     ("ghostbatchnorm", nl.GhostBatchNorm2d), ("batchnorm", nl.BatchNorm2d)])
def test_converting_within_the_bn_family_keeps_the_inference_function(to, cls):
    torch.manual_seed(1)
    model = _train_stats(_cnn(), (6, 3, 5, 5)).eval()
    x = torch.randn(3, 3, 5, 5)
    before = model(x)
    model, replaced = nl.convert_norms(model, to)
    assert len(replaced) == 3 and isinstance(model[1], cls)
    assert all(not m.training for m in model.modules())          # eval mode carried over
    torch.testing.assert_close(model(x), before)                  # running stats + affine + eps carried


def test_convert_momentum_eps_carried_and_keywords_override():
    model = nn.Sequential(nn.BatchNorm1d(3, eps=1e-3, momentum=0.3))
    model, _ = nl.convert_norms(model, "ghostbatchnorm", virtual_batch_size=2)
    assert (model[0].eps, model[0].momentum, model[0].virtual_batch_size) == (1e-3, 0.3, 2)
    model, _ = nl.convert_norms(model, "batchnorm", of="ghostbatchnorm", momentum=0.05)
    assert type(model[0]) is nl.BatchNorm1d and model[0].momentum == 0.05 and model[0].eps == 1e-3


def test_convert_of_other_kinds_needs_dim_when_the_class_does_not_say():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"cannot build 'batchnorm' for 1 \(GroupNorm, 4 channels\).*dim"):
        nl.convert_norms(model, "batchnorm", of="groupnorm")
    model, replaced = nl.convert_norms(model, "batchnorm", of="groupnorm", dim=2)
    assert replaced == [("1", "GroupNorm", "BatchNorm2d")]
    assert isinstance(model[2], nn.LayerNorm)                     # not of the kind asked for
    model, replaced = nl.convert_norms(model, "identity", of="all")
    assert [r[0] for r in replaced] == ["1", "2"] and _count(model, nn.Identity) == 2


def test_convert_keeps_sharing_the_root_and_already_converted_modules():
    bn = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"a": bn, "b": nn.Sequential(bn)})
    model, replaced = nl.convert_norms(model, "batchrenorm")
    assert model["a"] is model["b"][0] and len(replaced) == 1
    root, replaced = nl.convert_norms(nn.BatchNorm2d(3), "gn", num_groups=3)
    assert isinstance(root, nn.GroupNorm) and replaced == [("", "BatchNorm2d", "GroupNorm")]
    ours = nn.Sequential(nl.BatchNorm2d(3))
    assert nl.convert_norms(ours, "batchnorm")[1] == []           # already normlab's BN2d
    torch_bn, replaced = nl.convert_norms(nn.Sequential(nn.BatchNorm2d(3)), "batchnorm")
    assert type(torch_bn[0]) is nl.BatchNorm2d and replaced == [("0", "BatchNorm2d", "BatchNorm2d")]


def test_convert_with_a_callable_and_bad_arguments():
    model, replaced = nl.convert_norms(_cnn(), lambda m: nn.GroupNorm(1, m.num_features))
    assert len(replaced) == 3
    with pytest.raises(TypeError, match="must return an nn.Module"):
        nl.convert_norms(_cnn(), lambda m: None)
    with pytest.raises(ValueError, match="unknown norm 'gropnorm'"):
        nl.convert_norms(_cnn(), "gropnorm")
    with pytest.raises(TypeError, match="virtual_batch_size"):
        nl.convert_norms(_cnn(), "groupnorm", virtual_batch_size=4)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nl.convert_norms([nn.BatchNorm1d(2)], "groupnorm")


# ============================================================================ fold_batchnorm


def _fold_zoo(dtype):
    return nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 6, 3, groups=3, bias=False), nl.BatchNorm1d(6),
        nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2), nn.BatchNorm1d(4, affine=False),
        nn.Unflatten(2, (3, 5)), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4), nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False), nl.BatchNorm2d(6),
        nn.Unflatten(2, (2, 2)), nn.Conv3d(6, 2, (1, 2, 2)), nn.BatchNorm3d(2),
        nn.Flatten(), nn.Linear(2 * 2 * 1 * 5, 5), nl.BatchNorm1d(5),
    ).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 5e-5)])
def test_fold_is_exact_and_removes_every_bn(dtype, tol):
    torch.manual_seed(2)
    model = _fold_zoo(dtype)
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(torch.randn(8, 3, 9, generator=g, dtype=dtype) * 2 + i)
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(4, 3, 9, generator=g, dtype=dtype)
    before = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    n_bn = _count(model, _BatchNorm)
    model, not_folded = nl.fold_batchnorm(model)
    assert not_folded == []
    assert n_bn == 7 and _count(model, _BatchNorm) == 0
    assert sum(p.numel() for p in model.parameters()) < n_params
    after = model(x)
    assert after.dtype == dtype
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)


class _Residual(nn.Module):
    """conv->bn in functional forward code, a conv output used twice, a shared BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nl.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b3 = nn.BatchNorm2d(4)
        self.lin, self.b4 = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.c1(x)
        out = torch.relu(self.b1(h)) + self.b2(self.c2(x)) + self.b3(h)
        return self.b4(self.lin(out.mean(dim=(2, 3))))


def test_fold_traces_functional_forward_and_reports_what_it_cannot_fold():
    torch.manual_seed(3)
    model = _train_stats(_Residual(), (5, 3, 4, 4)).eval()
    x = torch.randn(3, 3, 4, 4)
    before = model(x)
    model, not_folded = nl.fold_batchnorm(model)
    assert isinstance(model.b2, nn.Identity) and isinstance(model.b4, nn.Identity)
    assert dict(not_folded).keys() == {"b1", "b3"}
    assert "also feeds other operations" in dict(not_folded)["b1"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:                                   # not traceable by torch.fx
            return self.seq(x) + self.b(self.c(x))
        return self.seq(x)


def test_fold_falls_back_to_sequential_pairs_and_skips_training_mode_bn():
    torch.manual_seed(4)
    model = _train_stats(_DataDependent(), (4, 3, 5, 5)).eval()
    x = torch.rand(2, 3, 5, 5)
    before = model(x)
    model, not_folded = nl.fold_batchnorm(model)
    assert isinstance(model.seq[1], nn.Identity)
    assert [n for n, _ in not_folded] == ["b"] and "could not be traced" in not_folded[0][1]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    train_model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3),
                                nn.BatchNorm1d(3, track_running_stats=False)).train()
    _, not_folded = nl.fold_batchnorm(train_model)
    assert [n for n, _ in not_folded] == ["1", "3"]
    assert "training mode" in not_folded[0][1] and "track_running_stats=False" in not_folded[1][1]


def test_fold_folds_frozen_batch_norm():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nl.FrozenBatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 2, 3, 3)
    before = model(x)
    model, not_folded = nl.fold_batchnorm(model)
    assert not_folded == [] and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), before)


# ============================================================================ recalibrate_batchnorm


def _small_cnn():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 3, 1), nl.BatchNorm2d(3, momentum=None), nn.Flatten())


def _population(x_all):
    C = x_all.shape[1]
    flat = x_all.double().transpose(0, 1).reshape(C, -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def test_recalibrate_sets_the_exact_population_statistics():
    model = _train_stats(_small_cnn(), (8, 2, 6, 6))
    model.train()
    model[0].eval()                                   # a mixed mode that must survive
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(n, 2, 6, 6, generator=g) * 2 + 3, torch.zeros(n)) for n in (16, 16, 9)]
    rm_before = model[1].running_mean.clone()
    nl.recalibrate_batchnorm(model, batches)
    # BN 1: statistics of conv1's output over all 41 samples (unequal batches: count-weighted)
    with torch.no_grad():
        h1 = [model[0](x) for x, _ in batches]
        mean1, var1 = _population(torch.cat(h1))
        # BN 2 sees conv2(relu(BN1 with each batch's statistics)): dropout off, as at inference
        h2 = [model[4](torch.relu(nn.functional.batch_norm(h, None, None, model[1].weight, model[1].bias,
                                                            True, 0.0, model[1].eps))) for h in h1]
        mean2, var2 = _population(torch.cat(h2))
    torch.testing.assert_close(model[1].running_mean.double(), mean1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[5].running_mean.double(), mean2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[5].running_var.double(), var2, rtol=1e-5, atol=1e-6)
    assert (rm_before.double() - mean1).abs().max() > 0.1         # the EMA was off before
    assert int(model[1].num_batches_tracked) == 3
    assert (model[1].momentum, model[5].momentum) == (0.3, None)
    assert model.training and not model[0].training and model[1].training and model[3].training
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k


def test_recalibrate_num_batches_tensors_and_dataloader():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(10, 2, 5, 5, generator=g) + i for i in range(4)]
    a = nl.recalibrate_batchnorm(_small_cnn().eval(), xs, num_batches=2)
    b = nl.recalibrate_batchnorm(_small_cnn().eval(), xs[:2])
    assert torch.equal(a[1].running_mean, b[1].running_mean) and int(a[1].num_batches_tracked) == 2
    assert not a.training
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs[:2]), torch.zeros(20)),
                                         batch_size=7)
    c = nl.recalibrate_batchnorm(_small_cnn().eval(), loader)
    torch.testing.assert_close(c[1].running_mean, b[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c[1].running_var, b[1].running_var, rtol=1e-5, atol=1e-6)


def test_recalibrate_errors_name_the_fix():
    with pytest.raises(TypeError, match=r"batch 0 is a dict.*first element is the input"):
        nl.recalibrate_batchnorm(_small_cnn(), [{"x": torch.randn(2, 2, 5, 5)}])
    with pytest.raises(ValueError, match="no batches"):
        nl.recalibrate_batchnorm(_small_cnn(), [])
    with pytest.raises(ValueError, match="num_batches"):
        nl.recalibrate_batchnorm(_small_cnn(), [torch.randn(2, 2, 5, 5)], num_batches=0)
    with pytest.raises(TypeError, match="iterable"):
        nl.recalibrate_batchnorm(_small_cnn(), 3)
    model = _small_cnn().eval()
    with pytest.raises(RuntimeError):
        nl.recalibrate_batchnorm(model, [torch.randn(2, 5, 5, 5)])    # wrong channels: conv fails
    assert "forward" not in model[1].__dict__ and not model.training  # restored even on error


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_recalibrate_refuses_non_finite_statistics_and_writes_nothing(bad):
    model = _small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 5, 5)
    x[1, 0, 2, 2] = bad                  # a conv spreads it over channels of the BN that follows
    with pytest.raises(ValueError, match=r"non-finite values \(channel \d+: mean (inf|-inf|nan)"):
        nl.recalibrate_batchnorm(model, [torch.randn(4, 2, 5, 5), x])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ============================================================================ adapt_batchnorm (AdaBN)


def _blobs(n, g, shift=None, scale=1.0):
    centers = torch.tensor([[2.0, 0, 0, 1, 0, 0], [0, 2.0, 0, 0, 1, 0], [0, 0, 2.0, 0, 0, 1]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.7 * torch.randn(n, 6, generator=g)
    if shift is not None:
        x = x * scale + shift
    return x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids thread contention on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_adabn_recovers_accuracy_on_a_shifted_domain(one_thread):
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(8)
    # torch.nn's BN: the tools work on any model (and it keeps this training loop fast)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(80):
        x, y = _blobs(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    shift, scale = torch.tensor([3.0, -4.0, 2.0, 5.0, -3.0, 4.0]), 2.5       # covariate shift
    xs, ys = _blobs(2000, g)
    xt, yt = _blobs(2000, g, shift, scale)
    acc_source = _accuracy(model, xs, ys)
    acc_before = _accuracy(model, xt, yt)
    target_batches = [(_blobs(100, g, shift, scale)[0],) for _ in range(10)]   # unlabeled
    nl.adapt_batchnorm(model, target_batches)
    acc_after = _accuracy(model, xt, yt)
    print(f"AdaBN: source {acc_source:.3f}, target before {acc_before:.3f}, after {acc_after:.3f}")
    assert acc_source > 0.9
    assert acc_before < acc_source - 0.2                 # the shift breaks the source statistics
    assert acc_after > acc_source - 0.03                 # AdaBN restores (almost) all of it
    assert not model.training


# ============================================================================ freeze_batchnorm


def test_freeze_keeps_running_stats_through_train_and_optimizer_steps():
    torch.manual_seed(9)
    model = _train_stats(_cnn(nl), (6, 3, 5, 5)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    before = model(x)
    model = nl.freeze_batchnorm(model)
    assert _count(model, _BatchNorm) == 0 and _count(model, nl.FrozenBatchNorm) == 3
    assert isinstance(model[1], nl.FrozenBatchNorm2d) and isinstance(model[9], nl.FrozenBatchNorm1d)
    model.train()
    torch.testing.assert_close(model(x), before)         # train() does not bring batch stats back
    frozen_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 3, 5, 5) * 5).sum().backward()
    opt.step()
    for name in ("1", "4", "9"):
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(model.state_dict()[f"{name}.{key}"], frozen_state[f"{name}.{key}"])
    assert not torch.equal(model[0].weight, frozen_state["0.weight"])   # the conv did train
    # the BN checkpoint loads into the frozen model, and the conversion is reversible
    model.load_state_dict(state)
    model, replaced = nl.convert_norms(model, "batchnorm", of="frozenbatchnorm")
    assert len(replaced) == 3 and _count(model, _BatchNorm) == 3
    model.eval()
    torch.testing.assert_close(model(x), before)


def test_freeze_refuses_bn_without_running_statistics():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\) has no running statistics"):
        nl.freeze_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm1d)           # nothing half-converted


def test_recalibrate_treats_renorm_and_ghost_as_batch_norm_and_skips_frozen():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nl.GhostBatchNorm1d(4, virtual_batch_size=2), nn.Linear(4, 4),
                          nl.BatchRenorm1d(4), nl.FrozenBatchNorm1d(4))
    frozen = {k: v.clone() for k, v in model[4].state_dict().items()}
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(6, 3, generator=g) * 3 + 2 for _ in range(3)]
    nl.recalibrate_batchnorm(model, xs)
    with torch.no_grad():
        h = [model[0](x) for x in xs]
        mean1, var1 = _population(torch.cat(h))
        h2 = [model[2](nn.functional.batch_norm(v, None, None, model[1].weight, model[1].bias, True)) for v in h]
        mean2, var2 = _population(torch.cat(h2))
    torch.testing.assert_close(model[1].running_mean.double(), mean1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[3].running_mean.double(), mean2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[3].running_var.double(), var2, rtol=1e-5, atol=1e-6)
    for k, v in model[4].state_dict().items():
        assert torch.equal(v, frozen[k])


def test_docstring_examples_run():
    import doctest

    from normlab.nn import variants
    for module in (tools, variants):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0
    assert doctest.testmod(tools).attempted > 0

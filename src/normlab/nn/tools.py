r"""Model surgery for batch norm's failure modes.

* :func:`create_norm` — one registry of every normalization method by name.
* :func:`convert_norms` — replace every BatchNorm (or any kind of norm) in a model by another
  method (e.g. GroupNorm for small batches), carrying over what means the same thing.
* :func:`fold_batchnorm` — fold inference-mode BN into the preceding conv/linear layer.
* :func:`recalibrate_batchnorm` — precise BN (Wu & Johnson, 2021): exact population
  statistics instead of the EMA's lagging, noisy estimate.
* :func:`adapt_batchnorm` — AdaBN (Li et al., 2016): re-estimate the statistics on the target
  domain.
* :func:`freeze_batchnorm` — running statistics and fixed affine, whatever ``train()`` says.

"BatchNorm" below means any module of the batch-norm family: every
``torch.nn.modules.batchnorm._BatchNorm`` (torch.nn's and normlab's BatchNorm1d/2d/3d,
SyncBatchNorm, normlab's BatchRenorm and GhostBatchNorm) unless a function says otherwise.

The contract of ``create_norm(name, C, dim=d)``: a module that takes the channels-first tensor
that ``BatchNorm{d}d(C)`` would take, ``(N, C)``/``(N, C, L)`` for ``dim=1``, ``(N, C, H, W)``
for 2, ``(N, C, D, H, W)`` for 3, and returns a tensor of the same shape, with (by default)
a per-channel affine. That is what makes every entry a drop-in replacement for BN.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import _checks
from . import adaptive as A
from . import modules as M
from . import variants as V

__all__ = ["create_norm", "available_norms", "convert_norms", "fold_batchnorm",
           "recalibrate_batchnorm", "adapt_batchnorm", "freeze_batchnorm"]

# ============================================================================ the registry


def _by_dim(classes, dim, name):
    if dim not in classes:
        valid = sorted(classes)
        raise ValueError(
            f"create_norm({name!r}) needs dim in {valid} (the spatial rank of the input: 1 for (N, C) or "
            f"(N, C, L), 2 for (N, C, H, W), 3 for (N, C, D, H, W)), got dim={dim!r}; pass e.g. "
            f"dim=2 or a name with the suffix, e.g. {name + '2d'!r}")
    return classes[dim]


def _batchnorm(C, dim, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
               device=None, dtype=None):
    cls = _by_dim({1: M.BatchNorm1d, 2: M.BatchNorm2d, 3: M.BatchNorm3d}, dim, "batchnorm")
    return cls(C, eps, momentum, affine, track_running_stats, device, dtype)


def _batchrenorm(C, dim, *, eps=1e-5, momentum=0.1, r_max=3.0, d_max=5.0, warmup_steps=0,
                 ramp_steps=0, affine=True, device=None, dtype=None):
    cls = _by_dim({1: V.BatchRenorm1d, 2: V.BatchRenorm2d, 3: V.BatchRenorm3d}, dim, "batchrenorm")
    return cls(C, eps, momentum, r_max, d_max, warmup_steps, affine, device, dtype, ramp_steps=ramp_steps)


def _ghostbatchnorm(C, dim, *, virtual_batch_size=32, eps=1e-5, momentum=0.1, affine=True,
                    track_running_stats=True, device=None, dtype=None):
    cls = _by_dim({1: V.GhostBatchNorm1d, 2: V.GhostBatchNorm2d, 3: V.GhostBatchNorm3d}, dim,
                  "ghostbatchnorm")
    return cls(C, virtual_batch_size, eps, momentum, affine, track_running_stats, device, dtype)


def _frozenbatchnorm(C, dim, *, eps=1e-5, device=None, dtype=None):
    cls = {1: V.FrozenBatchNorm1d, 2: V.FrozenBatchNorm2d, 3: V.FrozenBatchNorm3d}.get(dim, V.FrozenBatchNorm)
    if dim not in (None, 1, 2, 3):
        _by_dim({1: 0, 2: 0, 3: 0}, dim, "frozenbatchnorm")
    return cls(C, eps, device=device, dtype=dtype)


def _instancenorm(C, dim, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=False,
                  device=None, dtype=None):
    cls = _by_dim({1: M.InstanceNorm1d, 2: M.InstanceNorm2d, 3: M.InstanceNorm3d}, dim, "instancenorm")
    return cls(C, eps, momentum, affine, track_running_stats, device, dtype)


def _default_groups(C):
    return math.gcd(32, C)


def _groupnorm(C, dim, *, num_groups=None, eps=1e-5, affine=True, device=None, dtype=None):
    G = _default_groups(C) if num_groups is None else num_groups
    _checks.check_groups(G, C)
    return M.GroupNorm(G, C, eps, affine, device, dtype)


def _layernorm(C, dim, *, eps=1e-5, affine=True, device=None, dtype=None):
    return M.GroupNorm(1, C, eps, affine, device, dtype)


def _rmsnorm(C, dim, *, eps=None, affine=True, device=None, dtype=None):
    if dim not in (None, 0, 1):
        raise ValueError(
            f"create_norm('rmsnorm') normalizes the trailing dimension (torch.nn.RMSNorm(C)), so it "
            f"fits (N, C) features only, got dim={dim!r}; use 'layernorm' (statistics over C and "
            f"spatial) or 'groupnorm' for convolutional features")
    return M.RMSNorm(C, eps, affine, device, dtype)


def _switchablenorm(C, dim, *, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
    cls = _by_dim({1: A.SwitchableNorm1d, 2: A.SwitchableNorm2d, 3: A.SwitchableNorm3d}, dim,
                  "switchablenorm")
    return cls(C, eps, momentum, affine, device, dtype)


def _any_rank(cls_2d, cls_any, dim):
    """The rank-checked 2d class for dim=2, else the class that takes any (N, C, *spatial)."""
    return cls_2d if dim == 2 else cls_any


def _filterresponsenorm(C, dim, *, eps=1e-6, learnable_eps=False, learnable_eps_init=1e-4, tlu=True,
                        affine=True, device=None, dtype=None):
    cls = _any_rank(A.FilterResponseNorm2d, A.FilterResponseNorm, dim)
    return cls(C, eps, learnable_eps, learnable_eps_init, tlu, affine, device, dtype)


def _evonorm_b0(C, dim, *, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
    return _any_rank(A.EvoNormB0_2d, A.EvoNormB0, dim)(C, eps, momentum, affine, device, dtype)


def _evonorm_s0(C, dim, *, groups=None, eps=1e-5, affine=True, device=None, dtype=None):
    return _any_rank(A.EvoNormS0_2d, A.EvoNormS0, dim)(C, groups, eps, affine, device, dtype)


def _identity(C, dim, *, device=None, dtype=None):
    return nn.Identity()


@dataclass(frozen=True)
class _Entry:
    factory: Callable
    kinds: tuple          # classes matched by convert_norms(of=<this name>)
    doc: str

    @property
    def keywords(self):
        return [p.name for p in inspect.signature(self.factory).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]


_REGISTRY = {
    "batchnorm": _Entry(_batchnorm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
                        "BatchNorm{dim}d (Ioffe & Szegedy 2015)"),
    "batchrenorm": _Entry(_batchrenorm, (V._BatchRenorm,), "BatchRenorm{dim}d (Ioffe 2017)"),
    "ghostbatchnorm": _Entry(_ghostbatchnorm, (V._GhostBatchNorm,), "GhostBatchNorm{dim}d (Hoffer et al. 2017)"),
    "frozenbatchnorm": _Entry(_frozenbatchnorm, (V.FrozenBatchNorm,), "FrozenBatchNorm{dim}d (fixed statistics)"),
    "instancenorm": _Entry(_instancenorm, (_InstanceNorm,),
                           "InstanceNorm{dim}d (Ulyanov et al. 2016), affine=True by default"),
    "groupnorm": _Entry(_groupnorm, (nn.GroupNorm,),
                        "GroupNorm (Wu & He 2018); num_groups defaults to gcd(32, C)"),
    "layernorm": _Entry(_layernorm, (nn.LayerNorm,),
                        "LayerNorm over (C, *spatial) per sample = GroupNorm(1, C)"),
    "rmsnorm": _Entry(_rmsnorm, (nn.RMSNorm,), "RMSNorm(C) (Zhang & Sennrich 2019), (N, C) input"),
    "switchablenorm": _Entry(_switchablenorm, (A._SwitchableNorm,),
                             "SwitchableNorm{dim}d (Luo et al. 2018): softmax mix of IN, LN, BN statistics"),
    "filterresponsenorm": _Entry(_filterresponsenorm, (A.FilterResponseNorm,),
                                 "FilterResponseNorm(2d) + TLU (Singh & Krishnan 2019); tlu=False: FRN only"),
    "evonorm_b0": _Entry(_evonorm_b0, (A.EvoNormB0,), "EvoNormB0(_2d) (Liu et al. 2020), batch variance"),
    "evonorm_s0": _Entry(_evonorm_s0, (A.EvoNormS0,),
                         "EvoNormS0(_2d) (Liu et al. 2020), group std; groups defaults to gcd(32, C)"),
    "identity": _Entry(_identity, (nn.Identity,), "no normalization"),
}

_ALIASES = {
    "bn": "batchnorm", "batchnorm": "batchnorm",
    "brn": "batchrenorm", "batchrenorm": "batchrenorm", "renorm": "batchrenorm",
    "gbn": "ghostbatchnorm", "ghostbatchnorm": "ghostbatchnorm", "ghostbn": "ghostbatchnorm",
    "frozenbn": "frozenbatchnorm", "frozenbatchnorm": "frozenbatchnorm", "fbn": "frozenbatchnorm",
    "in": "instancenorm", "instancenorm": "instancenorm",
    "gn": "groupnorm", "groupnorm": "groupnorm",
    "ln": "layernorm", "layernorm": "layernorm",
    "rms": "rmsnorm", "rmsnorm": "rmsnorm",
    "sn": "switchablenorm", "switchablenorm": "switchablenorm", "switchnorm": "switchablenorm",
    "frn": "filterresponsenorm", "filterresponsenorm": "filterresponsenorm",
    "evonormb0": "evonorm_b0", "evonorm_b0": "evonorm_b0",
    "evonorms0": "evonorm_s0", "evonorm_s0": "evonorm_s0",
    "none": "identity", "identity": "identity",
}


def available_norms() -> dict:
    """``{canonical name: description}`` of every method :func:`create_norm` builds."""
    return {k: e.doc for k, e in _REGISTRY.items()}


def _resolve(name):
    """``name -> (canonical, dim from a 1d/2d/3d suffix or None)``."""
    if not isinstance(name, str):
        raise TypeError(f"a norm name must be a string such as 'batchnorm' or 'groupnorm', got {name!r} "
                        f"of type {type(name).__name__}")
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    suffix_dim = None
    if len(key) > 2 and key[-2:] in ("1d", "2d", "3d") and key[:-2] in _ALIASES:
        suffix_dim, key = int(key[-2]), key[:-2]
    if key not in _ALIASES:
        raise ValueError(
            f"unknown norm {name!r}; valid names: {sorted(_REGISTRY)} "
            f"(aliases: {sorted(set(_ALIASES) - set(_REGISTRY))}; a 1d/2d/3d suffix sets dim, e.g. 'batchnorm2d')")
    return _ALIASES[key], suffix_dim


def create_norm(name, num_channels, **kw) -> nn.Module:
    r"""Build the normalization layer ``name`` for ``num_channels`` channels.

    The module takes what ``BatchNorm{dim}d(num_channels)`` takes (channels on axis 1) and
    returns the same shape; every method normalizes ``y = (x - mean) / sqrt(var + eps) * w + b``
    and differs only in the axes of the statistics and where they come from:

    ==================  ==========================================  =========================
    name (aliases)      module                                      statistics over
    ==================  ==========================================  =========================
    batchnorm (bn)      normlab.nn.BatchNorm{dim}d                  N, spatial (per channel)
    batchrenorm (brn)   BatchRenorm{dim}d                           as BN, r/d-corrected
    ghostbatchnorm      GhostBatchNorm{dim}d (virtual_batch_size)   N in virtual batches
    frozenbatchnorm     FrozenBatchNorm{dim}d                       fixed (buffers)
    instancenorm (in)   InstanceNorm{dim}d, affine=True by default  spatial (per sample, ch.);
                                                                    dim=1 takes (N, C, L) only
    groupnorm (gn)      GroupNorm(num_groups, C)                    C/G channels x spatial
    layernorm (ln)      GroupNorm(1, C)                             C x spatial (per sample)
    rmsnorm (rms)       RMSNorm(C), (N, C) input only               C, uncentered
    switchablenorm (sn) SwitchableNorm{dim}d                        softmax mix of IN, LN, BN
    filterresponsenorm  FilterResponseNorm2d (dim=2, else any rank) spatial, uncentered; + TLU
      (frn)
    evonorm_b0          EvoNormB0_2d (dim=2, else any rank)         batch var, instance var
    evonorm_s0          EvoNormS0_2d (dim=2, else any rank)         group var; x * sigmoid(vx)
    identity (none)     nn.Identity                                 —
    ==================  ==========================================  =========================

    Names are case-, ``_``- and ``-``-insensitive; a ``1d``/``2d``/``3d`` suffix sets ``dim``.

    Args:
        name: a method name above.
        num_channels: C (> 0).
        dim: 1, 2 or 3, the input's rank as in BatchNorm{dim}d; required by the methods whose
            module class depends on it (batchnorm, batchrenorm, ghostbatchnorm, instancenorm,
            switchablenorm) unless the name has the suffix; filterresponsenorm, evonorm_b0 and
            evonorm_s0 give their rank-checked 2d class for dim=2 and their any-rank class
            otherwise; ignored by the others.
        **kw: passed to the constructor; each method accepts the keywords of its class
            (``eps``, ``affine``, ``device``, ``dtype``; ``momentum`` and
            ``track_running_stats`` for the running-statistics methods; ``num_groups`` for
            groupnorm, default ``gcd(32, C)``: Wu & He's 32 groups, or the largest power of two
            dividing C when 32 does not; ``virtual_batch_size``; ``r_max``, ``d_max``,
            ``warmup_steps``, ``ramp_steps``). An unknown keyword raises TypeError listing them.

    LayerNorm on channels-first features is GroupNorm with one group (Wu & He 2018, Fig. 2):
    statistics over all of a sample's ``(C, *spatial)`` values, per-channel affine; on
    ``(N, C)`` input it equals ``nn.LayerNorm(C)``.

    Example:
        >>> create_norm("gn", 64, dim=2).num_groups
        32
        >>> create_norm("BatchNorm1d", 8).__class__.__name__
        'BatchNorm1d'
    """
    canonical, suffix_dim = _resolve(name)
    dim = kw.pop("dim", None)
    if suffix_dim is not None and dim is not None and dim != suffix_dim:
        raise ValueError(f"create_norm({name!r}, dim={dim!r}): the name says dim={suffix_dim}; drop one of them")
    dim = suffix_dim if dim is None else dim
    if dim is not None and (isinstance(dim, bool) or dim not in (0, 1, 2, 3)):
        raise ValueError(f"dim must be 1, 2 or 3 (the input's rank as in BatchNorm{{dim}}d), got dim={dim!r}")
    C = _checks.check_positive_int(num_channels, "num_channels")
    entry = _REGISTRY[canonical]
    bad = sorted(set(kw) - set(entry.keywords))
    if bad:
        raise TypeError(f"create_norm({name!r}) got unexpected keyword(s) {bad}; it accepts "
                        f"{['dim'] + entry.keywords}")
    return entry.factory(C, dim, **kw)


# ============================================================================ convert_norms


_BN_FAMILY = (_BatchNorm, V.FrozenBatchNorm)          # modules that hold BN's running statistics


def _kinds(of):
    if of is None:
        of = ("batchnorm",)
    if isinstance(of, (str, type)):
        of = (of,)
    classes = []
    for k in of:
        if isinstance(k, type):
            classes.append(k)
        elif isinstance(k, str) and k.lower() in ("all", "any"):
            for e in _REGISTRY.values():
                if e.factory is not _identity:
                    classes.extend(e.kinds)
        else:
            canonical, _ = _resolve(k)
            classes.extend(_REGISTRY[canonical].kinds)
    return tuple(classes)


def _channels_and_dim(m):
    """(num_channels, dim or None) of a norm module, or (None, None) when it has no channel count."""
    if hasattr(m, "num_features"):
        C = m.num_features
    elif isinstance(m, nn.GroupNorm):
        C = m.num_channels
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and len(m.normalized_shape) == 1:
        C = m.normalized_shape[0]
    else:
        return None, None
    dim = getattr(type(m), "_dim", None)
    for d, classes in ((1, (nn.BatchNorm1d, nn.InstanceNorm1d)), (2, (nn.BatchNorm2d, nn.InstanceNorm2d)),
                       (3, (nn.BatchNorm3d, nn.InstanceNorm3d))):
        if isinstance(m, classes):
            dim = d
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        dim = 1   # (N, C) features
    return C, dim


def _tensor_of(m):
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


def _carry_over(old, new):
    """Copy the per-channel affine and the BN running statistics where both sides have them."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            a, b = getattr(old, name, None), getattr(new, name, None)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                b.copy_(a)
        if isinstance(old, _BN_FAMILY) and isinstance(new, _BN_FAMILY):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                a, b = getattr(old, name, None), getattr(new, name, None)
                if a is not None and b is not None:
                    b.copy_(a)


def convert_norms(model, to, **kw):
    r"""Replace every BatchNorm (or every norm of the kinds ``of``) in ``model`` by method ``to``.

    ``to`` is a :func:`create_norm` name, or a callable ``old_module -> new_module``. Each new
    module is built for the old one's channel count and dimensionality (``dim`` is taken from
    the old class, e.g. BatchNorm2d -> 2; pass ``dim=`` when the old class does not say, e.g.
    SyncBatchNorm or GroupNorm), on its device and dtype, in its train/eval mode, then given
    what means the same thing in both: the per-channel ``weight``/``bias`` (the scale and
    shift applied after normalizing, whenever both have them with the same shape) and, between
    batch-norm-family modules (BN, BatchRenorm, GhostBN, FrozenBN), ``running_mean``,
    ``running_var`` and ``num_batches_tracked``. ``eps`` and ``momentum`` carry over when the new
    method takes them; keywords in ``kw`` override. Modules already of the target class, and
    kinds not in ``of``, are left alone. Shared module instances stay shared.

    The model is changed in place (and returned; a model that is itself a norm is replaced by
    the returned module). New modules have new parameters: build the optimizer after surgery.

    Args:
        model: any ``nn.Module``.
        to: target method name, or a callable.
        of: which modules to replace: a name (``"batchnorm"``, the default, matches torch.nn's and
            normlab's BatchNorm1d/2d/3d and SyncBatchNorm; ``"batchrenorm"``, ``"groupnorm"``...;
            ``"all"`` every norm), a class, or a tuple of them.
        **kw: for :func:`create_norm` (e.g. ``num_groups=8``).

    Returns:
        ``(model, replaced)`` with ``replaced`` a list of ``(qualified name, old type name,
        new type name)``; the root is named ``""``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net, replaced = convert_norms(net, "groupnorm", num_groups=4)
        >>> replaced
        [('1', 'BatchNorm2d', 'GroupNorm')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = _kinds(kw.pop("of", None))
    if callable(to) and not isinstance(to, str):
        if kw:
            raise TypeError(f"convert_norms: keywords {sorted(kw)} are for a named target; a callable "
                            f"`to` builds the module itself")

        def build(old, qualname):
            return to(old)
    else:
        canonical, suffix_dim = _resolve(to)
        entry = _REGISTRY[canonical]
        bad = sorted(set(kw) - set(entry.keywords) - {"dim"})
        if bad:
            raise TypeError(f"convert_norms(to={to!r}) got unexpected keyword(s) {bad}; it accepts "
                            f"['of', 'dim'] + {entry.keywords}")

        def build(old, qualname):
            C, dim = _channels_and_dim(old)
            if C is None:
                raise ValueError(f"convert_norms: cannot tell the channel count of {qualname or '<root>'} "
                                 f"({type(old).__name__}); only per-channel norms can be converted")
            args = dict(kw)
            if suffix_dim is None:
                args.setdefault("dim", dim)
            for name in ("eps", "momentum"):
                if name in entry.keywords and name not in args and hasattr(old, name):
                    val = getattr(old, name)
                    if name != "eps" or val is not None:
                        args[name] = val
            if canonical == "frozenbatchnorm" and isinstance(old, _BatchNorm) and old.running_mean is None:
                raise ValueError(
                    f"convert_norms: {qualname or '<root>'} ({type(old).__name__}) has no running "
                    f"statistics (track_running_stats=False), so a frozen copy would normalize with "
                    f"made-up statistics; recalibrate a copy built with track_running_stats=True instead")
            if args.get("dim") is None:
                args.pop("dim", None)
            ref = _tensor_of(old)
            if ref is not None:
                args.setdefault("device", ref.device)
                args.setdefault("dtype", ref.dtype)
            try:
                new = create_norm(to, C, **args)
            except ValueError as e:
                raise ValueError(f"convert_norms: cannot build {to!r} for {qualname or '<root>'} "
                                 f"({type(old).__name__}, {C} channels): {e}") from e
            return new

    replaced, memo = [], {}

    def convert(module, qualname):
        if isinstance(module, kinds):
            if id(module) not in memo:
                new = build(module, qualname)
                if not isinstance(new, nn.Module):
                    raise TypeError(f"convert_norms: the callable `to` returned {type(new).__name__} for "
                                    f"{qualname or '<root>'}; it must return an nn.Module")
                if type(new) is type(module) and new.extra_repr() == module.extra_repr():
                    memo[id(module)] = module          # already what was asked for: keep it
                    return module
                _carry_over(module, new)
                new.train(module.training)
                memo[id(module)] = new
                replaced.append((qualname, type(module).__name__, type(new).__name__))
            return memo[id(module)]
        for child_name, child in list(module.named_children()):
            sub = convert(child, f"{qualname}.{child_name}" if qualname else child_name)
            if sub is not child:
                setattr(module, child_name, sub)
        return module

    model = convert(model, "")
    return model, replaced


# ============================================================================ fold_batchnorm


_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d, nn.Linear)


def _bn_scale_shift(bn):
    """Per-channel ``scale = w / sqrt(rv + eps)``, ``shift = b - rm * scale`` in float64."""
    rm = bn.running_mean.detach().double()
    rv = bn.running_var.detach().double()
    scale = torch.rsqrt(rv + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().double()
    shift = -rm * scale
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _why_not_foldable(layer, bn):
    """None when ``bn`` can be folded into ``layer``; otherwise the reason."""
    if not isinstance(bn, _BN_FAMILY):
        return "not a batch norm"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if getattr(bn, "training", False) and isinstance(bn, _BatchNorm):
        return "in training mode (it normalizes with batch statistics); call model.eval() first"
    if layer is None:
        return "no Conv/ConvTranspose/Linear module whose only consumer it is precedes it"
    if not isinstance(layer, _FOLD_INTO):
        return f"preceded by {type(layer).__name__}, not a Conv/ConvTranspose/Linear"
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return f"the preceding {type(layer).__name__} is not initialized yet"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"the preceding {type(layer).__name__} has {out} output channels, the BN {bn.num_features}"
    return None


@torch.no_grad()
def _fold(layer, bn):
    scale, shift = _bn_scale_shift(bn)                               # (C,) float64 each
    W = layer.weight.detach().double()
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # weight (C_in, C_out / groups, *k); output channel g * (C_out/groups) + j
        g = layer.groups
        cin, cog = W.shape[0], W.shape[1]
        Wg = W.reshape(g, cin // g, cog, *W.shape[2:])
        Wg = Wg * scale.reshape(g, 1, cog, *([1] * (W.ndim - 2)))
        W_new = Wg.reshape(W.shape)
    else:
        # Conv: (C_out, C_in / groups, *k); Linear: (C_out, C_in)
        W_new = W * scale.reshape(-1, *([1] * (W.ndim - 1)))
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    b_new = b * scale + shift
    layer.weight.copy_(W_new.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b_new.to(dtype=layer.weight.dtype, device=layer.weight.device),
                                  requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(b_new.to(layer.bias.dtype))


_ALL_NORMS = _BN_FAMILY + _kinds("all")


class _LeafTracer(torch.fx.Tracer):
    """Keeps convs, linears and every norm opaque (normlab's modules are not in torch.nn)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _FOLD_INTO + _ALL_NORMS) or super().is_leaf_module(m, qualname)


def _pairs_from_fx(model):
    """``({bn qualname: layer qualname}, {bn qualname: reason})`` from a symbolic trace, or None."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: fall back to the module walk
        return None
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs, reasons = {}, {}
    for target, nodes in calls.items():
        mod = model.get_submodule(target)
        if not isinstance(mod, _BN_FAMILY):
            continue
        if len(nodes) != 1:
            reasons[target] = f"it is called {len(nodes)} times in forward"
            continue
        node = nodes[0]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or not isinstance(model.get_submodule(prev.target), _FOLD_INTO):
            continue
        if len(calls.get(prev.target, [])) != 1:
            reasons[target] = f"the preceding layer {prev.target!r} is called more than once in forward"
        elif len(prev.users) != 1:
            reasons[target] = (f"the output of the preceding layer {prev.target!r} also feeds other "
                               f"operations, which must not see the folded weights")
        else:
            pairs[target] = prev.target
    return pairs, reasons


def _pairs_from_sequential(model):
    """``{bn qualname: layer qualname}`` for (layer, bn) adjacent in an nn.Sequential."""
    pairs = {}
    for qual, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for (n1, a), (n2, b) in zip(items, items[1:]):
                if isinstance(b, _BN_FAMILY) and isinstance(a, _FOLD_INTO):
                    pre = f"{qual}." if qual else ""
                    pairs[pre + n2] = pre + n1
    return pairs


def fold_batchnorm(model):
    r"""Fold every inference-mode BatchNorm into the Conv/ConvTranspose/Linear that feeds it.

    With ``scale_c = weight_c / sqrt(running_var_c + eps)`` and
    ``shift_c = bias_c - running_mean_c * scale_c``, ``BN(conv(x)) = conv'(x)`` where::

        W'[c_out, ...] = W[c_out, ...] * scale_c        (output channel c of the layer)
        b'_c           = b_c * scale_c + shift_c         (b = 0 when the layer had no bias)

    for Conv1d/2d/3d (any ``groups``, any padding mode: weight axis 0 is the output channel),
    ConvTranspose1d/2d/3d (weight ``(C_in, C_out/groups, *k)``: output channel
    ``g * C_out/groups + j`` scales ``W[group g inputs, j]``), and Linear (``(C_out, C_in)``; the
    BN must see the Linear's output as ``(N, C_out)``). The arithmetic is done in float64 and
    cast back, so the folded model matches the original to the dtype's rounding. Each folded BN
    is replaced by ``nn.Identity`` (so forward code that calls it keeps working) and the model
    loses its parameters and buffers; the layer gains a bias if it had none.

    Finding the pairs: the model is symbolically traced with ``torch.fx`` (convs, linears and
    norms kept opaque), and a BN is folded when its single input is the output of a layer
    module that is called exactly once and whose output feeds nothing else; this sees
    functional ``forward`` code, not only ``nn.Sequential``. When the model cannot be traced
    (data-dependent control flow), the fallback walks ``nn.Sequential`` children, folding a BN
    that directly follows a layer; a module walk cannot see what a functional ``forward``
    does, so a pair written that way is then reported, not folded. (In the fallback a layer
    reused elsewhere in the model would be folded for every use; fx rules that out.)

    Only batch-norm-family modules in eval mode with running statistics fold (FrozenBatchNorm
    always); a BN in training mode normalizes with batch statistics, which no fixed weight can
    reproduce. The model is changed in place and returned.

    Returns:
        ``(model, not_folded)``: ``not_folded`` lists ``(qualified name, reason)`` for every
        batch-norm-family module left in the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, _BN_FAMILY):
        return model, [("", "the model is a lone batch norm: there is no layer to fold it into")]
    found = _pairs_from_fx(model)
    traced = found is not None
    pairs, reasons = found if traced else (_pairs_from_sequential(model), {})
    not_folded = []
    for qual, mod in list(model.named_modules()):
        if not isinstance(mod, _BN_FAMILY):
            continue
        layer_name = pairs.get(qual)
        layer = model.get_submodule(layer_name) if layer_name is not None else None
        reason = _why_not_foldable(layer, mod)
        if reason is None:
            _fold(layer, mod)
            parent_name, _, child = qual.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        else:
            if layer is None and qual in reasons:
                reason = reasons[qual]
            elif layer is None and not traced:
                reason += " (the model could not be traced with torch.fx; only nn.Sequential pairs were searched)"
            not_folded.append((qual, reason))
    return model, not_folded


# ============================================================================ recalibrate / AdaBN


def _batches(data, num_batches, what):
    if num_batches is not None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f"{what}: num_batches must be a positive int or None (all batches), "
                             f"got num_batches={num_batches!r}")
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{what}: data must be an iterable of input tensors or of (input, ...) "
                        f"tuples/lists, e.g. a DataLoader, got {type(data).__name__}") from None
    for i, item in enumerate(it):
        if num_batches is not None and i >= num_batches:
            return
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"{what}: batch {i} is an empty {type(item).__name__}; each batch "
                                 f"must be an input tensor or an (input, ...) tuple/list")
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{what}: batch {i} is a {type(item).__name__}, not a tensor; data must "
                            f"yield input tensors or (input, ...) tuples/lists whose first element is the input")
        yield item


class _Moments:
    """Exact float64 (count, mean, M2) per channel over every value seen (Chan et al. 1979)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x):
        C = x.shape[1]
        xf = x.detach().double().transpose(0, 1).reshape(C, -1)          # (C, M)
        nb = xf.shape[1]
        if nb == 0:
            return
        mb = xf.mean(dim=1)
        m2b = ((xf - mb[:, None]) ** 2).sum(dim=1)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        f = nb / n
        # where delta is not finite (an infinite mean), the weighted sum keeps inf where the
        # difference form gives inf - inf = NaN (as the kernels' Chan merge)
        self.mean = torch.where(torch.isfinite(delta), self.mean + delta * f,
                                self.mean * (1.0 - f) + mb * f)
        self.m2 = self.m2 + m2b + delta ** 2 * (self.n * nb / n)
        self.n = n


def _batch_stat_forward(bn):
    """A forward that normalizes with the batch's statistics and touches no buffer."""
    from . import functional as F

    def forward(input):
        if isinstance(bn, _BatchNorm):
            bn._check_input_dim(input)
        return F.batch_norm(input, None, None, getattr(bn, "weight", None), getattr(bn, "bias", None),
                            True, 0.0, bn.eps)
    return forward


def _population_statistics(model, data, num_batches, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")
    bns = [(q, m) for q, m in model.named_modules()
           if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None]
    if not bns:
        return model
    ref = next(iter(model.parameters()), None)
    modes = {m: m.training for m in model.modules()}
    stats = {m: _Moments() for _, m in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, args: stats[mod].add(args[0])) for _, m in bns]
    seen = 0
    try:
        model.eval()
        for _, m in bns:
            m.forward = _batch_stat_forward(m)
        with torch.no_grad():
            for x in _batches(data, num_batches, what):
                if ref is not None and x.is_floating_point():
                    x = x.to(device=ref.device)
                model(x)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for _, m in bns:
            m.__dict__.pop("forward", None)
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise ValueError(f"{what}: data yielded no batches; pass a non-empty iterable of inputs")
    for q, m in bns:                      # every check before any buffer is written
        s = stats[m]
        if s.n < 2:
            raise ValueError(f"{what}: {q} saw {s.n} value(s) per channel; the unbiased variance "
                             f"needs at least 2: pass more data")
        bad = ~(torch.isfinite(s.mean) & torch.isfinite(s.m2))
        if bad.any():
            c = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"{what}: {q} saw non-finite values (channel {c}: mean {float(s.mean[c])}, variance "
                f"{float(s.m2[c] / (s.n - 1))}; {int(bad.sum())} channel(s) in all); its running "
                f"statistics are left unchanged: find the inf/NaN in the data or the layers before "
                f"it")
    with torch.no_grad():
        for q, m in bns:
            s = stats[m]
            m.running_mean.copy_(s.mean.to(m.running_mean.dtype))
            m.running_var.copy_((s.m2 / (s.n - 1)).to(m.running_var.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(seen)
    return model


def recalibrate_batchnorm(model, data, num_batches=None):
    r"""Precise BN: set every BatchNorm's running statistics to the exact population statistics.

    The EMA of training (``running <- (1 - m) running + m * batch``) weights recent batches,
    which came from weights that kept changing, and is noisy; Wu & Johnson ("Rethinking 'Batch'
    in BatchNorm", 2021, Sec. 3) recompute the statistics with the final weights over many
    batches. Here, for each BN with running statistics, over every value of channel c reaching
    it in the given batches (M values in all), accumulated exactly in float64 with Chan's
    merge (the cumulative, momentum=None average, count-weighted so unequal batches are exact)::

        running_mean_c = (1/M) sum x
        running_var_c  = 1/(M - 1) sum (x - running_mean_c)^2   (unbiased, as torch stores it)

    ``num_batches_tracked`` becomes the number of batches. During the pass the model is in eval
    mode (dropout off, as at inference) except that every BN normalizes with its own batch's
    statistics, as a plain BN in training (BatchRenorm and GhostBatchNorm too: their
    inference is plain BN), and leaves its buffers alone; the population statistics are
    written at the end. Each module's train/eval mode and each BN's ``momentum`` are restored,
    parameters are untouched, nothing is differentiated. BNs without running statistics are
    skipped; FrozenBatchNorm has no statistics to re-estimate.

    Args:
        model: any ``nn.Module``.
        data: an iterable of input tensors, or of tuples/lists whose first element is the input
            (a DataLoader of ``(x, y)``). Inputs are moved to the model's device.
        num_batches: use at most this many batches (None: all).

    Returns:
        model (changed in place).
    """
    return _population_statistics(model, data, num_batches, "recalibrate_batchnorm")


def adapt_batchnorm(model, target_data, num_batches=None):
    r"""AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization For Practical Domain
    Adaptation", 2016): replace every BatchNorm's statistics by the target domain's.

    The weights learnt on the source domain are kept; only the statistics change. For each BN
    and channel c, over the target-domain values reaching it::

        running_mean_c = mean_target(x),  running_var_c = var_target(x)  (unbiased)

    so that each layer's inputs are standardized with the target domain's statistics; a shift
    of the input distribution that is a per-channel affine map at some BN's input (e.g. a
    change of brightness and contrast) is undone exactly. The old statistics are discarded (not
    mixed in), and the estimate is exact over the given batches, as in
    :func:`recalibrate_batchnorm`, whose conventions (data, modes, ``num_batches``) apply.
    """
    return _population_statistics(model, target_data, num_batches, "adapt_batchnorm")


# ============================================================================ freeze


def freeze_batchnorm(model):
    r"""Freeze every BatchNorm: running statistics always, affine fixed, whatever ``train()`` says.

    How: each BN-family module with running statistics (BatchNorm1d/2d/3d, SyncBatchNorm,
    BatchRenorm, GhostBatchNorm) is replaced by :class:`normlab.nn.FrozenBatchNorm{dim}d` with
    the same ``eps`` and a copy of its ``weight``, ``bias``, ``running_mean``, ``running_var``,
    all as buffers. A frozen layer has no training behaviour, so a later ``model.train()``
    changes nothing, and since it has no parameters an optimizer cannot update it. Its output
    is BN's eval output::

        y = (x - running_mean_c) / sqrt(running_var_c + eps) * weight_c + bias_c

    The state_dict keeps its keys except ``num_batches_tracked`` (a BN checkpoint still loads:
    that key is ignored). Undo with ``convert_norms(model, "batchnorm", of="frozenbatchnorm")``.
    A BN with ``track_running_stats=False`` raises ValueError (it has no statistics to freeze).
    Build optimizers after freezing, or they keep references to the replaced parameters.

    Returns:
        model (changed in place; a lone BN is returned as its frozen replacement).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_batchnorm: model must be a torch.nn.Module, got {type(model).__name__}")
    for q, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ValueError(
                f"freeze_batchnorm: {q or '<root>'} ({type(m).__name__}) has no running statistics "
                f"(track_running_stats=False); freezing would invent them. Rebuild it with "
                f"track_running_stats=True and train or recalibrate it first")
    model, _ = convert_norms(model, "frozenbatchnorm", of=(_BatchNorm,))
    return model

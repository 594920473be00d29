r"""Drop-in modules: torch.nn's normalization layers running on normlab.nn.functional.

Each class subclasses its torch.nn twin, so constructor signature, attributes, ``extra_repr``,
``reset_parameters``/``reset_running_stats``, state_dict keys and versioned checkpoint loading
(old checkpoints without ``num_batches_tracked``) are torch.nn's own, and ``isinstance(m,
torch.nn.BatchNorm2d)`` stays true for code that inspects models. Only ``forward`` differs: it
runs normlab's functional API (fused kernels where a backend applies).

Running statistics (BatchNorm, and InstanceNorm with ``track_running_stats=True``), with
``f = momentum``, or ``f = 1 / num_batches_tracked`` when ``momentum is None``::

    running_mean <- (1 - f) * running_mean + f * mean_B
    running_var  <- (1 - f) * running_var  + f * var_B * M / (M - 1)
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import _checks
from . import functional as F


def _checked_init(torch_cls, what_dims=None):
    """An ``__init__`` that validates torch_cls's constructor arguments, then runs it.

    torch.nn accepts eps <= 0, momentum outside [0, 1] and fails late (or not at all); these
    twins refuse them at construction with a message that names the value and the fix. The
    class keeps torch_cls's signature (``__signature__``) for ``inspect`` and IDEs.
    """
    sig = inspect.signature(torch_cls)

    def __init__(self, *args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}{sig}: {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        if "num_features" in a:
            _checks.check_positive_int(a["num_features"], "num_features")
        if "num_channels" in a:
            _checks.check_positive_int(a["num_channels"], "num_channels")
            _checks.check_groups(a["num_groups"], a["num_channels"])
        if "normalized_shape" in a:
            _checks.normalized_shape_tuple(a["normalized_shape"])
        if "eps" in a:
            _checks.check_eps(a["eps"], allow_none=torch_cls is nn.RMSNorm)
        if "momentum" in a:
            _checks.check_momentum(a["momentum"])
        torch_cls.__init__(self, *args, **kwargs)

    return __init__, sig


def _twin(torch_cls):
    """Class decorator: constructor checks and torch_cls's signature."""
    def decorate(cls):
        cls.__init__, cls.__signature__ = _checked_init(torch_cls)
        return cls
    return decorate


_DIMS = {"BatchNorm1d": ((2, 3), "(N, C) or (N, C, L)"), "BatchNorm2d": ((4,), "(N, C, H, W)"),
         "BatchNorm3d": ((5,), "(N, C, D, H, W)"), "InstanceNorm1d": ((2, 3), "(C, L) or (N, C, L)"),
         "InstanceNorm2d": ((3, 4), "(C, H, W) or (N, C, H, W)"),
         "InstanceNorm3d": ((4, 5), "(C, D, H, W) or (N, C, D, H, W)")}


_DIMS_OF: dict = {}      # class -> (its name, its torch.nn base's name, allowed ranks, layout)


def _check_dims(module, input):
    """Rank and channel count, with the layout expected and the fix (torch.nn's message is
    'expected 4D input (got 2D input)')."""
    cls = type(module)
    try:
        name, base, allowed, layout = _DIMS_OF[cls]
    except KeyError:
        base = next(c.__name__ for c in cls.__mro__ if c.__name__ in _DIMS)
        name, base, allowed, layout = _DIMS_OF[cls] = (cls.__name__, base) + _DIMS[base]
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}; convert it "
                        f"with torch.as_tensor(x)")
    _checks.check_ndim_in(input, allowed, name, layout)
    unbatched = base.startswith("Instance") and input.dim() == allowed[0]
    axis = 0 if unbatched else 1
    # torch.nn.InstanceNorm without affine or running statistics accepts any channel count
    strict = not base.startswith("Instance") or module.affine or module.track_running_stats
    if strict and input.shape[axis] != module.num_features:
        raise ValueError(
            f"{name} was built for num_features={module.num_features} but the input of shape "
            f"{tuple(input.shape)} has {input.shape[axis]} channels on axis {axis}; pass an input "
            f"with {module.num_features} channels, or build {name}({input.shape[axis]})")


def _batch_moments(x: torch.Tensor, dims):
    """``(var, mean)`` over ``dims`` (biased), for statistics computed outside the fused kernels
    (Batch Renorm's r and d, Ghost BN's and SyncBatchNorm's batch statistics).

    On CPU they accumulate in float64, like the fused kernels: float32 data whose mean is 1e4
    times its spread keeps full float32 accuracy (a float32 mean would be off by half an ulp of
    the offset, i.e. 3e-4 of the spread at 1e4: a relative error of that size in Batch Renorm's
    d). On other devices: in at least float32 (float64 is slow on most GPUs).
    """
    acc = torch.float64 if x.device.type == "cpu" else torch.promote_types(x.dtype, torch.float32)
    return torch.var_mean(x.detach().to(acc), dim=dims, correction=0)


class _Checkpoint:
    """Checkpoint loading shared by every normlab.nn normalization module (a mixin, first base).

    State and versions are torch.nn's: the same state_dict keys, and torch's ``_version``
    mechanism -- ``state_dict()._metadata[prefix]["version"]`` is the class's ``_version`` (2 for
    the batch-norm family and InstanceNorm, whose version 1 had no ``num_batches_tracked``; 1
    for LayerNorm, GroupNorm, RMSNorm, FrozenBatchNorm). The torch.nn base classes upgrade older
    versions on load (a version-1 or unversioned checkpoint without ``num_batches_tracked``
    keeps the module's own count, 0 for a fresh module), so a checkpoint moves both ways
    between a normlab module and its torch.nn twin.

    What this adds to torch's ``_load_from_state_dict``:

    * all or nothing: torch copies the matching tensors of a module one by one and reports the
      bad ones at the end, so a failed load leaves a half-loaded module. Here the checkpoint's
      entries for this module are validated (tensor, shape) before anything is copied, and if
      the load of this module fails anyway (a copy error, missing or unexpected keys under
      ``strict=True``, torch's own version checks) every parameter and buffer is restored to
      the object and values it had before. Inside ``_load_from_state_dict`` torch always
      passes ``strict=True`` and decides about missing/unexpected keys only at the end of
      ``load_state_dict``, so a per-module hook cannot tell a strict load from a lenient one:
      errors (size, type, copy, version) restore the module there, and missing/unexpected keys
      under ``strict=True`` are undone by ``load_state_dict`` when it is called on the normlab
      module itself. (In a larger model, torch.nn's rule holds for the model: the modules whose
      entries were fine are loaded before the error is raised.)
    * a size mismatch names the key, both shapes and the constructor argument that fixes it.

    The error is still raised by ``load_state_dict`` as torch's ``RuntimeError("Error(s) in
    loading state_dict ...")``, listing our messages.
    """

    def _local_state(self):
        params = {k: v for k, v in self._parameters.items() if v is not None}
        buffers = {k: v for k, v in self._buffers.items()
                   if v is not None and k not in self._non_persistent_buffers_set}
        return params, buffers

    def _size_fix(self, name, shape) -> str:
        """How to build a module that takes a checkpoint entry ``name`` of ``shape``."""
        cls = type(self).__name__
        if len(shape) == 0:
            return f"a {cls} stores {name} as a scalar; check that the checkpoint entry belongs to a {cls}"
        if hasattr(self, "num_features") and len(shape) == 1:
            return f"build it as {cls}(num_features={shape[0]}, ...) to load this checkpoint"
        if hasattr(self, "num_channels") and len(shape) == 1:
            return (f"build it as {cls}(num_groups, num_channels={shape[0]}, ...) (num_groups must "
                    f"divide {shape[0]}) to load this checkpoint")
        if hasattr(self, "normalized_shape"):
            return f"build it as {cls}(normalized_shape={tuple(shape)}, ...) to load this checkpoint"
        return f"build the {cls} with the checkpoint's sizes to load it"

    def _checkpoint_errors(self, state_dict, prefix) -> list:
        params, buffers = self._local_state()
        cls = type(self).__name__
        errors = []
        for name, local in {**params, **buffers}.items():
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if not torch.overrides.is_tensor_like(value):
                errors.append(f"{cls}: the checkpoint entry {key!r} is a {type(value).__name__}, "
                              f"expected a tensor of shape {tuple(local.shape)}; nothing was "
                              f"loaded into this {cls}")
                continue
            if torch.nn.parameter.is_lazy(local):
                continue
            got = tuple(value.shape)
            if len(local.shape) == 0 and got == (1,):     # torch accepts 0.3-era 1-element tensors
                continue
            if got != tuple(local.shape):
                errors.append(
                    f"size mismatch for {key}: the checkpoint has shape {got} but this {cls} "
                    f"({self.extra_repr()}) has shape {tuple(local.shape)}; {self._size_fix(name, got)}. "
                    f"Nothing was loaded into this {cls}")
        return errors

    def _snapshot(self):
        """(restore function) for every parameter and buffer of this module and its children."""
        saved = []
        for module in self.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None:
                        saved.append((table, name, t, t.detach().clone()))

        def restore():
            with torch.no_grad():
                for table, name, tensor, value in saved:
                    table[name] = tensor        # the original object (assign=True replaces it)
                    tensor.copy_(value)
        return restore

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        errors = self._checkpoint_errors(state_dict, prefix)
        if errors:              # refuse before any copy
            error_msgs.extend(errors)
            return
        restore = self._snapshot()
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > n_errors:
            restore()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch.nn.Module.load_state_dict, all or nothing: if it raises (size mismatch, missing
        or unexpected keys under ``strict=True``, ...), the module is left as it was."""
        restore = self._snapshot()
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            restore()
            raise


__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"]


class _BatchNormForward(_Checkpoint):
    """forward() shared by BatchNorm1d/2d/3d: torch.nn's _BatchNorm policy, normlab's math.

    ``nonfinite_policy`` (class attribute None: the context's or process default; set it on an
    instance to "skip", "propagate" or "raise") decides what a training batch with non-finite
    statistics does to the running statistics (docs/reliability.md). With "skip" (the default)
    ``num_batches_tracked`` is incremented only for batches that were folded in.
    """

    nonfinite_policy = None

    def _check_input_dim(self, input):
        _check_dims(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            # momentum None: cumulative average over the batches folded in so far
            return F._batch_norm(input, self.running_mean, self.running_var, self.weight,
                                 self.bias, True, self.momentum, self.eps, owner=self,
                                 num_batches_tracked=self.num_batches_tracked)
        factor = 0.0 if self.momentum is None else self.momentum
        return F._batch_norm(input, self.running_mean if track else None,
                             self.running_var if track else None, self.weight, self.bias,
                             use_batch_stats, factor, self.eps, owner=self)


@_twin(nn.BatchNorm1d)
class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    __doc__ = nn.BatchNorm1d.__doc__


@_twin(nn.BatchNorm2d)
class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    __doc__ = nn.BatchNorm2d.__doc__


@_twin(nn.BatchNorm3d)
class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    __doc__ = nn.BatchNorm3d.__doc__


class _InstanceNormForward(_Checkpoint):
    """forward() shared by InstanceNorm1d/2d/3d; ``nonfinite_policy`` as for BatchNorm."""

    nonfinite_policy = None

    def _check_input_dim(self, input):
        _check_dims(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        y = F._instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             use_input_stats, self.momentum if self.momentum is not None else 0.0,
                             self.eps, owner=self)
        return y.squeeze(0) if unbatched else y


@_twin(nn.InstanceNorm1d)
class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    __doc__ = nn.InstanceNorm1d.__doc__


@_twin(nn.InstanceNorm2d)
class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    __doc__ = nn.InstanceNorm2d.__doc__


@_twin(nn.InstanceNorm3d)
class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    __doc__ = nn.InstanceNorm3d.__doc__


@_twin(nn.LayerNorm)
class LayerNorm(_Checkpoint, nn.LayerNorm):
    __doc__ = nn.LayerNorm.__doc__

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@_twin(nn.GroupNorm)
class GroupNorm(_Checkpoint, nn.GroupNorm):
    __doc__ = nn.GroupNorm.__doc__

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


@_twin(nn.RMSNorm)
class RMSNorm(_Checkpoint, nn.RMSNorm):
    __doc__ = nn.RMSNorm.__doc__

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)

r"""SyncBatchNorm: batch normalization with the statistics of the global batch over all ranks.

Each rank holds ``n_r`` values per channel (``n_r`` may differ between ranks, and may be 0).
Forward, per channel::

    local:    n_r, mean_r, M2_r = sum over the rank's values of (x - mean_r)^2
    exchange: one all_gather of (n_r, mean_r, M2_r) for every channel
    merge:    N = sum_r n_r
              mean = sum_r n_r * mean_r / N
              M2   = sum_r M2_r + sum_r n_r * (mean_r - mean)^2        (Chan et al. 1979)
              var  = M2 / N                                            (biased, normalizes)
    y = (x - mean) / sqrt(var + eps) * weight + bias

The merge is exact (no E[x^2] - E[x]^2 cancellation) and a rank with ``n_r = 0`` contributes
nothing. Every rank computes the same ``mean``/``var`` from the same gathered values, so the
running statistics (``var * N / (N - 1)``, torch.nn's rule) are identical on every rank.

Backward, with ``xhat = (x - mean) * rstd`` and one all_reduce of two sums per channel::

    S1 = sum over all ranks of dy,   S2 = sum over all ranks of dy * xhat
    dx = weight * rstd * (dy - S1 / N - xhat * S2 / N)
    dweight = local sum of dy * xhat,  dbias = local sum of dy

(dweight/dbias stay local: DistributedDataParallel averages parameter gradients itself, as
with torch.nn.SyncBatchNorm.)

Outside an initialized process group, with a world (or ``process_group``) of size 1, or in
eval mode, it is exactly :class:`normlab.nn.BatchNorm2d` & co. A collective that cannot
complete (a peer died, or skipped this layer) raises ``RuntimeError`` naming the layer after
the process group's timeout instead of hanging silently beyond it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from .modules import _batch_moments, _Checkpoint

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _group_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _collective_error(what: str, err: Exception, process_group) -> RuntimeError:
    size = _group_size(process_group)
    return RuntimeError(
        f"SyncBatchNorm: the {what} over {size} ranks did not complete ({type(err).__name__}: "
        f"{err}). Every rank must run the same SyncBatchNorm layers in the same order each step; "
        f"a peer may have died or skipped this layer (e.g. a data-dependent branch). The wait is "
        f"bounded by the process group's timeout (init_process_group(timeout=...))")


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, process_group, stats_out):
        C = x.shape[1]
        dims = [0] + list(range(2, x.ndim))
        n_local = x.numel() // C if C else 0
        if n_local:
            var_l, mean_l = _batch_moments(x, dims)     # float64 on CPU
            local = torch.cat([torch.full((1,), float(n_local), dtype=torch.float64),
                               mean_l.double(), var_l.double() * n_local])
        else:   # an empty rank: the neutral element of the merge, it still takes part
            local = torch.zeros(2 * C + 1, dtype=torch.float64)
        local = local.to(x.device)
        size = _group_size(process_group)
        gathered = [torch.empty_like(local) for _ in range(size)]
        try:
            dist.all_gather(gathered, local, group=process_group)
        except Exception as e:  # gloo/NCCL raise RuntimeError (or DistBackendError) on timeout
            raise _collective_error("all_gather of the batch statistics", e, process_group) from e
        g = torch.stack(gathered)                                 # (R, 2C + 1)
        n_r, mean_r, m2_r = g[:, :1], g[:, 1:C + 1], g[:, C + 1:]
        N = float(n_r.sum())
        if N <= 1:
            raise ValueError(
                f"SyncBatchNorm in training needs more than 1 value per channel over all ranks "
                f"together, got {int(N)} (local input shape {tuple(x.shape)}); use larger batches "
                f"or evaluation mode")
        mean = (n_r * mean_r).sum(0) / N                          # (C,) float64
        m2 = m2_r.sum(0) + (n_r * (mean_r - mean) ** 2).sum(0)
        var = m2 / N
        rstd = torch.rsqrt(var + eps)
        shape = (1, C) + (1,) * (x.ndim - 2)
        mean_c = mean.to(x.dtype)                                 # (C,) rounded to x's dtype
        # x - mean = (x - mean_c) - (mean - mean_c): the second part, under half an ulp of the
        # mean, is a per-channel constant folded into the shift of xhat (and so into the bias),
        # so float32 data whose mean is far larger than its spread keeps float32 accuracy
        shift = (mean - mean_c.double()) * rstd                   # (C,) float64
        mean_x, rstd_x = mean_c.view(shape), rstd.to(x.dtype).view(shape)
        shift_x = shift.to(x.dtype).view(shape)
        if x.numel():   # the given-statistics path of batch norm: the fused eval kernel on CPU
            pdtype = next((p.dtype for p in (bias, weight) if p is not None), x.dtype)
            b_eff = -shift if weight is None else -shift * weight.detach().double()
            if bias is not None:
                b_eff = b_eff + bias.detach().double()
            y = F._normalize_given(x, mean_c, var.to(x.dtype), weight, b_eff.to(pdtype), eps)
        else:
            y = x.clone()
        stats_out.extend([mean, var, N])
        ctx.save_for_backward(x, weight, mean_x, rstd_x, shift_x)
        ctx.process_group, ctx.N, ctx.has_bias = process_group, N, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean_x, rstd_x, shift_x = ctx.saved_tensors
        C = x.shape[1]
        dims = [0] + list(range(2, x.ndim))
        shape = (1, C) + (1,) * (x.ndim - 2)
        xhat = (x - mean_x) * rstd_x - shift_x
        if x.numel():
            sum_dy = dy.sum(dims)
            sum_dy_xhat = (dy * xhat).sum(dims)
        else:
            sum_dy = sum_dy_xhat = torch.zeros(C, dtype=x.dtype, device=x.device)
        sums = torch.cat([sum_dy, sum_dy_xhat]).double()
        try:
            dist.all_reduce(sums, group=ctx.process_group)
        except Exception as e:
            raise _collective_error("all_reduce of the gradient sums", e, ctx.process_group) from e
        g1 = (sums[:C] / ctx.N).to(x.dtype).view(shape)
        g2 = (sums[C:] / ctx.N).to(x.dtype).view(shape)
        scale = rstd_x if weight is None else rstd_x * weight.view(shape)
        dx = scale * (dy - g1 - xhat * g2)
        dweight = sum_dy_xhat if (weight is not None and ctx.needs_input_grad[1]) else None
        dbias = sum_dy if (ctx.has_bias and ctx.needs_input_grad[2]) else None
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(_Checkpoint, nn.modules.batchnorm._BatchNorm):
    r"""Batch norm whose training statistics are those of the batch over all ranks.

    Same constructor, attributes and state_dict keys as ``torch.nn.SyncBatchNorm`` (and so as
    BatchNorm1d/2d/3d): a checkpoint moves both ways. It is deliberately not a subclass of
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses those on CPU modules, while
    this one works with gloo on CPU as well as with NCCL on GPU. Accepts ``(N, C, *spatial)`` inputs with
    any number of spatial dims (also 0: ``(N, C)``), in any memory format; runs on CPU (gloo)
    and GPU (NCCL). Ranks may hold different batch sizes, including 0: the statistics are the
    exact ones of the concatenated global batch (see the module docstring for the math).

    Example (one process, no group initialized: plain batch norm)::

        >>> import torch
        >>> from normlab.nn import SyncBatchNorm
        >>> m = SyncBatchNorm(4)
        >>> m(torch.randn(8, 4, 5)).shape
        torch.Size([8, 4, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True):
        extra = {} if bias else {"bias": False}     # the bias switch exists since torch 2.6
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **extra)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expects an input of at least 2 dimensions (N, C, *spatial), got "
                f"an input of shape {tuple(input.shape)}; add the batch axis")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm was built for {self.num_features} channels but the input of shape "
                f"{tuple(input.shape)} has {input.shape[1]} on its second axis")

    nonfinite_policy = None     # see docs/reliability.md and normlab.nn.BatchNorm2d

    def forward(self, input):
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        pg = self.process_group if self.process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (use_batch_stats and self.training and _group_size(pg) > 1):
            if counting:
                return F._batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     True, self.momentum, self.eps, owner=self,
                                     num_batches_tracked=self.num_batches_tracked)
            return F._batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                 use_batch_stats, 0.0 if self.momentum is None else self.momentum,
                                 self.eps, owner=self)
        stats = []
        y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps, pg, stats)
        mean, var, N = stats
        if running_mean is not None:
            # mean/var are the merged statistics of the global batch, identical on every rank,
            # so every rank takes the same decision under the non-finite policy (no extra
            # collective): all fold the batch in, or all skip it, or all raise.
            momentum = self.momentum if counting else (0.0 if self.momentum is None else self.momentum)
            F._update_running(running_mean, running_var, mean, var, N, momentum, owner=self,
                              num_batches_tracked=self.num_batches_tracked if counting else None)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch.nn's or normlab's) in ``module`` by SyncBatchNorm.

    Parameters, buffers, ``requires_grad`` and train/eval mode carry over; returns the new
    module (``module`` itself is converted in place where it is a container), like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        factory = {}
        if module.affine:
            factory = dict(device=module.weight.device, dtype=module.weight.dtype)
        elif module.running_mean is not None:
            factory = dict(device=module.running_mean.device, dtype=module.running_mean.dtype)
        has_bias = getattr(module, "bias", None) is not None or not module.affine
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=has_bias, **factory)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(module, name, None), getattr(out, name, None)
                if src is not None and dst is not None:
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out

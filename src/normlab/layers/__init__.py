"""normlab.layers: normalization layers in plain NumPy, with hand-written backward passes.

Every layer has ``forward(x, training=True) -> y`` and ``backward(dy) -> dx`` (parameter
gradients land in ``dweight``, ``dbias``), torch.nn's constructor arguments, parameter and
buffer names and ``state_dict`` keys, so checkpoints move both ways between these layers and
torch.nn.

Dtype policy: parameters and running statistics are stored in the constructor's ``dtype``
(float32 by default); the math runs on ``normlab.kernels`` (the fused numba kernels for
float32/float64 input, with float64 accumulation; the float64 NumPy backend for other floats
or when a layer is built with ``backend="numpy"``; Batch Renorm on the float64 reference);
``y`` and ``dx`` come back in the input's dtype, ``dweight`` and ``dbias`` in the parameter
dtype. Non-floating input is refused rather than promoted.

>>> import numpy as np
>>> from normlab.layers import LayerNorm
>>> ln = LayerNorm(4)
>>> y = ln.forward(np.arange(8, dtype=np.float32).reshape(2, 4))
>>> dx = ln.backward(np.ones_like(y))
>>> y.dtype, dx.dtype, ln.dweight.dtype
(dtype('float32'), dtype('float32'), dtype('float32'))
"""

from ._base import LoadResult, NormLayer
from .batch_norm import BatchNorm, BatchRenorm
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm
from .layer_norm import LayerNorm, RMSNorm

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm",
           "NormLayer", "LoadResult"]

"""normlab.reference: the float64 NumPy specification of every method.

Pure functions, no classes, no torch. ``<method>_forward(x, ...) -> (y, cache)`` and
``<method>_backward(dy, cache) -> (dx, dweight, dbias)`` (None for an absent parameter).
Outputs are float64 whatever the input dtype: this is the yardstick the fast paths are
measured against.
"""

from .adaptive import (adain_backward, adain_forward, conditional_batch_norm_backward,
                       conditional_batch_norm_forward, evonorm_b0_backward, evonorm_b0_forward,
                       evonorm_s0_backward, evonorm_s0_forward, film_backward, film_forward,
                       filter_response_norm_backward, filter_response_norm_forward,
                       switchable_norm_backward, switchable_norm_forward,
                       weight_standardization_backward, weight_standardization_forward)
from .batch_norm import batch_norm_backward, batch_norm_forward
from .batch_renorm import batch_renorm_backward, batch_renorm_forward
from .ghost_batch_norm import (ghost_batch_norm_backward, ghost_batch_norm_forward,
                               virtual_batch_slices)
from .group_norm import group_norm_backward, group_norm_forward
from .instance_norm import instance_norm_backward, instance_norm_forward
from .layer_norm import layer_norm_backward, layer_norm_forward
from .moments import chan_merge, finalize, moments, running_stats_update, summarize
from .rms_norm import rms_norm_backward, rms_norm_forward

__all__ = [
    "batch_norm_forward", "batch_norm_backward",
    "batch_renorm_forward", "batch_renorm_backward",
    "ghost_batch_norm_forward", "ghost_batch_norm_backward", "virtual_batch_slices",
    "group_norm_forward", "group_norm_backward",
    "instance_norm_forward", "instance_norm_backward",
    "layer_norm_forward", "layer_norm_backward",
    "rms_norm_forward", "rms_norm_backward",
    "switchable_norm_forward", "switchable_norm_backward", "adain_forward", "adain_backward",
    "conditional_batch_norm_forward", "conditional_batch_norm_backward",
    "film_forward", "film_backward",
    "filter_response_norm_forward", "filter_response_norm_backward",
    "evonorm_b0_forward", "evonorm_b0_backward", "evonorm_s0_forward", "evonorm_s0_backward",
    "weight_standardization_forward", "weight_standardization_backward",
    "moments", "summarize", "chan_merge", "finalize", "running_stats_update",
]

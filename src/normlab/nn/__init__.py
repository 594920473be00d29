"""normlab.nn: drop-in PyTorch normalization modules and functional API."""

from . import functional
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)

__all__ = ["functional", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"]

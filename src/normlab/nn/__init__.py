"""normlab.nn: drop-in PyTorch normalization modules, the batch-norm variants, normalized
recurrent layers, and model tools."""

from . import functional, tools
from .adaptive import (TLU, AdaIN, ConditionalBatchNorm2d, EvoNormB0, EvoNormB0_2d, EvoNormS0,
                       EvoNormS0_2d, FiLM, FilterResponseNorm, FilterResponseNorm2d, LinearFiLM,
                       SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d, WSConv2d)
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)
from .recurrent import (BNLSTM, BNLSTMCell, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM,
                        LayerNormLSTMCell)
from .sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm
from .tools import (adapt_batchnorm, available_norms, convert_norms, create_norm, fold_batchnorm,
                    freeze_batchnorm, recalibrate_batchnorm)
from .variants import (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, FrozenBatchNorm,
                       FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, GhostBatchNorm1d,
                       GhostBatchNorm2d, GhostBatchNorm3d)

__all__ = ["functional", "tools", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
           "LayerNormLSTMCell", "LayerNormLSTM", "LayerNormGRUCell", "LayerNormGRU",
           "BNLSTMCell", "BNLSTM",
           "SwitchableNorm1d", "SwitchableNorm2d", "SwitchableNorm3d", "AdaIN",
           "ConditionalBatchNorm2d", "FiLM", "LinearFiLM", "TLU", "FilterResponseNorm",
           "FilterResponseNorm2d", "EvoNormB0", "EvoNormB0_2d", "EvoNormS0", "EvoNormS0_2d", "WSConv2d",
           "SyncBatchNorm", "convert_sync_batchnorm",
           "create_norm", "available_norms", "convert_norms", "fold_batchnorm",
           "recalibrate_batchnorm", "adapt_batchnorm", "freeze_batchnorm"]

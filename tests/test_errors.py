"""Bad arguments, table-driven, over every public front end.

Each row: a call that is wrong in one way, the exception type, and a regex that must match the
message. The regex always checks two things: the message names the bad value (or shape/dtype/
device), and it says what to do instead (the "fix" part). A row that stops raising, or raises
a message that lost its value or its fix, fails.

Front ends: normlab.nn modules and functional, normlab.layers, normlab.estimators,
normlab.reference, normlab.kernels (numba backend), and the non-finite policy API.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
from normlab import layers as L
from normlab import nn as nl
from normlab import reference as R
from normlab.estimators import BatchNormalizer
from normlab.kernels import get_backend
from normlab.nn import functional as NF

F32 = np.float32
X4 = torch.randn(4, 3, 2, 2)
XN = np.random.default_rng(0).normal(size=(4, 3, 2, 2))
XN32 = XN.astype(F32)
KB = get_backend("numba", dtype="float32")
META3 = torch.ones(3, device="meta")     # "another device" without a GPU

# the fix parts used below
EPS_FIX = r"use a small positive value such as 1e-5"
MOM_FIX = r"or None for a cumulative average"
GROUP_FIX = r"choose one of \[1, 2, 3, 6\]"
ONE_FIX = r"use a batch of at least 2 samples"
NDIM_FIX = r"(add the missing batch or channel axis|reshape it to that layout)"


def _row(id, call, exc, match):
    return pytest.param(call, exc, match, id=id)


ROWS = [
    # ---------------------------------------------------------------- normlab.nn modules
    _row("nn.BatchNorm2d-ndim", lambda: nl.BatchNorm2d(3)(torch.randn(4, 3)), ValueError,
         r"4-dimensional input \(N, C, H, W\).*shape \(4, 3\).*reshape"),
    _row("nn.BatchNorm1d-ndim", lambda: nl.BatchNorm1d(3)(torch.randn(4, 3, 2, 2)), ValueError,
         r"2 or 3-dimensional.*\(4, 3, 2, 2\).*reshape"),
    _row("nn.BatchNorm3d-channels", lambda: nl.BatchNorm3d(3)(torch.randn(2, 5, 2, 2, 2)),
         ValueError, r"num_features=3.*has 5 channels.*build BatchNorm3d\(5\)"),
    _row("nn.BatchNorm2d-eps0", lambda: nl.BatchNorm2d(3, eps=0), ValueError, rf"eps=0.*{EPS_FIX}"),
    _row("nn.BatchNorm2d-eps-neg", lambda: nl.BatchNorm2d(3, eps=-1e-5), ValueError,
         rf"eps=-1e-05.*{EPS_FIX}"),
    _row("nn.BatchNorm2d-eps-str", lambda: nl.BatchNorm2d(3, eps="1e-5"), TypeError,
         r"eps must be a positive float, got '1e-5' of type str"),
    _row("nn.BatchNorm1d-momentum", lambda: nl.BatchNorm1d(3, momentum=1.5), ValueError,
         rf"momentum=1.5.*|{MOM_FIX}"),
    _row("nn.BatchNorm1d-momentum-neg", lambda: nl.BatchNorm1d(3, momentum=-0.1), ValueError,
         r"must be in \[0, 1\].*momentum=-0.1"),
    _row("nn.BatchNorm1d-num_features", lambda: nl.BatchNorm1d(0), ValueError,
         r"num_features must be a positive integer, got num_features=0"),
    _row("nn.BatchNorm1d-batch-of-one", lambda: nl.BatchNorm1d(3).train()(torch.randn(1, 3)),
         ValueError, rf"shape \(1, 3\).*{ONE_FIX}"),
    _row("nn.BatchNorm2d-not-a-tensor", lambda: nl.BatchNorm2d(3)(XN), TypeError,
         r"got ndarray.*torch.as_tensor"),
    _row("nn.BatchNorm2d-int-input", lambda: nl.BatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.long)),
         TypeError, r"torch.int64.*input.float\(\)"),
    _row("nn.BatchNorm2d-meta-params", lambda: nl.BatchNorm2d(3, device="meta")(X4), ValueError,
         r"weight is on device meta but the input is on cpu.*\.to\("),
    _row("nn.InstanceNorm2d-ndim", lambda: nl.InstanceNorm2d(3)(torch.randn(4, 3)), ValueError,
         r"3 or 4-dimensional.*\(4, 3\).*reshape"),
    _row("nn.InstanceNorm1d-channels-affine", lambda: nl.InstanceNorm1d(3, affine=True)(torch.randn(2, 4, 5)),
         ValueError, r"num_features=3.*has 4 channels.*InstanceNorm1d\(4\)"),
    _row("nn.InstanceNorm1d-single-value", lambda: nl.InstanceNorm1d(3)(torch.randn(2, 3, 1)),
         ValueError, r"more than 1 spatial element.*\(2, 3, 1\)"),
    _row("nn.InstanceNorm2d-momentum", lambda: nl.InstanceNorm2d(3, momentum=2.0), ValueError,
         r"momentum=2.0"),
    _row("nn.GroupNorm-groups", lambda: nl.GroupNorm(4, 6), ValueError,
         rf"num_groups=4 does not divide num_channels=6; {GROUP_FIX}"),
    _row("nn.GroupNorm-eps", lambda: nl.GroupNorm(2, 6, eps=0.0), ValueError, rf"eps=0.0.*{EPS_FIX}"),
    _row("nn.LayerNorm-eps", lambda: nl.LayerNorm(4, eps=float("nan")), ValueError, rf"eps=nan.*{EPS_FIX}"),
    _row("nn.LayerNorm-shape", lambda: nl.LayerNorm(4)(torch.randn(2, 5)), ValueError,
         r"trailing dimensions \(4,\).*\(2, 5\).*must equal normalized_shape"),
    _row("nn.LayerNorm-bad-normalized-shape", lambda: nl.LayerNorm("4"), TypeError,
         r"normalized_shape.*'4'.*pass e.g. normalized_shape=\(32,\)"),
    _row("nn.RMSNorm-eps", lambda: nl.RMSNorm(4, eps=0.0), ValueError, rf"eps=0.0.*{EPS_FIX}"),
    _row("nn.BatchRenorm2d-r_max", lambda: nl.BatchRenorm2d(3, r_max=0.5), ValueError,
         r"r_max=0.5.*r_max=1, d_max=0 is plain batch norm"),
    _row("nn.BatchRenorm2d-eps", lambda: nl.BatchRenorm2d(3, eps=0), ValueError, rf"eps=0.*{EPS_FIX}"),
    _row("nn.BatchRenorm1d-batch-of-one", lambda: nl.BatchRenorm1d(3)(torch.randn(1, 3)), ValueError,
         rf"\(1, 3\).*{ONE_FIX}"),
    _row("nn.GhostBatchNorm2d-vbs", lambda: nl.GhostBatchNorm2d(3, virtual_batch_size=0), ValueError,
         r"virtual_batch_size must be a positive integer, got virtual_batch_size=0"),
    _row("nn.GhostBatchNorm1d-channels", lambda: nl.GhostBatchNorm1d(3)(torch.randn(4, 5)), ValueError,
         r"num_features=3.*\(4, 5\) has 5 channels"),
    _row("nn.SyncBatchNorm-ndim", lambda: nl.SyncBatchNorm(3)(torch.randn(3)), ValueError,
         r"at least 2 dimensions.*\(3,\).*add the batch axis"),
    _row("nn.FrozenBatchNorm2d-eps", lambda: nl.FrozenBatchNorm2d(3, eps=-1.0), ValueError,
         rf"eps=-1.0.*{EPS_FIX}"),
    # ---------------------------------------------------------------- normlab.nn.functional
    _row("F.batch_norm-ndim", lambda: NF.batch_norm(torch.randn(3), None, None, training=True),
         ValueError, rf"at least 2 dimensions.*\(3,\).*{NDIM_FIX}"),
    _row("F.batch_norm-channels", lambda: NF.batch_norm(torch.randn(4, 5), None, None, torch.ones(3)),
         ValueError, r"weight must have shape \(5,\).*input of shape \(4, 5\).*got shape \(3,\); pass"),
    _row("F.batch_norm-eps", lambda: NF.batch_norm(X4, None, None, training=True, eps=0.0),
         ValueError, rf"eps=0.0.*{EPS_FIX}"),
    _row("F.batch_norm-momentum", lambda: NF.batch_norm(X4, torch.zeros(3), torch.ones(3), training=True,
                                                        momentum=1.5), ValueError, r"momentum=1.5"),
    _row("F.batch_norm-batch-of-one", lambda: NF.batch_norm(torch.randn(1, 3), None, None, training=True),
         ValueError, ONE_FIX),
    _row("F.batch_norm-int-weight", lambda: NF.batch_norm(X4, None, None, torch.ones(3, dtype=torch.long),
                                                          training=True),
         TypeError, r"weight must be a floating-point tensor, got dtype torch.int64.*\.to\("),
    _row("F.batch_norm-array-weight", lambda: NF.batch_norm(X4, None, None, np.ones(3), training=True),
         TypeError, r"weight must be a torch.Tensor or None, got ndarray.*torch.as_tensor"),
    _row("F.batch_norm-meta-weight", lambda: NF.batch_norm(X4, None, None, META3, training=True),
         ValueError, r"weight is on device meta but the input is on cpu.*weight.to\(input.device\)"),
    _row("F.batch_norm-meta-running", lambda: NF.batch_norm(X4, META3, META3), ValueError,
         r"running_mean is on device meta.*running_mean.to\(input.device\)"),
    _row("F.batch_norm-numpy-input", lambda: NF.batch_norm(XN, None, None, training=True), TypeError,
         r"got ndarray.*torch.as_tensor"),
    _row("F.batch_norm-int-input", lambda: NF.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None,
                                                         training=True), TypeError, r"torch.int64.*\.float\(\)"),
    _row("F.batch_norm-nonfinite", lambda: NF.batch_norm(X4, None, None, training=True, nonfinite="warn"),
         ValueError, r"nonfinite=.warn.*'skip' leaves"),
    _row("F.instance_norm-ndim", lambda: NF.instance_norm(torch.randn(4, 3)), ValueError,
         r"at least 3 dimensions.*\(4, 3\)"),
    _row("F.instance_norm-eval-no-stats", lambda: NF.instance_norm(torch.randn(2, 3, 4), use_input_stats=False),
         ValueError, r"running_mean=None.*pass both, or use_input_stats=True"),
    _row("F.instance_norm-meta-bias", lambda: NF.instance_norm(X4, bias=META3), ValueError,
         r"bias is on device meta"),
    _row("F.group_norm-groups", lambda: NF.group_norm(torch.randn(2, 6, 3), 4), ValueError,
         rf"num_groups=4.*{GROUP_FIX}"),
    _row("F.group_norm-zero-groups", lambda: NF.group_norm(torch.randn(2, 6, 3), 0), ValueError,
         r"num_groups must be a positive integer, got num_groups=0"),
    _row("F.group_norm-weight-shape", lambda: NF.group_norm(torch.randn(2, 6, 3), 2, torch.ones(4)),
         ValueError, r"weight must have shape \(6,\).*got shape \(4,\)"),
    _row("F.layer_norm-shape", lambda: NF.layer_norm(torch.randn(2, 5), (4,)), ValueError,
         r"\(4,\).*\(2, 5\).*must equal normalized_shape"),
    _row("F.layer_norm-int-weight", lambda: NF.layer_norm(torch.randn(2, 4), (4,), torch.ones(4, dtype=torch.int32)),
         TypeError, r"torch.int32.*\.to\("),
    _row("F.layer_norm-weight-shape", lambda: NF.layer_norm(torch.randn(2, 4), (4,), torch.ones(3)),
         ValueError, r"weight must have shape \(4,\), got shape \(3,\)"),
    _row("F.rms_norm-eps", lambda: NF.rms_norm(torch.randn(2, 4), (4,), eps=-1.0), ValueError,
         rf"eps=-1.0.*{EPS_FIX}"),
    _row("F.rms_norm-meta-weight", lambda: NF.rms_norm(torch.randn(2, 4), (4,), torch.ones(4, device="meta")),
         ValueError, r"weight is on device meta"),
    # ---------------------------------------------------------------- normlab.layers
    _row("layers.BatchNorm-ndim", lambda: L.BatchNorm(3).forward(np.ones(3, F32)), ValueError,
         rf"at least 2 dimensions.*\(3,\).*{NDIM_FIX}"),
    _row("layers.BatchNorm-channels", lambda: L.BatchNorm(3).forward(np.ones((4, 5), F32)), ValueError,
         r"3 channels.*\(4, 5\) has 5.*pass an input with 3 channels"),
    _row("layers.BatchNorm-eps", lambda: L.BatchNorm(3, eps=0), ValueError, rf"eps=0.*{EPS_FIX}"),
    _row("layers.BatchNorm-momentum", lambda: L.BatchNorm(3, momentum=-0.1), ValueError,
         rf"momentum=-0.1|{MOM_FIX}"),
    _row("layers.BatchNorm-batch-of-one", lambda: L.BatchNorm(3).forward(np.ones((1, 3), F32)),
         ValueError, ONE_FIX),
    _row("layers.BatchNorm-int-input", lambda: L.BatchNorm(3).forward(np.ones((4, 3), np.int64)),
         TypeError, r"int64.*astype\(np.float32\)"),
    _row("layers.BatchNorm-int-dtype", lambda: L.BatchNorm(3, dtype=np.int32), TypeError,
         r"floating dtype.*got dtype=int32"),
    _row("layers.BatchNorm-nonfinite", lambda: L.BatchNorm(3).forward(np.ones((4, 3), F32), nonfinite="x"),
         ValueError, r"must be one of \['skip', 'propagate', 'raise'\].*got nonfinite='x'"),
    _row("layers.GroupNorm-groups", lambda: L.GroupNorm(4, 6), ValueError, rf"num_groups=4.*{GROUP_FIX}"),
    _row("layers.InstanceNorm-single-value", lambda: L.InstanceNorm(3).forward(np.ones((2, 3, 1), F32)),
         ValueError, r"more than 1 spatial value.*use LayerNorm or BatchNorm"),
    _row("layers.LayerNorm-shape", lambda: L.LayerNorm(4).forward(np.ones((2, 5), F32)), ValueError,
         r"\(4,\).*\(2, 5\).*must equal normalized_shape"),
    _row("layers.RMSNorm-eps", lambda: L.RMSNorm(4, eps=0.0), ValueError, rf"eps=0.0.*{EPS_FIX}"),
    _row("layers.BatchRenorm-d_max", lambda: L.BatchRenorm(3, d_max=-1.0), ValueError,
         r"d_max=-1.0.*r_max=1, d_max=0 is plain batch norm"),
    _row("layers.BatchNorm-backend", lambda: L.BatchNorm(3, backend="cuda"), ValueError,
         r"backend must be None \(automatic\) or one of .*got backend='cuda'"),
    _row("layers.BatchNorm-load-shape", lambda: L.BatchNorm(3).load_state_dict(
        {k: (np.zeros(4) if k != "num_batches_tracked" else v) for k, v in L.BatchNorm(3).state_dict().items()}),
         ValueError, r"has shape \(4,\), expected shape \(3,\).*nothing was loaded"),
    # ---------------------------------------------------------------- normlab.estimators
    _row("BatchNormalizer-eps", lambda: BatchNormalizer(eps=0).fit(np.ones((3, 2))), ValueError,
         rf"eps=0.*{EPS_FIX}"),
    _row("BatchNormalizer-momentum", lambda: BatchNormalizer(momentum=0.0).fit(np.ones((3, 2))),
         ValueError, r"momentum=0.0.*use e.g. momentum=0.1"),
    _row("BatchNormalizer-gamma-shape", lambda: BatchNormalizer(gamma=[1.0, 2.0, 3.0]).fit(np.ones((3, 2))),
         ValueError, r"gamma of shape \(3,\); pass 2 values"),
    _row("BatchNormalizer-1d", lambda: BatchNormalizer().fit(np.ones(3)), ValueError,
         r"(?s)Expected 2D array, got 1D array.*Reshape your data"),
    _row("BatchNormalizer-features", lambda: BatchNormalizer().fit(np.ones((3, 2))).transform(np.ones((3, 4))),
         ValueError, r"X has 4 features, but BatchNormalizer is expecting 2"),
    _row("BatchNormalizer-policy", lambda: BatchNormalizer(nonfinite_policy="off").fit(np.ones((3, 2))),
         ValueError, r"nonfinite_policy='off'"),
    # ---------------------------------------------------------------- normlab.reference
    _row("reference.batch_norm-ndim", lambda: R.batch_norm_forward(np.ones(3)), ValueError,
         rf"\(3,\).*{NDIM_FIX}"),
    _row("reference.batch_norm-eps", lambda: R.batch_norm_forward(XN, eps=0), ValueError, rf"eps=0.*{EPS_FIX}"),
    _row("reference.batch_norm-weight", lambda: R.batch_norm_forward(XN, np.ones(5)), ValueError,
         r"weight must have shape \(3,\).*got shape \(5,\)"),
    _row("reference.batch_norm-batch-of-one", lambda: R.batch_norm_forward(np.ones((1, 3))), ValueError,
         ONE_FIX),
    _row("reference.group_norm-groups", lambda: R.group_norm_forward(np.ones((2, 6, 3)), 4), ValueError,
         GROUP_FIX),
    _row("reference.layer_norm-shape", lambda: R.layer_norm_forward(np.ones((2, 5)), (4,)), ValueError,
         r"must equal normalized_shape"),
    _row("reference.running_stats_update-momentum",
         lambda: R.running_stats_update(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 4, 1.5),
         ValueError, r"momentum=1.5"),
    # ---------------------------------------------------------------- normlab.kernels
    _row("kernels.batch_norm-ndim", lambda: KB.batch_norm_forward(np.ones(3, F32), None, None, 1e-5),
         ValueError, rf"\(3,\).*{NDIM_FIX}"),
    _row("kernels.batch_norm-eps", lambda: KB.batch_norm_forward(XN32, None, None, 0.0), ValueError,
         rf"eps=0.0.*{EPS_FIX}"),
    _row("kernels.batch_norm-weight", lambda: KB.batch_norm_forward(XN32, np.ones(5, F32), None, 1e-5),
         ValueError, r"weight must have shape \(3,\).*got shape \(5,\)"),
    _row("kernels.batch_norm-negative-var",
         lambda: KB.batch_norm_forward(XN32, None, None, 1e-5, mean=np.zeros(3, F32),
                                       var=np.array([1.0, -0.5, 1.0], F32)),
         ValueError, r"var\[1\]=-0\.5.*pass the running variance"),
    _row("kernels.group_norm-groups", lambda: KB.group_norm_forward(np.ones((2, 6, 3), F32), 4, None, None, 1e-5),
         ValueError, GROUP_FIX),
    _row("kernels.batch_norm-int-input", lambda: KB.batch_norm_forward(np.ones((4, 3), np.int64), None, None, 1e-5),
         TypeError, r"int64; cast the input"),
    _row("kernels.get_backend-name", lambda: get_backend("cuda-magic"), ValueError,
         r"'cuda-magic'.*valid choices here"),
    # ---------------------------------------------------------------- the non-finite policy API
    _row("nonfinite_policy-bad", lambda: normlab.nonfinite_policy("warn").__enter__(), ValueError,
         r"policy='warn'.*'skip' leaves"),
    _row("set_nonfinite_policy-bad", lambda: normlab.set_nonfinite_policy("never"), ValueError,
         r"policy='never'"),
]


@pytest.mark.parametrize("call, exc, match", ROWS)
def test_bad_argument_gives_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_failed_forward_leaves_the_module_unchanged():
    """Errors are raised before anything is written (running statistics included)."""
    m = nl.BatchNorm2d(3).train()
    m(X4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(4, 5, 2, 2), torch.randn(1, 3, 1, 1), torch.randn(4, 3)):
        with pytest.raises(ValueError):
            m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checked_constructors_keep_torch_signatures():
    import inspect

    for name in ("BatchNorm1d", "BatchNorm2d", "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm"):
        assert inspect.signature(getattr(nl, name)) == inspect.signature(getattr(torch.nn, name))
    with pytest.raises(TypeError, match=r"BatchNorm2d\(num_features.*unexpected keyword.*affin"):
        nl.BatchNorm2d(3, affin=False)

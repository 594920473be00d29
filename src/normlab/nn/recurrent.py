r"""Normalization in recurrent networks: layer-normalized LSTM/GRU and recurrent batch norm.

Batch norm fits recurrent networks poorly: the statistics of a pre-activation differ from one
time step to the next, and sequences in a batch have different lengths. Two answers:

**Layer normalization** (Ba, Kiros & Hinton 2016, "Layer Normalization", arXiv:1607.06450,
section 3.1 and the supplementary LSTM equations) normalizes each sample over its features, so it
needs no batch statistics and is the same function in training and inference. With
``LN(a; g, b) = (a - mean(a)) / sqrt(var(a) + eps) * g + b`` (mean/var over the features of one
sample) and torch.nn.LSTM's gate order ``i, f, g, o``::

    (i, f, g, o) = LN(W_ih x_t; g_ih) + b_ih + LN(W_hh h_{t-1}; g_hh) + b_hh
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t; g_c, b_c))

and for the GRU, torch.nn.GRU's formula (gate order ``r, z, n``) with the two projections
normalized::

    (a_r, a_z, a_n) = LN(W_ih x_t; g_ih) + b_ih          (input-to-hidden)
    (u_r, u_z, u_n) = LN(W_hh h_{t-1}; g_hh) + b_hh      (hidden-to-hidden)
    r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z)
    n = tanh(a_n + r * u_n)
    h_t = (1 - z) * n + z * h_{t-1}

The projections are normalized over all their gates jointly (``4H`` or ``3H`` features), as the
paper writes it; ``norm_per_gate=True`` normalizes each gate's ``H`` features separately
instead (as several later implementations do). ``layer_norm=False`` drops every LN and the
modules compute torch.nn.LSTM/GRU exactly (same weights, names, shapes and state_dict keys).

**Recurrent batch normalization** (Cooijmans, Ballas, Laurent, Gulcehre & Courville 2016,
"Recurrent Batch Normalization", arXiv:1603.09025, ICLR 2017), :class:`BNLSTM`::

    (i, f, g, o) = BN_t(W_ih x_t; gamma_ih, 0) + BN_t(W_hh h_{t-1}; gamma_hh, 0) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN_t(c_t; gamma_c, beta_c))

with ``b = b_ih + b_hh`` (kept as two tensors for torch.nn.LSTM's names; the paper has one).
``BN_t`` normalizes each feature over the batch at time step ``t``: separate statistics per
step ``t < max_steps``; population (running) statistics are kept per step for inference, and at
inference steps ``t >= max_steps`` use those of step ``max_steps - 1`` (the paper's
``T_max``). The gammas start at 0.1, as the paper recommends (gamma = 1 drives the gates into
saturation and the gradient through time vanishes); the two projection BNs have no beta (it
would duplicate ``b``); the cell-state BN has its beta (start 0). The cell state itself is
not normalized in the recurrence, only on its way to ``h_t``.

**Variable-length batches.** Every multi-layer module accepts a
:class:`torch.nn.utils.rnn.PackedSequence` (and returns one, like torch.nn.LSTM), or a padded
tensor with a ``lengths`` argument (and returns a padded tensor of the input's length, zeros at
padded steps). Internally everything runs in packed layout: at step ``t`` only the
``batch_sizes[t]`` sequences still active are computed, so padded values never enter a matrix
product, a LayerNorm or a batch statistic, and the final states are those at each sequence's
own last step. The reverse direction of a bidirectional layer reverses each sequence within its
own length (so it starts at the sequence's last valid step, as torch does), runs forward, and
reverses back; for BNLSTM its step index ``t`` therefore counts steps from each sequence's end.

Running statistics follow torch.nn's rule with ``f = momentum`` (or ``1 / num_batches_tracked``
of that step when ``momentum=None``) and the unbiased batch variance::

    running_mean[t] <- (1 - f) * running_mean[t] + f * mean_B(t)
    running_var[t]  <- (1 - f) * running_var[t]  + f * var_B(t) * M_t / (M_t - 1)

where ``M_t`` is the number of sequences active at step ``t``. Choices where the paper is
silent: (1) in training, steps ``t >= max_steps`` use their own batch statistics and do not
update any running statistics (slot ``max_steps - 1`` estimates step ``max_steps - 1`` only);
(2) in training, a step at which a single sequence is still active (variance undefined) is
normalized with that step's running statistics and updates nothing; a whole batch of one
sequence in training raises ``ValueError``, as torch.nn.BatchNorm does.

The LN-LSTM's recurrence (LayerNormLSTM and LayerNormLSTMCell, CPU, float32/float64, the
default ``layer_norm=True`` with or without ``norm_per_gate``) runs on a fused path: one
:class:`torch.autograd.Function` per layer direction and sequence (``_FusedLNLSTM``) whose
forward calls, per step, ``torch.mm`` for ``W_hh h_{t-1}`` and one numba kernel
(``normlab.kernels._numba_rnn``) for everything else of the step (the LN of the hidden term,
the gates, the cell update, the LN of ``c_t``, ``h_t``), and whose backward is the same in
reverse (one kernel and one ``torch.mm`` per step, ``dW_hh`` one matmul at the end). It
computes the same function as the composite path up to float rounding (tested); it is
first-order only. ``_FUSED = False`` switches it off. Everything else -- the input term
``LN(W_ih x; g_ih) + b_ih`` (all steps at once), the GRU, BNLSTM, CUDA, other dtypes -- is
differentiable torch code (composite ops; the normalizations are
``torch.nn.functional.layer_norm`` / ``batch_norm``, see ``_NORM`` below), so autograd gives the
gradients.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _checks

# The normalizations of the composite path. torch.nn.functional and normlab.nn.functional have
# the same signatures for layer_norm and batch_norm (and the same running-statistics rule), so
# this is a one-line switch. torch's is used: a recurrent step normalizes a tiny (active batch,
# 4H) tensor between two torch matmuls, where normlab.nn.functional's per-call overhead
# (custom-op dispatch and tensor/NumPy glue, ~150-200 us against torch's ~18 us on (32, 1024))
# dominates, and interleaving its numba-parallel kernels with torch's OpenMP ops in such a loop
# measured 10-30x slower on a 2-core machine (the thread pools spin-wait against each other).
# The LN-LSTM's recurrence does not go through here by default: see _FUSED (one serial numba
# kernel per step for the whole elementwise part, no per-op dispatch at all).
_NORM = TF

__all__ = ["LayerNormLSTMCell", "LayerNormGRUCell", "LayerNormLSTM", "LayerNormGRU",
           "BNLSTMCell", "BNLSTM"]


# ----------------------------------------------------------------------------- argument checks

def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r} of type {type(value).__name__}")
    return value


def _check_dropout(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1], got dropout={p!r} of type {type(p).__name__}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1] (applied between layers), got dropout={p!r}")
    return float(p)


def _check_float_input(x, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor or PackedSequence input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} expects a floating-point input, got dtype {x.dtype}; convert it with .float()")


def _check_dtype(x, param, what):
    if x.dtype != param.dtype or x.device != param.device:
        raise TypeError(
            f"{what}: the input is {x.dtype} on {x.device} but the parameters are {param.dtype} on "
            f"{param.device}; convert one of them, e.g. module.to({x.dtype}) or input.to({param.dtype})")


def _check_state(state, shape, name, what):
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a tensor of shape {tuple(shape)}, got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got shape {tuple(state.shape)}")


# ----------------------------------------------------------------------------- normalizations

def _layer_norm(a, weight, bias, eps, chunks):
    """LN over the last dim (``chunks == 1``) or over each of ``chunks`` equal gate blocks of it."""
    if chunks == 1:
        return _NORM.layer_norm(a, (a.shape[-1],), weight, bias, eps)
    H = a.shape[-1] // chunks
    y = _NORM.layer_norm(a.unflatten(-1, (chunks, H)), (H,), None, None, eps).flatten(-2)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _StepBN:
    """The three batch norms of one BN-LSTM layer direction at one time step ``t``.

    Decides once per step which statistics apply (batch or running slot ``min(t, max_steps-1)``)
    and increments that slot's ``num_batches_tracked`` once, so the ih, hh and cell BNs of the
    step share one update count.
    """

    def __init__(self, p, t, rows, training, momentum, eps, max_steps):
        self.p, self.eps = p, eps
        self.slot = min(t, max_steps - 1)
        self.batch_stats = training and rows > 1
        self.track = self.batch_stats and t < max_steps
        self.factor = 0.0
        if self.track:
            nbt = p["num_batches_tracked"]
            with torch.no_grad():
                nbt[self.slot] += 1
            self.factor = momentum if momentum is not None else 1.0 / float(nbt[self.slot])

    def __call__(self, x, which, weight, bias=None):
        rm, rv = self.p["running_mean_" + which], self.p["running_var_" + which]
        if self.batch_stats:
            if self.track:
                return _NORM.batch_norm(x, rm[self.slot], rv[self.slot], weight, bias, True, self.factor, self.eps)
            return _NORM.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return _NORM.batch_norm(x, rm[self.slot], rv[self.slot], weight, bias, False, 0.0, self.eps)


# ----------------------------------------------------------------------------- one step of each cell

def _ln_lstm_step(gi, h, c, p, eps, chunks):
    """One LN-LSTM step; ``gi`` is the input term LN(W_ih x; g_ih) + b_ih, already computed."""
    gh = TF.linear(h, p["weight_hh"])
    if "ln_weight_hh" in p:
        gh = _layer_norm(gh, p["ln_weight_hh"], None, eps, chunks)
    if p.get("bias_hh") is not None:
        gh = gh + p["bias_hh"]
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cn = _layer_norm(c, p["ln_weight_c"], p["ln_bias_c"], eps, 1) if "ln_weight_c" in p else c
    return torch.sigmoid(o) * torch.tanh(cn), c


def _ln_gru_step(gi, h, p, eps, chunks):
    """One LN-GRU step (torch.nn.GRU's formula); ``gi`` = LN(W_ih x; g_ih) + b_ih."""
    gh = TF.linear(h, p["weight_hh"])
    if "ln_weight_hh" in p:
        gh = _layer_norm(gh, p["ln_weight_hh"], None, eps, chunks)
    if p.get("bias_hh") is not None:
        gh = gh + p["bias_hh"]
    a_r, a_z, a_n = gi.chunk(3, -1)
    u_r, u_z, u_n = gh.chunk(3, -1)
    r = torch.sigmoid(a_r + u_r)
    z = torch.sigmoid(a_z + u_z)
    n = torch.tanh(a_n + r * u_n)
    return (1 - z) * n + z * h


def _ln_input_term(x, p, eps, chunks):
    gi = TF.linear(x, p["weight_ih"])
    if "ln_weight_ih" in p and chunks == 1:     # b_ih as the LN's own bias: one op, one pass less
        return _NORM.layer_norm(gi, (gi.shape[-1],), p["ln_weight_ih"], p.get("bias_ih"), eps)
    if "ln_weight_ih" in p:
        gi = _layer_norm(gi, p["ln_weight_ih"], None, eps, chunks)
    if p.get("bias_ih") is not None:
        gi = gi + p["bias_ih"]
    return gi


def _bn_lstm_step(gi_raw, h, c, p, bn):
    """One BN-LSTM step; ``gi_raw`` = W_ih x (not normalized), ``bn`` a :class:`_StepBN`."""
    gates = bn(gi_raw, "ih", p["bn_weight_ih"]) + bn(TF.linear(h, p["weight_hh"]), "hh", p["bn_weight_hh"])
    if p.get("bias_ih") is not None:
        gates = gates + (p["bias_ih"] + p["bias_hh"])
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(bn(c, "c", p["bn_weight_c"], p["bn_bias_c"]))
    return h, c


# ----------------------------------------------------------------------------- the fused LN-LSTM path

#: Use the fused numba kernels (``normlab.kernels._numba_rnn``) for the recurrence of
#: LayerNormLSTM / LayerNormLSTMCell where they apply (CPU, float32/float64, layer_norm=True);
#: ``False`` runs every configuration on the composite torch path (``_ln_lstm_step``).
_FUSED = True

_RNN_KERNELS = []          # [module] once imported, [None] if numba is unavailable


def _rnn_kernels():
    if not _RNN_KERNELS:
        try:
            from ..kernels import _numba_rnn
        except Exception:  # numba missing or failing to initialise: the torch path still works
            _numba_rnn = None
        _RNN_KERNELS.append(_numba_rnn)
    return _RNN_KERNELS[0]


def _fused_applies(p, ref):
    """Whether the fused LN-LSTM kernels cover this layer direction / cell."""
    return (_FUSED and "ln_weight_hh" in p and "ln_weight_c" in p
            and ref.device.type == "cpu" and ref.dtype in (torch.float32, torch.float64)
            and all(v.dtype == ref.dtype and v.device.type == "cpu" for v in p.values())
            and _rnn_kernels() is not None)


def _np(t):
    return t.detach().numpy()


class _FusedLNLSTM(torch.autograd.Function):
    """The recurrence of one LN-LSTM layer direction over a whole packed sequence.

    ``forward(gi, h0, c0, w_hh, w_ln_hh, b_hh, w_ln_c, b_ln_c, sizes, eps, chunks)`` ->
    ``(out, h_n, c_n)``: ``gi`` (N, 4H) the input terms ``LN(W_ih x; g_ih) + b_ih`` of all steps
    in packed layout (step ``t`` has ``sizes[t]`` rows, non-increasing), ``h0``, ``c0`` (B, H)
    in sorted order; ``out`` (N, H) the ``h_t`` of every row, ``h_n``, ``c_n`` (B, H) each
    sequence's state at its own last step. ``b_hh`` may be None. Per step: one ``torch.mm``
    into a preallocated buffer, one call of the numba kernel; backward likewise in reverse (the
    kernel, then ``dh = da @ W_hh`` and ``dW_hh += da^T h_{t-1}``). First-order only
    (``once_differentiable``): for double backward set ``recurrent._FUSED = False``.
    """

    @staticmethod
    def forward(ctx, gi, h0, c0, w_hh, w_ln_hh, b_hh, w_ln_c, b_ln_c, sizes, eps, chunks):
        K = _rnn_kernels()
        N, G = gi.shape
        B, H = h0.shape
        dt = gi.dtype
        gi, h0, c0 = gi.contiguous(), h0.contiguous(), c0.contiguous()
        A = torch.empty(N, G, dtype=dt)
        ACT = torch.empty(N, G, dtype=dt)
        C = torch.empty(N, H, dtype=dt)
        TC = torch.empty(N, H, dtype=dt)
        OUT = torch.empty(N, H, dtype=dt)
        STATS = np.empty((N, chunks, 2))
        CSTATS = np.empty((N, 2))
        a_np, gi_np, c_np, c0_np = _np(A), _np(gi), _np(C), _np(c0)
        bh = _np(b_hh.contiguous()) if b_hh is not None else np.zeros(G, dtype=gi_np.dtype)
        params = (_np(w_ln_hh.contiguous()), bh, _np(w_ln_c.contiguous()), _np(b_ln_c.contiguous()))
        outs = (STATS, _np(ACT), c_np, CSTATS, _np(TC), _np(OUT))
        wT, h0d = w_hh.detach().t(), h0.detach()
        r0 = prev = 0
        for t, n in enumerate(sizes):
            hp = h0d[:n] if t == 0 else OUT[prev:prev + n]
            torch.mm(hp, wT, out=A[r0:r0 + n])
            K.lnlstm_forward_step(a_np, gi_np, r0, n, c0_np if t == 0 else c_np, 0 if t == 0 else prev,
                                  *params, chunks, eps, *outs)
            prev, r0 = r0, r0 + n
        last = _last_rows(sizes)
        ctx.sizes, ctx.chunks = sizes, chunks
        ctx.bufs = (A, STATS, ACT, C, CSTATS, TC)
        ctx.has_bias = b_hh is not None
        ctx.save_for_backward(OUT, h0, c0, w_hh, w_ln_hh, w_ln_c)
        return OUT, OUT[last], C[last]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        K = _rnn_kernels()
        OUT, h0, c0, w_hh, w_ln_hh, w_ln_c = ctx.saved_tensors
        A, STATS, ACT, C, CSTATS, TC = ctx.bufs
        sizes, chunks = ctx.sizes, ctx.chunks
        N, G = A.shape
        B, H = h0.shape
        dt = A.dtype
        d_out = torch.zeros(N, H, dtype=dt) if d_out is None else d_out.to(dt).contiguous()
        DH = torch.zeros(B, H, dtype=dt) if d_hn is None else d_hn.to(dt).clone(memory_format=torch.contiguous_format)
        DC = torch.zeros(B, H, dtype=dt) if d_cn is None else d_cn.to(dt).clone(memory_format=torch.contiguous_format)
        DZ = torch.empty(N, G, dtype=dt)
        DA = torch.empty(B, G, dtype=dt)       # one step's rows at a time: stays in cache
        dw_hh, db_hh, dw_c, db_c = np.zeros(G), np.zeros(G), np.zeros(H), np.zeros(H)
        W = w_hh.detach()
        need = ctx.needs_input_grad
        d_w = torch.zeros(G, H, dtype=dt) if need[3] else None
        dh_np, dc_np, dz_np, da_np = DH.numpy(), DC.numpy(), DZ.numpy(), DA.numpy()
        fixed = (_np(A), STATS, _np(ACT))
        c_np, c0_np = _np(C), _np(c0)
        rest = (CSTATS, _np(TC), _np(w_ln_hh.contiguous()), _np(w_ln_c.contiguous()), chunks, dz_np, da_np,
                dw_hh, db_hh, dw_c, db_c)
        dout_np = d_out.numpy()
        out_d, h0_d = OUT.detach(), h0.detach()
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        for t in range(len(sizes) - 1, -1, -1):
            r0, n = offsets[t], sizes[t]
            cp, cp0 = (c0_np, 0) if t == 0 else (c_np, offsets[t - 1])
            K.lnlstm_backward_step(r0, n, dout_np, dh_np, dc_np, *fixed, cp, cp0, c_np, *rest)
            da = DA[:n]
            if d_w is not None:
                hp = h0_d[:n] if t == 0 else out_d[offsets[t - 1]:offsets[t - 1] + n]
                d_w.addmm_(da.t(), hp)
            torch.mm(da, W, out=DH[:n])
        grads = [DZ if need[0] else None, DH if need[1] else None, DC if need[2] else None, d_w]
        for k, acc in ((4, dw_hh), (5, db_hh), (6, dw_c), (7, db_c)):
            grads.append(torch.from_numpy(acc).to(dt) if need[k] and (k != 5 or ctx.has_bias) else None)
        return tuple(grads) + (None, None, None)


def _last_rows(sizes):
    """Packed row of each (sorted) sequence's last step."""
    offsets, B = [0], sizes[0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    last = [0] * B
    for t, n in enumerate(sizes):
        last[:n] = range(offsets[t], offsets[t] + n)
    return torch.tensor(last, dtype=torch.long)


def _fused_ln_lstm(gi, sizes, h0, c0, p, eps, chunks):
    """(out (N, H), h_n, c_n) of one layer direction on the fused path."""
    return _FusedLNLSTM.apply(gi, h0, c0, p["weight_hh"], p["ln_weight_hh"], p.get("bias_hh"),
                              p["ln_weight_c"], p["ln_bias_c"], list(sizes), float(eps), int(chunks))


# ----------------------------------------------------------------------------- packed-layout helpers

def _reverse_within_lengths(batch_sizes):
    """Row permutation of packed data that reverses every sequence within its own length.

    Packed row ``offset[t] + b`` holds step ``t`` of (sorted) sequence ``b``; it is sent to
    step ``len_b - 1 - t`` of the same sequence. The permutation is its own inverse and keeps
    ``batch_sizes``.
    """
    bs = batch_sizes.to(torch.long)
    T, B = bs.numel(), int(bs[0])
    offsets = torch.cumsum(bs, 0) - bs                                   # (T,)
    t_idx = torch.repeat_interleave(torch.arange(T), bs)                 # (N,) step of each row
    b_idx = torch.arange(int(bs.sum())) - offsets[t_idx]                 # (N,) sequence of each row
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)    # (B,)
    return offsets[lengths[b_idx] - 1 - t_idx] + b_idx


def _scan(step, xs, sizes, states):
    """Run ``step(x_t, *states_active) -> new states`` over packed steps.

    ``xs[t]`` has ``sizes[t]`` rows (non-increasing); rows past ``sizes[t]`` have finished, and
    their states are kept as their final states. Returns the per-step first states (outputs) and
    the final states, rows in sorted order.
    """
    outputs, finished = [], []
    for x, n in zip(xs, sizes):
        if n < states[0].shape[0]:
            finished.append([s[n:] for s in states])
            states = [s[:n] for s in states]
        states = step(x, *states)
        outputs.append(states[0])
    finals = [torch.cat([states[k]] + [f[k] for f in reversed(finished)], 0) for k in range(len(states))]
    return outputs, finals


# ----------------------------------------------------------------------------- cells

def _cell_input(cell, input, hx, n_states):
    """Validate a cell call; returns (batched input, batched states, was_unbatched)."""
    what = type(cell).__name__
    _check_float_input(input, what)
    if input.dim() not in (1, 2):
        raise ValueError(f"{what} expects an input of shape (batch, {cell.input_size}) or ({cell.input_size},), "
                         f"got shape {tuple(input.shape)}")
    if input.shape[-1] != cell.input_size:
        raise ValueError(f"{what} was built for input_size={cell.input_size} but the input of shape "
                         f"{tuple(input.shape)} has {input.shape[-1]} features on its last axis")
    _check_dtype(input, cell.weight_ih, what)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    B, H = x.shape[0], cell.hidden_size
    names = ("h", "c")[:n_states]
    if hx is None:
        states = [x.new_zeros(B, H) for _ in range(n_states)]
    else:
        if n_states == 2:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{what}: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}")
            states = list(hx)
        else:
            states = [hx]
        shape = (H,) if unbatched else (B, H)
        for s, nm in zip(states, names):
            _check_state(s, shape, nm, what)
            _check_dtype(s, cell.weight_ih, what)
        if unbatched:
            states = [s.unsqueeze(0) for s in states]
    return x, states, unbatched


def _init_uniform(module, hidden_size, skip=()):
    """torch.nn.LSTM/GRU's initialization: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))."""
    stdv = 1.0 / math.sqrt(hidden_size)
    for name, w in module.named_parameters(recurse=False):
        if not name.startswith(skip):
            nn.init.uniform_(w, -stdv, stdv)


class _LNCellBase(nn.Module):
    _gates = 4

    def __init__(self, input_size, hidden_size, bias=True, layer_norm=True, norm_per_gate=False,
                 eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.input_size = _checks.check_positive_int(input_size, "input_size")
        self.hidden_size = _checks.check_positive_int(hidden_size, "hidden_size")
        self.bias = _check_bool(bias, "bias")
        self.layer_norm = _check_bool(layer_norm, "layer_norm")
        self.norm_per_gate = _check_bool(norm_per_gate, "norm_per_gate")
        _checks.check_eps(eps)
        self.eps = float(eps)
        kw = {"device": device, "dtype": dtype}
        G, H = self._gates * hidden_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(G, H, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if layer_norm:
            self.ln_weight_ih = nn.Parameter(torch.empty(G, **kw))
            self.ln_weight_hh = nn.Parameter(torch.empty(G, **kw))
            if self._gates == 4:
                self.ln_weight_c = nn.Parameter(torch.empty(H, **kw))
                self.ln_bias_c = nn.Parameter(torch.empty(H, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        """Weights and biases as torch.nn.LSTMCell/GRUCell; LN gains 1, LN bias 0."""
        _init_uniform(self, self.hidden_size, skip=("ln_",))
        for name, w in self.named_parameters(recurse=False):
            if name.startswith("ln_weight"):
                nn.init.ones_(w)
            elif name.startswith("ln_bias"):
                nn.init.zeros_(w)

    def _params(self):
        return {k: v for k, v in self._parameters.items() if v is not None}

    @property
    def _chunks(self):
        return self._gates if self.norm_per_gate else 1

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if not self.layer_norm:
            s += ", layer_norm=False"
        if self.norm_per_gate:
            s += ", norm_per_gate=True"
        return s


class LayerNormLSTMCell(_LNCellBase):
    r"""An LSTM cell with layer normalization (Ba, Kiros & Hinton 2016), torch.nn.LSTMCell's API.

    ::

        (i, f, g, o) = LN(W_ih x; g_ih) + b_ih + LN(W_hh h; g_hh) + b_hh
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(LN(c'; g_c, b_c))

    Parameters: torch.nn.LSTMCell's ``weight_ih (4H, I)``, ``weight_hh (4H, H)``, ``bias_ih``,
    ``bias_hh (4H,)``, plus the LN gains ``ln_weight_ih``, ``ln_weight_hh (4H,)`` and the cell
    LN's ``ln_weight_c``, ``ln_bias_c (H,)``. The projections' LNs have no bias (``b_ih``,
    ``b_hh`` play that role). ``layer_norm=False`` is torch.nn.LSTMCell exactly;
    ``norm_per_gate=True`` normalizes each gate's ``H`` features separately rather than all
    ``4H`` jointly (the paper's form).

    ``forward(input, hx=None) -> (h', c')``: input ``(B, I)`` or ``(I,)``, ``hx = (h, c)``
    each ``(B, H)`` or ``(H,)`` (zeros if omitted).
    """

    _gates = 4

    def forward(self, input, hx=None):
        x, (h, c), unbatched = _cell_input(self, input, hx, 2)
        p = self._params()
        gi = _ln_input_term(x, p, self.eps, self._chunks)
        if _fused_applies(p, gi):
            h, _, c = _fused_ln_lstm(gi, [gi.shape[0]], h, c, p, self.eps, self._chunks)
        else:
            h, c = _ln_lstm_step(gi, h, c, p, self.eps, self._chunks)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class LayerNormGRUCell(_LNCellBase):
    r"""A GRU cell with layer normalization on both projections, torch.nn.GRUCell's API.

    ::

        (a_r, a_z, a_n) = LN(W_ih x; g_ih) + b_ih,   (u_r, u_z, u_n) = LN(W_hh h; g_hh) + b_hh
        r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z),  n = tanh(a_n + r * u_n)
        h' = (1 - z) * n + z * h

    Parameters: torch.nn.GRUCell's ``weight_ih (3H, I)``, ``weight_hh (3H, H)``, ``bias_ih``,
    ``bias_hh (3H,)`` and the LN gains ``ln_weight_ih``, ``ln_weight_hh (3H,)``.
    ``layer_norm=False`` is torch.nn.GRUCell exactly. ``forward(input, hx=None) -> h'``.
    """

    _gates = 3

    def forward(self, input, hx=None):
        x, (h,), unbatched = _cell_input(self, input, hx, 1)
        p = self._params()
        gi = _ln_input_term(x, p, self.eps, self._chunks)
        h = _ln_gru_step(gi, h, p, self.eps, self._chunks)
        return h.squeeze(0) if unbatched else h


def _check_max_steps(max_steps):
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps <= 0:
        raise ValueError(
            f"max_steps must be a positive integer (the number of time steps with their own "
            f"statistics; the paper's T_max, the longest training sequence), got max_steps={max_steps!r}")
    return int(max_steps)


def _bn_buffers(module, suffix, H, max_steps, kw):
    for which, F in (("ih", 4 * H), ("hh", 4 * H), ("c", H)):
        module.register_buffer(f"running_mean_{which}{suffix}", torch.zeros(max_steps, F, **kw))
        module.register_buffer(f"running_var_{which}{suffix}", torch.ones(max_steps, F, **kw))
    module.register_buffer(f"num_batches_tracked{suffix}",
                           torch.zeros(max_steps, dtype=torch.long, device=kw["device"]))


class BNLSTMCell(nn.Module):
    r"""One step of the batch-normalized LSTM of Cooijmans et al. 2016 (recurrent batch norm).

    ::

        (i, f, g, o) = BN_t(W_ih x; gamma_ih) + BN_t(W_hh h; gamma_hh) + b_ih + b_hh
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(BN_t(c'; gamma_c, beta_c))

    ``forward(input, hx=None, time_step=0) -> (h', c')``: ``time_step`` selects the running
    statistics slot ``min(time_step, max_steps - 1)``. In training the batch statistics of this
    call normalize, and the slot is updated if ``time_step < max_steps``; in eval the slot
    normalizes. Input ``(B, I)`` (``B >= 2`` in training) or ``(I,)`` (eval only).

    Parameters: torch.nn.LSTMCell's four, ``bn_weight_ih``, ``bn_weight_hh (4H,)`` (gamma, start
    0.1, no beta), ``bn_weight_c``, ``bn_bias_c (H,)`` (start 0.1 and 0). Buffers
    ``running_mean_{ih,hh,c}``, ``running_var_{ih,hh,c}`` of shape ``(max_steps, features)`` and
    ``num_batches_tracked (max_steps,)``. ``momentum=None`` is a cumulative average per step.
    """

    def __init__(self, input_size, hidden_size, bias=True, *, max_steps, momentum=0.1, eps=1e-5,
                 gamma_init=0.1, device=None, dtype=None):
        super().__init__()
        self.input_size = _checks.check_positive_int(input_size, "input_size")
        self.hidden_size = _checks.check_positive_int(hidden_size, "hidden_size")
        self.bias = _check_bool(bias, "bias")
        self.max_steps = _check_max_steps(max_steps)
        _checks.check_momentum(momentum)
        _checks.check_eps(eps)
        self.momentum, self.eps = momentum, float(eps)
        self.gamma_init = _checks.check_real(gamma_init, "gamma_init")
        kw = {"device": device, "dtype": dtype}
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * H, **kw))
            self.bias_hh = nn.Parameter(torch.empty(4 * H, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.bn_weight_ih = nn.Parameter(torch.empty(4 * H, **kw))
        self.bn_weight_hh = nn.Parameter(torch.empty(4 * H, **kw))
        self.bn_weight_c = nn.Parameter(torch.empty(H, **kw))
        self.bn_bias_c = nn.Parameter(torch.empty(H, **kw))
        _bn_buffers(self, "", H, self.max_steps, kw)
        self.reset_parameters()

    def reset_running_stats(self):
        for name, b in self._buffers.items():
            if name.startswith("running_var"):
                b.fill_(1)
            else:
                b.zero_()

    def reset_parameters(self):
        """torch.nn.LSTMCell's uniform init; gammas ``gamma_init`` (0.1), beta_c 0; running stats reset."""
        self.reset_running_stats()
        _init_uniform(self, self.hidden_size, skip=("bn_",))
        for name, w in self.named_parameters(recurse=False):
            if name.startswith("bn_weight"):
                nn.init.constant_(w, self.gamma_init)
            elif name.startswith("bn_bias"):
                nn.init.zeros_(w)

    def forward(self, input, hx=None, time_step=0):
        if isinstance(time_step, bool) or not isinstance(time_step, numbers.Integral) or time_step < 0:
            raise ValueError(f"BNLSTMCell: time_step must be an integer >= 0, got time_step={time_step!r}")
        x, (h, c), unbatched = _cell_input(self, input, hx, 2)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                f"BNLSTMCell in training needs a batch of at least 2 samples for batch statistics, got "
                f"an input of shape {tuple(input.shape)}; use a larger batch or eval mode (running statistics)")
        p = {**{k: v for k, v in self._parameters.items() if v is not None}, **self._buffers}
        bn = _StepBN(p, int(time_step), x.shape[0], self.training, self.momentum, self.eps, self.max_steps)
        h, c = _bn_lstm_step(TF.linear(x, self.weight_ih), h, c, p, bn)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
                + f", max_steps={self.max_steps}, momentum={self.momentum}, eps={self.eps}")


# ----------------------------------------------------------------------------- multi-layer modules

class _RecurrentBase(nn.Module):
    """Layers x directions of one cell type, torch.nn.LSTM/GRU's conventions and parameter names."""

    _gates = 4
    _n_states = 2   # (h, c) for LSTM, h for GRU

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__()
        self.input_size = _checks.check_positive_int(input_size, "input_size")
        self.hidden_size = _checks.check_positive_int(hidden_size, "hidden_size")
        self.num_layers = _checks.check_positive_int(num_layers, "num_layers")
        self.bias = _check_bool(bias, "bias")
        self.batch_first = _check_bool(batch_first, "batch_first")
        self.dropout = _check_dropout(dropout)
        self.bidirectional = _check_bool(bidirectional, "bidirectional")
        if self.dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout={dropout} has no effect with num_layers=1: dropout is applied "
                          f"between layers (to the output of every layer but the last)", stacklevel=3)
        self._kw = {"device": device, "dtype": dtype}
        self.num_directions = 2 if bidirectional else 1
        G, H = self._gates * hidden_size, hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else H * self.num_directions
            for sfx in self._suffixes(layer):
                self.register_parameter(f"weight_ih{sfx}", nn.Parameter(torch.empty(G, in_size, **self._kw)))
                self.register_parameter(f"weight_hh{sfx}", nn.Parameter(torch.empty(G, H, **self._kw)))
                if bias:
                    self.register_parameter(f"bias_ih{sfx}", nn.Parameter(torch.empty(G, **self._kw)))
                    self.register_parameter(f"bias_hh{sfx}", nn.Parameter(torch.empty(G, **self._kw)))
                self._add_norm_state(sfx)

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def _add_norm_state(self, sfx):
        raise NotImplementedError

    def _layer_state(self, sfx):
        """Parameters and buffers of one layer direction, keyed without the suffix."""
        out = {}
        for store in (self._parameters, self._buffers):
            for name, v in store.items():
                if name.endswith(sfx) and v is not None:
                    out[name[: -len(sfx)]] = v
        return out

    # --- input handling -------------------------------------------------------------------
    def _prepare(self, input, lengths):
        """Returns packed rows, batch_sizes, sorted/unsorted indices, and how to restore the output."""
        what = type(self).__name__
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{what}: pass either a PackedSequence or a padded tensor with lengths, not "
                                 f"both (a PackedSequence already carries its lengths)")
            data = input.data
            _check_float_input(data, what)
            if data.dim() != 2 or data.shape[1] != self.input_size:
                raise ValueError(f"{what} was built for input_size={self.input_size} but the PackedSequence's "
                                 f"data has shape {tuple(data.shape)}")

            def restore(out):
                return PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices)

            return data, input.batch_sizes, input.sorted_indices, input.unsorted_indices, restore, False
        _check_float_input(input, what)
        if input.dim() not in (2, 3):
            layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
            raise ValueError(f"{what} expects a 3-D input {layout} or an unbatched 2-D input (L, H_in), "
                             f"got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{what} was built for input_size={self.input_size} but the input of shape "
                             f"{tuple(input.shape)} has {input.shape[-1]} features on its last axis")
        unbatched = input.dim() == 2
        if unbatched:
            if lengths is not None:
                raise ValueError(f"{what}: lengths needs a batched 3-D input, got an unbatched input of shape "
                                 f"{tuple(input.shape)}")
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        T, B = x.shape[0], x.shape[1]
        if T == 0 or B == 0:
            raise ValueError(f"{what} needs at least one time step and one sequence, got an input of shape "
                             f"{tuple(input.shape)}")
        if lengths is None:
            def restore(out):
                y = out.view(T, B, out.shape[-1])
                if unbatched:
                    return y.squeeze(1)
                return y.transpose(0, 1) if self.batch_first else y

            sizes = torch.full((T,), B, dtype=torch.long)
            return x.reshape(T * B, x.shape[-1]), sizes, None, None, restore, unbatched
        lengths = self._check_lengths(lengths, T, B)
        packed = pack_padded_sequence(x, lengths, batch_first=False, enforce_sorted=False)

        def restore(out):
            seq = PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            return pad_packed_sequence(seq, batch_first=self.batch_first, total_length=T)[0]

        return packed.data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices, restore, False

    def _check_lengths(self, lengths, T, B):
        what = type(self).__name__
        if isinstance(lengths, torch.Tensor):
            if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
                raise TypeError(f"{what}: lengths must hold integers, got a tensor of dtype {lengths.dtype}")
            lengths = lengths.detach().to("cpu", torch.long)
        else:
            try:
                vals = list(lengths)
            except TypeError:
                raise TypeError(f"{what}: lengths must be a 1-D sequence or tensor of ints (one per "
                                f"sequence), got {lengths!r}") from None
            bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
            if bad:
                raise TypeError(f"{what}: lengths must hold integers, got {bad[0]!r} of type {type(bad[0]).__name__}")
            lengths = torch.tensor([int(v) for v in vals], dtype=torch.long)
        if lengths.dim() != 1 or lengths.numel() != B:
            raise ValueError(f"{what}: lengths must have one entry per sequence ({B}), got shape "
                             f"{tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"{what}: every length must be in [1, {T}] (the padded input has {T} steps), got "
                             f"lengths={lengths.tolist()}")
        return lengths

    def _prepare_states(self, hx, B, ref, unbatched, sorted_indices):
        what = type(self).__name__
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        if hx is None:
            return [ref.new_zeros(LD, B, H) for _ in range(self._n_states)]
        if self._n_states == 2:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{what}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
            states = list(hx)
        else:
            states = [hx]
        shape = (LD, H) if unbatched else (LD, B, H)
        for s, nm in zip(states, ("h_0", "c_0")):
            _check_state(s, shape, nm, what)
            _check_dtype(s, ref, what)
        if unbatched:
            states = [s.unsqueeze(1) for s in states]
        if sorted_indices is not None:
            states = [s.index_select(1, sorted_indices.to(s.device)) for s in states]
        return states

    def forward(self, input, hx=None, lengths=None):
        """``output, h_n`` (GRU) or ``output, (h_n, c_n)`` (LSTM), as torch.nn.LSTM/GRU.

        ``input``: ``(L, N, H_in)`` (``(N, L, H_in)`` with ``batch_first``), unbatched
        ``(L, H_in)``, or a PackedSequence. ``lengths`` (optional, padded input only): the valid
        length of each sequence; the output is then zero at padded steps and the final states
        are taken at each sequence's last valid step.
        """
        data, batch_sizes, sorted_idx, unsorted_idx, restore, unbatched = self._prepare(input, lengths)
        what = type(self).__name__
        first = getattr(self, "weight_ih_l0")
        _check_dtype(data, first, what)
        B = int(batch_sizes[0])
        states = self._prepare_states(hx, B, data, unbatched, sorted_idx)
        self._check_batch(B)
        sizes = [int(n) for n in batch_sizes]
        flip = _reverse_within_lengths(batch_sizes).to(data.device) if self.bidirectional else None
        finals = [[] for _ in range(self._n_states)]
        x = data
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes(layer)):
                idx = layer * self.num_directions + d
                xd = x if d == 0 else x.index_select(0, flip)
                out, fin = self._run_direction(xd, sizes, [s[idx] for s in states], self._layer_state(sfx))
                outs.append(out if d == 0 else out.index_select(0, flip))
                for k in range(self._n_states):
                    finals[k].append(fin[k])
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = TF.dropout(x, self.dropout, True)
        output = restore(x)
        finals = [torch.stack(f, 0) for f in finals]
        if unsorted_idx is not None:
            finals = [f.index_select(1, unsorted_idx.to(f.device)) for f in finals]
        if unbatched:
            finals = [f.squeeze(1) for f in finals]
        return output, (finals[0] if self._n_states == 1 else tuple(finals))

    def _check_batch(self, B):
        pass

    def _run_direction(self, x, sizes, states, p):
        raise NotImplementedError

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


class _LNRecurrent(_RecurrentBase):
    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, layer_norm=True, norm_per_gate=False, eps=1e-5, device=None, dtype=None):
        self.layer_norm = _check_bool(layer_norm, "layer_norm")
        self.norm_per_gate = _check_bool(norm_per_gate, "norm_per_gate")
        _checks.check_eps(eps)
        self.eps = float(eps)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)
        self.reset_parameters()

    def _add_norm_state(self, sfx):
        if not self.layer_norm:
            return
        G, H = self._gates * self.hidden_size, self.hidden_size
        self.register_parameter(f"ln_weight_ih{sfx}", nn.Parameter(torch.empty(G, **self._kw)))
        self.register_parameter(f"ln_weight_hh{sfx}", nn.Parameter(torch.empty(G, **self._kw)))
        if self._gates == 4:
            self.register_parameter(f"ln_weight_c{sfx}", nn.Parameter(torch.empty(H, **self._kw)))
            self.register_parameter(f"ln_bias_c{sfx}", nn.Parameter(torch.empty(H, **self._kw)))

    def reset_parameters(self):
        """Weights and biases as torch.nn.LSTM/GRU (U(-1/sqrt(H), 1/sqrt(H))); LN gains 1, LN bias 0."""
        _init_uniform(self, self.hidden_size, skip=("ln_",))
        for name, w in self.named_parameters(recurse=False):
            if name.startswith("ln_weight"):
                nn.init.ones_(w)
            elif name.startswith("ln_bias"):
                nn.init.zeros_(w)

    @property
    def _chunks(self):
        return self._gates if self.norm_per_gate else 1

    def extra_repr(self):
        s = super().extra_repr()
        if not self.layer_norm:
            s += ", layer_norm=False"
        if self.norm_per_gate:
            s += ", norm_per_gate=True"
        return s


class LayerNormLSTM(_LNRecurrent):
    r"""Multi-layer LSTM with layer normalization (Ba, Kiros & Hinton 2016); torch.nn.LSTM's API.

    Every layer direction computes, with gate order ``i, f, g, o``::

        (i, f, g, o) = LN(W_ih x_t; g_ih) + b_ih + LN(W_hh h_{t-1}; g_hh) + b_hh
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN(c_t; g_c, b_c))

    ``LayerNormLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, layer_norm=True, norm_per_gate=False, eps=1e-5)``.
    Parameters: torch.nn.LSTM's ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` (same shapes), plus ``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}`` (4H,),
    ``ln_weight_c_l{k}``, ``ln_bias_c_l{k}`` (H,). With ``layer_norm=False`` it has exactly
    torch.nn.LSTM's state_dict and computes torch.nn.LSTM.

    ``forward(input, hx=None, lengths=None) -> output, (h_n, c_n)``; see
    :meth:`_RecurrentBase.forward` and the module docstring for packed / variable-length input.
    """

    _gates, _n_states = 4, 2

    def _run_direction(self, x, sizes, states, p):
        gi = _ln_input_term(x, p, self.eps, self._chunks)      # all steps at once: LN is per row
        if _fused_applies(p, gi):
            out, h_n, c_n = _fused_ln_lstm(gi, sizes, states[0], states[1], p, self.eps, self._chunks)
            return out, [h_n, c_n]

        def step(gi_t, h, c):
            return list(_ln_lstm_step(gi_t, h, c, p, self.eps, self._chunks))

        outs, finals = _scan(step, gi.split(sizes, 0), sizes, states)
        return torch.cat(outs, 0), finals


class LayerNormGRU(_LNRecurrent):
    r"""Multi-layer GRU with layer normalization on both projections; torch.nn.GRU's API.

    Every layer direction computes torch.nn.GRU's recurrence (gate order ``r, z, n``)::

        (a_r, a_z, a_n) = LN(W_ih x_t; g_ih) + b_ih,   (u_r, u_z, u_n) = LN(W_hh h_{t-1}; g_hh) + b_hh
        r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z),  n = tanh(a_n + r * u_n)
        h_t = (1 - z) * n + z * h_{t-1}

    Parameters: torch.nn.GRU's four per layer direction plus ``ln_weight_ih_l{k}``,
    ``ln_weight_hh_l{k}`` (3H,). ``layer_norm=False`` is torch.nn.GRU exactly.
    ``forward(input, hx=None, lengths=None) -> output, h_n``.
    """

    _gates, _n_states = 3, 1

    def _run_direction(self, x, sizes, states, p):
        gi = _ln_input_term(x, p, self.eps, self._chunks)

        def step(gi_t, h):
            return [_ln_gru_step(gi_t, h, p, self.eps, self._chunks)]

        outs, finals = _scan(step, gi.split(sizes, 0), sizes, states)
        return torch.cat(outs, 0), finals


class BNLSTM(_RecurrentBase):
    r"""Multi-layer batch-normalized LSTM (Cooijmans et al. 2016); torch.nn.LSTM's API.

    Every layer direction computes, at step ``t`` with per-step statistics::

        (i, f, g, o) = BN_t(W_ih x_t; gamma_ih) + BN_t(W_hh h_{t-1}; gamma_hh) + b_ih + b_hh
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_t(c_t; gamma_c, beta_c))

    ``BNLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, *, max_steps, momentum=0.1, eps=1e-5, gamma_init=0.1)``.
    ``max_steps`` (required; the paper's ``T_max``, typically the longest training sequence):
    steps ``0 .. max_steps-1`` have their own running statistics, later steps use those of step
    ``max_steps - 1`` at inference. At step ``t`` of a variable-length batch, BN_t's batch
    statistics are over the sequences still active at ``t`` only. See the module docstring for
    the running-statistics rule and the choices the paper leaves open.

    Parameters per layer direction: torch.nn.LSTM's four, ``bn_weight_ih_l{k}``,
    ``bn_weight_hh_l{k}`` (4H,), ``bn_weight_c_l{k}``, ``bn_bias_c_l{k}`` (H,). Buffers:
    ``running_mean_{ih,hh,c}_l{k}``, ``running_var_{ih,hh,c}_l{k}`` of shape
    ``(max_steps, 4H or H)``, ``num_batches_tracked_l{k}`` of shape ``(max_steps,)``
    (``_reverse`` suffix for the reverse direction).
    """

    _gates, _n_states = 4, 2

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, *, max_steps, momentum=0.1, eps=1e-5, gamma_init=0.1,
                 device=None, dtype=None):
        self.max_steps = _check_max_steps(max_steps)
        _checks.check_momentum(momentum)
        _checks.check_eps(eps)
        self.momentum, self.eps = momentum, float(eps)
        self.gamma_init = _checks.check_real(gamma_init, "gamma_init")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)
        self.reset_parameters()

    def _add_norm_state(self, sfx):
        G, H = 4 * self.hidden_size, self.hidden_size
        for name, F in (("bn_weight_ih", G), ("bn_weight_hh", G), ("bn_weight_c", H), ("bn_bias_c", H)):
            self.register_parameter(f"{name}{sfx}", nn.Parameter(torch.empty(F, **self._kw)))
        _bn_buffers(self, sfx, H, self.max_steps, self._kw)

    def reset_running_stats(self):
        for name, b in self._buffers.items():
            if name.startswith("running_var"):
                b.fill_(1)
            else:
                b.zero_()

    def reset_parameters(self):
        """torch.nn.LSTM's uniform init; gammas ``gamma_init`` (0.1), beta_c 0; running stats reset."""
        self.reset_running_stats()
        _init_uniform(self, self.hidden_size, skip=("bn_",))
        for name, w in self.named_parameters(recurse=False):
            if name.startswith("bn_weight"):
                nn.init.constant_(w, self.gamma_init)
            elif name.startswith("bn_bias"):
                nn.init.zeros_(w)

    def _check_batch(self, B):
        if self.training and B < 2:
            raise ValueError(
                f"BNLSTM in training needs at least 2 sequences for batch statistics, got a batch of {B}; "
                f"use a larger batch or eval mode (per-step running statistics)")

    def _run_direction(self, x, sizes, states, p):
        gi = TF.linear(x, p["weight_ih"])                     # BN needs per-step statistics: normalize per step
        t_box = [0]

        def step(gi_t, h, c):
            t = t_box[0]
            t_box[0] += 1
            bn = _StepBN(p, t, gi_t.shape[0], self.training, self.momentum, self.eps, self.max_steps)
            return list(_bn_lstm_step(gi_t, h, c, p, bn))

        outs, finals = _scan(step, gi.split(sizes, 0), sizes, states)
        return torch.cat(outs, 0), finals

    def extra_repr(self):
        return super().extra_repr() + f", max_steps={self.max_steps}, momentum={self.momentum}, eps={self.eps}"

"""Tests of normlab.nn.recurrent: LayerNorm LSTM/GRU and the recurrent batch-normalized LSTM.

The reference below is a plain float64 loop over the equations, one list entry per sequence,
written independently of the module (no packing, no normlab code): at each step it gathers the
sequences still active, so for BN the batch statistics are over those sequences only.
"""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from normlab.nn.recurrent import (BNLSTM, BNLSTMCell, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM,
                                  LayerNormLSTMCell)

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tests run thousands of tiny ops in Python loops; on a loaded 2-core machine torch's
    two OpenMP threads wait on each other at every op (measured: 32-37 s for this file with 2
    threads, 5-9 s with 1). One thread for this module; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- reference

def ref_ln(a, g, b, eps, chunks):
    shape = a.shape
    v = a.reshape(*shape[:-1], chunks, shape[-1] // chunks)
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    y = ((v - mu) / torch.sqrt(var + eps)).reshape(shape) * g
    return y if b is None else y + b


class RefBN:
    """Per-step BN state for the reference: batch stats over the active rows, EMA of running stats."""

    def __init__(self, p, training, momentum, eps, max_steps):
        self.p, self.training, self.momentum, self.eps, self.max_steps = p, training, momentum, eps, max_steps

    def begin_step(self, t, rows):
        self.s = min(t, self.max_steps - 1)
        self.batch = self.training and rows > 1
        self.track = self.batch and t < self.max_steps
        if self.track:
            self.p["num_batches_tracked"][self.s] += 1
            n = int(self.p["num_batches_tracked"][self.s])
            self.f = self.momentum if self.momentum is not None else 1.0 / n

    def __call__(self, a, which, g, b=None):
        rm, rv = self.p["running_mean_" + which], self.p["running_var_" + which]
        if self.batch:
            mu, var = a.mean(0), ((a - a.mean(0)) ** 2).mean(0)
            if self.track:
                M = a.shape[0]
                rm[self.s] = (1 - self.f) * rm[self.s] + self.f * mu
                rv[self.s] = (1 - self.f) * rv[self.s] + self.f * var * M / (M - 1)
        else:
            mu, var = rm[self.s], rv[self.s]
        y = (a - mu) / torch.sqrt(var + self.eps) * g
        return y if b is None else y + b


def ref_direction(kind, seqs, h0, c0, p, eps=1e-5, chunks=1, bn=None):
    """One layer direction over a list of sequences (each (L_i, F)); returns outputs, h, c lists."""
    n = len(seqs)
    h, c = list(h0), list(c0) if c0 is not None else [None] * n
    outs = [[None] * len(s) for s in seqs]
    T = max(len(s) for s in seqs)
    b_ih, b_hh = p.get("bias_ih", 0), p.get("bias_hh", 0)
    for t in range(T):
        act = [i for i in range(n) if len(seqs[i]) > t]
        x = torch.stack([seqs[i][t] for i in act])
        H = torch.stack([h[i] for i in act])
        if kind == "bnlstm":
            bn.begin_step(t, len(act))
            C = torch.stack([c[i] for i in act])
            gates = (bn(x @ p["weight_ih"].T, "ih", p["bn_weight_ih"])
                     + bn(H @ p["weight_hh"].T, "hh", p["bn_weight_hh"]) + b_ih + b_hh)
            i_, f_, g_, o_ = gates.chunk(4, -1)
            C = torch.sigmoid(f_) * C + torch.sigmoid(i_) * torch.tanh(g_)
            H = torch.sigmoid(o_) * torch.tanh(bn(C, "c", p["bn_weight_c"], p["bn_bias_c"]))
        else:
            ai, ah = x @ p["weight_ih"].T, H @ p["weight_hh"].T
            if "ln_weight_ih" in p:
                ai = ref_ln(ai, p["ln_weight_ih"], None, eps, chunks)
                ah = ref_ln(ah, p["ln_weight_hh"], None, eps, chunks)
            ai, ah = ai + b_ih, ah + b_hh
            if kind == "lstm":
                C = torch.stack([c[i] for i in act])
                i_, f_, g_, o_ = (ai + ah).chunk(4, -1)
                C = torch.sigmoid(f_) * C + torch.sigmoid(i_) * torch.tanh(g_)
                Cn = ref_ln(C, p["ln_weight_c"], p["ln_bias_c"], eps, 1) if "ln_weight_c" in p else C
                H = torch.sigmoid(o_) * torch.tanh(Cn)
            else:  # gru, torch's formula
                a_r, a_z, a_n = ai.chunk(3, -1)
                u_r, u_z, u_n = ah.chunk(3, -1)
                r, z = torch.sigmoid(a_r + u_r), torch.sigmoid(a_z + u_z)
                nn_ = torch.tanh(a_n + r * u_n)
                H = (1 - z) * nn_ + z * H
        for k, i in enumerate(act):
            h[i] = H[k]
            outs[i][t] = H[k]
            if kind != "gru":
                c[i] = C[k]
    return [torch.stack(o) for o in outs], h, c


def ref_model(kind, model, seqs, h0=None, c0=None, training=False):
    """The whole multi-layer model on a list of sequences; returns outputs, h_n, c_n, buffers."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    L, D, H, n = model.num_layers, 2 if model.bidirectional else 1, model.hidden_size, len(seqs)
    if h0 is None:
        h0 = torch.zeros(L * D, n, H, dtype=D64)
    if c0 is None and kind != "gru":
        c0 = torch.zeros(L * D, n, H, dtype=D64)
    chunks = (4 if kind == "lstm" else 3) if getattr(model, "norm_per_gate", False) else 1
    x, hn, cn = seqs, [], []
    for layer in range(L):
        outs = []
        for d, sfx in enumerate([f"_l{layer}", f"_l{layer}_reverse"][:D]):
            p = {k[: -len(sfx)]: v for k, v in sd.items() if k.endswith(sfx)}
            bn = RefBN(p, training, model.momentum, model.eps, model.max_steps) if kind == "bnlstm" else None
            xin = x if d == 0 else [s.flip(0) for s in x]
            idx = layer * D + d
            o, h, c = ref_direction(kind, xin, h0[idx], None if c0 is None else c0[idx], p,
                                    eps=model.eps, chunks=chunks, bn=bn)
            outs.append(o if d == 0 else [s.flip(0) for s in o])
            hn.append(torch.stack(h))
            if kind != "gru":
                cn.append(torch.stack(c))
        x = [torch.cat([o[i] for o in outs], -1) for i in range(n)]
    return x, torch.stack(hn), (torch.stack(cn) if cn else None), sd


def randomize(module, scale=0.5, seed=0):
    """Move every parameter (LN/BN gains and biases included) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln_weight" in name or "bn_weight" in name:
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) if "ln" in name
                        else 0.1 + 0.3 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def padded(seqs, batch_first=False, fill=0.0):
    T, B, F = max(len(s) for s in seqs), len(seqs), seqs[0].shape[-1]
    x = torch.full((T, B, F), fill, dtype=D64)
    for i, s in enumerate(seqs):
        x[: len(s), i] = s
    return x.transpose(0, 1).contiguous() if batch_first else x


def make_seqs(lengths, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, F, generator=g, dtype=D64) for n in lengths]


def check_against_ref(out, hn, cn, ref, lengths, batch_first=False):
    ref_out, ref_h, ref_c, _ = ref
    y = out.transpose(0, 1) if batch_first else out
    for i, n in enumerate(lengths):
        torch.testing.assert_close(y[:n, i], ref_out[i], rtol=1e-10, atol=1e-12)
        assert torch.all(y[n:, i] == 0)
    torch.testing.assert_close(hn, ref_h, rtol=1e-10, atol=1e-12)
    if ref_c is not None:
        torch.testing.assert_close(cn, ref_c, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- torch parity, norm off

PARITY = [  # num_layers, bidirectional, batch_first, bias
    (1, False, False, True), (2, False, True, True), (2, True, False, True),
    (3, True, True, False), (1, True, True, True),
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("L,bi,bf,bias", PARITY)
def test_norm_disabled_equals_torch(kind, L, bi, bf, bias):
    torch.manual_seed(1)
    TorchCls, Cls = (torch.nn.LSTM, LayerNormLSTM) if kind == "lstm" else (torch.nn.GRU, LayerNormGRU)
    ref = TorchCls(3, 5, num_layers=L, bias=bias, batch_first=bf, bidirectional=bi).double()
    m = Cls(3, 5, num_layers=L, bias=bias, batch_first=bf, bidirectional=bi, layer_norm=False).double()
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())          # strict: same keys and shapes
    B, T = 4, 6
    x = torch.randn((B, T, 3) if bf else (T, B, 3), dtype=D64)
    h0 = torch.randn(L * (2 if bi else 1), B, 5, dtype=D64)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    for args in [(x,), (x, hx)]:
        y_ref, s_ref = ref(*args)
        y, s = m(*args)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    # variable lengths: PackedSequence in and out, and the padded tensor + lengths form
    lengths = torch.tensor([6, 2, 5, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
    y_ref, s_ref = ref(packed, hx)
    y, s = m(packed, hx)
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(y.data, y_ref.data, rtol=1e-12, atol=1e-12)
    assert torch.equal(y.batch_sizes, y_ref.batch_sizes) and torch.equal(y.unsorted_indices, y_ref.unsorted_indices)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    y2, s2 = m(x, hx, lengths=lengths)
    y_pad = pad_packed_sequence(y_ref, batch_first=bf, total_length=T)[0]
    torch.testing.assert_close(y2, y_pad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s_ref, rtol=1e-12, atol=1e-12)


def test_norm_disabled_unbatched_and_cells_equal_torch():
    torch.manual_seed(2)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    m = LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=False).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, dtype=D64)                     # unbatched (L, H_in)
    h0, c0 = torch.randn(4, 4, dtype=D64), torch.randn(4, 4, dtype=D64)
    (y, (h, c)), (yr, (hr, cr)) = m(x, (h0, c0)), ref(x, (h0, c0))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, hr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, cr, rtol=1e-12, atol=1e-12)
    for TorchCell, Cell in [(torch.nn.LSTMCell, LayerNormLSTMCell), (torch.nn.GRUCell, LayerNormGRUCell)]:
        rc = TorchCell(3, 4).double()
        mc = Cell(3, 4, layer_norm=False).double()
        mc.load_state_dict(rc.state_dict())
        xb, hb = torch.randn(2, 3, dtype=D64), torch.randn(2, 4, dtype=D64)
        hx = (hb, torch.randn_like(hb)) if TorchCell is torch.nn.LSTMCell else hb
        for args in [(xb,), (xb, hx), (xb[0], hx[0] if isinstance(hx, tuple) else hx[0])]:
            if len(args) == 2 and isinstance(hx, tuple) and args[0].dim() == 1:
                args = (xb[0], (hx[0][0], hx[1][0]))
            torch.testing.assert_close(mc(*args), rc(*args), rtol=1e-12, atol=1e-12)


def test_norm_disabled_checkpoint_loads_into_torch():
    m = LayerNormGRU(3, 4, num_layers=2, bidirectional=True, layer_norm=False)
    ref = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(m(x)[0], ref(x)[0])


# ----------------------------------------------------------------------------- LayerNorm vs reference

@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("per_gate", [False, True])
@pytest.mark.parametrize("bf", [False, True])
def test_layer_norm_matches_reference_loop(kind, per_gate, bf):
    Cls = LayerNormLSTM if kind == "lstm" else LayerNormGRU
    m = randomize(Cls(3, 4, num_layers=2, bidirectional=True, batch_first=bf, norm_per_gate=per_gate,
                      bias=not per_gate).double())
    lengths = [5, 2, 4, 1]
    seqs = make_seqs(lengths, 3)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(4, 4, 4, generator=g, dtype=D64)
    c0 = torch.randn(4, 4, 4, generator=g, dtype=D64)
    hx = (h0, c0) if kind == "lstm" else h0
    out, s = m(padded(seqs, bf), hx, lengths=lengths)
    hn, cn = s if kind == "lstm" else (s, None)
    ref = ref_model(kind, m, seqs, h0, c0 if kind == "lstm" else None)
    check_against_ref(out, hn, cn, ref, lengths, bf)


@pytest.mark.parametrize("Cell,kind", [(LayerNormLSTMCell, "lstm"), (LayerNormGRUCell, "gru")])
def test_layer_norm_cells_match_reference(Cell, kind):
    cell = randomize(Cell(3, 5).double(), seed=4)
    x, h, c = (torch.randn(6, k, dtype=D64) for k in (3, 5, 5))
    p = {k: v.detach() for k, v in cell.state_dict().items()}
    o, hr, cr = ref_direction(kind, [row.unsqueeze(0) for row in x], h, c if kind == "lstm" else None, p)
    out = cell(x, (h, c)) if kind == "lstm" else cell(x, h)
    if kind == "lstm":
        torch.testing.assert_close(out[0], torch.stack(hr), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[1], torch.stack(cr), rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(out, torch.stack(hr), rtol=1e-10, atol=1e-12)


def test_layer_norm_is_invariant_to_input_scale():
    """LN(W_ih (a x)) = LN(W_ih x) for a > 0 (up to eps): the LN-LSTM ignores the input's scale."""
    m = LayerNormLSTM(3, 4, eps=1e-14).double()
    x = torch.randn(5, 2, 3, dtype=D64)
    torch.testing.assert_close(m(x)[0], m(7.5 * x)[0], rtol=1e-9, atol=1e-11)
    plain = LayerNormLSTM(3, 4, layer_norm=False).double()
    assert not torch.allclose(plain(x)[0], plain(7.5 * x)[0], atol=1e-3)


# ----------------------------------------------------------------------------- BNLSTM vs reference

@pytest.mark.parametrize("L,bi,momentum", [(1, False, 0.1), (2, True, 0.3), (1, True, None)])
def test_bnlstm_train_and_eval_match_reference(L, bi, momentum):
    m = randomize(BNLSTM(3, 4, num_layers=L, bidirectional=bi, max_steps=4, momentum=momentum).double(), seed=5)
    lengths = [6, 3, 5, 2, 6]           # steps 4, 5 are beyond max_steps; step 5 has 2 active sequences
    ref_buffers = None
    for it in range(2):                  # two training passes: EMA / cumulative average over batches
        seqs = make_seqs(lengths, 3, seed=10 + it)
        g = torch.Generator().manual_seed(20 + it)
        h0 = torch.randn(L * (2 if bi else 1), 5, 4, generator=g, dtype=D64)
        c0 = torch.randn_like(h0)
        ref = ref_model("bnlstm", m, seqs, h0, c0, training=True)
        out, (hn, cn) = m.train()(padded(seqs), (h0, c0), lengths=lengths)
        check_against_ref(out, hn, cn, ref, lengths)
        ref_buffers = ref[3]
        for name, buf in m.named_buffers():
            torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(m.num_batches_tracked_l0, torch.tensor([2, 2, 2, 2]))
    # eval: running statistics per step, steps >= max_steps reuse slot max_steps - 1
    seqs = make_seqs([7, 1, 4], 3, seed=30)
    out, (hn, cn) = m.eval()(padded(seqs), lengths=[7, 1, 4])
    check_against_ref(out, hn, cn, ref_model("bnlstm", m, seqs), [7, 1, 4])


def test_bnlstm_per_step_statistics_by_hand():
    """Slot t of the running statistics of W_ih x is the EMA of the step-t batch moments."""
    m = BNLSTM(2, 3, max_steps=3, momentum=0.25).double()
    x = torch.randn(3, 6, 2, dtype=D64)                  # (T, B, I)
    m(x)
    a = x @ m.weight_ih_l0.detach().T                    # (T, B, 4H)
    torch.testing.assert_close(m.running_mean_ih_l0, 0.25 * a.mean(1))
    torch.testing.assert_close(m.running_var_ih_l0, 0.75 + 0.25 * a.var(1, unbiased=True))
    # step 0: h_0 = 0, so W_hh h_0 is constant: its batch variance is 0
    assert torch.all(m.running_mean_hh_l0[0] == 0) and torch.allclose(m.running_var_hh_l0[0], torch.full((12,), 0.75, dtype=D64))
    assert not torch.allclose(m.running_var_hh_l0[1], torch.full((12,), 0.75, dtype=D64))


def test_bnlstm_steps_beyond_max_steps_do_not_update_running_stats():
    torch.manual_seed(6)
    m_long, m_short = BNLSTM(2, 3, max_steps=3).double(), BNLSTM(2, 3, max_steps=3).double()
    m_short.load_state_dict(m_long.state_dict())
    x = torch.randn(8, 4, 2, dtype=D64)
    y_long, _ = m_long(x)
    y_short, _ = m_short(x[:3])
    torch.testing.assert_close(y_long[:3], y_short)
    for (name, a), b in zip(m_long.named_buffers(), m_short.buffers()):
        assert torch.equal(a, b), name
    # eval on a long sequence: step t >= 3 is normalized with slot 2 (checked by the reference)
    m_long.eval()
    seqs = make_seqs([9, 9], 2, seed=7)
    out, (hn, cn) = m_long(padded(seqs))
    check_against_ref(out, hn, cn, ref_model("bnlstm", m_long, seqs), [9, 9])


def test_bnlstm_eval_uses_running_stats_not_batch():
    m = randomize(BNLSTM(2, 3, max_steps=5).double(), seed=8)
    for _ in range(3):
        m(torch.randn(5, 6, 2, dtype=D64))
    m.eval()
    x = torch.randn(5, 6, 2, dtype=D64)
    y_all, _ = m(x)
    y_one, _ = m(x[:, :1])                               # one sequence alone: same result in eval
    torch.testing.assert_close(y_all[:, :1], y_one, rtol=1e-12, atol=1e-12)
    before = [b.clone() for b in m.buffers()]
    m(x)
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))
    m.train()
    y_tr, _ = m(x)
    assert not torch.allclose(y_tr[:, :1], y_one, atol=1e-6)   # training: batch statistics instead


def test_bnlstm_single_active_sequence_step_uses_running_stats():
    m = randomize(BNLSTM(2, 3, max_steps=6).double(), seed=9)
    seqs = make_seqs([5, 2, 2], 2, seed=11)              # steps 2..4: only one active sequence
    ref = ref_model("bnlstm", m, seqs, training=True)
    out, (hn, cn) = m(padded(seqs), lengths=[5, 2, 2])
    check_against_ref(out, hn, cn, ref, [5, 2, 2])
    assert m.num_batches_tracked_l0.tolist() == [1, 1, 0, 0, 0, 0]
    assert torch.all(m.running_mean_ih_l0[2:] == 0) and torch.all(m.running_var_ih_l0[2:] == 1)


def test_bnlstm_cell_matches_module_and_initial_values():
    torch.manual_seed(12)
    mod = BNLSTM(3, 4, max_steps=3, dtype=D64)
    cell = BNLSTMCell(3, 4, max_steps=3, dtype=D64)
    assert torch.all(cell.bn_weight_ih == 0.1) and torch.all(cell.bn_weight_c == 0.1)
    assert torch.all(cell.bn_bias_c == 0) and cell.running_mean_ih.shape == (3, 16)
    assert cell.running_var_c.shape == (3, 4) and torch.all(cell.running_var_c == 1)
    cell.load_state_dict({k[:-3]: v for k, v in mod.state_dict().items()})
    x = torch.randn(5, 4, 3, dtype=D64)
    for mode in ("train", "eval"):
        getattr(mod, mode)(), getattr(cell, mode)()
        y, (hn, cn) = mod(x)
        h = c = torch.zeros(4, 4, dtype=D64)
        for t in range(5):
            h, c = cell(x[t], (h, c), time_step=t)
            torch.testing.assert_close(h, y[t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, cn[0], rtol=1e-12, atol=1e-12)
        for name, b in cell.named_buffers():
            torch.testing.assert_close(b, getattr(mod, name + "_l0"), msg=name)


# ----------------------------------------------------------------------------- variable lengths

@pytest.mark.parametrize("make", [
    lambda: LayerNormLSTM(3, 4, num_layers=2, bidirectional=True),
    lambda: LayerNormGRU(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    lambda: BNLSTM(3, 4, num_layers=2, bidirectional=True, max_steps=4),
])
def test_padding_values_do_not_matter(make):
    """Outputs, final states, running statistics and gradients ignore what the padding holds."""
    torch.manual_seed(13)
    m1 = make().double()
    m2 = make().double()
    m2.load_state_dict(m1.state_dict())
    lengths = [5, 2, 4, 2]
    seqs = make_seqs(lengths, 3, seed=14)
    x1 = padded(seqs, m1.batch_first, fill=0.0).requires_grad_()
    x2 = padded(seqs, m1.batch_first, fill=float("nan")).requires_grad_()
    y1, s1 = m1(x1, lengths=lengths)
    y2, s2 = m2(x2, lengths=lengths)
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    for (name, a), b in zip(m1.named_buffers(), m2.buffers()):
        assert torch.equal(a, b), name
    (y1.sum() + y1.pow(2).sum()).backward()
    (y2.sum() + y2.pow(2).sum()).backward()
    assert torch.isfinite(x2.grad).all()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)


def test_bnlstm_padded_batch_statistics_come_from_active_sequences_only():
    """Step t's statistics of a padded batch are those of the sequences active at t, computed alone."""
    torch.manual_seed(15)
    m = BNLSTM(2, 3, max_steps=4, momentum=1.0).double()   # momentum 1: running stats = last batch's
    lengths = [4, 4, 2, 2]
    seqs = make_seqs(lengths, 2, seed=16)
    m(padded(seqs), lengths=lengths)
    # steps 2, 3: the moments of W_ih x_t over the two sequences still active, computed directly
    a = torch.stack([seqs[0][2:], seqs[1][2:]], 1) @ m.weight_ih_l0.detach().T   # (2 steps, 2 seqs, 4H)
    torch.testing.assert_close(m.running_mean_ih_l0[2:], a.mean(1))
    torch.testing.assert_close(m.running_var_ih_l0[2:], a.var(1, unbiased=True))
    a0 = torch.stack([s[:2] for s in seqs], 1) @ m.weight_ih_l0.detach().T          # steps 0, 1: all four
    torch.testing.assert_close(m.running_mean_ih_l0[:2], a0.mean(1))


def test_packed_input_equals_lengths_form_and_sorted_order_irrelevant():
    torch.manual_seed(17)
    m = BNLSTM(3, 4, num_layers=2, bidirectional=True, max_steps=5).double()
    m2 = BNLSTM(3, 4, num_layers=2, bidirectional=True, max_steps=5).double()
    m2.load_state_dict(m.state_dict())
    lengths = torch.tensor([3, 5, 1, 4])
    x = torch.randn(5, 4, 3, dtype=D64)
    h0 = torch.randn(4, 4, 4, dtype=D64)
    c0 = torch.randn_like(h0)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    yp, (hp, cp) = m(packed, (h0, c0))
    yl, (hl, cl) = m2(x, (h0, c0), lengths=lengths)
    torch.testing.assert_close(pad_packed_sequence(yp, total_length=5)[0], yl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hp, hl, rtol=1e-12, atol=1e-12)
    # permuting the batch permutes outputs and final states
    perm = torch.tensor([2, 0, 3, 1])
    m3 = BNLSTM(3, 4, num_layers=2, bidirectional=True, max_steps=5).double()
    m3.load_state_dict(m.state_dict())
    m3.reset_running_stats(), m2.reset_running_stats()
    yl, (hl, cl) = m2(x, (h0, c0), lengths=lengths)
    yq, (hq, cq) = m3(x[:, perm], (h0[:, perm], c0[:, perm]), lengths=lengths[perm])
    torch.testing.assert_close(yq, yl[:, perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cq, cl[:, perm], rtol=1e-10, atol=1e-12)


def test_final_state_is_taken_at_each_sequences_last_step():
    m = randomize(LayerNormLSTM(2, 3).double(), seed=18)
    seqs = make_seqs([4, 2], 2, seed=19)
    y, (h, c) = m(padded(seqs), lengths=[4, 2])
    torch.testing.assert_close(h[0, 1], y[1, 1])
    torch.testing.assert_close(h[0, 0], y[3, 0])
    y_alone, (h_alone, _) = m(seqs[1].unsqueeze(1))
    torch.testing.assert_close(h[0, 1], h_alone[0, 0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- gradients

def _gradcheck_module(m, x, extra=(), param_filter=lambda n: True, fast=False, **kw):
    names = [n for n, _ in m.named_parameters() if param_filter(n)]
    params = tuple(dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def f(x, *rest):
        ps = dict(zip(names, rest[: len(names)]))
        hx = rest[len(names):]
        hx = None if not hx else (hx[0] if len(hx) == 1 else tuple(hx))
        out, s = torch.func.functional_call(m, ps, (x, hx), kw, strict=False)
        s = s if isinstance(s, tuple) else (s,)
        return (out,) + s

    assert torch.autograd.gradcheck(f, (x,) + params + tuple(extra), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=fast)


def test_gradcheck_layer_norm_lstm_bidirectional_variable_length():
    m = randomize(LayerNormLSTM(2, 2, bidirectional=True).double(), seed=20)
    x = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=D64, requires_grad=True)
    c0 = torch.randn(2, 2, 2, dtype=D64, requires_grad=True)
    _gradcheck_module(m, x, (h0, c0), lengths=[3, 2])


def test_gradcheck_layer_norm_gru_per_gate():
    m = randomize(LayerNormGRU(2, 2, norm_per_gate=True).double(), seed=21)
    x = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, dtype=D64, requires_grad=True)
    _gradcheck_module(m, x, (h0,))


def test_gradcheck_bnlstm_training():
    m = randomize(BNLSTM(2, 2, max_steps=2).double(), seed=22)
    x = torch.randn(3, 3, 2, dtype=D64, requires_grad=True)
    h0 = torch.randn(1, 3, 2, dtype=D64, requires_grad=True)
    c0 = torch.randn(1, 3, 2, dtype=D64, requires_grad=True)
    _gradcheck_module(m, x, (h0, c0), lengths=[3, 3, 2])


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("make", [
    lambda: LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, norm_per_gate=True),
    lambda: LayerNormGRU(3, 4, num_layers=2),
    lambda: BNLSTM(3, 4, num_layers=2, bidirectional=True, max_steps=3, momentum=None),
])
def test_state_dict_round_trip(make):
    torch.manual_seed(23)
    a = randomize(make().double(), seed=24)
    a(torch.randn(5, 3, 3, dtype=D64))                   # fills BNLSTM's running statistics
    b = make().double()
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    a.eval(), b.eval()
    x = torch.randn(6, 2, 3, dtype=D64)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


def test_parameter_names_shapes_and_init():
    m = LayerNormLSTM(3, 5, num_layers=2, bidirectional=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True).state_dict().items()}
    assert {k: shapes[k] for k in ref} == ref
    assert shapes["ln_weight_ih_l1_reverse"] == (20,) and shapes["ln_bias_c_l0"] == (5,)
    assert torch.all(m.ln_weight_hh_l1 == 1) and torch.all(m.ln_bias_c_l0 == 0)
    assert m.weight_hh_l0.abs().max() <= 1 / math.sqrt(5)
    g = LayerNormGRU(3, 5)
    assert set(g.state_dict()) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                   "ln_weight_ih_l0", "ln_weight_hh_l0"}
    b = BNLSTM(3, 5, max_steps=7, bias=False)
    assert "bias_ih_l0" not in b.state_dict() and b.running_mean_hh_l0.shape == (7, 20)
    assert b.num_batches_tracked_l0.shape == (7,) and torch.all(b.bn_weight_hh_l0 == 0.1)


def test_dropout_between_layers():
    torch.manual_seed(25)
    m = LayerNormLSTM(3, 4, num_layers=2, dropout=1.0).double()
    x1, x2 = torch.randn(4, 2, 3, dtype=D64), torch.randn(4, 2, 3, dtype=D64)
    # p = 1: layer 2 sees zeros in training, so its output does not depend on the input
    torch.testing.assert_close(m(x1)[0], m(x2)[0])
    m.eval()
    assert not torch.allclose(m(x1)[0], m(x2)[0])
    nodrop = LayerNormLSTM(3, 4, num_layers=2).double()
    nodrop.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x1)[0], nodrop.eval()(x1)[0])
    with pytest.warns(UserWarning, match="num_layers=1"):
        LayerNormGRU(3, 4, dropout=0.5)


def test_float32_runs_and_keeps_dtype():
    for m in (LayerNormLSTM(3, 4, bidirectional=True), LayerNormGRU(3, 4), BNLSTM(3, 4, max_steps=3)):
        y, s = m(torch.randn(5, 2, 3), lengths=[5, 3])
        assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("Cls", [LayerNormLSTM, LayerNormGRU, BNLSTM])
def test_learning_sanity(Cls):
    """A few Adam steps on a toy task (the sum of a sequence's first feature) reduce the loss."""
    torch.manual_seed(26)
    kw = {"max_steps": 8} if Cls is BNLSTM else {}
    rnn = Cls(2, 8, **kw)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=0.03)
    x = torch.randn(6, 24, 2)
    lengths = torch.randint(2, 7, (24,))
    mask = (torch.arange(6).unsqueeze(1) < lengths).float()
    target = (x[..., 0] * mask).sum(0, keepdim=True).T / 2.0
    losses = []
    for _ in range(25):
        _, s = rnn(x, lengths=lengths)
        h = s[0] if isinstance(s, tuple) else s
        loss = torch.nn.functional.mse_loss(head(h[-1]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("ctor,exc,match", [
    (lambda: LayerNormLSTM(0, 4), ValueError, "input_size"),
    (lambda: LayerNormLSTM(3, 4.0), ValueError, "hidden_size"),
    (lambda: LayerNormGRU(3, 4, num_layers=0), ValueError, "num_layers"),
    (lambda: LayerNormLSTM(3, 4, dropout=1.5), ValueError, "dropout"),
    (lambda: LayerNormLSTM(3, 4, dropout="0.1"), TypeError, "dropout"),
    (lambda: LayerNormLSTM(3, 4, bidirectional="yes"), TypeError, "bidirectional"),
    (lambda: LayerNormGRU(3, 4, layer_norm=1), TypeError, "layer_norm"),
    (lambda: LayerNormLSTMCell(3, 4, eps=0), ValueError, "eps"),
    (lambda: BNLSTM(3, 4, max_steps=0), ValueError, "max_steps"),
    (lambda: BNLSTM(3, 4, max_steps=2.5), ValueError, "max_steps"),
    (lambda: BNLSTM(3, 4, max_steps=3, momentum=1.5), ValueError, "momentum"),
    (lambda: BNLSTMCell(3, 4, max_steps=3, eps=-1.0), ValueError, "eps"),
    (lambda: BNLSTM(3, 4), TypeError, "max_steps"),
])
def test_bad_constructor_arguments(ctor, exc, match):
    with pytest.raises(exc, match=match):
        ctor()


def test_bad_forward_arguments():
    m = LayerNormLSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    cases = [
        (lambda: m(torch.randn(5, 2, 4)), ValueError, "input_size=3"),
        (lambda: m(torch.randn(5, 2, 3, 1)), ValueError, "3-D input"),
        (lambda: m(torch.randint(0, 3, (5, 2, 3))), TypeError, "floating-point"),
        (lambda: m(x.double()), TypeError, "float64"),
        (lambda: m(x, lengths=[5]), ValueError, "one entry per sequence"),
        (lambda: m(x, lengths=[5, 0]), ValueError, r"\[1, 5\]"),
        (lambda: m(x, lengths=[6, 2]), ValueError, r"\[1, 5\]"),
        (lambda: m(x, lengths=torch.tensor([5.0, 2.0])), TypeError, "integers"),
        (lambda: m(x, lengths=[5, 2.5]), TypeError, "integers"),
        (lambda: m(pack_padded_sequence(x, [5, 2]), lengths=[5, 2]), ValueError, "not both"),
        (lambda: m(x, torch.zeros(2, 2, 4)), TypeError, r"tuple \(h_0, c_0\)"),
        (lambda: m(x, (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))), ValueError, r"h_0 must have shape \(2, 2, 4\)"),
        (lambda: m(torch.randn(5, 3), lengths=[5]), ValueError, "batched"),
        (lambda: m(torch.randn(0, 2, 3)), ValueError, "at least one time step"),
        (lambda: LayerNormGRU(3, 4)(x, torch.zeros(2, 2, 4)), ValueError, r"h_0 must have shape \(1, 2, 4\)"),
        (lambda: LayerNormLSTMCell(3, 4)(torch.randn(2, 5)), ValueError, "input_size=3"),
        (lambda: LayerNormGRUCell(3, 4)(torch.randn(2, 3), torch.zeros(3, 4)), ValueError, r"\(2, 4\)"),
        (lambda: BNLSTMCell(3, 4, max_steps=2)(torch.randn(2, 3), time_step=-1), ValueError, "time_step"),
        (lambda: BNLSTMCell(3, 4, max_steps=2)(torch.randn(1, 3)), ValueError, "at least 2"),
        (lambda: BNLSTM(3, 4, max_steps=2)(torch.randn(5, 1, 3)), ValueError, "at least 2 sequences"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # the same single-sequence batch is fine in eval (running statistics)
    m_bn = BNLSTM(3, 4, max_steps=2).eval()
    assert m_bn(torch.randn(5, 1, 3))[0].shape == (5, 1, 4)


def test_docs_example_runs():
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "recurrent.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/recurrent.md example", "exec"), {})


# ----------------------------------------------------------------------------- the fused LN-LSTM path

from normlab.nn import recurrent as _rec  # noqa: E402


def _run_both_paths(make_model, make_inputs, loss_fn, dtype):
    """Forward + backward on the fused path in ``dtype`` and on the composite torch path (in
    float64 when ``dtype`` is float32: the reference), same weights and inputs."""
    runs = [(True, dtype), (False, D64)]
    results = []
    for fused, dt in runs:
        m = make_model().to(dtype).to(dt)            # the reference starts from the same rounded values
        args, kwargs, leaves = make_inputs(dt)
        old = _rec._FUSED
        _rec._FUSED = fused
        try:
            out = m(*args, **kwargs)
        finally:
            _rec._FUSED = old
        loss_fn(out).backward()
        flat = [out[0].data if isinstance(out[0], torch.nn.utils.rnn.PackedSequence) else out[0]]
        flat += list(out[1]) if isinstance(out[1], tuple) else [out[1]]
        grads = [t.grad for t in leaves] + [p.grad for p in m.parameters()]
        assert all(g is not None for g in grads)
        labels = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0"]
        labels += [f"grad {n}" for n, _ in m.named_parameters()]
        results.append(dict(zip(labels, [t.detach() for t in flat] + grads)))
    return results


def _assert_paths_agree(results, dtype):
    """float64: fused == torch path to 1e-10. float32: against the float64 reference (same
    rounded weights and inputs): every tensor within float32 tolerance, and the mean relative
    error (mean |error| / max |reference|, averaged over all outputs and gradients) below 1e-5.
    Measured: fused 1e-7 to 3e-6 in these cases, the composite path 1e-7 to 3e-6 (and 4e-4 at
    hidden size 1, where LN of one value amplifies its rounding); per tensor the two paths'
    errors differ by chance up to 4x either way (rounding amplified by the recurrence), so the
    bound is absolute rather than relative to the composite path's."""
    if dtype == D64:
        fused, torch_path = results
        for k in fused:
            torch.testing.assert_close(fused[k], torch_path[k], rtol=1e-10, atol=1e-12, msg=k)
        return
    fused, ref = results
    total = 0.0
    for k in fused:
        scale = max(float(ref[k].abs().max()), 1e-3)
        total += float((fused[k].double() - ref[k]).abs().mean()) / scale
        torch.testing.assert_close(fused[k], ref[k].to(dtype), rtol=1e-3, atol=1e-5 * max(scale, 1.0), msg=k)
    assert total / len(fused) <= 1e-5, total / len(fused)


FUSED_CASES = [  # hidden, input, layers, bidirectional, batch_first, norm_per_gate, bias
    (7, 5, 2, True, False, False, True),
    (5, 3, 1, False, True, True, True),
    (3, 4, 3, True, True, False, False),
    (1, 2, 1, False, False, False, True),
]


@pytest.mark.parametrize("dtype", [D64, torch.float32])
@pytest.mark.parametrize("H,I,L,bi,bf,per_gate,bias", FUSED_CASES)
def test_fused_matches_torch_path_padded(dtype, H, I, L, bi, bf, per_gate, bias):
    """Outputs, final states and every gradient (input, h0, c0, all parameters) of the fused
    path equal the composite torch path's, variable lengths, odd sizes, float32 and float64."""
    D = 2 if bi else 1
    lengths = [6, 2, 5, 1, 6]
    B, T = len(lengths), 6

    def make_model():
        return randomize(LayerNormLSTM(I, H, num_layers=L, bidirectional=bi, batch_first=bf,
                                       norm_per_gate=per_gate, bias=bias).double(), seed=40)

    def make_inputs(dtype):
        g = torch.Generator().manual_seed(41)
        x = torch.randn((B, T, I) if bf else (T, B, I), generator=g).to(dtype).requires_grad_()
        h0 = torch.randn(L * D, B, H, generator=g).to(dtype).requires_grad_()
        c0 = torch.randn(L * D, B, H, generator=g).to(dtype).requires_grad_()
        return (x, (h0, c0)), {"lengths": lengths}, (x, h0, c0)

    def loss(out):
        y, (h, c) = out
        return y.sin().sum() + (h * h).sum() + c.cos().sum()

    _assert_paths_agree(_run_both_paths(make_model, make_inputs, loss, dtype), dtype)


@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_fused_matches_torch_path_packed_long_sequence(dtype):
    """A PackedSequence in, sequences up to 40 steps, 2 bidirectional layers, h0/c0 given."""
    lengths = torch.tensor([40, 17, 33, 1, 40, 8, 2])
    T, B, I, H = 40, 7, 6, 9

    def make_model():
        return randomize(LayerNormLSTM(I, H, num_layers=2, bidirectional=True).double(), scale=0.3, seed=42)

    def make_inputs(dtype):
        g = torch.Generator().manual_seed(43)
        x = torch.randn(T, B, I, generator=g).to(dtype).requires_grad_()
        h0 = torch.randn(4, B, H, generator=g).to(dtype).requires_grad_()
        c0 = torch.randn(4, B, H, generator=g).to(dtype).requires_grad_()
        return (pack_padded_sequence(x, lengths, enforce_sorted=False), (h0, c0)), {}, (x, h0, c0)

    def loss(out):
        y, (h, c) = out
        return (y.data * torch.linspace(-1, 1, y.data.shape[-1], dtype=y.data.dtype)).sum() + h.sum() - 2 * c.sum()

    _assert_paths_agree(_run_both_paths(make_model, make_inputs, loss, dtype), dtype)


@pytest.mark.parametrize("dtype", [D64, torch.float32])
@pytest.mark.parametrize("per_gate", [False, True])
def test_fused_cell_matches_torch_path(dtype, per_gate):
    cell = randomize(LayerNormLSTMCell(5, 6, norm_per_gate=per_gate), seed=44).to(dtype)
    g = torch.Generator().manual_seed(45)
    x, h, c = (torch.randn(3, k, generator=g, dtype=D64).to(dtype) for k in (5, 6, 6))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == D64 else dict(rtol=2e-5, atol=2e-6)
    outs = []
    for fused in (True, False):
        _rec._FUSED, old = fused, _rec._FUSED
        try:
            xs, hs, cs = (t.clone().requires_grad_() for t in (x, h, c))
            cell.zero_grad()
            h1, c1 = cell(xs, (hs, cs))
            (h1.sum() * 3 + (c1 * c1).sum()).backward()
            h_u, c_u = cell(x[0], (h[0], c[0]))                # unbatched
        finally:
            _rec._FUSED = old
        outs.append([h1.detach(), c1.detach(), h_u.detach(), c_u.detach(), xs.grad, hs.grad, cs.grad]
                    + [p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)


def _fused_inputs(sizes, H, chunks, bias=True, seed=46):
    """Arguments of ``_FusedLNLSTM.apply``: gi, h0, c0, W_hh, g_hh, b_hh, g_c, b_c, sizes, eps, chunks."""
    g = torch.Generator().manual_seed(seed)
    N, B, G = sum(sizes), sizes[0], 4 * H

    def mk(*shape, scale=1.0, center=0.0):
        return (center + scale * torch.randn(*shape, generator=g, dtype=D64)).requires_grad_()

    return (mk(N, G), mk(B, H), mk(B, H), mk(G, H, scale=0.5), mk(G, scale=0.3, center=1.0),
            mk(G, scale=0.3) if bias else None, mk(H, scale=0.3, center=1.0), mk(H, scale=0.3),
            sizes, 1e-5, chunks)


@pytest.mark.parametrize("chunks,bias", [(1, True), (4, True), (1, False)])
def test_gradcheck_fused_step_function(chunks, bias):
    """gradcheck (float64) of the fused recurrence itself: gi, h0, c0, W_hh and the four LN
    parameters, packed variable-length steps (sizes 3, 3, 2, 1)."""
    args = _fused_inputs([3, 3, 2, 1], 3, chunks, bias)
    assert torch.autograd.gradcheck(lambda *a: _rec._FusedLNLSTM.apply(*a), args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fused_function_matches_composite_step_directly():
    """The fused recurrence vs a loop of the composite step ``_ln_lstm_step`` (float64)."""
    sizes, H = [4, 4, 3, 1, 1], 5
    args = _fused_inputs(sizes, H, 1)
    gi, h0, c0, w, g_hh, b_hh, g_c, b_c = args[:8]
    out, h_n, c_n = _rec._FusedLNLSTM.apply(*args)
    p = {"weight_hh": w, "ln_weight_hh": g_hh, "bias_hh": b_hh, "ln_weight_c": g_c, "ln_bias_c": b_c}
    outs, finals = _rec._scan(lambda gi_t, h, c: list(_rec._ln_lstm_step(gi_t, h, c, p, 1e-5, 1)),
                              gi.split(sizes, 0), sizes, [h0, c0])
    torch.testing.assert_close(out, torch.cat(outs, 0), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_n, finals[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c_n, finals[1], rtol=1e-12, atol=1e-13)


def test_fused_path_is_taken_by_default_and_switch_restores_torch_path(monkeypatch):
    """Default configuration on CPU float32/float64: the numba kernels run and the composite
    step never does; ``_FUSED = False`` and uncovered configurations use the composite step."""
    K = _rec._rnn_kernels()
    assert K is not None
    calls = {"fwd": 0, "bwd": 0, "composite": 0}
    real_f, real_b, real_step = K.lnlstm_forward_step, K.lnlstm_backward_step, _rec._ln_lstm_step

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(K, "lnlstm_forward_step", count("fwd", real_f))
    monkeypatch.setattr(K, "lnlstm_backward_step", count("bwd", real_b))
    monkeypatch.setattr(_rec, "_ln_lstm_step", count("composite", real_step))
    for dtype in (torch.float32, D64):
        m = LayerNormLSTM(3, 4, num_layers=2).to(dtype)
        m(torch.randn(5, 2, 3, dtype=dtype))[0].sum().backward()
        LayerNormLSTMCell(3, 4).to(dtype)(torch.randn(2, 3, dtype=dtype))[0].sum().backward()
    assert calls == {"fwd": 2 * (2 * 5 + 1), "bwd": 2 * (2 * 5 + 1), "composite": 0}
    calls.update(fwd=0, bwd=0)
    LayerNormLSTM(3, 4, layer_norm=False)(torch.randn(5, 2, 3))                 # not covered: torch path
    monkeypatch.setattr(_rec, "_FUSED", False)
    LayerNormLSTM(3, 4)(torch.randn(5, 2, 3))                                   # switched off
    assert calls == {"fwd": 0, "bwd": 0, "composite": 10}


def test_fused_nonlinearities_match_numpy():
    """The kernels' own sigmoid / tanh (vectorizable Cephes-style exp and tanh): float64 within
    3 ulp of NumPy over the whole range, both branches of tanh, signed zeros, inf and NaN;
    float32 (computed in float64 with a shorter polynomial, rounded once) correctly rounded
    but for at most 0.01 ulp."""
    K = _rec._rnn_kernels()
    import numpy as np
    rng = np.random.default_rng(47)
    x = np.concatenate([rng.normal(0, 3, 20000), rng.normal(0, 300, 2000), np.linspace(-700, 700, 20001),
                        np.linspace(-0.7, 0.7, 20001), rng.normal(0, 1e-9, 100),
                        [0.0, -0.0, 0.625, -0.625, np.nextafter(0.625, 0), 1e-300, -1e-300]])
    s, t = np.empty_like(x), np.empty_like(x)
    K.sigmoid_tanh(x, s, t)
    e = np.exp(-np.abs(x))
    s_ref = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    np.testing.assert_allclose(s, s_ref, rtol=6e-16, atol=2.3e-308)   # 0 where the true value is subnormal
    np.testing.assert_allclose(t, np.tanh(x), rtol=6e-16, atol=0)
    assert np.signbit(t[x == 0]).tolist() == np.signbit(x[x == 0]).tolist()
    special = np.array([np.inf, -np.inf, np.nan, -800.0, 800.0])
    for dt in (np.float64, np.float32):
        s, t = np.empty(5, dt), np.empty(5, dt)
        K.sigmoid_tanh(special.astype(dt), s, t)
        assert s[0] == 1 and s[1] == 0 and np.isnan(s[2]) and s[3] == 0 and s[4] == 1
        assert t[0] == 1 and t[1] == -1 and np.isnan(t[2]) and t[3] == -1 and t[4] == 1
    x32 = np.concatenate([rng.normal(0, 3, 200000), np.linspace(-90, 90, 20001)]).astype(np.float32)
    s32, t32 = np.empty_like(x32), np.empty_like(x32)
    K.sigmoid_tanh(x32, s32, t32)
    x64 = x32.astype(np.float64)
    e = np.exp(-np.abs(x64))
    for got, exact in ((s32, np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))), (t32, np.tanh(x64))):
        ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert float(np.max(np.abs(got - exact) / ulp)) <= 0.51


def test_fused_path_is_first_order_only():
    """Double backward through the fused recurrence raises (once_differentiable) rather than
    returning a wrong second derivative; the torch path (``_FUSED = False``) supports it."""
    m = LayerNormLSTM(2, 3).double()
    x = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()

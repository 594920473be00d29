"""Small models of the study, built from normlab.nn modules, and the norm registry.

``NORMS`` maps a short name to a label and a factory ``(channels, length) -> nn.Module`` for a
1-D feature map ``(N, channels, length)``; ``length=None`` means the MLP's ``(N, channels)``.
``brn`` (Batch Renorm) and ``ghost`` (Ghost BN) come from ``normlab.nn`` when it has them;
``available_norms()`` says which are missing and why, never silently.
"""

from __future__ import annotations


import torch
from torch import nn

GHOST_VIRTUAL_BATCH = 16  # Ghost BN's virtual batch: batches <= 16 are plain BN

NORM_LABELS = {
    "none": "no norm",
    "bn": "BatchNorm",
    "brn": "BatchRenorm",
    "ghost": f"GhostBN (virtual batch {GHOST_VIRTUAL_BATCH})",
    "gn": "GroupNorm (4 channels/group)",
    "ln": "LayerNorm",
    "in": "InstanceNorm",
}
ALL_NORMS = tuple(NORM_LABELS)
_OPTIONAL = {"brn": "BatchRenorm1d", "ghost": "GhostBatchNorm1d"}


def available_norms() -> tuple[list[str], dict[str, str]]:
    """(usable norm names, {skipped name: reason})."""
    import normlab.nn as nlnn

    ok, skipped = [], {}
    for name in ALL_NORMS:
        cls = _OPTIONAL.get(name)
        if cls is not None and not hasattr(nlnn, cls):
            skipped[name] = f"normlab.nn.{cls} is not importable in this version of normlab"
        else:
            ok.append(name)
    return ok, skipped


def make_norm(name: str, channels: int, length: int | None, *, brn_warmup_steps: int = 0) -> nn.Module:
    import normlab.nn as nlnn

    if name == "none":
        return nn.Identity()
    if name == "bn":
        return nlnn.BatchNorm1d(channels)
    if name == "brn":
        return nlnn.BatchRenorm1d(channels, warmup_steps=brn_warmup_steps)
    if name == "ghost":
        return nlnn.GhostBatchNorm1d(channels, virtual_batch_size=GHOST_VIRTUAL_BATCH)
    if name == "gn":
        return nlnn.GroupNorm(max(1, channels // 4), channels)
    if name == "ln":
        return nlnn.LayerNorm([channels] if length is None else [channels, length])
    if name == "in":
        if length is None:
            raise ValueError("InstanceNorm needs a spatial axis: use the 'cnn' model, not 'mlp'")
        return nlnn.InstanceNorm1d(channels, affine=True)
    raise ValueError(f"unknown norm {name!r}; choose from {', '.join(ALL_NORMS)}")


class MLP(nn.Module):
    """flatten -> [Linear -> norm -> ReLU] x depth -> Linear."""

    def __init__(self, in_features, num_classes, norm, width=128, depth=2, **norm_kw):
        super().__init__()
        layers, d = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=norm == "none"), make_norm(norm, width, None, **norm_kw),
                       nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNN1d(nn.Module):
    """[Conv1d(k=5) -> norm -> ReLU] x 3 (channels 16, 32, 32; strides 1, 2, 2) -> flatten -> Linear."""

    def __init__(self, length, num_classes, norm, channels=(16, 32, 32), **norm_kw):
        super().__init__()
        layers, c, L = [], 1, length
        for i, out in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(c, out, 5, stride=stride, padding=2, bias=norm == "none")]
            L = (L + 2 * 2 - 5) // stride + 1
            layers += [make_norm(norm, out, L, **norm_kw), nn.ReLU()]
            c = out
        layers += [nn.Flatten(), nn.Linear(c * L, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class RNN(nn.Module):
    """The signal read as a sequence of ``length / STEP`` steps of ``STEP`` consecutive values ->
    one recurrent layer (hidden 64) -> its last hidden state -> Linear.

    ``cell`` "lstm" or "gru"; ``norm`` "none" (``LayerNormLSTM/GRU(layer_norm=False)``, which is
    torch.nn.LSTM/GRU), "ln" (LayerNorm LSTM/GRU, Ba et al. 2016) or "bn" (recurrent batch norm,
    ``BNLSTM`` with per-step statistics for every step, Cooijmans et al. 2016; LSTM only).
    """

    HIDDEN = 64
    STEP = 4

    def __init__(self, length, num_classes, norm, cell="lstm"):
        super().__init__()
        import normlab.nn as nlnn

        if norm not in RNN_NORMS:
            raise ValueError(f"norm {norm!r} has no recurrent form; choose from {', '.join(RNN_NORMS)}")
        if length % self.STEP:
            raise ValueError(f"the RNN reads {self.STEP} values per step; the signal length {length} "
                             f"is not a multiple of {self.STEP}")
        steps = length // self.STEP
        if norm == "bn":
            if cell != "lstm":
                raise ValueError("recurrent batch norm (norm 'bn') exists for the LSTM only; use --model lstm")
            self.rnn = nlnn.BNLSTM(self.STEP, self.HIDDEN, batch_first=True, max_steps=steps)
        else:
            cls = nlnn.LayerNormLSTM if cell == "lstm" else nlnn.LayerNormGRU
            self.rnn = cls(self.STEP, self.HIDDEN, batch_first=True, layer_norm=norm == "ln")
        self.head = nn.Linear(self.HIDDEN, num_classes)

    def forward(self, x):                     # x: (N, 1, L) -> (N, L / STEP, STEP)
        _, state = self.rnn(x.reshape(x.shape[0], -1, self.STEP))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


RNN_NORMS = ("none", "ln", "bn")
MODELS = ("mlp", "cnn", "lstm", "gru")


def build_model(model: str, length: int, num_classes: int, norm: str, *, init_scale: float = 1.0,
                brn_warmup_steps: int = 0) -> nn.Module:
    """The model, its weights drawn by torch's default init and then multiplied by ``init_scale``."""
    kw = {"brn_warmup_steps": brn_warmup_steps} if norm == "brn" else {}
    if model == "mlp":
        m = MLP(length, num_classes, norm, **kw)
    elif model == "cnn":
        m = CNN1d(length, num_classes, norm, **kw)
    elif model in ("lstm", "gru"):
        m = RNN(length, num_classes, norm, cell=model)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if init_scale != 1.0:
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Linear, nn.Conv1d)):
                    mod.weight.mul_(init_scale)
    return m


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["ALL_NORMS", "NORM_LABELS", "MODELS", "available_norms", "make_norm", "build_model",
           "MLP", "CNN1d", "RNN", "RNN_NORMS", "count_parameters"]

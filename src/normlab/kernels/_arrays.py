"""Arrays in, arrays out: the conversions every backend shares.

* NumPy arrays are used as they are when they are C-contiguous.
* CPU torch tensors become NumPy views of the same memory (``t.detach().numpy()``: no copy,
  autograd history dropped); results come back as torch tensors wrapping the result arrays
  (``torch.from_numpy``: no copy). A tensor on another device raises ``ValueError``.
* Non-contiguous input is made contiguous in the layout it is nearest: an ``(N, C, *spatial)``
  array whose memory is channels-last (``np.moveaxis(x, 1, -1)`` is contiguous: e.g. a torch
  tensor in ``torch.channels_last`` format) is processed as channels-last without a copy and
  its outputs come back in the same memory layout, and the other way round; anything else is
  copied with ``np.ascontiguousarray`` in the layout the caller declared. Never a wrong answer.
"""

from __future__ import annotations

import sys

import numpy as np

#: dtypes the fused CPU kernels run natively
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _torch():
    return sys.modules.get("torch")


_TENSOR = []      # [torch.Tensor] once torch is imported (normlab never imports it here)


def is_tensor(a) -> bool:
    if type(a) is np.ndarray:
        return False
    if not _TENSOR:
        torch = _torch()
        if torch is None:
            return False
        _TENSOR.append(torch.Tensor)
    return isinstance(a, _TENSOR[0])


def to_numpy(a, name: str):
    """``a`` as a NumPy array sharing its memory (None stays None)."""
    if a is None or type(a) is np.ndarray:
        return a
    if not is_tensor(a):
        return np.asarray(a)
    if not a.is_cpu:
        raise ValueError(
            f"{name} is a tensor on device {a.device}; the CPU kernels need CPU memory: "
            f"move it with .cpu(), or use get_backend(device={a.device.type!r})")
    if a.requires_grad:
        a = a.detach()
    try:
        return a.numpy()
    except RuntimeError:                 # a conjugate or negative view: materialize it
        return a.resolve_conj().resolve_neg().numpy()
    except TypeError:
        raise TypeError(
            f"{name} has dtype {a.dtype}, which has no NumPy equivalent; the CPU kernels "
            f"support float32 and float64: cast with .float(), or use the torch backend "
            f"(normlab.nn) for half precision") from None


def from_numpy(a, as_tensor: bool):
    """Results back to the caller's array type (torch.from_numpy shares memory)."""
    if a is None or not as_tensor:
        return a
    return sys.modules["torch"].from_numpy(a)


def check_kernel_dtype(x, backend: str) -> np.dtype:
    dt = x.dtype
    if dt not in KERNEL_DTYPES:
        raise TypeError(
            f"the {backend} backend supports float32 and float64 input, got dtype {dt}; cast the "
            f"input with x.astype(np.float32) (or .float() for a tensor), or use "
            f"get_backend('numpy') (the float64 reference, any float dtype) or the torch "
            f"backend (normlab.nn) for {dt}")
    return dt


def check_float_dtype(x, backend: str) -> np.dtype:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"the {backend} backend needs floating-point input, got dtype {x.dtype}; cast it with "
            f"x.astype(np.float32) or x.astype(np.float64)")
    return x.dtype


def layout(x, channels_last: bool):
    """``(xp, phys_cl, swapped)``: x as a C-contiguous array in its physical layout.

    ``phys_cl`` says whether ``xp`` is ``(N, *spatial, C)``; ``swapped`` whether that differs
    from the declared layout (then results are moved back with ``restore``).
    """
    if x.ndim < 3:
        # (N, C): both layouts are the same memory
        return np.ascontiguousarray(x), False, False
    if x.flags.c_contiguous:
        return x, channels_last, False
    alt = np.moveaxis(x, 1, -1) if not channels_last else np.moveaxis(x, -1, 1)
    if alt.flags.c_contiguous:
        return alt, not channels_last, True
    return np.ascontiguousarray(x), channels_last, False


def same_layout(a, phys_cl: bool, declared_cl: bool, swapped: bool):
    """Put ``a`` (e.g. dy) in the physical layout chosen for x, C-contiguous."""
    if a.ndim >= 3 and swapped:
        a = np.moveaxis(a, 1, -1) if not declared_cl else np.moveaxis(a, -1, 1)
    return np.ascontiguousarray(a)


def restore(a, declared_cl: bool, swapped: bool):
    """Inverse of ``layout``/``same_layout``: a view in the caller's logical layout."""
    if not swapped:
        return a
    return np.moveaxis(a, -1, 1) if not declared_cl else np.moveaxis(a, 1, -1)

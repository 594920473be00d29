r"""normlab.kernels: fast implementations of one contract, and the registry that picks one.

The contract (every backend, same names and signatures; see ``numba_cpu`` for the details)::

    batch_norm_forward(x, weight, bias, eps, *, channels_last=False, mean=None, var=None)
        -> (y, mean, var, rstd)
    batch_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                        need_weight_grad=None, need_bias_grad=None) -> (dx, dweight, dbias)
    layer_norm_forward(x, normalized_shape, weight, bias, eps) -> (y, mean, rstd)
    layer_norm_backward(dy, x, normalized_shape, weight, mean, rstd) -> (dx, dweight, dbias)
    rms_norm_forward(x, normalized_shape, weight, eps) -> (y, rstd)
    rms_norm_backward(dy, x, normalized_shape, weight, rstd) -> (dx, dweight)
    group_norm_forward(x, num_groups, weight, bias, eps, *, channels_last=False) -> (y, mean, rstd)
    group_norm_backward(dy, x, num_groups, weight, mean, rstd, *, channels_last=False)
        -> (dx, dweight, dbias)
    instance_norm_forward(x, weight, bias, eps, *, channels_last=False) -> (y, mean, var, rstd)
    instance_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False)
        -> (dx, dweight, dbias)

Backends:

=========  =======  ==================================  ===================================
name       device   dtypes                              what
=========  =======  ==================================  ===================================
numba      cpu      float32, float64                    fused numba kernels (default on CPU)
triton     cuda     float16, bfloat16, float32,         Triton kernels (default on CUDA);
                    float64                             CPU tensors under TRITON_INTERPRET=1
numpy      any      any float (computes in float64)     the float64 reference; the fallback
=========  =======  ==================================  ===================================

A backend module may define ``unavailable(device) -> str | None``: why it cannot run on that
device type now (triton: no CUDA; on CPU, not built for the interpreter), checked after loading.

Resolution in ``get_backend(name=None, *, device="cpu", dtype=None)``:

1. the ``name`` argument, else
2. the ``NORMLAB_BACKEND`` environment variable (read at each call), else
3. the device's default (``numba`` on CPU, ``triton`` on CUDA), else
4. the fallback ``numpy``.

A choice made explicitly (1 or 2) that cannot run (unknown name, numba not importable,
unsupported device or dtype) raises ``ValueError`` naming the choice and the valid options;
an automatic choice (3) that cannot run falls back to 4 silently (``backend.name`` says which
one was picked, ``available_backends()`` says why).

Memory: the numba backend carves its large outputs (1 MiB and more) from an output pool that
reuses the memory of earlier outputs nothing refers to any more (see ``_pool``): at most
``$NORMLAB_OUTPUT_POOL_MB`` MiB (default 1024; 0 turns it off); ``release_output_pool()``
frees the idle part now.

Example:
    >>> import numpy as np
    >>> from normlab.kernels import get_backend
    >>> be = get_backend("numpy")
    >>> y, mean, rstd = be.layer_norm_forward(np.arange(6.0).reshape(2, 3), (3,), None, None, 1e-5)
    >>> y.shape, be.name
    ((2, 3), 'numpy')
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

__all__ = ["get_backend", "available_backends", "register_backend", "Backend", "FUNCTIONS",
           "ENV_VAR", "FALLBACK", "release_output_pool"]

#: the functions every backend provides
FUNCTIONS = (
    "batch_norm_forward", "batch_norm_backward",
    "layer_norm_forward", "layer_norm_backward",
    "rms_norm_forward", "rms_norm_backward",
    "group_norm_forward", "group_norm_backward",
    "instance_norm_forward", "instance_norm_backward",
)
ENV_VAR = "NORMLAB_BACKEND"
FALLBACK = "numpy"

_FLOATS = tuple(np.dtype(t).name for t in (np.float16, np.float32, np.float64, np.longdouble))


@dataclass(frozen=True)
class _Entry:
    name: str
    loader: Callable[[], object]          # returns an object (module) with FUNCTIONS
    devices: tuple                        # device types, or ("*",) for any
    dtypes: tuple                         # dtype names
    description: str = ""


class Backend:
    """One resolved backend: the contract's functions plus ``name``, ``device``, ``dtypes``."""

    def __init__(self, entry: _Entry, impl, device: str):
        self.name = entry.name
        self.device = device
        self.dtypes = entry.dtypes
        self.description = entry.description
        self.impl = impl

    def supports(self, dtype) -> bool:
        return _dtype_name(dtype) in self.dtypes

    def __repr__(self):
        return f"Backend({self.name!r}, device={self.device!r}, dtypes={self.dtypes})"


def _contract_property(name: str) -> property:
    # the implementation's function, looked up at each access: a Backend is built once per
    # backend and device, and a patched implementation must still be seen. A property rather
    # than ``__getattr__``, which runs only after the normal lookup has failed: 0.9 us per
    # access against 0.1 us, on calls whose kernels take a few us (LayerNorm 1x4096)
    return property(lambda self: getattr(self.impl, name), doc=f"The backend's ``{name}``.")


for _name in FUNCTIONS:
    setattr(Backend, _name, _contract_property(_name))
del _name


_REGISTRY: dict = {}
_DEVICE_DEFAULTS = {"cpu": "numba"}
_LOADED: dict = {}          # name -> impl, or the exception its loader raised
_HOOKED: list = []          # the loaded impls with an ``availability_state`` hook
_RESOLVED: dict = {}        # (name, device) -> Backend, built once (cleared by register_backend)
#: get_backend's answers per (name, $NORMLAB_BACKEND, device, dtype, _state()) as passed, for
#: backends whose availability cannot change (no ``unavailable`` hook) or says what it depends
#: on (an ``availability_state()`` hook, part of the key); cleared by register_backend
_CHOSEN: dict = {}


def _rehook() -> None:
    """List the loaded impls that have an ``availability_state`` hook (after a load or reset)."""
    _HOOKED[:] = [i for i in _LOADED.values() if hasattr(i, "availability_state")]


def _resolved(name: str, dev: str) -> Backend:
    impl = _LOADED[name]
    be = _RESOLVED.get((name, dev))
    if be is None or be.impl is not impl:          # built anew when the backend was reloaded
        be = _RESOLVED[(name, dev)] = Backend(_REGISTRY[name], impl, dev)
    return be


def register_backend(name: str, loader: Callable[[], object], *, devices=("cpu",), dtypes=("float32", "float64"),
                     default_for=(), description: str = "") -> None:
    """Add (or replace) a backend. ``loader()`` imports and returns the implementation lazily."""
    _REGISTRY[name] = _Entry(name, loader, tuple(devices), tuple(dtypes), description)
    _LOADED.pop(name, None)
    _rehook()
    _RESOLVED.clear()
    _CHOSEN.clear()
    for dev in default_for:
        _DEVICE_DEFAULTS[dev] = name


def release_output_pool() -> int:
    """Free the idle buffers of the numba backend's output pool now; returns the bytes freed.

    The pool keeps the memory of large outputs once they are no longer referenced, to reuse it
    for the next ones (``$NORMLAB_OUTPUT_POOL_MB``, default 1024 MiB; 0 turns it off).
    """
    from . import _pool

    return _pool.release()


def _module(path: str):
    return lambda: importlib.import_module(path, __name__)


register_backend("numba", _module(".numba_cpu"), devices=("cpu",), dtypes=("float32", "float64"),
                 default_for=("cpu",), description="fused numba CPU kernels (parallel, float64 accumulation)")
register_backend("triton", _module(".triton_gpu"), devices=("cuda", "cpu"),
                 dtypes=("float16", "bfloat16", "float32", "float64"), default_for=("cuda",),
                 description="Triton GPU kernels (float32 accumulation; CPU tensors only under "
                             "TRITON_INTERPRET=1)")
register_backend("numpy", _module(".numpy_ref"), devices=("*",), dtypes=_FLOATS,
                 description="the float64 NumPy reference (always available, slow)")


def _device_type(device) -> str:
    return str(device).split(":")[0].strip().lower() if device is not None else "cpu"


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> Optional[str]:
    """``"float32"`` for torch.float32, np.float32, "float32"... (memoized: on every call path)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):       # TypeError: an unhashable dtype-like
        pass
    name = _dtype_name_uncached(dtype)
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


def _dtype_name_uncached(dtype) -> Optional[str]:
    if dtype is None:
        return None
    s = str(dtype)
    if s.startswith("torch."):                # torch.float32 -> "float32"
        s = s[len("torch."):]
        dtype = s
    try:
        return np.dtype(dtype).name
    except TypeError:
        return s


def _load(entry: _Entry):
    if entry.name not in _LOADED:
        try:
            _LOADED[entry.name] = entry.loader()
        except Exception as e:  # ImportError, or numba failing to initialise
            _LOADED[entry.name] = e
        _rehook()
    return _LOADED[entry.name]


def _problem(name: str, device: str, dtype: Optional[str]) -> Optional[str]:
    """Why backend ``name`` cannot run here, or None when it can."""
    entry = _REGISTRY.get(name)
    if entry is None:
        return "no backend of that name"
    if "*" not in entry.devices and device not in entry.devices:
        return f"it runs on {', '.join(entry.devices)}, not on {device!r}"
    if dtype is not None and dtype not in entry.dtypes:
        return f"it supports {', '.join(entry.dtypes)}, not {dtype}"
    impl = _load(entry)
    if isinstance(impl, Exception):
        return f"it failed to load: {type(impl).__name__}: {impl}"
    check = getattr(impl, "unavailable", None)
    if check is not None:
        return check(device)
    return None


def _valid(device: str, dtype: Optional[str]) -> list:
    return [n for n in _REGISTRY if _problem(n, device, dtype) is None]


def get_backend(name: Optional[str] = None, *, device="cpu", dtype=None) -> Backend:
    """The backend to use: ``name``, else ``$NORMLAB_BACKEND``, else the device default, else numpy.

    ``dtype`` (optional) is the input dtype the caller will pass; a backend that cannot take
    it is treated as unable to run.
    """
    env = os.environ.get(ENV_VAR, "") if name is None else None
    try:
        return _CHOSEN[(name, env, device, dtype, _state())]
    except (KeyError, TypeError):           # TypeError: an unhashable device or dtype
        pass
    be = _choose(name, env, _device_type(device), _dtype_name(dtype))
    if (getattr(be.impl, "unavailable", None) is None
            or getattr(be.impl, "availability_state", None) is not None):
        try:
            _CHOSEN[(name, env, device, dtype, _state())] = be    # (loading may add a hook)
        except TypeError:
            pass
    return be


def _state() -> tuple:
    """What the loaded backends say their availability depends on now (their optional
    ``availability_state()`` hooks, e.g. an environment variable read at each call)."""
    return tuple(impl.availability_state() for impl in _HOOKED) if _HOOKED else ()


def _choose(name: Optional[str], env: Optional[str], dev: str, dt: Optional[str]) -> Backend:
    source = "the name argument"
    if name is None:
        env = env.strip()
        if env:
            name, source = env, f"the {ENV_VAR} environment variable"
    if name is not None:
        name = str(name).strip().lower()
        why = _problem(name, dev, dt)
        if why is not None:
            valid = _valid(dev, dt)
            raise ValueError(
                f"backend {name!r} (chosen by {source}) cannot run on device {dev!r}"
                + (f" with dtype {dt}" if dt else "") + f": {why}; valid choices here: "
                + ", ".join(repr(v) for v in valid)
                + f" (registered: {', '.join(repr(n) for n in _REGISTRY)})")
        return _resolved(name, dev)
    default = _DEVICE_DEFAULTS.get(dev)
    for candidate in ((default,) if default else ()) + (FALLBACK,):
        if _problem(candidate, dev, dt) is None:
            return _resolved(candidate, dev)
    raise ValueError(f"no backend can run on device {dev!r} with dtype {dt}: "
                     f"{FALLBACK!r} reports: {_problem(FALLBACK, dev, dt)}")


def available_backends(device=None) -> dict:
    """``{name: info}`` for every registered backend, for ``normlab info``.

    ``info`` has ``available`` (bool, on ``device`` when given), ``reason`` (why not, or ""),
    ``devices``, ``dtypes``, ``default_for`` (device types) and ``description``.
    """
    out = {}
    for name, entry in _REGISTRY.items():
        why = _problem(name, _device_type(device), None) if device is not None else None
        if device is None:
            impl = _load(entry)
            why = f"it failed to load: {type(impl).__name__}: {impl}" if isinstance(impl, Exception) else None
        out[name] = dict(available=why is None, reason=why or "", devices=entry.devices,
                         dtypes=entry.dtypes,
                         default_for=tuple(d for d, n in _DEVICE_DEFAULTS.items() if n == name),
                         description=entry.description)
    return out

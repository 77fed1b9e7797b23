"""xattn: scaled dot-product (cross-)attention on any GPU wgpu reaches (Vulkan, Metal, DX12, GL).

The calls read like PyTorch's::

    import numpy as np, xattn
    q = np.random.randn(2, 8, 64, 40).astype(np.float32)    # [batch, heads, L, E]
    k = np.random.randn(2, 8, 77, 40).astype(np.float32)    # [batch, heads, S, E]
    v = np.random.randn(2, 8, 77, 40).astype(np.float32)
    o = xattn.scaled_dot_product_attention(q, k, v)          # [2, 8, 64, 40], float32

- :func:`scaled_dot_product_attention` is ``torch.nn.functional.scaled_dot_product_attention``
  (same arguments, same semantics; differences listed in its docstring).
- :func:`attention` is the richer call: layouts, bottom-right causal, lengths, windows, softcap,
  key segments, additive bias, LSE, weights and row statistics.
- :class:`MultiheadAttention` is xattn's layer with ``nn.MultiheadAttention``'s forward, from a
  torch, Hugging Face or diffusers module (:meth:`~MultiheadAttention.from_torch`) or a
  safetensors file (:meth:`~MultiheadAttention.from_safetensors`).
- :func:`adapters` lists what wgpu sees; :class:`Engine` picks one and keeps tensors on the
  device between calls (:meth:`Engine.upload`), so a decoding loop uploads K and V once.

Inputs are NumPy arrays (float32, float16) or CPU torch tensors (float32, float16, bfloat16);
results come back as the same kind and dtype. A C-contiguous input in the library's layout is
uploaded straight from its buffer (a torch tensor through a NumPy view of its memory: no host
copy); strided ones, and ``[B, H, S, d]`` inputs (transposed on the host in this version), are
copied once first. Bad shapes, dtypes and arguments raise
``ValueError``; device failures raise :class:`DeviceError` (a ``RuntimeError``).
"""

from __future__ import annotations

import contextlib as _contextlib
import functools as _functools
import random as _random
import sys as _sys
import threading as _threading
from collections import namedtuple as _namedtuple

import numpy as _np

from . import _xattn
from ._xattn import DeviceError

__all__ = [
    "AttentionResult",
    "DeviceError",
    "Engine",
    "Heatmap",
    "MultiheadAttention",
    "Tensor",
    "adapters",
    "attention",
    "default_engine",
    "heatmap",
    "route_sdpa",
    "scaled_dot_product_attention",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("xattn")
except Exception:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0+unknown"

_LAYOUTS = ("bhsd", "bshd")
_ALIGNMENTS = ("top-left", "bottom-right")

AttentionResult = _namedtuple(
    "AttentionResult", ["out", "lse", "weights", "entropy", "focus", "coverage"]
)
AttentionResult.__doc__ = """What :func:`attention` returns when more than O is asked for.

- ``out``: O, in the call's layout and the inputs' dtype and kind;
- ``lse``: ``[B, H, M]`` float32, natural log of Σ_j exp(logit_j) per row (−inf for a row that
  sees no key), or None;
- ``weights``: P ``[B, H, M, N]`` float32 (after dropout, as PyTorch's), or None;
- ``entropy``, ``focus`` ``[B, H, M]`` and ``coverage`` ``[B, H, N]`` float32 (of P before
  dropout), or None.
"""


def adapters():
    """Every adapter wgpu can see, as ``xattn info`` lists them: a list of dicts with ``index``,
    ``name``, ``backend``, ``device_type``, ``driver``, ``driver_info``, ``vendor``, ``device``.
    ``WGPU_BACKEND`` (vulkan, gl, metal, dx12) restricts the backends searched."""
    return _xattn.adapters()


# --- host arrays and torch tensors -------------------------------------------------------------


def _torch():
    return _sys.modules.get("torch")


def _is_torch(x):
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _check_grad(x, name):
    torch = _torch()
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{name} requires grad: xattn returns gradients for q, k and v only (not for "
            f"{name} yet); detach it or call under torch.no_grad()"
        )


def _host(x, name):
    """(array, dtype name, from torch): a NumPy float32/float16 array, or uint16 bfloat16 bits."""
    if _is_torch(x):
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(
                f"{name} is on {x.device}: xattn takes CPU torch tensors (move it with .cpu())"
            )
        _check_grad(x, name)
        x = x.detach()
        if x.dtype == torch.bfloat16:
            bits = x.contiguous().view(torch.int16).numpy().view(_np.uint16)
            return bits, "bfloat16", True
        if x.dtype in (torch.float32, torch.float16):
            return x.numpy(), str(x.dtype).replace("torch.", ""), True
        raise ValueError(
            f"{name} has dtype {x.dtype}: xattn computes float32, float16 and bfloat16 "
            "(cast with .float())"
        )
    if isinstance(x, _np.ndarray):
        if x.dtype in (_np.float32, _np.float16):
            return x, x.dtype.name, False
        raise ValueError(
            f"{name} has dtype {x.dtype}: xattn computes float32 and float16 from NumPy "
            "(and bfloat16 from torch); cast with .astype(np.float32)"
        )
    raise TypeError(
        f"{name} must be a numpy.ndarray, a CPU torch.Tensor or an xattn.Tensor; "
        f"got {type(x).__name__}"
    )


def _to_library(a, layout):
    """A 4-D array in `layout` as the library's C-contiguous [B, S, H, d]."""
    if layout == "bhsd":
        a = a.transpose(0, 2, 1, 3)
    return _np.ascontiguousarray(a)


def _from_library(a, layout):
    if layout == "bhsd":
        return _np.ascontiguousarray(a.transpose(0, 2, 1, 3))
    return a


def _wrap(a, dtype, torch_out):
    """A result array as the caller's kind: torch (bfloat16 restored) or NumPy (bfloat16 widened
    to float32 exactly, NumPy having no bfloat16)."""
    if torch_out:
        torch = _torch()
        if dtype == "bfloat16":
            return torch.from_numpy(a.view(_np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    if dtype == "bfloat16":
        return (a.astype(_np.uint32) << 16).view(_np.float32)
    return a


def _as_numpy_any(x, name):
    """Masks and biases: any NumPy array or CPU torch tensor, as NumPy."""
    if _is_torch(x):
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}: xattn takes CPU torch tensors")
        _check_grad(x, name)
        x = x.detach()
        if x.dtype == torch.bool:
            return x.numpy()
        if x.is_floating_point():
            return x.float().numpy()
        raise ValueError(f"{name} has dtype {x.dtype}: expected bool or a float type")
    return _np.asarray(x)


def _broadcast(m, full, name):
    """`m` checked broadcastable to `full` (PyTorch's rules: dims aligned from the right, each 1
    or the full size), as an array of len(full) dims whose last dim is full (the library
    broadcasts the others)."""
    if m.ndim == 0 or m.ndim > len(full):
        raise ValueError(
            f"{name} has {m.ndim} dims {list(m.shape)}: expected 1 to {len(full)} dims "
            f"broadcastable to {list(full)}"
        )
    padded = (1,) * (len(full) - m.ndim) + tuple(m.shape)
    if any(g != 1 and g != f for g, f in zip(padded, full)):
        raise ValueError(f"{name} of shape {list(m.shape)} is not broadcastable to {list(full)}")
    m = m.reshape(padded)
    if padded[-1] != full[-1]:
        m = _np.broadcast_to(m, padded[:-1] + (full[-1],))
    return m


def _mask_inputs(mask, bias, full, three_d=False):
    """The library's (mask bool [B|1, H|1, M|1, N], bias float32 alike) from masks broadcastable
    to `full` ([B, H, M, N], or [B, M, N] for a 3-D call, which has one head)."""
    out = []
    for m, name, kind in ((mask, "mask", _np.bool_), (bias, "bias", _np.float32)):
        if m is None:
            out.append(None)
            continue
        m = _as_numpy_any(m, name)
        if kind is _np.bool_ and m.dtype != _np.bool_:
            raise ValueError(
                f"mask has dtype {m.dtype}: a mask is bool (True = may attend); pass additive "
                "float values as bias="
            )
        if kind is _np.float32 and not _np.issubdtype(m.dtype, _np.floating):
            raise ValueError(f"bias has dtype {m.dtype}: expected a float type (added to logits)")
        m = _broadcast(m, full, name)
        if three_d:
            m = m[:, None]
        out.append(_np.ascontiguousarray(m, dtype=kind))
    return out


def _lens(x, name, batch):
    if x is None:
        return None
    a = _as_numpy_any(x, name)
    if a.ndim != 1 or not _np.issubdtype(a.dtype, _np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integers (one per batch entry)")
    if len(a) != batch:
        raise ValueError(f"{name} has {len(a)} entries for a batch of {batch}")
    if (a < 0).any() or (a > 0xFFFFFFFF).any():
        raise ValueError(f"{name} must be non-negative, got {a.tolist()}")
    return [int(v) for v in a]


def _alignment(value, name):
    if value is None:
        return None
    if value not in _ALIGNMENTS:
        raise ValueError(f"{name} must be None, 'top-left' or 'bottom-right'; got {value!r}")
    return value


def _dropout(p, seed):
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return None
    if seed is None:
        seed = _random.getrandbits(64)
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"dropout_seed must be in [0, 2**64), got {seed}")
    return (p, int(seed), 0)


# --- device tensors and the engine -------------------------------------------------------------


class Tensor:
    """A tensor kept on the device by :meth:`Engine.upload`, reusable across calls.

    It remembers the layout it was uploaded in (``shape`` and :meth:`to_numpy` use it); on the
    device it is stored as the library's ``[B, S, H, d]``.
    """

    __slots__ = ("_raw", "layout", "_torch")

    def __init__(self, raw, layout, from_torch):
        self._raw = raw
        self.layout = layout
        self._torch = from_torch

    @property
    def shape(self):
        b, s, h, d = self._raw.shape
        return (b, h, s, d) if self.layout == "bhsd" else (b, s, h, d)

    def _bhsd_shape(self):
        b, s, h, d = self._raw.shape
        return (b, h, s, d)

    @property
    def dtype(self):
        """``float32``, ``float16`` or ``bfloat16`` (a name: NumPy has no bfloat16)."""
        return self._raw.dtype

    def to_numpy(self):
        """The tensor read back, in its layout; bfloat16 widened to float32 exactly."""
        return _wrap(_from_library(self._raw.to_numpy(), self.layout), self.dtype, False)

    def to_torch(self):
        """The tensor read back as a CPU torch tensor of its dtype, in its layout."""
        if _torch() is None:
            raise ImportError("to_torch() needs torch")
        return _wrap(_from_library(self._raw.to_numpy(), self.layout), self.dtype, True)

    def __repr__(self):
        return f"xattn.Tensor(shape={self.shape}, dtype={self.dtype}, layout={self.layout!r})"


class Engine:
    """xattn on one adapter: pipelines, planner and buffers, shared by every call made through it.

    ``adapter``: None for the default (``WGPU_ADAPTER_NAME`` and ``WGPU_BACKEND`` respected), an
    index into :func:`adapters`, or a substring of an adapter's name (case-insensitive).

    Safe to share between Python threads (the library's engine is ``Send + Sync``; the GIL is
    released while the device works, so threads overlap their host work with device work).
    """

    def __init__(self, adapter=None):
        if isinstance(adapter, bool) or not (
            adapter is None or isinstance(adapter, (int, str))
        ):
            raise ValueError(
                "adapter must be None, an index into xattn.adapters() or a name substring; "
                f"got {adapter!r}"
            )
        if isinstance(adapter, int) and adapter < 0:
            raise ValueError(f"adapter index must be non-negative, got {adapter}")
        self._raw = _xattn.Engine(adapter)

    @property
    def adapter(self):
        """The adapter's name, backend, device type and driver (a dict)."""
        return self._raw.adapter

    def __repr__(self):
        return repr(self._raw).replace("Engine(", "xattn.Engine(", 1)

    def upload(self, x, layout="bhsd"):
        """Copies a 4-D array or CPU torch tensor to the device once; the :class:`Tensor` serves
        any number of :meth:`attention` calls. ``layout`` names its dims: ``"bhsd"``
        ``[B, H, S, d]`` (PyTorch's) or ``"bshd"`` ``[B, S, H, d]`` (the library's, no
        transpose)."""
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
        a, dtype, from_torch = _host(x, "array")
        if a.ndim != 4:
            raise ValueError(f"upload takes a 4-D tensor in layout {layout}, got shape {a.shape}")
        raw = self._raw.upload(_to_library(a, layout), bf16=dtype == "bfloat16")
        return Tensor(raw, layout, from_torch)

    def attention(self, q, k, v, **kwargs):
        """:func:`attention` on this engine; q, k, v may also be :class:`Tensor`s."""
        return attention(q, k, v, engine=self, **kwargs)

    def scaled_dot_product_attention(self, query, key, value, *args, **kwargs):
        """:func:`scaled_dot_product_attention` on this engine."""
        return scaled_dot_product_attention(query, key, value, *args, engine=self, **kwargs)


_default = None
_default_lock = _threading.Lock()


def default_engine():
    """The engine the module-level calls use, opened on first use on the default adapter."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Engine()
        return _default


def _inputs(q, k, v, layout, three_d=False):
    """The library's inputs (raw device tensors or [B, S, H, d] arrays), their shared dtype name,
    whether the result goes back as torch, and the dims (B, Hq, M, Hkv, N, d_k, d_v)."""
    got, dtypes, torch_out, shapes = [], [], False, []
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if isinstance(x, Tensor):
            got.append(x._raw)
            dtypes.append(x.dtype)
            torch_out |= x._torch
            b, s, h, d = x._raw.shape
        else:
            a, dtype, from_torch = _host(x, name)
            torch_out |= from_torch
            dtypes.append(dtype)
            if three_d:
                if a.ndim != 3:
                    raise ValueError(f"{name} has shape {list(a.shape)}, expected 3 dims")
                a = _np.ascontiguousarray(a)[:, :, None, :]
                lib = a
            else:
                if a.ndim != 4:
                    raise ValueError(
                        f"{name} has {a.ndim} dims {list(a.shape)}: expected 4 dims in layout "
                        f"{layout} ([B, H, S, d] for bhsd, [B, S, H, d] for bshd)"
                    )
                lib = _to_library(a, layout)
            got.append(lib)
            b, s, h, d = lib.shape
        shapes.append((b, s, h, d))
    if len(set(dtypes)) != 1:
        raise ValueError(
            f"q, k and v must share one dtype; got q {dtypes[0]}, k {dtypes[1]}, v {dtypes[2]}"
        )
    (bq, m, hq, dk), (bk, n, hk, dk2), (bv, n2, hv, dv) = shapes
    return got, dtypes[0], torch_out, (bq, hq, m, hk, n, dk, dv)


def _prepare(
    engine,
    q,
    k,
    v,
    *,
    layout,
    three_d=False,
    scale=None,
    causal=None,
    window=None,
    window_align=None,
    q_lens=None,
    kv_lens=None,
    mask=None,
    bias=None,
    softcap=None,
    key_segments=None,
    dropout=None,
):
    """Checks a call's arguments into a :class:`_Call` (inputs in the library's layout, the
    extension's keyword arguments)."""
    engine = engine if engine is not None else default_engine()
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be an xattn.Engine, got {type(engine).__name__}")
    inputs, dtype, torch_out, (b, hq, m, hk, n, dk, dv) = _inputs(q, k, v, layout, three_d)
    full = (b, m, n) if three_d else (b, hq, m, n)
    mask_arr, bias_arr = _mask_inputs(mask, bias, full, three_d)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"scale must be a float or None, got {scale!r}")
        scale = float(scale)
    if window is not None:
        try:
            left, right = (int(x) for x in window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be (left, right), two non-negative ints; got {window!r}")
        if left < 0 or right < 0:
            raise ValueError(f"window must be (left, right), two non-negative ints; got {window!r}")
        window = (left, right)
    segments = None
    if key_segments is not None:
        try:
            segments = [(int(s), int(e), float(f)) for s, e, f in key_segments]
        except (TypeError, ValueError):
            raise ValueError(
                f"key_segments must be a list of (start, end, factor); got {key_segments!r}"
            )
        if any(s < 0 or e < 0 for s, e, _ in segments):
            raise ValueError(f"key_segments' ranges must be non-negative; got {key_segments!r}")
    raw_kwargs = dict(
        bf16=dtype == "bfloat16",
        scale=scale,
        causal=_alignment(causal, "causal"),
        window=window,
        window_align=_alignment(window_align, "window_align"),
        q_lens=_lens(q_lens, "q_lens", b),
        kv_lens=_lens(kv_lens, "kv_lens", b),
        mask=mask_arr,
        bias=bias_arr,
        softcap=None if softcap is None else float(softcap),
        key_segments=segments,
        dropout=dropout,
    )
    return _Call(engine, inputs, dtype, torch_out, layout, three_d, raw_kwargs)


class _Call:
    """One checked call: the engine, the inputs in the library's layout, their dtype, whether
    results go back as torch, the caller's layout, and the extension's keyword arguments."""

    __slots__ = ("engine", "inputs", "dtype", "torch_out", "layout", "three_d", "kwargs")

    def __init__(self, engine, inputs, dtype, torch_out, layout, three_d, kwargs):
        self.engine = engine
        self.inputs = inputs
        self.dtype = dtype
        self.torch_out = torch_out
        self.layout = layout
        self.three_d = three_d
        self.kwargs = kwargs

    def forward(self, **returns):
        return self.engine._raw.attention(*self.inputs, **self.kwargs, **returns)

    def from_library(self, a, dtype=None):
        """A [B, S, H, d] result in the caller's layout, dtype and kind."""
        a = a[:, :, 0, :] if self.three_d else _from_library(a, self.layout)
        return _wrap(a, dtype or self.dtype, self.torch_out)

    def to_library(self, a):
        """A host array in the caller's layout as the library's [B, S, H, d]."""
        if self.three_d:
            return _np.ascontiguousarray(a)[:, :, None, :]
        return _to_library(a, self.layout)

    def side(self, a):
        """LSE, weights, statistics ([B, H, …] float32) in the caller's kind."""
        if a is None:
            return None
        if self.three_d:
            a = a[:, 0]
        return _wrap(a, "float32", self.torch_out)


def _run(engine, q, k, v, *, return_lse=False, return_weights=False, return_stats=False, **kw):
    bias = kw.get("bias")
    bias = bias if _is_torch(bias) and _needs_grad(bias) else None
    if _needs_grad(q, k, v, *([] if bias is None else [bias])):
        if return_lse or return_weights or return_stats:
            raise NotImplementedError(
                "gradients through xattn return O alone: call without return_lse, "
                "return_weights and return_stats, or under torch.no_grad()"
            )
        return _autograd_function().apply(engine, kw, q, k, v, bias)
    call = _prepare(engine, q, k, v, **kw)
    o, lse, weights, stats = call.forward(
        return_lse=return_lse, return_weights=return_weights, return_stats=return_stats
    )
    out = call.from_library(o)
    if not (return_lse or return_weights or return_stats):
        return out
    entropy, focus, coverage = stats if stats is not None else (None, None, None)
    return AttentionResult(
        out,
        call.side(lse),
        call.side(weights),
        call.side(entropy),
        call.side(focus),
        call.side(coverage),
    )


# --- gradients through torch.autograd ------------------------------------------------------------


def _needs_grad(*xs):
    torch = _torch()
    if torch is None or not torch.is_grad_enabled():
        return False
    if not any(_is_torch(x) and x.requires_grad for x in xs):
        return False
    if not all(_is_torch(x) for x in xs):
        raise NotImplementedError(
            "gradients through xattn need q, k and v as torch tensors (not xattn.Tensor or "
            "NumPy arrays beside a tensor that requires grad)"
        )
    return True


@_functools.cache
def _autograd_function():
    """The torch.autograd.Function whose backward is xattn's (FlashAttention-2's scheme: P
    rebuilt from the forward's LSE; dropout's mask regenerated from its seed); made on first
    use."""
    torch = _torch()

    class XattnAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, engine, kw, q, k, v, bias):
            call = _prepare(engine, q.detach(), k.detach(), v.detach(), **kw)
            o, lse, _, _ = call.forward(return_lse=True)
            ctx.call, ctx.o, ctx.lse = call, o, lse
            ctx.bias = None if bias is None else (bias.shape, bias.dtype)
            return call.from_library(o)

        @staticmethod
        def backward(ctx, d_o):
            call = ctx.call
            torch = _torch()
            want = {"float32": torch.float32, "float16": torch.float16}.get(
                call.dtype, torch.bfloat16
            )
            d, _, _ = _host(d_o.detach().to(want), "grad_output")
            dq, dk, dv, dbias = call.engine._raw.attention_backward(
                *call.inputs, ctx.o, ctx.lse, call.to_library(d), bias_grad=ctx.bias is not None,
                **call.kwargs
            )
            grads = [call.from_library(g) for g in (dq, dk, dv)]
            return None, None, *grads, _bias_grad(dbias, ctx.bias, call.three_d)

    return XattnAttention


def _bias_grad(dbias, bias, three_d):
    """The library's dBias (summed to the dims it read: [B|1, H|1, M|1, N]) as the gradient of
    the caller's bias of (shape, dtype) `bias`: summed over the keys it broadcast, reshaped."""
    if bias is None:
        return None
    shape, dtype = bias
    g = dbias[:, 0] if three_d else dbias
    if shape[-1] == 1 and g.shape[-1] != 1:
        g = g.sum(axis=-1, keepdims=True)
    return _torch().from_numpy(_np.ascontiguousarray(g)).reshape(shape).to(dtype)


def attention(
    q,
    k,
    v,
    *,
    layout="bhsd",
    causal=None,
    kv_lens=None,
    q_lens=None,
    window=None,
    window_align=None,
    softcap=None,
    scale=None,
    mask=None,
    bias=None,
    key_segments=None,
    dropout_p=0.0,
    dropout_seed=None,
    return_lse=False,
    return_weights=False,
    return_stats=False,
    engine=None,
):
    """Scaled dot-product attention with all of xattn's options.

    ``O = softmax(scale·Q·Kᵀ + bias, masked)·V`` row by row, computed in float32 whatever the
    inputs' dtype (O is rounded once to it).

    - ``q``, ``k``, ``v``: 4-D NumPy arrays (float32, float16), CPU torch tensors (float32,
      float16, bfloat16) or :class:`Tensor` s, in ``layout``: ``"bhsd"`` ``[B, H, S, d]``
      (PyTorch's) or ``"bshd"`` ``[B, S, H, d]`` (the library's; no transpose on the host).
      K and V have ``Hkv`` heads, ``Hq`` a multiple of it (GQA: query head h reads K/V head
      ``h // (Hq // Hkv)``); ``d_v`` may differ from ``d_k``.
    - ``scale``: multiplies Q·Kᵀ; ``1/√d_k`` when None.
    - ``causal``: None, ``"top-left"`` (PyTorch, JAX: row i sees keys j ≤ i) or
      ``"bottom-right"`` (FlashAttention ≥ 2.1, decoding: j ≤ i + kv_len − q_len, per sequence).
    - ``window=(left, right)``: row i sees keys ``diag − left ≤ j ≤ diag + right`` around the
      diagonal aligned by ``window_align`` (or by ``causal``, whose alignment it must share).
    - ``q_lens``, ``kv_lens``: valid rows/keys per batch entry; rows ≥ q_len output 0 (LSE −inf),
      keys ≥ kv_len are ignored.
    - ``mask``: bool, True = may attend; ``bias``: float, added to the logits after scale and
      softcap (−inf or ≤ −1e30 removes a key). Both broadcastable to ``[B, Hq, M, N]``.
    - ``softcap``: ``cap·tanh(logit/cap)`` before the bias; ``key_segments``: up to four
      ``(start, end, factor)`` key ranges whose logits are multiplied by ``factor``.
    - ``dropout_p``, ``dropout_seed``: dropout on the weights with xattn's counter-based RNG
      (Philox); the seed is drawn from Python's ``random`` unless given.
    - ``return_lse``, ``return_weights``, ``return_stats``: also return LSE, P and the rows'
      entropy/focus and the keys' coverage (an :class:`AttentionResult`); otherwise O alone.

    A row that sees no key returns 0 (LSE −inf), never NaN. The layout conversion for
    ``"bhsd"`` is a host transpose in this version.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    return _run(
        engine,
        q,
        k,
        v,
        layout=layout,
        scale=scale,
        causal=causal,
        window=window,
        window_align=window_align,
        q_lens=q_lens,
        kv_lens=kv_lens,
        mask=mask,
        bias=bias,
        softcap=softcap,
        key_segments=key_segments,
        dropout=_dropout(dropout_p, dropout_seed),
        return_lse=return_lse,
        return_weights=return_weights,
        return_stats=return_stats,
    )


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    dropout_seed=None,
    engine=None,
):
    """``torch.nn.functional.scaled_dot_product_attention`` on xattn.

    ``query`` ``[B, Hq, L, E]``, ``key`` ``[B, Hkv, S, E]``, ``value`` ``[B, Hkv, S, Ev]`` (or
    3-D ``[B, L, E]`` … without heads): NumPy arrays (float32, float16) or CPU torch tensors
    (float32, float16, bfloat16), of one dtype; the result ``[B, Hq, L, Ev]`` is the same kind
    and dtype. As PyTorch defines it:

    - ``attn_mask``: bool (True = takes part in attention) or float (added to the scaled
      logits), broadcastable to ``[B, Hq, L, S]``; not together with ``is_causal``.
    - ``is_causal``: top-left alignment, row i sees keys j ≤ i (PyTorch's ``tril``).
    - ``scale``: ``1/√E`` when None.
    - ``enable_gqa``: allows ``Hq`` ≠ ``Hkv`` (``Hq`` a multiple of ``Hkv``; query head h reads
      K/V head ``h // (Hq // Hkv)``, as ``repeat_interleave``); without it the heads must match.

    Differences from PyTorch:

    - a row whose keys are all masked out returns 0 (PyTorch's math backend returns NaN);
    - dropout (``dropout_p > 0``, applied whenever given, as in PyTorch's function) draws its
      keep mask from xattn's Philox stream keyed by a seed (Python's ``random`` unless
      ``dropout_seed`` is given), not from torch's RNG, whose stream cannot be matched: same
      statistics, different bits;
    - computation is float32 whatever the dtype (O rounded once to it); float64 is refused;
    - torch tensors that require grad get their gradients from xattn's backward through
      ``torch.autograd`` (dQ, dK, dV, and dBias for a float ``attn_mask`` that requires grad);
    - the ``[B, H, L, E]`` layout is transposed to the library's ``[B, L, H, E]`` on the host
      in this version (a copy of Q, K, V and O); :func:`attention` with ``layout="bshd"``
      avoids it.
    """
    names = ("query", "key", "value")
    ndims = []
    for x, name in zip((query, key, value), names):
        if isinstance(x, Tensor):
            ndims.append(4)
            continue
        shape = getattr(x, "shape", None)
        if shape is None:
            _host(x, name)  # raises the TypeError naming what it got
        ndims.append(len(shape))
    if len(set(ndims)) != 1 or ndims[0] not in (3, 4):
        raise ValueError(
            "query, key and value must all be 4-D [B, H, L, E] (or all 3-D [B, L, E]); got "
            + ", ".join(f"{n} {nd}-D" for n, nd in zip(names, ndims))
        )
    three_d = ndims[0] == 3
    # Device tensors in [B, H, S, d] order whatever their layout.
    shapes = [
        x._bhsd_shape() if isinstance(x, Tensor) else x.shape for x in (query, key, value)
    ]
    if three_d:
        shapes = [(s[0], 1, s[1], s[2]) for s in shapes]
    (bq, hq, lq, eq), (bk, hk, sk, ek), (bv, hv, sv, ev) = [tuple(s) for s in shapes]
    if not (bq == bk == bv):
        raise ValueError(f"query, key and value batch sizes differ: {bq}, {bk}, {bv}")
    if ek != eq:
        raise ValueError(f"query's E {eq} differs from key's E {ek}")
    if sk != sv:
        raise ValueError(f"key has S = {sk} but value has S = {sv}")
    if hk != hv:
        raise ValueError(f"key has {hk} heads but value has {hv}")
    if hq != hk:
        if not enable_gqa:
            raise ValueError(
                f"query has {hq} heads but key and value have {hk}: pass enable_gqa=True for "
                "grouped-query attention"
            )
        if hq % hk != 0:
            raise ValueError(
                f"enable_gqa needs the query heads ({hq}) to be a multiple of the key/value "
                f"heads ({hk})"
            )
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot be given together (as in PyTorch)")
    mask = bias = None
    if attn_mask is not None:
        # A torch float mask stays a tensor: it may require grad.
        m = attn_mask if _is_torch(attn_mask) else _np.asarray(attn_mask)
        if str(m.dtype) in ("bool", "torch.bool"):
            mask = m
        elif m.is_floating_point() if _is_torch(m) else _np.issubdtype(m.dtype, _np.floating):
            bias = m
        else:
            raise ValueError(f"attn_mask has dtype {m.dtype}: expected bool or a float type")
    return _run(
        engine,
        query,
        key,
        value,
        layout="bhsd",
        three_d=three_d,
        scale=scale,
        causal="top-left" if is_causal else None,
        mask=mask,
        bias=bias,
        dropout=_dropout(dropout_p, dropout_seed),
    )


# --- pictures ----------------------------------------------------------------------------------


class Heatmap:
    """A PNG picture of attention weights; a Jupyter notebook displays it (``_repr_png_``).
    ``png`` holds the file's bytes; :meth:`save` writes them."""

    __slots__ = ("png",)

    def __init__(self, png):
        self.png = png

    def _repr_png_(self):
        return self.png

    def save(self, path):
        """Writes the PNG file."""
        with open(path, "wb") as f:
            f.write(self.png)

    def __repr__(self):
        return f"xattn.Heatmap({len(self.png)} bytes of PNG)"


def heatmap(weights, *, q_labels=None, k_labels=None, caption=None, range=None, pool="max"):
    """xattn's heatmap of a 2-D map of weights ``[M, N]`` (rows = queries, columns = keys), e.g.
    ``attention(..., return_weights=True).weights[b, h]`` or a mean over heads: viridis, a
    legend, optional token labels (one per row / column) and a caption; ``range=(low, high)``
    fixes the colour map's ends (else the data's). Maps larger than 2048 a side are pooled
    first (``pool``: ``"max"`` or ``"mean"`` over blocks), and their labels dropped.
    Returns a :class:`Heatmap`."""
    w = _as_numpy_any(weights, "weights")
    if not _np.issubdtype(w.dtype, _np.floating):
        raise ValueError(f"weights have dtype {w.dtype}: expected a float type")
    if w.ndim != 2:
        raise ValueError(f"a heatmap takes a 2-D map [M, N], got shape {list(w.shape)}")
    labels = [None if x is None else [str(t) for t in x] for x in (q_labels, k_labels)]
    png = _xattn.heatmap_png(
        _np.ascontiguousarray(w, dtype=_np.float32),
        q_labels=labels[0],
        k_labels=labels[1],
        caption=caption,
        range=None if range is None else (float(range[0]), float(range[1])),
        pool=pool,
    )
    return Heatmap(png)


# --- routing a torch model's attention ---------------------------------------------------------


@_contextlib.contextmanager
def route_sdpa(engine=None):
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` to xattn inside the block
    (restored after it), so a model that calls it — ``nn.MultiheadAttention`` outside its
    inference fast path, Hugging Face's and diffusers' SDPA attention — runs its attention on
    xattn, gradients included::

        with xattn.route_sdpa():
            loss = model(x).sum(); loss.backward()

    The one-line form for a whole program is
    ``torch.nn.functional.scaled_dot_product_attention = xattn.scaled_dot_product_attention``.
    Calls xattn cannot serve (float64, tensors on a CUDA device) raise instead of falling back.
    """
    import torch

    functional = torch.nn.functional
    before = functional.scaled_dot_product_attention

    def routed(*args, **kwargs):
        return scaled_dot_product_attention(*args, engine=engine, **kwargs)

    functional.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = before


# The layer reads the helpers above.
from .layer import MultiheadAttention  # noqa: E402

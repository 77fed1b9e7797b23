"""xattn.MultiheadAttention: the library's multi-head attention layer, built from a torch module
(``nn.MultiheadAttention``, Hugging Face's and diffusers' attention modules) or a safetensors
file, with ``nn.MultiheadAttention``'s forward."""

from __future__ import annotations

import functools as _functools

import numpy as _np

from . import _xattn
from . import _check_grad, _dropout, _host, _is_torch, _torch, _wrap, default_engine, Engine

# The layer's eight parameters in the extension's order.
_PARAMS = ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "k_bias", "v_bias", "o_bias")


def _unsupported(module, what):
    return ValueError(f"xattn.MultiheadAttention cannot run this {type(module).__name__}: {what}")


def _linears(heads, q, k, v, o):
    """(sizes, the eight parameters as live torch tensors) of four `nn.Linear` projections;
    `o` None where the module has no output projection (W^O is then the identity)."""
    sizes = dict(
        embed_dim=q.in_features,
        num_heads=heads,
        kdim=k.in_features,
        vdim=v.in_features,
        inner_dim=q.out_features,
        kv_heads=heads * k.out_features // q.out_features,
    )
    params = [q.weight, k.weight, v.weight, None if o is None else o.weight]
    params += [q.bias, k.bias, v.bias, None if o is None else o.bias]
    return sizes, params


def _torch_params(module):
    """(kind, sizes, the eight parameters as live torch tensors or None, scale, dropout,
    batch_first) of a supported module, or a ValueError saying what is unsupported."""
    torch = _torch()
    name = type(module).__name__
    if isinstance(module, torch.nn.MultiheadAttention):
        if module.bias_k is not None or module.bias_v is not None:
            raise _unsupported(module, "add_bias_kv=True (bias_k, bias_v) is not supported")
        if module.add_zero_attn:
            raise _unsupported(module, "add_zero_attn=True is not supported")
        e = module.embed_dim
        if module.in_proj_weight is not None:
            w = module.in_proj_weight
            qkv = [w[:e], w[e : 2 * e], w[2 * e :]]
        else:
            qkv = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        b = module.in_proj_bias
        biases = [None] * 3 if b is None else [b[:e], b[e : 2 * e], b[2 * e :]]
        params = qkv + [module.out_proj.weight] + biases + [module.out_proj.bias]
        sizes = dict(embed_dim=e, num_heads=module.num_heads, kdim=module.kdim, vdim=module.vdim)
        return "pytorch", sizes, params, None, module.dropout, module.batch_first
    if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
        # diffusers' Attention: only the plain projections and scaled attention.
        for attr in ("norm_q", "norm_k", "norm_cross", "group_norm", "spatial_norm"):
            if getattr(module, attr, None) is not None:
                raise _unsupported(module, f"its {attr} is not supported")
        if getattr(module, "add_k_proj", None) is not None:
            raise _unsupported(module, "added key/value projections are not supported")
        if getattr(module, "residual_connection", False):
            raise _unsupported(module, "residual_connection=True is not supported")
        if getattr(module, "rescale_output_factor", 1.0) != 1.0:
            raise _unsupported(module, "rescale_output_factor ≠ 1 is not supported")
        sizes, params = _linears(module.heads, module.to_q, module.to_k, module.to_v,
                                 module.to_out[0])
        dropout = getattr(module.to_out[1], "p", 0.0) if len(module.to_out) > 1 else 0.0
        # The dropout after W^O is not the weights' dropout: refused in training rather than
        # misplaced (a no-op in eval mode).
        if dropout and module.training:
            raise _unsupported(
                module, "dropout after the output projection in training mode is not supported"
            )
        return "diffusers", sizes, params, getattr(module, "scale", None), 0.0, True
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
        # Hugging Face Whisper, BART, Marian, M2M100 and the like.
        heads = getattr(module, "num_heads", None) or module.config.num_attention_heads
        sizes, params = _linears(heads, module.q_proj, module.k_proj, module.v_proj,
                                 module.out_proj)
        return "hf", sizes, params, getattr(module, "scaling", None), module.dropout, True
    if all(hasattr(module, a) for a in ("q", "k", "v", "o", "n_heads")):
        # Hugging Face T5: no scaling (folded into its initialisation); a position bias only in
        # the layers that own one.
        if getattr(module, "has_relative_attention_bias", False):
            raise _unsupported(
                module,
                "its relative_attention_bias (a position bias) is not supported: bind a layer "
                "without one, or give the bias through attn_mask",
            )
        sizes, params = _linears(module.n_heads, module.q, module.k, module.v, module.o)
        return "t5", sizes, params, 1.0, module.dropout, True
    if all(hasattr(module, a) for a in ("query", "key", "value", "num_attention_heads")):
        # BERT-like self-attention: the output projection lives in the next module, so W^O is
        # the identity here (exact in float32).
        if getattr(module, "position_embedding_type", "absolute") != "absolute":
            raise _unsupported(module, "relative position embeddings are not supported")
        sizes, params = _linears(module.num_attention_heads, module.query, module.key,
                                 module.value, None)
        if sizes["inner_dim"] != sizes["embed_dim"]:
            raise _unsupported(module, "an inner width other than the hidden size")
        dropout = getattr(module.dropout, "p", 0.0)
        return "bert", sizes, params, None, dropout, True
    raise ValueError(
        f"xattn.MultiheadAttention.from_torch takes nn.MultiheadAttention, a Hugging Face "
        f"attention module (q_proj/k_proj/v_proj/out_proj, T5's q/k/v/o, BERT's "
        f"query/key/value) or diffusers' Attention; got {name}"
    )


def _as_f32(p, rows):
    """A parameter as a C-contiguous float32 array (W^O = identity of `rows` when None)."""
    if p is None:
        return _np.eye(rows, dtype=_np.float32)
    return _np.ascontiguousarray(p.detach().cpu().float().numpy())


class MultiheadAttention:
    """xattn's multi-head attention layer with ``torch.nn.MultiheadAttention``'s forward.

    Build it with :meth:`from_torch` (``nn.MultiheadAttention``, Hugging Face's Whisper/BART/T5
    /BERT attention, diffusers' ``Attention``) or :meth:`from_safetensors`. The weights live on
    the engine's device; a layer from a torch module re-uploads them when the module's
    parameters change (an optimizer step), and trains them through ``torch.autograd``.
    """

    def __init__(self, raw, *, engine, batch_first=True, dropout=0.0, scale=None, module=None):
        self._raw = raw
        self.engine = engine
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.scale = scale
        self.training = False
        self._module = module
        self._synced = self._versions()

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_torch(cls, module, *, engine=None, dtype=None):
        """The layer of a torch attention module, its weights copied to the device (in
        ``dtype``: the module's float32/float16/bfloat16 when None) and uploaded again when an
        optimizer changes them. Unsupported features (``add_bias_kv``, ``add_zero_attn``, q/k
        norms, position biases…) raise ValueError. The call is ``nn.MultiheadAttention``'s
        whatever the module: a Hugging Face module's own causal flag is not read (pass
        ``is_causal=True``), and its dropout follows the module's ``train()``/``eval()``."""
        torch = _torch()
        if torch is None or not isinstance(module, torch.nn.Module):
            raise ValueError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}")
        engine = _engine(engine)
        _, sizes, params, scale, dropout, batch_first = _torch_params(module)
        if dtype is None:
            dtype = str(params[0].dtype).replace("torch.", "")
        raw = _xattn.Layer(engine._raw, **_layer_args(sizes, params), dtype=dtype)
        return cls(raw, engine=engine, batch_first=batch_first, dropout=dropout, scale=scale,
                   module=module)

    @classmethod
    def from_safetensors(cls, path, prefix, embed_dim, num_heads, *, kv_heads=None, kdim=None,
                         vdim=None, bias=True, names=None, ignore=None, scale=None,
                         batch_first=True, dropout=0.0, engine=None, dtype="float32"):
        """The layer whose weights a safetensors file holds under ``prefix`` (e.g.
        ``"model.decoder.layers.0.encoder_attn."``), in one of the name families
        ``pytorch`` (``in_proj_weight``…), ``hf`` (``q_proj``…), ``diffusers`` (``to_q``…),
        ``t5`` (``q``, ``k``…), found unless ``names`` says. The inner width comes from W^Q;
        ``ignore`` names tensors under the prefix the layer may leave unread (others are
        refused by name). ``scale``: 1/√head_dim when None, except 1 for T5's names."""
        engine = _engine(engine)
        raw = _xattn.Layer.from_safetensors(
            engine._raw, str(path), prefix, embed_dim, num_heads, kv_heads=kv_heads, kdim=kdim,
            vdim=vdim, bias=bias, names=names,
            ignore=None if ignore is None else list(ignore), dtype=dtype,
        )
        if scale is None and raw.config["names"] == "t5":
            scale = 1.0
        return cls(raw, engine=engine, batch_first=batch_first, dropout=dropout, scale=scale)

    @property
    def config(self):
        """The sizes (embed_dim, inner_dim, num_heads, kv_heads, kdim, vdim, head_dim), bias,
        the weights' dtype, and the file's name family."""
        return self._raw.config

    def _training(self):
        """A layer from a torch module follows the module's train()/eval()."""
        return self.training if self._module is None else self._module.training

    def train(self, mode=True):
        """Dropout on (as the torch module's ``train()``); a layer from a torch module follows
        the module's mode instead."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        return repr(self._raw).replace("Layer(", "xattn.MultiheadAttention(", 1)

    # --- weights kept in step with a torch module -----------------------------------------

    def _params(self):
        """The module's eight parameters as live torch tensors (views of packed ones), or
        none for a layer without a module."""
        if self._module is None:
            return []
        return _torch_params(self._module)[2]

    def _versions(self):
        if self._module is None:
            return None
        return tuple((id(p), p._version) for p in self._module.parameters())

    def _sync(self):
        """Uploads the module's weights again when they changed since the last upload (an
        optimizer step changes them in place)."""
        now = self._versions()
        if now != self._synced:
            args = _layer_args(self.config, self._params())
            self._raw.set_weights(args["weights"], args["biases"])
            self._synced = now

    # --- forward ----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False, *,
                dropout_seed=None):
        """``nn.MultiheadAttention.forward``: query ``[B, L, E]`` (``[L, B, E]`` unless
        batch_first; ``[L, E]`` unbatched), key ``[B, S, kdim]``, value ``[B, S, vdim]`` (the
        query when None: self-attention); NumPy arrays or CPU torch tensors. Returns
        ``(attn_output, attn_weights)`` as torch's: weights ``[B, L, S]`` averaged over heads,
        ``[B, H, L, S]`` with ``average_attn_weights=False``, None without ``need_weights``.

        - ``key_padding_mask`` ``[B, S]``: bool, **True = ignore the key**, or float (added);
        - ``attn_mask`` ``[L, S]`` or ``[B·H, L, S]``: bool, **True = not allowed**, or float
          (added);
        - ``is_causal``: a hint that ``attn_mask`` is causal; without ``attn_mask``, top-left
          causal attention;
        - dropout on the weights while ``training`` (xattn's Philox stream keyed by
          ``dropout_seed``, not torch's RNG).

        Differences from torch: a row whose keys are all masked out returns 0 (torch: NaN); the
        weights are returned without gradients."""
        key = query if key is None else key
        value = key if value is None else value
        if self._module is not None:
            self._sync()
        xs = [query, key, value]
        unbatched = getattr(query, "ndim", None) == 2
        if unbatched:
            xs = [x[None] for x in xs]
        elif not self.batch_first:
            xs = [x.transpose(1, 0, 2) if isinstance(x, _np.ndarray) else x.transpose(0, 1)
                  for x in xs]
        for x, name in zip(xs, ("query", "key", "value")):
            if getattr(x, "ndim", 3) != 3:
                raise ValueError(
                    f"{name} has shape {list(x.shape)}: expected [B, L, E] (or [L, E] unbatched)"
                )
        b, m, n = xs[0].shape[0], xs[0].shape[1], xs[1].shape[1]
        heads = self.config["num_heads"]
        mask, bias = _torch_masks(key_padding_mask, attn_mask, b, heads, m, n, unbatched)
        kw = dict(
            scale=self.scale,
            causal="top-left" if is_causal and attn_mask is None else None,
            mask=mask,
            bias=bias,
            dropout=_dropout(self.dropout if self._training() else 0.0, dropout_seed),
        )
        need = "none"
        if need_weights:
            need = "averaged" if average_attn_weights else "per_head"
        params = self._params()
        if _needs_grad(xs, params):
            out = _layer_function().apply(self, kw, *xs, *params)
            weights = None
            if need != "none":
                _, weights = self._forward_raw(xs, kw, need)
        else:
            out, weights = self._forward_raw(xs, kw, need)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.transpose(1, 0, 2) if isinstance(out, _np.ndarray) else out.transpose(0, 1)
        return out, weights

    def _forward_raw(self, xs, kw, need):
        """The extension's forward on host inputs: (out, weights) as the inputs' kind."""
        arrays, dtype, torch_out = _layer_inputs([x.detach() if _is_torch(x) else x for x in xs])
        out, weights = self._raw.forward(*arrays, kw, bf16=dtype == "bfloat16",
                                         need_weights=need)
        weights = None if weights is None else _wrap(weights, "float32", torch_out)
        return _wrap(out, dtype, torch_out), weights


def _engine(engine):
    engine = engine if engine is not None else default_engine()
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be an xattn.Engine, got {type(engine).__name__}")
    return engine


def _layer_args(sizes, params):
    """The extension's constructor arguments: sizes, four weights, four biases (None where
    absent) as float32 arrays."""
    e = sizes["embed_dim"]
    weights = [_as_f32(p, e) for p in params[:4]]
    biases = [None if p is None else _as_f32(p, e) for p in params[4:]]
    keys = ("embed_dim", "num_heads", "kv_heads", "kdim", "vdim", "inner_dim")
    args = {k: sizes[k] for k in keys if sizes.get(k) is not None}
    return dict(args, weights=weights, biases=biases)


def _layer_inputs(xs):
    """(C-contiguous arrays, their shared dtype name, whether results go back as torch)."""
    got, dtypes, torch_out = [], [], False
    for x, name in zip(xs, ("query", "key", "value")):
        a, dtype, from_torch = _host(x, name)
        got.append(_np.ascontiguousarray(a))
        dtypes.append(dtype)
        torch_out |= from_torch
    if len(set(dtypes)) != 1:
        raise ValueError(
            f"query, key and value must share one dtype; got {', '.join(dtypes)}"
        )
    return got, dtypes[0], torch_out


def _numpy_mask(x, name):
    if _is_torch(x):
        _check_grad(x, name)
        x = x.detach().cpu()
        return x.numpy() if x.dtype == _torch().bool else x.double().numpy()
    return _np.asarray(x)


def _torch_masks(key_padding_mask, attn_mask, b, heads, m, n, unbatched):
    """torch's key_padding_mask and attn_mask as the library's (bool keep mask, float bias),
    each ``[B|1, H|1, M|1, N]`` or None."""
    keep = bias = None

    def add(kind, value):
        nonlocal keep, bias
        if value.dtype == _np.bool_:
            keep = ~value if keep is None else keep & ~value
        elif _np.issubdtype(value.dtype, _np.floating):
            bias = value if bias is None else bias + value
        else:
            raise ValueError(f"{kind} has dtype {value.dtype}: expected bool or a float type")

    if key_padding_mask is not None:
        kpm = _numpy_mask(key_padding_mask, "key_padding_mask")
        if unbatched and kpm.ndim == 1:
            kpm = kpm[None]
        if kpm.shape != (b, n):
            raise ValueError(
                f"key_padding_mask has shape {list(kpm.shape)}; expected [B, S] = [{b}, {n}]"
            )
        add("key_padding_mask", kpm[:, None, None, :])
    if attn_mask is not None:
        am = _numpy_mask(attn_mask, "attn_mask")
        if am.shape == (m, n):
            am = am[None, None]
        elif am.shape == (b * heads, m, n):
            am = am.reshape(b, heads, m, n)
        else:
            raise ValueError(
                f"attn_mask has shape {list(am.shape)}; expected [L, S] = [{m}, {n}] or "
                f"[B·num_heads, L, S] = [{b * heads}, {m}, {n}]"
            )
        add("attn_mask", am)
    if keep is not None:
        keep = _np.ascontiguousarray(keep)
    if bias is not None:
        bias = _np.ascontiguousarray(bias, dtype=_np.float32)
    return keep, bias


# --- gradients through torch.autograd ------------------------------------------------------


def _needs_grad(xs, params):
    """Whether the call goes through torch.autograd: torch inputs, and an input or a weight
    that requires grad."""
    torch = _torch()
    if torch is None or not torch.is_grad_enabled() or not all(_is_torch(x) for x in xs):
        return False
    return any(x is not None and x.requires_grad for x in [*xs, *params])


@_functools.cache
def _layer_function():
    """The torch.autograd.Function whose backward is the layer's backward on the device
    (gradients of the inputs, the weights and the biases); made on first use (torch is
    imported only by callers who use it)."""
    torch = _torch()

    class XattnLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layer, kw, query, key, value, *params):
            xs = [query.detach(), key.detach(), value.detach()]
            arrays, dtype, _ = _layer_inputs(xs)
            out, _ = layer._raw.forward(*arrays, kw, bf16=dtype == "bfloat16")
            ctx.layer, ctx.kw, ctx.arrays, ctx.dtype = layer, kw, arrays, dtype
            ctx.like = [query, key, value, *params]
            return _wrap(out, dtype, True)

        @staticmethod
        def backward(ctx, d_out):
            d = _np.ascontiguousarray(d_out.detach().float().numpy())
            dq, dk, dv, d_weights, d_biases = ctx.layer._raw.backward(
                *ctx.arrays, d, ctx.kw, bf16=ctx.dtype == "bfloat16"
            )
            grads = [dq, dk, dv, *d_weights, *d_biases]
            out = []
            for g, like in zip(grads, ctx.like):
                if like is None or g is None or not like.requires_grad:
                    out.append(None)
                else:
                    out.append(torch.from_numpy(g).reshape(like.shape).to(like.dtype))
            return (None, None, *out)

    return XattnLayer

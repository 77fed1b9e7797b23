"""Shared helpers of the Python tests: seeded inputs, the float64 reference, the error budgets.

The reference is written here, independent of xattn: softmax(Q·Kᵀ·scale (softcapped, segment
factors) + bias, masked)·V in float64, with GQA by repeating K/V heads as torch's
``repeat_interleave`` does. The budgets are the library's (tests/common/mod.rs `budget_masked`,
src/cpu/budget.rs `max_logit`): an f32 computation of the same formulas may differ from the f64
reference by ε·(4·(1 + max|logit|) + N), times max|V| for O; half outputs add one rounding.
"""

import os

import numpy as np
import pytest

import xattn

try:
    # torch's compiler stack loads triton, whose bundled LLVM crashes the process when Mesa's
    # LLVM (lavapipe, llvmpipe) is loaded first: load it before the first engine opens (an
    # optimizer's constructor imports it).
    import torch._dynamo  # noqa: F401
except ImportError:
    pass

EPS32 = float(np.finfo(np.float32).eps)
# Unit roundoff of the half types O may be rounded to.
UNIT = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def pytest_report_header(config):
    names = [f"{a['name']} ({a['backend']})" for a in xattn.adapters()]
    return "xattn adapters: " + (", ".join(names) or "none")


@pytest.fixture(scope="session")
def engine():
    """The engine of the default adapter. Without an adapter: a loud skip locally, a failure
    where CI or XATTN_REQUIRE_GPU is set (the Rust tests' rule)."""
    try:
        return xattn.default_engine()
    except xattn.DeviceError as e:
        required = os.environ.get("CI") or os.environ.get("XATTN_REQUIRE_GPU", "0") != "0"
        if required:
            pytest.fail(f"a GPU adapter is required (CI or XATTN_REQUIRE_GPU set): {e}")
        pytest.skip(f"*** SKIPPING GPU TEST: {e} ***")


def rand(rng, shape, dtype=np.float32, scale=1.0):
    """Seeded standard normal values (never zeros), scaled, as `dtype`."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def qkv(seed, b, hq, m, n, dk, hkv=None, dv=None, dtype=np.float32):
    """Seeded Q [b, hq, m, dk], K [b, hkv, n, dk], V [b, hkv, n, dv] in PyTorch's layout."""
    rng = np.random.default_rng(seed)
    hkv = hq if hkv is None else hkv
    dv = dk if dv is None else dv
    return (
        rand(rng, (b, hq, m, dk), dtype),
        rand(rng, (b, hkv, n, dk), dtype),
        rand(rng, (b, hkv, n, dv), dtype),
    )


def reference(
    q,
    k,
    v,
    *,
    scale=None,
    mask=None,
    bias=None,
    causal=None,
    window=None,
    q_lens=None,
    kv_lens=None,
    softcap=None,
    key_segments=(),
):
    """(O [B, H, M, dv], LSE [B, H, M], P [B, H, M, N]) in float64, inputs in [B, H, S, d].
    A row that sees no key has O = 0, LSE = −inf, P = 0 (xattn's semantics)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, hq, m, dk = q.shape
    hkv, n = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hkv, axis=1)
    v = np.repeat(v, hq // hkv, axis=1)
    scale = 1.0 / np.sqrt(dk) if scale is None else scale
    s = np.einsum("bhmd,bhnd->bhmn", q, k) * scale
    for start, end, factor in key_segments:
        s[..., start:end] *= factor
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    keep = np.ones((b, hq, m, n), dtype=bool)
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask, dtype=bool), keep.shape)
    ql = np.full(b, m) if q_lens is None else np.asarray(q_lens)
    kl = np.full(b, n) if kv_lens is None else np.asarray(kv_lens)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    for bi in range(b):
        keep[bi, :, :, kl[bi]:] = False
        keep[bi, :, ql[bi]:, :] = False
        for align, left, right in [w for w in (causal, window) if w is not None]:
            diag = i + (kl[bi] - ql[bi] if align == "bottom-right" else 0)
            band = np.ones((m, n), dtype=bool)
            if right is not None:
                band &= j <= diag + right
            if left is not None:
                band &= j >= diag - left
            keep[bi] &= band
    s = np.where(keep, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(row_max)
    e = np.where(keep, np.exp(s - np.where(seen, row_max, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = np.where(seen, e / np.where(seen, total, 1.0), 0.0)
    lse = np.where(seen, np.log(np.where(seen, total, 1.0)) + np.where(seen, row_max, 0.0), -np.inf)
    return p @ v, lse[..., 0], p


def causal_of(align):
    """The reference's form of `causal=align`."""
    return None if align is None else (align, None, 0)


def amax(x):
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64)))) if np.size(x) else 0.0


def budget(q, k, v, *, scale=None, bias=None, softcap=None, key_segments=()):
    """The f32 budgets (o, lse, weights) of the library's tests for these inputs."""
    dk, n = q.shape[-1], k.shape[-2]
    scale = 1.0 / np.sqrt(dk) if scale is None else scale
    factor = max([1.0] + [f for _, _, f in key_segments])
    max_logit = abs(scale) * dk * amax(q) * amax(k) * factor
    if softcap is not None:
        max_logit = min(max_logit, softcap)
    if bias is not None:
        finite = np.asarray(bias, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        max_logit += amax(finite)
    base = EPS32 * (4.0 * (1.0 + max_logit) + n)
    return base * max(amax(v), 1e-3), base, base


def assert_close(what, got, want, tol):
    """|got − want| ≤ tol everywhere (equal infinities count as equal); reports the worst
    element."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    with np.errstate(invalid="ignore"):
        err = np.where(both_inf, 0.0, np.abs(got - want))
    err = np.where(np.isnan(err), np.inf, err)
    tol = np.broadcast_to(tol, err.shape)
    bad = err > tol
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} element(s) off; worst at {idx}: got {got[idx]}, "
            f"reference {want[idx]} (error {err[idx]:.3e} > tolerance {tol[idx]:.3e})"
        )
    return float(err.max()) if err.size else 0.0


def check_o(what, got, want, tol_o, dtype="float32"):
    """O within the f32 budget plus, for half outputs, one rounding of each element."""
    u = UNIT[dtype]
    tol = tol_o + u * (np.abs(want) + tol_o)
    return assert_close(what, got, want, tol)


# --- the multi-head attention layer ---------------------------------------------------------


def layer_weights(seed, e, heads, *, kv_heads=None, kdim=None, vdim=None, inner=None,
                  biases=(True, True, True, True)):
    """Seeded layer weights in PyTorch `Linear` layout: {"q", "k", "v", "o"} and the biases
    {"q_bias", …} where `biases` says, float32, scaled like torch's default init."""
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    kdim, vdim, inner = (e if x is None else x for x in (kdim, vdim, inner))
    kv = kv_heads * (inner // heads)
    shapes = {"q": (inner, e), "k": (kv, kdim), "v": (kv, vdim), "o": (e, inner)}
    w = {name: rand(rng, s, scale=s[1] ** -0.5) for name, s in shapes.items()}
    for (name, s), has in zip(shapes.items(), biases):
        if has:
            w[name + "_bias"] = rand(rng, (s[0],), scale=0.1)
    return w


def layer_reference(w, query, key, value, heads, kv_heads=None, **attn):
    """(out [B, M, E], P [B, H, M, N]) of the layer in float64: the projections, `reference`
    per head, the heads concatenated and projected by W^O."""
    kv_heads = heads if kv_heads is None else kv_heads

    def linear(x, name):
        y = np.asarray(x, np.float64) @ w[name].astype(np.float64).T
        b = w.get(name + "_bias")
        return y if b is None else y + b

    def split(y, h):
        b, s, f = y.shape
        return y.reshape(b, s, h, f // h).transpose(0, 2, 1, 3)

    q = split(linear(query, "q"), heads)
    k = split(linear(key, "k"), kv_heads)
    v = split(linear(value, "v"), kv_heads)
    o, _, p = reference(q, k, v, **attn)
    b, h, m, d = o.shape
    return linear(o.transpose(0, 2, 1, 3).reshape(b, m, h * d), "o"), p


def layer_tolerance(w, query, key, value, heads, scale=None, bias=None):
    """(out, weights) budgets of an f32 layer against `layer_reference`: the library's
    `layer_tolerance` (tests/common/layer.rs) — the projections' rounding carried through the
    logits and the softmax, then W^O's; an additive `bias` widens the logits' range as in
    `budget`."""
    n = np.asarray(key).shape[1]

    def proj(x, name):
        """(rounding budget, max |y|) of y = x·Wᵀ + b in f32."""
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        m = w[name].astype(np.float64)
        y = np.abs(x @ m.T + w.get(name + "_bias", 0.0)).max()
        return 4.0 * EPS32 * ((np.abs(x) @ np.abs(m).T).max() + y), y

    (dq, qm), (dk, km), (dv, vm) = proj(query, "q"), proj(key, "k"), proj(value, "v")
    d = w["q"].shape[0] // heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    logit = scale * d * qm * km
    if bias is not None:
        logit += amax(np.asarray(bias)[np.isfinite(bias)])
    dlogit = scale * d * (dq * km + qm * dk)
    d_o = EPS32 * (4.0 * (1.0 + logit) + n) * vm + 2.0 * dlogit * vm + dv
    wo_l1 = float(np.abs(w["o"].astype(np.float64)).sum(axis=1).max())
    out = d_o * wo_l1 + 4.0 * EPS32 * vm * wo_l1
    weights = EPS32 * (4.0 * (1.0 + logit) + n) + 2.0 * dlogit
    return out, weights


def write_safetensors(path, tensors):
    """A safetensors file of float32 `tensors` ({name: array}), written by hand (the format is
    an 8-byte header length, a JSON header, the raw little-endian data)."""
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def criterion(what, got, ours32, want64):
    """FlashAttention's criterion: our error against float64 within twice torch's own float32
    error plus one rounding of the largest value (tests/half_backward.rs)."""
    err = lambda a: float((a.double() - want64).abs().max())  # noqa: E731
    allowed = 2 * err(ours32) + EPS32 * float(want64.abs().max())
    assert err(got) <= allowed, f"{what}: error {err(got):.3e} > {allowed:.3e}"

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

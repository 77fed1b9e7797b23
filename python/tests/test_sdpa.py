"""xattn.scaled_dot_product_attention against the float64 reference, on NumPy arrays."""

import random

import numpy as np
import pytest

import xattn
from conftest import assert_close, budget, causal_of, check_o, qkv, reference

SHAPES = [
    # (b, hq, m, n, dk, hkv, dv): tile misfits, M ≠ N both ways, N = 1, M = 1, d_v ≠ d_k.
    (2, 3, 5, 7, 8, None, None),
    (1, 2, 33, 17, 40, None, 24),
    (2, 1, 1, 45, 64, None, None),
    (1, 2, 9, 1, 3, None, None),
]


def sdpa_check(engine, q, k, v, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    got = engine.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    mask = bias = None
    if attn_mask is not None:
        if attn_mask.dtype == bool:
            mask = attn_mask
        else:
            bias = attn_mask
    want, _, _ = reference(
        q, k, v, scale=scale, mask=mask, bias=bias, causal=causal_of("top-left" if is_causal else None)
    )
    tol_o, _, _ = budget(q, k, v, scale=scale, bias=bias)
    assert got.shape == want.shape and got.dtype == q.dtype
    check_o("O", got, want, tol_o, q.dtype.name)
    return got


@pytest.mark.parametrize("shape", SHAPES)
def test_plain(engine, shape):
    b, hq, m, n, dk, hkv, dv = shape
    q, k, v = qkv(1, b, hq, m, n, dk, hkv, dv)
    sdpa_check(engine, q, k, v)


def test_module_level_call_uses_the_default_engine(engine):
    q, k, v = qkv(2, 1, 2, 6, 9, 8)
    got = xattn.scaled_dot_product_attention(q, k, v)
    want, _, _ = reference(q, k, v)
    check_o("O", got, want, budget(q, k, v)[0])


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5, -0.5])
def test_scale(engine, scale):
    q, k, v = qkv(3, 2, 2, 11, 13, 16)
    sdpa_check(engine, q, k, v, scale=scale)


@pytest.mark.parametrize("m,n", [(7, 7), (5, 12), (12, 5)])
def test_is_causal_is_top_left(engine, m, n):
    q, k, v = qkv(4, 2, 2, m, n, 8)
    got = sdpa_check(engine, q, k, v, is_causal=True)
    # Top-left: row 0 sees key 0 alone, so it is V's first row (a fact independent of the
    # reference's causal code).
    np.testing.assert_allclose(got[:, :, 0, :], v[:, :, 0, :], rtol=0, atol=1e-6)


MASK_SHAPES = [
    # (mask shape for b=2, h=3, L=6, S=10): 2-D [L, S] up to 4-D, size-1 dims anywhere.
    (6, 10),
    (10,),
    (1, 10),
    (6, 1),
    (3, 6, 10),
    (2, 1, 1, 10),
    (1, 3, 6, 10),
    (2, 3, 6, 10),
    (2, 1, 6, 1),
]


@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
def test_bool_masks_broadcast(engine, mask_shape):
    q, k, v = qkv(5, 2, 3, 6, 10, 8)
    rng = np.random.default_rng(50)
    # Rows with no key left (possible where the mask's S dim is 1) are compared too: the
    # reference, like xattn, gives them 0.
    mask = rng.random(mask_shape) < 0.7
    sdpa_check(engine, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_shape", [(6, 10), (2, 1, 6, 10), (3, 1, 10)])
def test_float_masks_are_added(engine, mask_shape):
    q, k, v = qkv(6, 2, 3, 6, 10, 8)
    rng = np.random.default_rng(60)
    mask = rng.standard_normal(mask_shape).astype(np.float32) * 2
    mask[..., 3] = -np.inf  # a removed key, as torch users write masks
    sdpa_check(engine, q, k, v, attn_mask=mask)


def test_fully_masked_rows_return_zero(engine):
    q, k, v = qkv(7, 1, 2, 4, 6, 8)
    mask = np.ones((4, 6), dtype=bool)
    mask[2] = False
    got = sdpa_check(engine, q, k, v, attn_mask=mask)
    assert (got[:, :, 2, :] == 0).all()


@pytest.mark.parametrize("hq,hkv", [(6, 2), (6, 3), (4, 1)])
def test_gqa(engine, hq, hkv):
    q, k, v = qkv(8, 2, hq, 5, 9, 8, hkv=hkv)
    sdpa_check(engine, q, k, v, enable_gqa=True)


def test_gqa_with_equal_heads_is_plain(engine):
    q, k, v = qkv(9, 1, 2, 5, 9, 8)
    sdpa_check(engine, q, k, v, enable_gqa=True)


def test_three_dims(engine):
    rng = np.random.default_rng(10)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 6)).astype(np.float32)
    mask = rng.random((5, 9)) < 0.8
    mask[:, 0] = True
    got = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want, _, _ = reference(q[:, None], k[:, None], v[:, None], mask=mask)
    assert got.shape == (2, 5, 6)
    check_o("O", got, want[:, 0], budget(q, k, v)[0])


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_float16(engine, shape):
    b, hq, m, n, dk, hkv, dv = shape
    q, k, v = qkv(11, b, hq, m, n, dk, hkv, dv, dtype=np.float16)
    got = engine.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == np.float16
    # The reference reads the same f16 values; the f32 computation's budget plus one rounding
    # of O to f16 (unit roundoff 2⁻¹¹).
    want, _, _ = reference(q, k, v, causal=causal_of("top-left"))
    check_o("O f16", got, want, budget(q, k, v)[0], "float16")


def test_float16_with_float_mask(engine):
    q, k, v = qkv(12, 2, 2, 6, 10, 8, dtype=np.float16)
    mask = np.random.default_rng(120).standard_normal((6, 10)).astype(np.float16)
    got = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want, _, _ = reference(q, k, v, bias=mask)
    check_o("O f16", got, want, budget(q, k, v, bias=mask)[0], "float16")


def test_non_contiguous_inputs(engine):
    q, k, v = qkv(13, 2, 3, 6, 9, 8)
    qf = np.asfortranarray(q)
    ks = np.concatenate([k, k], axis=-1)[..., ::2]  # a strided view
    assert not ks.flags.c_contiguous
    got = engine.scaled_dot_product_attention(qf, ks, v)
    want, _, _ = reference(q, ks, v)
    check_o("O", got, want, budget(q, ks, v)[0])


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_zero_is_the_call_without_dropout(engine):
    q, k, v = qkv(14, 1, 2, 5, 8, 8)
    a = engine.scaled_dot_product_attention(q, k, v)
    b = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    assert np.array_equal(a, b)


def test_dropout_is_reproducible_by_seed(engine):
    q, k, v = qkv(15, 1, 2, 5, 8, 8)
    a = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3, dropout_seed=7)
    b = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3, dropout_seed=7)
    c = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3, dropout_seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Without a seed, one is drawn from Python's `random`: random.seed reproduces it.
    random.seed(1234)
    d = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    random.seed(1234)
    e = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert np.array_equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_output_follow_the_kept_weights(engine, p):
    b, h, m, n, d = 2, 4, 32, 48, 16
    q, k, v = qkv(16, b, h, m, n, d)
    res = engine.attention(q, k, v, dropout_p=p, dropout_seed=99, return_weights=True)
    _, _, pref = reference(q, k, v)
    w = res.weights.astype(np.float64)
    kept = w != 0
    count = kept.size
    # Keep rate: binomial(count, 1 − p); 5 standard deviations (a fixed seed: deterministic).
    sigma = np.sqrt(count * p * (1 - p))
    assert abs(kept.sum() - count * (1 - p)) <= 5 * sigma, (kept.sum(), count * (1 - p), sigma)
    # Kept weights are P/(1 − p), dropped ones 0.
    _, _, tol_w = budget(q, k, v)
    assert_close("kept weights", w, np.where(kept, pref / (1 - p), 0.0), tol_w / (1 - p))
    # O is the returned (dropped, rescaled) weights times V.
    want = w @ v.astype(np.float64)
    tol_o = budget(q, k, v)[0] / (1 - p)
    check_o("O under dropout", res.out, want, tol_o)


def test_dropout_output_is_unbiased(engine):
    # E[O] = P·V: per row, O_i0 − (P·V)_i0 has variance p/(1−p)·Σ_j P_ij² V_j0², rows
    # independent; the sum over rows, standardized, stays within 5 standard deviations.
    p, b, h, m, n, d = 0.4, 2, 4, 64, 40, 8
    q, k, v = qkv(17, b, h, m, n, d)
    got = engine.scaled_dot_product_attention(q, k, v, dropout_p=p, dropout_seed=5)
    want, _, pref = reference(q, k, v)
    diff = (got[..., 0].astype(np.float64) - want[..., 0]).sum()
    var = (p / (1 - p)) * (pref**2 * (v[..., 0].astype(np.float64) ** 2)[:, :, None, :]).sum()
    assert abs(diff) <= 5 * np.sqrt(var), (diff, np.sqrt(var))

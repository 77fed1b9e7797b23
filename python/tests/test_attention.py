"""xattn.attention, the richer call, against the float64 reference."""

import numpy as np
import pytest

import xattn
from conftest import EPS32, assert_close, budget, causal_of, check_o, qkv, reference


def check_lse(got, want, tol_lse):
    finite = want[np.isfinite(want)]
    scale = 1.0 + (np.abs(finite).max() if finite.size else 0.0)
    return assert_close("LSE", got, want, tol_lse * scale)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_layouts(engine, layout):
    q, k, v = qkv(20, 2, 3, 7, 11, 8, dv=5)
    if layout == "bshd":
        args = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    else:
        args = [q, k, v]
    got = engine.attention(*args, layout=layout)
    want, _, _ = reference(q, k, v)
    if layout == "bshd":
        want = want.transpose(0, 2, 1, 3)
    check_o(f"O {layout}", got, want, budget(q, k, v)[0])


@pytest.mark.parametrize("m,n", [(1, 40), (6, 20), (20, 6)])
@pytest.mark.parametrize("align", ["top-left", "bottom-right"])
def test_causal_alignments(engine, m, n, align):
    q, k, v = qkv(21, 2, 2, m, n, 8)
    res = engine.attention(q, k, v, causal=align, return_lse=True)
    want, lse, _ = reference(q, k, v, causal=causal_of(align))
    tol_o, tol_lse, _ = budget(q, k, v)
    check_o("O", res.out, want, tol_o)
    check_lse(res.lse, lse, tol_lse)
    if align == "bottom-right" and m > n:
        # Its first m − n rows see no key: O = 0, LSE = −inf.
        assert (res.out[:, :, : m - n] == 0).all()
        assert np.isneginf(res.lse[:, :, : m - n]).all()


def test_lengths(engine):
    q, k, v = qkv(22, 3, 2, 9, 14, 8)
    q_lens, kv_lens = [9, 4, 1], [14, 6, 3]
    res = engine.attention(
        q, k, v, q_lens=q_lens, kv_lens=kv_lens, causal="bottom-right", return_lse=True
    )
    want, lse, _ = reference(
        q, k, v, q_lens=q_lens, kv_lens=kv_lens, causal=causal_of("bottom-right")
    )
    tol_o, tol_lse, _ = budget(q, k, v)
    check_o("O", res.out, want, tol_o)
    check_lse(res.lse, lse, tol_lse)
    assert (res.out[1, :, 4:] == 0).all()


@pytest.mark.parametrize(
    "window,align,causal",
    [((2, 1), "top-left", None), ((3, 0), None, "bottom-right"), ((1, 4), "bottom-right", None)],
)
def test_windows(engine, window, align, causal):
    q, k, v = qkv(23, 2, 2, 10, 13, 8)
    got = engine.attention(q, k, v, window=window, window_align=align, causal=causal)
    w_align = align or causal
    want, _, _ = reference(
        q, k, v, window=(w_align, window[0], window[1]), causal=causal_of(causal)
    )
    check_o("O", got, want, budget(q, k, v)[0])


def test_softcap_bias_mask_and_segments(engine):
    b, h, m, n, d = 2, 4, 8, 15, 16
    q, k, v = qkv(24, b, h, m, n, d, hkv=2)
    rng = np.random.default_rng(240)
    mask = rng.random((b, 1, 1, n)) < 0.8
    mask[..., 0] = True
    bias = rng.standard_normal((1, h, m, n)).astype(np.float32)
    segments = [(0, 5, 1.5), (9, 12, 0.5)]
    kw = dict(scale=0.4, softcap=3.0)
    res = engine.attention(
        q, k, v, mask=mask, bias=bias, key_segments=segments, return_lse=True, **kw
    )
    want, lse, _ = reference(q, k, v, mask=mask, bias=bias, key_segments=segments, **kw)
    tol_o, tol_lse, _ = budget(q, k, v, bias=bias, key_segments=segments, **kw)
    check_o("O", res.out, want, tol_o)
    check_lse(res.lse, lse, tol_lse)


def test_weights_and_statistics(engine):
    b, h, m, n, d = 2, 2, 9, 12, 8
    q, k, v = qkv(25, b, h, m, n, d)
    res = engine.attention(
        q, k, v, causal="top-left", return_weights=True, return_stats=True, return_lse=True
    )
    want, lse, p = reference(q, k, v, causal=causal_of("top-left"))
    tol_o, tol_lse, tol_w = budget(q, k, v)
    assert isinstance(res, xattn.AttentionResult)
    check_o("O", res.out, want, tol_o)
    assert_close("weights", res.weights, p, tol_w)
    # The library's statistics budget (tests/common/weight_stats.rs): each P off by a relative
    # 11·base, a sum over K terms adds K·ε.
    rel = 11.0 * tol_lse
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    assert_close("entropy", res.entropy, entropy, (rel + n * EPS32) * (1.0 + entropy))
    focus = p.max(-1)
    assert_close("focus", res.focus, focus, rel * focus)
    coverage = p.sum(-2)
    assert_close("coverage", res.coverage, coverage, (rel + m * EPS32) * coverage)
    assert res.out.shape == (b, h, m, d) and res.lse.shape == (b, h, m)
    assert res.coverage.shape == (b, h, n)


def test_only_o_without_return_flags(engine):
    q, k, v = qkv(26, 1, 1, 3, 4, 8)
    got = engine.attention(q, k, v)
    assert isinstance(got, np.ndarray)
    res = engine.attention(q, k, v, return_lse=True)
    assert res.weights is None and res.entropy is None and res.lse is not None


def test_float16_lse_and_weights_are_float32(engine):
    q, k, v = qkv(27, 1, 2, 5, 9, 8, dtype=np.float16)
    res = engine.attention(q, k, v, return_lse=True, return_weights=True)
    assert res.out.dtype == np.float16
    assert res.lse.dtype == np.float32 and res.weights.dtype == np.float32
    want, lse, p = reference(q, k, v)
    tol_o, tol_lse, tol_w = budget(q, k, v)
    check_o("O f16", res.out, want, tol_o, "float16")
    check_lse(res.lse, lse, tol_lse)
    assert_close("weights", res.weights, p, tol_w)

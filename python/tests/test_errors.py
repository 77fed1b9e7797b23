"""Bad inputs raise exceptions that say what was wrong; nothing crashes the interpreter."""

import numpy as np
import pytest

import xattn
from conftest import qkv


@pytest.fixture
def inputs():
    return qkv(40, 2, 4, 5, 7, 8)


def test_float64_is_refused(engine, inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="float64"):
        engine.scaled_dot_product_attention(q.astype(np.float64), k, v)


def test_mixed_dtypes_are_refused(engine, inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="share one dtype"):
        engine.scaled_dot_product_attention(q, k.astype(np.float16), v)


def test_integer_arrays_and_lists_are_refused(engine, inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="int64"):
        engine.scaled_dot_product_attention(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="list"):
        engine.scaled_dot_product_attention(q.tolist(), k, v)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q[0], k[0], v[0]), None),  # 3-D all: allowed, checked elsewhere
        (lambda q, k, v: (q, k[0], v), "4-D"),
        (lambda q, k, v: (q[..., :4], k, v), "E"),
        (lambda q, k, v: (q, k, v[:, :, :3]), "S"),
        (lambda q, k, v: (q, k, v[:, :2]), "heads"),
        (lambda q, k, v: (q, k[:1], v[:1]), "batch"),
    ],
)
def test_shapes(engine, inputs, change, match):
    q, k, v = change(*inputs)
    if match is None:
        engine.scaled_dot_product_attention(q, k, v)
        return
    with pytest.raises(ValueError, match=match):
        engine.scaled_dot_product_attention(q, k, v)


def test_gqa_needs_enable_gqa_and_a_multiple(engine):
    q, k, v = qkv(41, 1, 6, 3, 5, 8, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        engine.scaled_dot_product_attention(q, k, v)
    q4, k4, v4 = qkv(42, 1, 6, 3, 5, 8, hkv=4)
    with pytest.raises(ValueError, match="multiple"):
        engine.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)


def test_masks(engine, inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="not broadcastable"):
        engine.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="dims"):
        engine.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((1, 2, 4, 5, 7), bool))
    with pytest.raises(ValueError, match="is_causal"):
        engine.scaled_dot_product_attention(
            q, k, v, attn_mask=np.ones((5, 7), dtype=bool), is_causal=True
        )
    with pytest.raises(ValueError, match="dtype"):
        engine.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((5, 7), dtype=np.int32))
    nan = np.zeros((5, 7), dtype=np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN|nan"):
        engine.scaled_dot_product_attention(q, k, v, attn_mask=nan)
    with pytest.raises(ValueError, match="bool"):
        engine.attention(q, k, v, mask=np.ones((5, 7), dtype=np.float32))


def test_arguments(engine, inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="dropout_p"):
        engine.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="scale"):
        engine.scaled_dot_product_attention(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match="layout"):
        engine.attention(q, k, v, layout="bsdh")
    with pytest.raises(ValueError, match="causal"):
        engine.attention(q, k, v, causal="top_left")
    with pytest.raises(ValueError, match="alignment"):
        engine.attention(q, k, v, window=(2, 2))
    with pytest.raises(ValueError, match="share one diagonal"):
        engine.attention(q, k, v, window=(2, 0), window_align="top-left", causal="bottom-right")
    with pytest.raises(ValueError, match="kv_lens"):
        engine.attention(q, k, v, kv_lens=[7])
    with pytest.raises(ValueError, match="non-negative"):
        engine.attention(q, k, v, kv_lens=[7, -1])
    with pytest.raises(ValueError):  # the library's own check: a length past N
        engine.attention(q, k, v, kv_lens=[7, 9])
    with pytest.raises(ValueError, match="softcap|cap"):
        engine.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError):
        engine.attention(q, k, v, key_segments=[(0, 3, 2.0), (2, 5, 2.0)])  # overlapping


def test_adapters_that_do_not_exist(engine):
    with pytest.raises(ValueError, match="out of range"):
        xattn.Engine(len(xattn.adapters()) + 3)
    with pytest.raises(xattn.DeviceError, match="no GPU adapter"):
        xattn.Engine("no adapter is called this")
    with pytest.raises(ValueError):
        xattn.Engine(1.5)
    assert issubclass(xattn.DeviceError, RuntimeError)


def test_a_panic_is_an_exception_not_an_abort(engine):
    with pytest.raises(RuntimeError, match="panicked"):
        xattn._xattn._panic_for_tests()
    # The interpreter and the engine carry on.
    q, k, v = qkv(43, 1, 1, 2, 3, 8)
    engine.scaled_dot_product_attention(q, k, v)

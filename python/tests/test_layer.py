"""xattn.MultiheadAttention from safetensors files written here, against the layer in float64
(conftest.layer_reference), with nn.MultiheadAttention's forward: masks in torch's polarity,
need_weights, batch_first both ways, unbatched inputs; and the errors of bad files and inputs."""

import numpy as np
import pytest

import xattn
from conftest import (
    assert_close,
    layer_reference,
    layer_tolerance,
    layer_weights,
    rand,
    write_safetensors,
    UNIT,
)

PREFIX = "model.decoder.layers.0.encoder_attn."


def file_tensors(w, family):
    """The weights `w` (conftest.layer_weights) under the names of `family`."""
    if family == "pytorch":
        t = {"in_proj_weight": np.concatenate([w["q"], w["k"], w["v"]]), "out_proj.weight": w["o"]}
        if "q_bias" in w:
            t["in_proj_bias"] = np.concatenate([w["q_bias"], w["k_bias"], w["v_bias"]])
            t["out_proj.bias"] = w["o_bias"]
        return t
    names = {
        "hf": ("q_proj", "k_proj", "v_proj", "out_proj"),
        "diffusers": ("to_q", "to_k", "to_v", "to_out.0"),
        "t5": ("q", "k", "v", "o"),
    }[family]
    t = {}
    for short, name in zip("qkvo", names):
        t[f"{name}.weight"] = w[short]
        if short + "_bias" in w:
            t[f"{name}.bias"] = w[short + "_bias"]
    return t


def layer_file(tmp_path, w, family, extra=None):
    path = tmp_path / f"{family}.safetensors"
    tensors = {PREFIX + k: v for k, v in file_tensors(w, family).items()}
    # Another layer's tensors beside it: not the layer's, not read.
    tensors["model.decoder.layers.1.encoder_attn.q_proj.weight"] = w["q"]
    tensors.update(extra or {})
    write_safetensors(path, tensors)
    return path


def inputs(seed, b, m, n, e, kdim=None, vdim=None):
    rng = np.random.default_rng(seed)
    return (
        rand(rng, (b, m, e)),
        rand(rng, (b, n, kdim or e)),
        rand(rng, (b, n, vdim or e)),
    )


@pytest.mark.parametrize(
    "family, sizes, biases",
    [
        ("pytorch", {}, (True,) * 4),
        ("pytorch", {}, (False,) * 4),
        ("hf", dict(kdim=24, vdim=20), (True, False, True, True)),
        ("diffusers", dict(kdim=24, vdim=20, inner=48), (False, False, False, True)),
        ("t5", dict(inner=48), (False,) * 4),
        ("hf", dict(kv_heads=2), (True,) * 4),
    ],
    ids=["pytorch", "pytorch-nobias", "hf-kdim-vdim", "diffusers-inner", "t5", "hf-gqa"],
)
def test_from_safetensors_matches_the_reference(engine, tmp_path, family, sizes, biases):
    e, heads = 32, 4
    w = layer_weights(60, e, heads, biases=biases, **sizes)
    path = layer_file(tmp_path, w, family)
    kv_heads = sizes.get("kv_heads")
    layer = xattn.MultiheadAttention.from_safetensors(
        path, PREFIX, e, heads, kv_heads=kv_heads, kdim=sizes.get("kdim"),
        vdim=sizes.get("vdim"), engine=engine,
    )
    assert layer.config["names"] == family
    assert layer.config["inner_dim"] == sizes.get("inner", e)
    query, key, value = inputs(61, 2, 7, 13, e, sizes.get("kdim"), sizes.get("vdim"))
    out, weights = layer(query, key, value)
    # T5 does not scale its logits (the factor lives in its initialisation).
    scale = 1.0 if family == "t5" else None
    want, p = layer_reference(w, query, key, value, heads, kv_heads, scale=scale)
    tol, w_tol = layer_tolerance(w, query, key, value, heads, scale=scale)
    assert out.dtype == np.float32 and out.shape == (2, 7, e)
    assert_close("out", out, want, tol)
    assert_close("averaged weights", weights, p.mean(axis=1), w_tol)


def pytorch_layer(engine, tmp_path, seed=70, e=32, heads=4, **kw):
    w = layer_weights(seed, e, heads)
    path = layer_file(tmp_path, w, "pytorch")
    return w, xattn.MultiheadAttention.from_safetensors(path, PREFIX, e, heads, engine=engine, **kw)


def test_masks_in_torch_polarity(engine, tmp_path):
    w, layer = pytorch_layer(engine, tmp_path)
    b, heads, m, n = 2, 4, 6, 9
    query, key, value = inputs(71, b, m, n, 32)
    rng = np.random.default_rng(72)
    kpm = rng.random((b, n)) < 0.3  # True = ignore the key
    kpm[:, 0] = False
    attn_bool = rng.random((m, n)) < 0.3  # True = not allowed
    attn_bool[:, 0] = False
    attn_float = rand(rng, (b * heads, m, n))
    kpm_float = rand(rng, (b, n))
    cases = [
        (dict(key_padding_mask=kpm), dict(mask=~kpm[:, None, None, :])),
        (dict(attn_mask=attn_bool), dict(mask=~attn_bool)),
        (
            dict(key_padding_mask=kpm, attn_mask=attn_bool),
            dict(mask=~kpm[:, None, None, :] & ~attn_bool),
        ),
        (dict(attn_mask=attn_float), dict(bias=attn_float.reshape(b, heads, m, n))),
        (
            dict(key_padding_mask=kpm_float, attn_mask=attn_bool),
            dict(bias=kpm_float[:, None, None, :], mask=~attn_bool),
        ),
        (dict(is_causal=True), dict(causal=("top-left", None, 0))),
    ]
    for call, attn in cases:
        out, weights = layer(query, key, value, average_attn_weights=False, **call)
        want, p = layer_reference(w, query, key, value, heads, **attn)
        tol, w_tol = layer_tolerance(w, query, key, value, heads, bias=attn.get("bias"))
        assert_close(f"out {sorted(call)}", out, want, tol)
        assert weights.shape == (b, heads, m, n)
        assert_close(f"weights {sorted(call)}", weights, p, w_tol)


def test_layouts_self_attention_and_need_weights(engine, tmp_path):
    w, layer = pytorch_layer(engine, tmp_path)
    query, _, _ = inputs(73, 3, 5, 5, 32)
    want, _ = layer_reference(w, query, query, query, 4)
    tol, _ = layer_tolerance(w, query, query, query, 4)
    out, weights = layer(query, need_weights=False)  # key = value = query
    assert weights is None
    assert_close("self-attention", out, want, tol)
    seq_first = xattn.MultiheadAttention.from_safetensors(
        tmp_path / "pytorch.safetensors", PREFIX, 32, 4, batch_first=False, engine=engine
    )
    x = np.ascontiguousarray(query.transpose(1, 0, 2))
    out, weights = seq_first(x, x, x)
    assert out.shape == (5, 3, 32) and weights.shape == (3, 5, 5)
    assert_close("batch_first=False", out.transpose(1, 0, 2), want, tol)
    out, weights = layer(query[1], query[1], query[1])
    assert out.shape == (5, 32) and weights.shape == (5, 5)
    assert_close("unbatched", out, want[1], tol)


def test_half_inputs(engine, tmp_path):
    w, layer = pytorch_layer(engine, tmp_path)
    query, key, value = inputs(74, 2, 6, 10, 32)
    half = [x.astype(np.float16) for x in (query, key, value)]
    out, _ = layer(*half, need_weights=False)
    assert out.dtype == np.float16
    want, _ = layer_reference(w, *half, 4)
    tol, _ = layer_tolerance(w, *half, 4)
    u = UNIT["float16"]
    assert_close("float16 out", out, want, tol + u * (np.abs(want) + tol))


def test_bad_files_and_inputs(engine, tmp_path):
    w = layer_weights(75, 32, 4)
    extra = {PREFIX + "bias_k": rand(np.random.default_rng(76), (1, 1, 32))}
    path = layer_file(tmp_path, w, "pytorch", extra)
    with pytest.raises(ValueError, match="bias_k"):
        xattn.MultiheadAttention.from_safetensors(path, PREFIX, 32, 4, engine=engine)
    layer = xattn.MultiheadAttention.from_safetensors(
        path, PREFIX, 32, 4, ignore=["bias_k"], engine=engine
    )
    with pytest.raises(ValueError, match="no projection weights"):
        xattn.MultiheadAttention.from_safetensors(path, "encoder.", 32, 4, engine=engine)
    with pytest.raises(ValueError, match="cannot read"):
        xattn.MultiheadAttention.from_safetensors(tmp_path / "none", PREFIX, 32, 4, engine=engine)
    with pytest.raises(ValueError, match="in_proj_weight"):
        xattn.MultiheadAttention.from_safetensors(
            path, PREFIX, 32, 4, kdim=16, ignore=["bias_k"], engine=engine
        )
    with pytest.raises(ValueError, match="no name family"):
        xattn.MultiheadAttention.from_safetensors(path, PREFIX, 32, 4, names="x", engine=engine)
    query, key, value = inputs(77, 2, 3, 4, 32)
    with pytest.raises(ValueError, match="axis 2 must be 32"):
        layer(query[..., :16], key, value)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        layer(query, key, value, key_padding_mask=np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="attn_mask has shape"):
        layer(query, key, value, attn_mask=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="share one dtype"):
        layer(query, key.astype(np.float16), value)


def test_threads_share_a_layer(engine, tmp_path):
    # One layer called from several Python threads at once (the GIL released on the device):
    # each thread's result is the one it gets alone.
    from concurrent.futures import ThreadPoolExecutor

    _, layer = pytorch_layer(engine, tmp_path)
    batches = [inputs(80 + i, 1, 4, 6, 32) for i in range(6)]
    alone = [layer(*x, need_weights=False)[0] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: layer(*x, need_weights=False)[0], batches))
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)

"""CPU torch tensors in and out, against torch's own scaled_dot_product_attention in float64.

Skipped where torch is not importable: CI does not install it (the wheel on the package index is
the CUDA build, about 540 MB to download and 5.7 GB installed); the NumPy tests check the same
calls against the float64 reference written in conftest.py.
"""

import numpy as np
import pytest

import xattn
from conftest import budget, check_o

torch = pytest.importorskip("torch")
F = torch.nn.functional


def tensors(seed, b, hq, m, n, dk, hkv=None, dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hkv = hq if hkv is None else hkv
    dv = dk if dv is None else dv
    return (
        torch.randn(b, hq, m, dk, generator=g).to(dtype),
        torch.randn(b, hkv, n, dk, generator=g).to(dtype),
        torch.randn(b, hkv, n, dv, generator=g).to(dtype),
    )


def torch64(q, k, v, **kw):
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, **kw)


UNIT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(is_causal=True),
        dict(scale=0.7),
        dict(enable_gqa=True, hkv=2),
        dict(attn_mask="bool"),
        dict(attn_mask="float"),
    ],
    ids=["plain", "causal", "scale", "gqa", "bool-mask", "float-mask"],
)
def test_against_torch(engine, dtype, case):
    case = dict(case)
    hkv = case.pop("hkv", None)
    q, k, v = tensors(50, 2, 4, 7, 11, 16, hkv=hkv, dv=12, dtype=dtype)
    g = torch.Generator().manual_seed(51)
    if case.get("attn_mask") == "bool":
        mask = torch.rand(1, 4, 7, 11, generator=g) < 0.7
        mask[..., 0] = True  # torch's math backend gives NaN for a row without keys
        case["attn_mask"] = mask
    elif case.get("attn_mask") == "float":
        case["attn_mask"] = torch.randn(7, 11, generator=g).to(dtype)
    got = engine.scaled_dot_product_attention(q, k, v, **case)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == (2, 4, 7, 12)
    want = torch64(q, k, v, **case).numpy()
    bias = case.get("attn_mask")
    bias = bias.float().numpy() if bias is not None and bias.is_floating_point() else None
    qn, kn, vn = (x.float().numpy() for x in (q, k, v))
    tol_o, _, _ = budget(qn, kn, vn, scale=case.get("scale"), bias=bias)
    check_o(f"O {dtype}", got.float().numpy(), want, tol_o, UNIT[dtype])


def test_upload_from_torch_returns_torch(engine):
    q, k, v = tensors(52, 1, 2, 3, 9, 8, dtype=torch.bfloat16)
    k_dev, v_dev = engine.upload(k), engine.upload(v)
    assert k_dev.dtype == "bfloat16" and k_dev.shape == tuple(k.shape)
    assert torch.equal(k_dev.to_torch(), k)
    got = engine.attention(q, k_dev, v_dev)
    assert got.dtype == torch.bfloat16
    want = torch64(q, k, v).numpy()
    qn, kn, vn = (x.float().numpy() for x in (q, k, v))
    check_o("O bf16", got.float().numpy(), want, budget(qn, kn, vn)[0], "bfloat16")


def test_requires_grad_is_refused_while_grad_is_on(engine):
    q, k, v = tensors(53, 1, 1, 2, 3, 8)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="grad"):
        engine.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        engine.scaled_dot_product_attention(q, k, v)


def test_unsupported_dtypes(engine):
    q, k, v = tensors(54, 1, 1, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        engine.scaled_dot_product_attention(q, k, v)


def test_dropout_on_torch_tensors(engine):
    q, k, v = tensors(55, 2, 2, 16, 24, 8)
    a = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.2, dropout_seed=3)
    b = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.2, dropout_seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, engine.scaled_dot_product_attention(q, k, v))


def test_numpy_results_stay_numpy(engine):
    q, k, v = (x.numpy() for x in tensors(56, 1, 1, 2, 3, 8))
    assert isinstance(xattn.scaled_dot_product_attention(q, k, v), np.ndarray)

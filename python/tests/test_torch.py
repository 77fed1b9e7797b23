"""CPU torch tensors in and out, against torch's own scaled_dot_product_attention in float64,
and gradients through torch.autograd against torch's autograd in float64.

Skipped where torch is not importable: CI does not install it (the wheel on the package index is
the CUDA build, about 540 MB to download and 5.7 GB installed); the NumPy tests check the same
calls against the float64 reference written in conftest.py.
"""

import numpy as np
import pytest

import xattn
from conftest import assert_close, budget, causal_of, check_o, reference

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


def grad_budget(q, k, v, d_o, p_ref, scale, hkv_group, dropout_p=0.0):
    """The library's f32 backward budget (src/cpu/budget.rs `grad_budget`): a logit off by
    ε·(1 + max|logit|), dP and D d_v-term dot products, each gradient a sequential f32 sum."""
    eps = float(np.finfo(np.float32).eps)
    amax = lambda x: float(np.abs(x).max())  # noqa: E731
    b, hq, m, dk = q.shape
    n, dv = k.shape[2], v.shape[3]
    logit_terms = 1.0 + abs(scale) * dk * amax(q) * amax(k)
    keep = 1.0 / (1.0 - dropout_p)
    g_dp = dv * amax(d_o) * amax(v) * keep
    # Coverage of each (batch, kv head, key) by the rows and query heads that read it.
    cov = p_ref.reshape(b, hq // hkv_group, hkv_group, m, n).sum(axis=(2, 3)).max()
    cov = max(float(cov), 1.0)
    d, rows = dk + dv, m * hkv_group
    return (
        4 * eps * (logit_terms + d + n) * 2 * g_dp * abs(scale) * amax(k),
        4 * eps * (logit_terms + d + rows) * 2 * g_dp * abs(scale) * amax(q) * cov,
        4 * eps * (logit_terms + rows) * amax(d_o) * cov * keep,
    )


@pytest.mark.parametrize(
    "case",
    [dict(), dict(is_causal=True), dict(enable_gqa=True, hkv=2), dict(attn_mask="bool")],
    ids=["plain", "causal", "gqa", "bool-mask"],
)
def test_gradients_against_torch_autograd(engine, case):
    case = dict(case)
    hkv = case.pop("hkv", None)
    q, k, v = tensors(57, 2, 4, 9, 13, 16, hkv=hkv, dv=8)
    if case.get("attn_mask") == "bool":
        mask = torch.rand(2, 1, 9, 13, generator=torch.Generator().manual_seed(58)) < 0.7
        mask[..., 0] = True
        case["attn_mask"] = mask
    d_o = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(59))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = engine.scaled_dot_product_attention(*leaves, **case)
    assert out.requires_grad
    out.backward(d_o)
    leaves64 = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = torch64(*leaves64, **case)
    ref.backward(d_o.double())
    check_o("O", out.detach().numpy(), ref.detach().numpy(), budget(*(x.numpy() for x in (q, k, v)))[0])
    group = 4 // (hkv or 4)
    mask = case.get("attn_mask")
    _, _, probs = reference(
        q.numpy(),
        k.numpy(),
        v.numpy(),
        mask=None if mask is None else mask.numpy(),
        causal=causal_of("top-left" if case.get("is_causal") else None),
    )
    tols = grad_budget(
        *(x.numpy() for x in (q, k, v)), d_o.numpy(), probs, 1 / np.sqrt(16), group
    )
    for name, leaf, leaf64, tol in zip(("dq", "dk", "dv"), leaves, leaves64, tols):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        check_o(name, leaf.grad.numpy(), leaf64.grad.numpy(), tol)


def test_dropout_gradients_use_the_forward_mask(engine):
    # With dropout, O is linear in V given the mask: dV = (P ∘ Z/(1 − p))ᵀ·dO, and the weights
    # the forward returns (same seed) are P ∘ Z/(1 − p).
    q, k, v = tensors(61, 1, 2, 6, 10, 8)
    p, seed = 0.3, 11
    w = engine.attention(q, k, v, dropout_p=p, dropout_seed=seed, return_weights=True).weights
    vv = v.clone().requires_grad_(True)
    d_o = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(62))
    engine.scaled_dot_product_attention(q, k, vv, dropout_p=p, dropout_seed=seed).backward(d_o)
    want = torch.einsum("bhmn,bhmd->bhnd", w.double(), d_o.double()).numpy()
    _, _, probs = reference(q.numpy(), k.numpy(), v.numpy())
    qn, kn, vn = (x.numpy() for x in (q, k, v))
    tol_dv = grad_budget(qn, kn, vn, d_o.numpy(), probs, 1 / np.sqrt(8), 1, dropout_p=p)[2]
    check_o("dV under dropout", vv.grad.numpy(), want, tol_dv)


def test_float_mask_gradient_against_torch_autograd(engine):
    # dBias of scaled_dot_product_attention's float attn_mask, broadcast over batch, heads or
    # query rows, against torch's autograd in float64 within the library's budget
    # (src/cpu/budget.rs: each dS term off by 4ε·2·g_dp·(logit terms + d), then a sum of
    # `terms`). A bias broadcast over the keys has a gradient of 0 (Σ_j P_ij·(dP_ij − D_i)),
    # which leaves only rounding to compare: not tested here.
    g = torch.Generator().manual_seed(91)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 4, 9, 16, generator=g),
               torch.randn(2, 4, 9, 16, generator=g))
    d_o = torch.randn(2, 4, 7, 16, generator=g)
    eps = float(np.finfo(np.float32).eps)
    amax = lambda x: float(x.abs().max())  # noqa: E731
    for shape in [(4, 7, 9), (1, 4, 1, 9), (7, 9)]:
        bias = torch.randn(*shape, generator=g)
        mine = bias.clone().requires_grad_(True)
        engine.scaled_dot_product_attention(q, k, v, attn_mask=mine).backward(d_o)
        b64 = bias.double().requires_grad_(True)
        F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=b64
        ).backward(d_o.double())
        assert mine.grad.shape == bias.shape
        logit_terms = 1.0 + 16**-0.5 * 16 * amax(q) * amax(k) + amax(bias)
        g_dp = 16 * amax(d_o) * amax(v)
        terms = 2 * 4 * 7 // int(np.prod(shape[:-1]))
        tol = 4 * eps * 2 * g_dp * (logit_terms + 32 + terms) * terms
        assert_close(f"dBias {shape}", mine.grad.numpy(), b64.grad.numpy(), tol)


def naive_attention(q, k, v):
    """Attention written out op by op, each result rounded to the inputs' type (as torch's eager
    attention computes): the same-dtype side of FlashAttention's criterion."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_meet_flash_attentions_criterion(engine, dtype):
    # Against a naive same-dtype attention (every op rounded to the type, as torch's eager
    # attention), both measured against float64 on the same rounded inputs: ours within twice
    # its error plus one rounding of the largest gradient (tests/half_backward.rs).
    g = torch.Generator().manual_seed(92)
    q, k, v, d_o = (torch.randn(2, 4, 9, 16, generator=g).to(dtype) for _ in range(4))
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]

    def grads(fn, cast):
        leaves = [x.detach().clone().to(cast).requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).backward(d_o.to(cast))
        return [x.grad for x in leaves]

    ours = grads(engine.scaled_dot_product_attention, dtype)
    same = grads(naive_attention, dtype)
    want = grads(naive_attention, torch.float64)
    for name, a, b, w in zip(("dq", "dk", "dv"), ours, same, want):
        assert a.dtype == dtype
        err = lambda x: float((x.double() - w).abs().max())  # noqa: E731
        allowed = 2 * err(b) + unit * float(w.abs().max())
        assert err(a) <= allowed, f"{name} {dtype}: {err(a):.3e} > {allowed:.3e}"


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


def test_route_sdpa_runs_a_torch_module_on_xattn(engine, monkeypatch):
    # nn.MultiheadAttention in training mode with need_weights=False calls
    # F.scaled_dot_product_attention; routed, its outputs and gradients stay within twice torch's
    # own f32 error against the module in float64 (FlashAttention's criterion), and xattn ran.
    import copy

    torch.manual_seed(70)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=24, vdim=24).train()
    x = torch.randn(2, 7, 32)
    src = torch.randn(2, 11, 24)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 8:] = True

    def run(module, dtype, routed):
        xx = x.to(dtype).detach().clone().requires_grad_(True)
        ctx = xattn.route_sdpa(engine) if routed else torch.enable_grad()
        with ctx:
            out, _ = module(xx, src.to(dtype), src.to(dtype), key_padding_mask=padding,
                            need_weights=False)
        out.backward(torch.ones_like(out))
        grads = [xx.grad] + [p.grad for p in module.parameters()]
        return out.detach(), grads

    calls = []
    real = xattn.scaled_dot_product_attention
    monkeypatch.setattr(
        xattn, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    m32, m32r, m64 = copy.deepcopy(mha), copy.deepcopy(mha), copy.deepcopy(mha).double()
    out_torch, g_torch = run(m32, torch.float32, False)
    out_xattn, g_xattn = run(m32r, torch.float32, True)
    assert calls, "the routed module did not call xattn"
    assert torch.nn.functional.scaled_dot_product_attention is not xattn.scaled_dot_product_attention
    out_64, g_64 = run(m64, torch.float64, False)
    err = lambda a, b: float((a.double() - b).abs().max())  # noqa: E731
    assert err(out_xattn, out_64) <= 2 * err(out_torch, out_64), "output"
    for i, (gx, gt, g6) in enumerate(zip(g_xattn, g_torch, g_64)):
        assert err(gx, g6) <= 2 * err(gt, g6), f"gradient {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_torch_tensors_are_copied(engine, dtype):
    # Contiguous tensors are read in place (a NumPy view, uploaded from its buffer); strided
    # views are copied first, with the same results.
    q, k, v = tensors(63, 1, 2, 5, 14, 8, dtype=dtype)
    ks, vs = k[:, :, ::2], v[:, :, ::2]
    assert not ks.is_contiguous()
    got = engine.scaled_dot_product_attention(q, ks, vs)
    assert torch.equal(got, engine.scaled_dot_product_attention(q, ks.contiguous(), vs.contiguous()))
    view = k.transpose(1, 2)  # [B, S, H, d] as a view of [B, H, S, d]
    assert torch.equal(engine.upload(view, layout="bshd").to_torch(), view)

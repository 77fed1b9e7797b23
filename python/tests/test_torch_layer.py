"""xattn.MultiheadAttention.from_torch against the live torch modules: nn.MultiheadAttention in
float64 (outputs, weights, masks, layouts), gradients of the inputs and of the weights through
torch.autograd, an optimizer step seen by the layer; Hugging Face and diffusers modules where
transformers / diffusers are importable. Skipped without torch."""

import copy

import numpy as np
import pytest

import xattn
from conftest import assert_close, criterion, layer_reference, layer_tolerance

torch = pytest.importorskip("torch")


def weights_of(mha):
    """The weights of an nn.MultiheadAttention as conftest.layer_weights names them."""
    e = mha.embed_dim
    if mha.in_proj_weight is not None:
        q, k, v = mha.in_proj_weight.detach().split(e)
    else:
        q, k, v = (p.detach() for p in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
    w = {"q": q, "k": k, "v": v, "o": mha.out_proj.weight.detach()}
    if mha.in_proj_bias is not None:
        w.update(zip(("q_bias", "k_bias", "v_bias"), mha.in_proj_bias.detach().split(e)))
        w["o_bias"] = mha.out_proj.bias.detach()
    return {name: t.float().numpy() for name, t in w.items()}


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(kdim=24, vdim=20), dict(bias=False), dict(batch_first=False)],
    ids=["plain", "kdim-vdim", "no-bias", "seq-first"],
)
def test_from_torch_matches_the_module_in_float64(engine, kw):
    torch.manual_seed(80)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=kw.pop("batch_first", True), **kw).eval()
    layer = xattn.MultiheadAttention.from_torch(mha, engine=engine)
    b, m, n = 2, 7, 11
    query = randn(81, b, m, 32)
    key, value = randn(82, b, n, kw.get("kdim", 32)), randn(83, b, n, kw.get("vdim", 32))
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[1, 8:] = True
    bias = randn(84, b * 4, m, n)
    args = [query, key, value]
    if not mha.batch_first:
        args = [x.transpose(0, 1) for x in args]
    out, weights = layer(*args, key_padding_mask=padding, attn_mask=bias,
                         average_attn_weights=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    with torch.no_grad():
        want, want_w = copy.deepcopy(mha).double()(
            *(x.double() for x in args), key_padding_mask=padding, attn_mask=bias.double(),
            average_attn_weights=False,
        )
    if not mha.batch_first:
        out, want = out.transpose(0, 1), want.transpose(0, 1)
    w = weights_of(mha)
    tol, w_tol = layer_tolerance(w, query, key, value, 4, bias=bias.numpy())
    assert_close("out", out.detach().numpy(), want.numpy(), tol)
    assert_close("weights", weights.numpy(), want_w.numpy(), w_tol)


def test_unsupported_modules_say_what(engine):
    with pytest.raises(ValueError, match="add_bias_kv"):
        xattn.MultiheadAttention.from_torch(
            torch.nn.MultiheadAttention(16, 2, add_bias_kv=True), engine=engine
        )
    with pytest.raises(ValueError, match="add_zero_attn"):
        xattn.MultiheadAttention.from_torch(
            torch.nn.MultiheadAttention(16, 2, add_zero_attn=True), engine=engine
        )
    with pytest.raises(ValueError, match="Linear"):
        xattn.MultiheadAttention.from_torch(torch.nn.Linear(4, 4), engine=engine)


def test_gradients_of_inputs_and_weights_against_torch_autograd(engine):
    torch.manual_seed(85)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=24, vdim=24).eval()
    query, src = randn(86, 2, 7, 32), randn(87, 2, 11, 24)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[0, 9:] = True
    d_out = randn(88, 2, 7, 32)

    def run(module, dtype, routed):
        q = query.detach().clone().to(dtype).requires_grad_(True)
        s = src.detach().clone().to(dtype).requires_grad_(True)
        if routed:
            out, _ = xattn.MultiheadAttention.from_torch(module, engine=engine)(
                q, s, s, key_padding_mask=padding, need_weights=False
            )
        else:
            out, _ = module(q, s, s, key_padding_mask=padding, need_weights=False)
        out.backward(d_out.to(dtype))
        return [out.detach(), q.grad, s.grad] + [p.grad for p in module.parameters()]

    ours = run(copy.deepcopy(mha), torch.float32, True)
    torch32 = run(copy.deepcopy(mha), torch.float32, False)
    want = run(copy.deepcopy(mha).double(), torch.float64, False)
    names = ["out", "d_query", "d_source"] + [n for n, _ in mha.named_parameters()]
    for name, got, t32, w64 in zip(names, ours, torch32, want):
        assert got is not None and got.shape == w64.shape, name
        criterion(name, got, t32, w64)


def test_an_optimizer_step_reaches_the_layer(engine):
    torch.manual_seed(89)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    layer = xattn.MultiheadAttention.from_torch(mha, engine=engine)
    x = randn(90, 1, 5, 16)
    opt = torch.optim.SGD(mha.parameters(), lr=0.5)
    out, _ = layer(x.requires_grad_(True), need_weights=False)
    out.square().sum().backward()
    opt.step()
    with torch.no_grad():
        got, _ = layer(x, need_weights=False)
        want, _ = copy.deepcopy(mha).double()(*(x.double(),) * 3, need_weights=False)
    tol, _ = layer_tolerance(weights_of(mha), x.detach(), x.detach(), x.detach(), 2)
    assert_close("after a step", got.numpy(), want.numpy(), tol)


# --- Hugging Face and diffusers modules ----------------------------------------------------


def linear_weights(q, k, v, o):
    """The weights of four nn.Linear as conftest.layer_weights names them; an nn.Identity for
    W^O (BERT's self-attention leaves it to the next module) is the identity matrix."""
    w = {}
    for name, lin in zip("qkvo", (q, k, v, o)):
        if isinstance(lin, torch.nn.Identity):
            w[name] = np.eye(w["q"].shape[0], dtype=np.float32)
            continue
        w[name] = lin.weight.detach().numpy()
        if lin.bias is not None:
            w[name + "_bias"] = lin.bias.detach().numpy()
    return w


def check_module(engine, module, w, heads, scale=None, e=32, kdim=32):
    layer = xattn.MultiheadAttention.from_torch(module, engine=engine)
    x, src = randn(93, 2, 6, e), randn(94, 2, 10, kdim)
    out, weights = layer(x, src, src)
    want, p = layer_reference(w, x.numpy(), src.numpy(), src.numpy(), heads, scale=scale)
    tol, w_tol = layer_tolerance(w, x.numpy(), src.numpy(), src.numpy(), heads, scale=scale)
    assert_close(type(module).__name__, out.detach().numpy(), want, tol)
    assert_close("weights", weights.numpy(), p.mean(axis=1), w_tol)


def test_hugging_face_modules(engine):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bart.modeling_bart import BartAttention
    from transformers.models.t5.modeling_t5 import T5Attention

    torch.manual_seed(95)
    bart = BartAttention(32, 4, is_decoder=True, bias=True).eval()
    check_module(engine, bart, linear_weights(bart.q_proj, bart.k_proj, bart.v_proj,
                                              bart.out_proj), 4)
    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, is_decoder=True)
    t5 = T5Attention(config, has_relative_attention_bias=False).eval()
    check_module(engine, t5, linear_weights(t5.q, t5.k, t5.v, t5.o), 4, scale=1.0)
    with pytest.raises(ValueError, match="relative_attention_bias"):
        xattn.MultiheadAttention.from_torch(T5Attention(config, has_relative_attention_bias=True))
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    whisper = WhisperAttention(32, 4).eval()  # k_proj has no bias
    assert whisper.k_proj.bias is None
    check_module(engine, whisper, linear_weights(whisper.q_proj, whisper.k_proj,
                                                 whisper.v_proj, whisper.out_proj), 4)
    from transformers.models.bert.modeling_bert import BertSelfAttention

    bert = BertSelfAttention(transformers.BertConfig(hidden_size=32, num_attention_heads=4)).eval()
    w = linear_weights(bert.query, bert.key, bert.value, torch.nn.Identity())
    check_module(engine, bert, w, 4)


def test_diffusers_attention(engine):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(96)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=12, bias=True).eval()
    w = linear_weights(attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    check_module(engine, attn, w, 4, kdim=24)
    assert diffusers is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layer_gradients_meet_flash_attentions_criterion(engine, dtype):
    # The module in a half type: ours (weights kept in that type on the device, every sum in
    # f32) against torch's own module in that type, both against float64 on the same rounded
    # weights and inputs, within twice torch's error plus one rounding of the largest value.
    torch.manual_seed(97)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval().to(dtype)
    x, src, d_out = (randn(98, 2, 6, 32).to(dtype), randn(99, 2, 7, 32).to(dtype),
                     randn(100, 2, 6, 32).to(dtype))
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]

    def run(module, cast, routed):
        module = copy.deepcopy(module).to(cast)
        q = x.detach().clone().to(cast).requires_grad_(True)
        s = src.detach().clone().to(cast)
        call = xattn.MultiheadAttention.from_torch(module, engine=engine) if routed else module
        out, _ = call(q, s, s, need_weights=False)
        out.backward(d_out.to(cast))
        return [out.detach(), q.grad] + [p.grad for p in module.parameters()]

    ours, same, want = run(mha, dtype, True), run(mha, dtype, False), run(mha, torch.float64, False)
    names = ["out", "d_query"] + [n for n, _ in mha.named_parameters()]
    for name, a, b, w in zip(names, ours, same, want, strict=True):
        assert a.dtype == dtype, name
        err = lambda t: float((t.double() - w).abs().max())  # noqa: E731
        allowed = 2 * err(b) + unit * float(w.abs().max())
        assert err(a) <= allowed, f"{name} {dtype}: {err(a):.3e} > {allowed:.3e}"

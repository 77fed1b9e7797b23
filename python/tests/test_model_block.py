"""A Hugging Face block (BART's decoder layer: causal self-attention, cross-attention, MLP) and a
diffusers block (BasicTransformerBlock: self- and cross-attention), built from a config with
random init, their attention routed through xattn (`xattn.route_sdpa`): outputs and gradients
(of the inputs and of every parameter) as without, by FlashAttention's criterion against the
same block in float64. Skipped without torch, transformers or diffusers."""

import copy

import pytest

import xattn
from conftest import criterion

torch = pytest.importorskip("torch")


def compare(engine, monkeypatch, block, inputs, call):
    """Runs `call(block, *inputs)` in float32 with and without routing, and in float64;
    checks xattn ran and the criterion on the output and every gradient."""
    calls = []
    real = xattn.scaled_dot_product_attention
    monkeypatch.setattr(
        xattn, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )

    def run(dtype, routed):
        module = copy.deepcopy(block).to(dtype)
        xs = [x.detach().clone().to(dtype).requires_grad_(True) for x in inputs]
        with xattn.route_sdpa(engine) if routed else torch.enable_grad():
            out = call(module, *xs)
        # A random upstream gradient: all ones through BART's final LayerNorm would give
        # gradients of ~0 (rounding alone) before it.
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
        out.backward(g.to(dtype))
        return [out.detach()] + [x.grad for x in xs] + [p.grad for p in module.parameters()]

    ours = run(torch.float32, True)
    assert calls, "the routed block did not call xattn"
    torch32 = run(torch.float32, False)
    want = run(torch.float64, False)
    names = ["out"] + [f"d_input{i}" for i in range(len(inputs))]
    names += [name for name, _ in block.named_parameters()]
    for name, got, t32, w64 in zip(names, ours, torch32, want, strict=True):
        assert got is not None and got.shape == w64.shape, name
        criterion(name, got, t32, w64)


def test_a_bart_decoder_layer_routed_through_xattn(engine, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import BartConfig
    from transformers.models.bart.modeling_bart import BartDecoderLayer

    torch.manual_seed(100)
    config = BartConfig(d_model=32, decoder_attention_heads=4, decoder_ffn_dim=64, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0)
    config._attn_implementation = "sdpa"
    block = BartDecoderLayer(config, layer_idx=0).eval()
    x, enc = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    compare(engine, monkeypatch, block, [x, enc],
            lambda m, x, enc: m(x, encoder_hidden_states=enc, use_cache=False))


def test_a_diffusers_transformer_block_routed_through_xattn(engine, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(101)
    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24).eval()
    x, context = torch.randn(2, 16, 32), torch.randn(2, 9, 24)
    compare(engine, monkeypatch, block, [x, context],
            lambda m, x, c: m(x, encoder_hidden_states=c))

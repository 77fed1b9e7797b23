"""Error tables against torch in float64: xattn's error next to torch's own in the same dtype,
on seeded random inputs (needs torch; prints Markdown tables): SDPA's output per case and dtype,
then the gradients through torch.autograd (SDPA's dQ, dK, dV; the layer's output, input and
weight gradients, xattn.MultiheadAttention.from_torch against nn.MultiheadAttention)."""
import copy
import torch, xattn
F = torch.nn.functional
g = torch.Generator().manual_seed(0)
cases = {
    "plain [2,8,64,77,40]": dict(shape=(2, 8, 64, 77, 40), kw={}),
    "causal [2,8,64,64,64]": dict(shape=(2, 8, 64, 64, 64), kw=dict(is_causal=True)),
    "bool mask [1,4,33,300,64]": dict(shape=(1, 4, 33, 300, 64), kw="bool"),
    "float mask [1,4,33,300,64]": dict(shape=(1, 4, 33, 300, 64), kw="float"),
    "gqa 8/2 [1,8,16,200,128]": dict(shape=(1, 8, 16, 200, 128), kw=dict(enable_gqa=True), hkv=2),
}
print(f"| case | dtype | xattn | torch same dtype |\n|---|---|---|---|")
for name, c in cases.items():
    b, h, m, n, d = c["shape"]
    hkv = c.get("hkv", h)
    q = torch.randn(b, h, m, d, generator=g); k = torch.randn(b, hkv, n, d, generator=g); v = torch.randn(b, hkv, n, d, generator=g)
    kw = c["kw"]
    if kw == "bool":
        mk = torch.rand(b, 1, m, n, generator=g) < 0.7; mk[..., 0] = True; kw = dict(attn_mask=mk)
    elif kw == "float":
        kw = dict(attn_mask=torch.randn(m, n, generator=g))
    def kw_as(dt):
        out = dict(kw)
        if "attn_mask" in out and out["attn_mask"].is_floating_point():
            out["attn_mask"] = out["attn_mask"].to(dt)
        return out
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        qd, kd, vd = (x.to(dt) for x in (q, k, v))
        ref = F.scaled_dot_product_attention(qd.double(), kd.double(), vd.double(), **kw_as(torch.float64))
        got = xattn.scaled_dot_product_attention(qd, kd, vd, **kw_as(dt))
        own = F.scaled_dot_product_attention(qd, kd, vd, **kw_as(dt))
        e1 = (got.double() - ref).abs().max().item(); e2 = (own.double() - ref).abs().max().item()
        print(f"| {name} | {str(dt)[6:]} | {e1:.2e} | {e2:.2e} |")

# The layer (xattn.MultiheadAttention.from_torch) and the gradients through torch.autograd
# (of Q, K, V for SDPA; of the query and the weights for the layer), against float64 likewise.
print("\n| call | dtype | xattn | torch same dtype |\n|---|---|---|---|")
torch.manual_seed(0)
mha = torch.nn.MultiheadAttention(256, 8, batch_first=True, kdim=192, vdim=192).eval()
x, src = torch.randn(2, 64, 256, generator=g), torch.randn(2, 77, 192, generator=g)
d_out = torch.randn(2, 64, 256, generator=g)


def layer_run(module, dt, xattn_layer):
    m = copy.deepcopy(module).to(dt)
    xx = x.detach().clone().to(dt).requires_grad_(True)
    call = xattn.MultiheadAttention.from_torch(m) if xattn_layer else m
    out, _ = call(xx, src.to(dt), src.to(dt), need_weights=False)
    out.backward(d_out.to(dt))
    return [("layer out", out.detach()), ("layer d_query", xx.grad),
            ("layer d_W_q", m.q_proj_weight.grad),
            ("layer d_W_k", m.k_proj_weight.grad), ("layer d_W_out", m.out_proj.weight.grad)]


def sdpa_run(fn, dt):
    q, k, v = (t.detach().clone().to(dt).requires_grad_(True) for t in (qs, ks, vs))
    fn(q, k, v, is_causal=True).backward(dos.to(dt))
    return [("sdpa causal dQ", q.grad), ("sdpa causal dK", k.grad), ("sdpa causal dV", v.grad)]


qs, ks, vs, dos = (torch.randn(2, 8, 64, 40, generator=g) for _ in range(4))
for dt in (torch.float32, torch.float16, torch.bfloat16):
    runs = [(lambda d, xl: sdpa_run(xattn.scaled_dot_product_attention if xl else
                                    F.scaled_dot_product_attention, d))]
    if dt == torch.float32:  # torch's layer has no half CPU backward for every op
        runs.append(lambda d, xl: layer_run(mha, d, xl))
    for run in runs:
        ref, ours, own = run(torch.float64, False), run(dt, True), run(dt, False)
        for (name, r), (_, a), (_, b) in zip(ref, ours, own):
            e1 = (a.double() - r).abs().max().item(); e2 = (b.double() - r).abs().max().item()
            print(f"| {name} | {str(dt)[6:]} | {e1:.2e} | {e2:.2e} |")

"""Error table against torch's SDPA in float64: xattn's error next to torch's own SDPA in the
same dtype, on seeded random inputs (needs torch; prints a Markdown table)."""
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

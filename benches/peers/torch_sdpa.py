#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes of `xattn bench`, for side-by-side
ratios on a lent GPU (../shared/GPU-CHECK.md). Prints one JSON list with the fields
`xattn bench --json` writes that compare.py reads: name, batch, heads, m, n, d_k, d_v, dtype,
median_ms, min_ms, gflops, runs, warmup, timing, adapter, and max_abs_err against a float64
reference computed on the same device.

Usage: torch_sdpa.py [--suite quick|standard] [--dtype f32,f16,bf16] [--runs 5] [--warmup 2]
                     [--json OUT]
"""
import argparse
import json
import sys

import torch

SUITES = {
    # name, batch, heads, M, N, d: the same as src/bin/xattn/suite.rs
    "quick": [
        ("diffusion", 1, 8, 1024, 77, 40),
        ("decode", 1, 8, 1, 1500, 64),
        ("square", 1, 8, 256, 256, 64),
        ("perceiver", 1, 1, 64, 4096, 64),
    ],
    "standard": [
        ("diffusion", 1, 8, 4096, 77, 40),
        ("decode", 1, 8, 1, 1500, 64),
        ("square", 1, 8, 1024, 1024, 64),
        ("perceiver", 1, 1, 256, 16384, 64),
    ],
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def flops(b, h, m, n, d):
    # As xattn counts: Q·Kᵀ and P·V, two multiply-adds each.
    return 4.0 * b * h * m * n * d


def run(name, b, h, m, n, d, dtype, runs, warmup, device):
    g = torch.Generator(device="cpu").manual_seed(7)
    # [batch, heads, seq, d] as SDPA takes them.
    q, k, v = (torch.randn(b, h, s, d, generator=g) for s in (m, n, n))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().to(device), k.double().to(device), v.double().to(device)
    )
    q, k, v = (x.to(device=device, dtype=DTYPES[dtype]) for x in (q, k, v))
    # fp32 without TF32, as xattn computes.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for _ in range(warmup):
        sdpa(q, k, v)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = sdpa(q, k, v)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    median = times[len(times) // 2]
    err = (out.double() - want).abs().max().item()
    return {
        "name": name, "batch": b, "heads": h, "m": m, "n": n, "d_k": d, "d_v": d,
        "dtype": dtype, "path": "torch-sdpa", "median_ms": median, "min_ms": times[0],
        "gflops": flops(b, h, m, n, d) / median / 1e6, "runs": runs, "warmup": warmup,
        "timing": "cuda-events", "adapter": torch.cuda.get_device_name(device),
        "max_abs_err": err,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="standard", choices=SUITES)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_sdpa.py: no CUDA device")
    device = torch.device("cuda")
    records = [
        run(*shape, dtype, a.runs, a.warmup, device)
        for dtype in a.dtype.split(",")
        for shape in SUITES[a.suite]
    ]
    for r in records:
        print(f"{r['name']:10s} {r['dtype']:5s} {r['median_ms']:9.3f} ms "
              f"{r['gflops']:9.1f} GFLOP/s  max|err| {r['max_abs_err']:.2e}", file=sys.stderr)
    text = json.dumps(records, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()

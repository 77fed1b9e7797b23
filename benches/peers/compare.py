#!/usr/bin/env python3
"""Side-by-side table of `xattn bench --json` records and a peer's (torch_sdpa.py): per shape,
dtype and xattn path, both medians and xattn's speed as a ratio (peer time / xattn time: above 1
is xattn faster).

Usage: compare.py XATTN.json PEER.json
"""
import json
import sys


def key(r):
    return (r["name"], r.get("dtype", "f32"))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours = json.load(open(sys.argv[1]))
    peer = {key(r): r for r in json.load(open(sys.argv[2]))}
    print("| shape | dtype | xattn path | xattn ms (GFLOP/s) | peer ms (GFLOP/s) | peer / xattn |")
    print("|---|---|---|---|---|---|")
    for r in ours:
        p = peer.get(key(r))
        if p is None or r.get("median_ms") is None:
            continue
        shape = f"{r['name']} B{r['batch']} H{r['heads']} M{r['m']} N{r['n']} d{r['d_k']}"
        print(f"| {shape} | {key(r)[1]} | {r['path']} | {r['median_ms']:.3f} ({r['gflops']:.1f}) "
              f"| {p['median_ms']:.3f} ({p['gflops']:.1f}) | {p['median_ms'] / r['median_ms']:.2f}× |")


if __name__ == "__main__":
    main()

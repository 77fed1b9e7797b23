"""The binding's per-call overhead: the same work as bench/overhead-rust (upload Q, K, V,
attention, O back to the host; median of the runs) through the Python package.

    cargo run --release --manifest-path python/bench/overhead-rust/Cargo.toml
    python python/bench/overhead.py

Run them alternately on a quiet machine: the difference of the medians is the binding's cost
(argument checks, the copies into and out of NumPy arrays, the host transpose for "bhsd").
"""
import time
import numpy as np
import xattn

e = xattn.default_engine()
for name, (b, m, n, h, d), runs in [("small", (1, 1, 77, 2, 40), 200), ("large", (1, 1024, 77, 8, 40), 30)]:
    rng = np.random.default_rng(0)
    q = rng.random((b, m, h, d), dtype=np.float32) - 0.5
    k = rng.random((b, n, h, d), dtype=np.float32) - 0.5
    v = rng.random((b, n, h, d), dtype=np.float32) - 0.5
    qh, kh, vh = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    for label, call in [
        ("attention bshd", lambda: e.attention(q, k, v, layout="bshd")),
        ("sdpa bhsd", lambda: xattn.scaled_dot_product_attention(qh, kh, vh)),
    ]:
        times = []
        for i in range(runs + 5):
            t = time.perf_counter()
            call()
            if i >= 5:
                times.append(time.perf_counter() - t)
        print(f"python {name} {label}: median {np.median(times) * 1e3:.3f} ms over {runs}")

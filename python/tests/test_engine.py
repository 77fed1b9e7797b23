"""Adapters, engines, device tensors kept between calls, and threads sharing one engine."""

import threading

import numpy as np
import pytest

import xattn
from conftest import budget, causal_of, check_o, qkv, reference


def test_adapters_list_what_wgpu_sees(engine):
    found = xattn.adapters()
    assert found, "an engine exists, so wgpu sees at least one adapter"
    for i, a in enumerate(found):
        assert a["index"] == i
        assert {"name", "backend", "device_type", "driver", "vendor", "device"} <= set(a)
        assert isinstance(a["name"], str) and a["name"]
    assert engine.adapter["name"] in {a["name"] for a in found}


def test_engine_by_index_and_by_name(engine):
    found = xattn.adapters()
    index = next(i for i, a in enumerate(found) if a["name"] == engine.adapter["name"])
    by_index = xattn.Engine(index)
    assert by_index.adapter["name"] == found[index]["name"]
    by_name = xattn.Engine(found[index]["name"][:5].upper())  # substring, any case
    assert found[index]["name"][:5].lower() in by_name.adapter["name"].lower()
    q, k, v = qkv(30, 1, 2, 4, 6, 8)
    want, _, _ = reference(q, k, v)
    for e in (by_index, by_name):
        check_o("O", e.scaled_dot_product_attention(q, k, v), want, budget(q, k, v)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_upload_round_trips(engine, dtype, layout):
    x = np.random.default_rng(31).standard_normal((2, 3, 5, 4)).astype(dtype)
    t = engine.upload(x, layout=layout)
    assert t.shape == x.shape and t.dtype == np.dtype(dtype).name and t.layout == layout
    back = t.to_numpy()
    assert back.dtype == dtype and np.array_equal(back, x)


def test_decoding_loop_uploads_kv_once(engine):
    b, h, n, d = 2, 4, 37, 16
    _, k, v = qkv(32, b, h, 1, n, d, hkv=2)
    k_dev, v_dev = engine.upload(k), engine.upload(v)
    rng = np.random.default_rng(320)
    for step in range(4):
        q = rng.standard_normal((b, h, 1, d)).astype(np.float32)
        res = engine.attention(q, k_dev, v_dev, return_lse=True)
        want, lse, _ = reference(q, k, v)
        tol_o, tol_lse, _ = budget(q, k, v)
        check_o(f"O step {step}", res.out, want, tol_o)
        check_o(f"LSE step {step}", res.lse, lse, tol_lse * (1 + np.abs(lse).max()))
    # The same through the SDPA call, and a device Q in the library's layout.
    q = rng.standard_normal((b, h, 3, d)).astype(np.float32)
    q_dev = engine.upload(np.ascontiguousarray(q.transpose(0, 2, 1, 3)), layout="bshd")
    got = engine.scaled_dot_product_attention(q_dev, k_dev, v_dev, is_causal=True, enable_gqa=True)
    want, _, _ = reference(q, k, v, causal=causal_of("top-left"))
    check_o("O device q", got, want, budget(q, k, v)[0])


def test_threads_share_one_engine(engine):
    # Several threads call the same engine at once (the GIL is released while the device
    # works); every result must be its own inputs' attention.
    errors, results = [], {}

    def worker(t):
        try:
            for i in range(4):
                seed = 100 * t + i
                q, k, v = qkv(seed, 1, 2, 3 + t, 5 + i, 8)
                got = engine.attention(q, k, v, causal="bottom-right")
                want, _, _ = reference(q, k, v, causal=causal_of("bottom-right"))
                check_o(f"thread {t} call {i}", got, want, budget(q, k, v)[0])
                results[(t, i)] = True
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 16


def test_the_default_engine_is_one_engine(engine):
    assert xattn.default_engine() is engine

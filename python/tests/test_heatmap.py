"""xattn.heatmap: PNG pictures of weights for notebooks (no image library needed to check them:
the PNG header is read with struct and the pixels inflated with zlib)."""

import struct
import zlib

import numpy as np
import pytest

import xattn
from conftest import qkv


def png_info(png):
    """(width, height, rows of RGB pixels) of an 8-bit RGB, non-interlaced PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        body = png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = ihdr
    assert (depth, colour, interlace) == (8, 2, 0), "8-bit RGB, not interlaced"
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height


def test_weights_draw_as_a_png(engine):
    q, k, v = qkv(60, 1, 2, 6, 9, 8)
    res = engine.attention(q, k, v, causal="top-left", return_weights=True)
    pic = xattn.heatmap(
        res.weights[0, 1],
        q_labels=[f"q{i}" for i in range(6)],
        k_labels=[f"k{j}" for j in range(9)],
        caption="batch 0, head 1",
    )
    assert isinstance(pic, xattn.Heatmap)
    assert pic._repr_png_() is pic.png
    width, height = png_info(pic.png)
    assert width > 9 and height > 6


def test_large_maps_are_pooled(engine, tmp_path):
    w = np.random.default_rng(61).random((3000, 40), dtype=np.float32)
    pic = xattn.heatmap(w, pool="mean", k_labels=[str(j) for j in range(40)])
    width, height = png_info(pic.png)
    assert height < 3000
    path = tmp_path / "map.png"
    pic.save(path)
    assert path.read_bytes() == pic.png


def test_bad_maps(engine):
    with pytest.raises(ValueError, match="2-D"):
        xattn.heatmap(np.ones((2, 3, 4), dtype=np.float32))
    bad = np.ones((3, 4), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        xattn.heatmap(bad)
    with pytest.raises(ValueError):
        xattn.heatmap(np.ones((3, 4), dtype=np.float32), q_labels=["a"])  # one per row
    with pytest.raises(ValueError, match="pool"):
        xattn.heatmap(np.ones((3, 4), dtype=np.float32), pool="median")

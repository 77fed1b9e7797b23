// Packs f32 values into half-precision pairs: word j of `dst` holds elements 2j (low 16 bits)
// and 2j + 1 (high), rounded to nearest; a missing last element is 0. One invocation per word,
// so no two invocations write one word. f16 by pack2x16float, bf16 by rounding the f32 bits to
// nearest-even (NaN stays NaN). TO_BF16 comes from the specialization prelude.

struct PackParams {
    elems: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: PackParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

const WG: u32 = 64u;

fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if x != x {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let word = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * WG;
    let first = 2u * word;
    if first >= p.elems {
        return;
    }
    let lo = src[first];
    var hi = 0.0;
    if first + 1u < p.elems {
        hi = src[first + 1u];
    }
    if TO_BF16 {
        dst[word] = to_bf16(lo) | (to_bf16(hi) << 16u);
    } else {
        dst[word] = pack2x16float(vec2<f32>(lo, hi));
    }
}

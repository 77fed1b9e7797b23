// Element-wise sum into an accumulator: acc[i] += x[i] for i < elems (f32). What a backward
// uses where one input feeds several products and its gradient is their sum (a layer's
// input read by two projections). One invocation per element, so no two write one element;
// the grid folds into x, y and z for large tensors.

// Keep in sync with AddParams in src/params.rs; tests/shaders.rs checks the layout.
struct AddParams {
    elems: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: AddParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc: array<f32>;

const WG: u32 = 64u;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * WG;
    if i < p.elems {
        acc[i] += x[i];
    }
}

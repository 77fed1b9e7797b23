//! The backward of a multi-head attention layer as one program: the forward's projections
//! and attention recomputed (as activation checkpointing does: nothing of the forward call is
//! kept), then W^O's backward, the attention's backward and the projections' backward, each
//! a GEMM of `linear_grad` (transposed products, f32 accumulation).

use crate::dtype::DType;
use crate::error::Result;
use crate::mha::MhaConfig;
use crate::plan::attention::append;
use crate::plan::backward::{self, GradIo};
use crate::plan::check::check_loops;
use crate::plan::device::DeviceCaps;
use crate::plan::layer::{declare_layer_inputs, f32_bytes, linear, linear_backward, projected_io};
use crate::plan::request::Request;
use crate::program::{BufferId, Program};

/// A layer backward as one program and its buffers.
#[derive(Clone, Debug)]
pub struct LayerBackward {
    /// Forward recomputation, then the backward.
    pub program: Program,
    /// Query input `[batch, M, embed_dim]`.
    pub query: BufferId,
    /// Key and value: the raw inputs, or a cache's projected K and V.
    pub source: [BufferId; 2],
    /// Weight and bias of W^Q, W^K, W^V, W^O.
    pub params: [[BufferId; 2]; 4],
    /// The attention's lengths, mask and bias inputs.
    pub masks: [BufferId; 3],
    /// The gradient of the layer's output `[batch, M, embed_dim]`, f32.
    pub d_out: BufferId,
    /// Gradients of the query and of the two source inputs (f32, like them).
    pub d_inputs: [BufferId; 3],
    /// Gradients of the weights and biases (f32), where the layer has them (W^K and W^V:
    /// not on the cached path, whose K and V are inputs).
    pub d_params: [[Option<BufferId>; 2]; 4],
}

/// The backward program of a layer with sizes `c` for the attention `req` (f32, no weights
/// or statistics), inputs of `x_type`, weights of `w_type`, biases where `has_bias`; K and V
/// from a cache where `cached`.
pub fn layer_backward_program(
    c: &MhaConfig,
    req: &Request,
    (cached, has_bias): (bool, [bool; 4]),
    (x_type, w_type): (DType, DType),
    caps: &DeviceCaps,
) -> Result<LayerBackward> {
    let s = req.shape;
    let (batch, m, n) = (s.batch, s.m, s.n);
    let (rows_q, rows_s) = (batch * m, batch * n);
    let mut program = Program::new();
    let (query, source, params, masks) =
        declare_layer_inputs(&mut program, c, req, (cached, has_bias), (x_type, w_type));
    let d_out = program.input("d_out", f32_bytes(rows_q * c.embed_dim));
    let d_inputs = [
        program.output("d_query", f32_bytes(rows_q * c.embed_dim)),
        program.output(
            "d_key",
            f32_bytes(rows_s * if cached { c.kv_dim() } else { c.kdim }),
        ),
        program.output(
            "d_value",
            f32_bytes(rows_s * if cached { c.kv_dim() } else { c.vdim }),
        ),
    ];
    let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
    let sizes = [(inner, e), (kv, c.kdim), (kv, c.vdim), (e, inner)];
    let names = ["q", "k", "v", "o"];
    let d_params: [[Option<BufferId>; 2]; 4] = std::array::from_fn(|i| {
        if cached && (i == 1 || i == 2) {
            return [None, None];
        }
        let (out, inp) = sizes[i];
        [
            Some(program.output(&format!("d_w_{}", names[i]), f32_bytes(out * inp))),
            has_bias[i].then(|| program.output(&format!("d_b_{}", names[i]), f32_bytes(out))),
        ]
    });

    // The forward, recomputed: projections and attention (O and LSE).
    let q_bytes = f32_bytes(rows_q * inner);
    let kv_bytes = f32_bytes(rows_s * kv);
    let io = projected_io(&mut program, c, &s, (cached, source, masks), None);
    let inputs = [query, source[0], source[1]];
    let targets = [io.q, io.k, io.v];
    for i in 0..3 {
        if cached && i > 0 {
            continue;
        }
        let [w, b] = params[i];
        let (out, inp) = sizes[i];
        let rows = if i == 0 { rows_q } else { rows_s };
        linear(
            &mut program,
            (rows, inp, out),
            [inputs[i], w, b, targets[i]],
            (x_type, w_type),
            has_bias[i],
            caps,
        )?;
    }
    append(req, caps, &mut program, &io)?;

    // W^O: dO = dY·W^O, dW^O = dYᵀ·O, db^O = Σ dY.
    let d_o = program.scratch("d_o", q_bytes);
    let absent = |program: &mut Program, name: &str, id: Option<BufferId>| {
        id.unwrap_or_else(|| program.absent(name))
    };
    let [dw_o, db_o] = d_params[3];
    let dw_o = dw_o.expect("W^O always has its gradient");
    let db_o = absent(&mut program, "d_b_o", db_o);
    linear_backward(
        &mut program,
        (rows_q, inner, e),
        [io.o, params[3][0], d_out, d_o, dw_o, db_o],
        (DType::F32, w_type),
        has_bias[3],
        caps,
    )?;

    // The attention's backward into dQ, dK, dV (the cache's gradients on the cached path).
    let dq = program.scratch("dq", q_bytes);
    let (dk, dv) = if cached {
        (d_inputs[1], d_inputs[2])
    } else {
        (
            program.scratch("dk", kv_bytes),
            program.scratch("dv", kv_bytes),
        )
    };
    let grad_io = GradIo {
        q: io.q,
        k: io.k,
        v: io.v,
        lens: io.lens,
        mask: io.mask,
        bias: io.bias,
        o: io.o,
        lse: io.lse,
        d_o,
        dq,
        dk,
        dv,
        dbias: None,
    };
    backward::append(req, (DType::F32, DType::F32), caps, &mut program, &grad_io)?;

    // The projections' backward: dX = dZ·W, dW = dZᵀ·X, db = Σ dZ.
    let grads = [dq, dk, dv];
    for i in 0..3 {
        if cached && i > 0 {
            continue;
        }
        let [dw, db] = d_params[i];
        let dw = dw.expect("an input projection has its gradient");
        let db = absent(&mut program, &format!("d_b_{}", names[i]), db);
        let (out, inp) = sizes[i];
        let rows = if i == 0 { rows_q } else { rows_s };
        linear_backward(
            &mut program,
            (rows, inp, out),
            [inputs[i], params[i][0], grads[i], d_inputs[i], dw, db],
            (x_type, w_type),
            has_bias[i],
            caps,
        )?;
    }
    check_loops(&program, caps)?;
    Ok(LayerBackward {
        program,
        query,
        source,
        params,
        masks,
        d_out,
        d_inputs,
        d_params,
    })
}

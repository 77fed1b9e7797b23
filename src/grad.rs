//! The backward of attention on the device: [`Engine::prepare_backward`],
//! [`Engine::attention_backward`] and [`Engine::attention_backward_host`]. Planned by
//! [`crate::plan::backward`].

use std::collections::HashMap;

use crate::call::Prepared;
use crate::dtype::DType;
use crate::engine::{dims4, Attention, Engine, HostOutput, Scratch};
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::plan::BackwardPlan;

/// Gradients of one attention call on the device, in the layouts of its inputs: dQ like Q
/// `[batch, M, q_heads, d_k]`, dK like K, dV like V (summed over the query heads that share a
/// K/V head), and dBias in the bias's own dims where asked for
/// ([`Attention::with_bias_grad`]).
#[derive(Debug)]
pub struct Grads {
    /// dQ.
    pub dq: Tensor,
    /// dK.
    pub dk: Tensor,
    /// dV.
    pub dv: Tensor,
    /// dBias (f32), where asked for.
    pub dbias: Option<Tensor>,
}

/// [`Grads`] on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostGrads {
    /// dQ.
    pub dq: Vec<f32>,
    /// dK.
    pub dk: Vec<f32>,
    /// dV.
    pub dv: Vec<f32>,
    /// dBias, where asked for.
    pub dbias: Option<Vec<f32>>,
}

impl Engine {
    /// What [`Engine::attention_backward`] would run.
    pub fn plan_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, d_o): (&Tensor, &Tensor),
        opts: &Attention,
    ) -> Result<BackwardPlan> {
        let req = self.request(q, k, v, opts)?;
        if d_o.dtype() != o.dtype() {
            return Err(Error::Argument(format!(
                "d_o is {} but o is {}; the gradient of O comes in O's type",
                d_o.dtype(),
                o.dtype()
            )));
        }
        if opts.bias_grad() && req.masks.bias_dims.is_none() {
            return Err(Error::Argument(
                "the bias gradient was asked for, but the call has no bias".into(),
            ));
        }
        let grad_dtype = opts.grad_dtype_for(req.dtype);
        BackwardPlan::new(&req, (o.dtype(), grad_dtype), opts.bias_grad(), self.caps())
    }

    /// Validates and plans the backward of one attention call once and binds it to its
    /// inputs: Q, K, V and the options of the forward, the forward's O and LSE
    /// ([`Engine::attention`]'s outputs), and dO (like O, in O's type); new gradients and
    /// scratch of its own. P is rebuilt from the LSE tile by tile (nothing M×N is stored);
    /// dropout regenerates the forward's mask from its seed and offset. Rows that saw no key
    /// get zero gradients.
    pub fn prepare_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &Attention,
    ) -> Result<Prepared<Grads>> {
        self.bind_backward(qkv, (o, lse), d_o, opts, Scratch::Own)
    }

    /// The gradients dQ, dK, dV (and dBias) of one attention call: [`Engine::prepare_backward`]
    /// and one run, with scratch from the engine's pool.
    pub fn attention_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &Attention,
    ) -> Result<Grads> {
        self.bind_backward(qkv, (o, lse), d_o, opts, Scratch::Pool)?
            .finish()
    }

    /// Forward and backward on host slices: uploads, runs the forward, then the backward of
    /// `d_o` (`[batch, M, q_heads, d_v]`), downloads both.
    pub fn attention_backward_host(
        &self,
        q: (&[f32], [usize; 4]),
        k: (&[f32], [usize; 4]),
        v: (&[f32], [usize; 4]),
        d_o: &[f32],
        opts: &Attention,
    ) -> Result<(HostOutput, HostGrads)> {
        let ctx = self.context();
        let q = Tensor::upload(ctx, "q", q.0, &q.1)?;
        let k = Tensor::upload(ctx, "k", k.0, &k.1)?;
        let v = Tensor::upload(ctx, "v", v.0, &v.1)?;
        let out = self.attention(&q, &k, &v, opts)?;
        let d_o = Tensor::upload(ctx, "d_o", d_o, out.o.dims())?;
        let grads = self.attention_backward((&q, &k, &v), (&out.o, &out.lse), &d_o, opts)?;
        let host = HostOutput {
            o: out.o.to_host()?,
            lse: out.lse.to_host()?,
            weights: out.weights.map(|w| w.to_host()).transpose()?,
            stats: out.stats.try_map(|t| t.to_host())?,
        };
        let grads = HostGrads {
            dq: grads.dq.to_host()?,
            dk: grads.dk.to_host()?,
            dv: grads.dv.to_host()?,
            dbias: grads.dbias.map(|t| t.to_host()).transpose()?,
        };
        Ok((host, grads))
    }

    fn bind_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &Attention,
        scratch: Scratch,
    ) -> Result<Prepared<Grads>> {
        let plan = self.plan_backward((q, k, v), (o, d_o), opts)?;
        let s = plan.shape();
        for (t, name, dims) in [
            (o, "o", s.o_dims().to_vec()),
            (d_o, "d_o", s.o_dims().to_vec()),
            (lse, "lse", s.lse_dims().to_vec()),
        ] {
            if t.dims() != dims {
                return Err(Error::Shape(format!(
                    "{name} has dims {:?} but the call needs {dims:?}",
                    t.dims()
                )));
            }
        }
        dims4(o, "o")?;
        if lse.dtype() != DType::F32 {
            return Err(Error::Argument(format!(
                "lse is {}; the forward writes it in f32",
                lse.dtype()
            )));
        }
        let ctx = self.context();
        let grad_dtype = opts.grad_dtype_for(q.dtype());
        let grads = Grads {
            dq: Tensor::empty_as(ctx, "dq", &s.q_dims(), grad_dtype)?,
            dk: Tensor::empty_as(ctx, "dk", &s.k_dims(), grad_dtype)?,
            dv: Tensor::empty_as(ctx, "dv", &s.v_dims(), grad_dtype)?,
            dbias: match (plan.io().dbias, opts.masking().bias.as_ref()) {
                (Some(_), Some(b)) => Some(Tensor::empty(ctx, "dbias", &b.dims)?),
                _ => None,
            },
        };
        let masks = self.mask_inputs(&s, opts.masking())?;
        let io = plan.io();
        let mut tensors: Bindings = HashMap::from([
            (io.q, q),
            (io.k, k),
            (io.v, v),
            (io.o, o),
            (io.lse, lse),
            (io.d_o, d_o),
            (io.dq, &grads.dq),
            (io.dk, &grads.dk),
            (io.dv, &grads.dv),
        ]);
        masks.bind([io.lens, io.mask, io.bias], &mut tensors);
        if let (Some(id), Some(t)) = (io.dbias, &grads.dbias) {
            tensors.insert(id, t);
        }
        let bound = self.bind_program(plan.program(), &tensors, scratch)?;
        drop(tensors);
        Ok(Prepared::new(ctx, bound, None, grads))
    }
}

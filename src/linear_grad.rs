//! The backward of [`Engine::linear`]: [`Engine::linear_backward`] and its [`LinearGrads`];
//! [`Engine::add_into`], which sums the gradients of an input that feeds several products.

use std::collections::HashMap;

use crate::dtype::DType;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::plan;
use crate::program::Program;
use crate::shape::F32;

/// The gradients of `y = x·wᵀ + b` ([`Engine::linear`]) from the output's gradient `dy`,
/// all f32: what [`Engine::linear_backward`] returns.
#[derive(Debug)]
pub struct LinearGrads {
    /// `dx = dy·w`, shaped like `x` (`[.., in]`).
    pub dx: Tensor,
    /// `dw = dyᵀ·x` over all rows of `x`, `[out, in]`.
    pub dw: Tensor,
    /// `db = Σ_rows dy`, `[out]`, where the layer has a bias.
    pub db: Option<Tensor>,
}

impl Engine {
    /// The gradients of [`Engine::linear`] (`y = x·wᵀ + b`, PyTorch `Linear` layout: `x
    /// [.., in]` with any leading dims, `w [out, in]`) given `dy [.., out]`, the gradient of
    /// the loss with respect to `y` (f32, with `x`'s leading dims): `dx = dy·w`, `dw = dyᵀ·x`
    /// summed over every row of `x`, and `db = Σ_rows dy` where `bias` (the bias's value does
    /// not enter the gradients, so it is not an argument).
    ///
    /// `x` and `w` may be f32, f16 or bf16; every gradient is f32, its sums run in f32 in one
    /// deterministic order (no atomics) whatever the device's limits split. Errors:
    /// [`Error::Shape`] for mismatched dims, [`Error::Argument`] for a `dy` that is not f32,
    /// [`Error::Limit`] for sizes beyond the device's.
    pub fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        bias: bool,
    ) -> Result<LinearGrads> {
        let (Some((&in_dim, lead)), [out_dim, w_in]) = (x.dims().split_last(), w.dims()) else {
            return Err(Error::Shape(format!(
                "linear_backward needs x [.., in] and w [out, in], got x {:?} and w {:?}",
                x.dims(),
                w.dims()
            )));
        };
        let out_dim = *out_dim;
        if *w_in != in_dim {
            return Err(Error::Shape(format!(
                "x has {in_dim} features but w is {:?} ([out, in])",
                w.dims()
            )));
        }
        let mut dy_dims = lead.to_vec();
        dy_dims.push(out_dim);
        if dy.dims() != dy_dims {
            return Err(Error::Shape(format!(
                "dy has dims {:?}; for x {:?} and w {:?} it must be {dy_dims:?}",
                dy.dims(),
                x.dims(),
                w.dims()
            )));
        }
        if dy.dtype() != DType::F32 {
            return Err(Error::Argument(format!(
                "dy is {}; linear_backward reads it as f32",
                dy.dtype()
            )));
        }
        let rows = lead.iter().product::<usize>();
        let f32_bytes = |elems: usize| elems as u64 * F32;
        let mut program = Program::new();
        let xs = program.input("x", x.dtype().bytes(rows * in_dim));
        let ws = program.input("w", w.dtype().bytes(out_dim * in_dim));
        let dys = program.input("dy", f32_bytes(rows * out_dim));
        let dxs = program.output("dx", f32_bytes(rows * in_dim));
        let dws = program.output("dw", f32_bytes(out_dim * in_dim));
        let dbs = if bias {
            program.output("db", f32_bytes(out_dim))
        } else {
            program.absent("db")
        };
        plan::linear_backward(
            &mut program,
            (rows, in_dim, out_dim),
            [xs, ws, dys, dxs, dws, dbs],
            (x.dtype(), w.dtype()),
            bias,
            self.caps(),
        )?;
        plan::check_loops(&program, self.caps())?;
        let ctx = self.context();
        let grads = LinearGrads {
            dx: Tensor::empty(ctx, "linear_dx", x.dims())?,
            dw: Tensor::empty(ctx, "linear_dw", &[out_dim, in_dim])?,
            db: bias
                .then(|| Tensor::empty(ctx, "linear_db", &[out_dim]))
                .transpose()?,
        };
        let mut tensors = HashMap::from([
            (xs, x),
            (ws, w),
            (dys, dy),
            (dxs, &grads.dx),
            (dws, &grads.dw),
        ]);
        if let Some(db) = &grads.db {
            tensors.insert(dbs, db);
        }
        self.execute(&program, &tensors)?;
        Ok(grads)
    }

    /// `acc += x` element by element on the device (both f32, of the same dims): the gradient
    /// of an input that feeds several products is the sum of theirs (a layer whose input is
    /// projected twice). Errors: [`Error::Shape`] for different dims, [`Error::Argument`] for
    /// a tensor that is not f32 or for `acc` and `x` in one buffer.
    pub fn add_into(&self, acc: &Tensor, x: &Tensor) -> Result<()> {
        if acc.dims() != x.dims() {
            return Err(Error::Shape(format!(
                "add_into needs tensors of one shape, got acc {:?} and x {:?}",
                acc.dims(),
                x.dims()
            )));
        }
        if acc.dtype() != DType::F32 || x.dtype() != DType::F32 {
            return Err(Error::Argument(format!(
                "add_into sums f32 tensors, got acc {} and x {}",
                acc.dtype(),
                x.dtype()
            )));
        }
        if acc.buffer() == x.buffer() {
            return Err(Error::Argument(
                "add_into: acc and x share one buffer, which one dispatch cannot both read and \
                 write"
                    .into(),
            ));
        }
        let mut program = Program::new();
        let bytes = x.dtype().bytes(x.len());
        let xs = program.input("x", bytes);
        let accs = program.output("acc", bytes);
        plan::add(&mut program, x.len(), [xs, accs], self.caps())?;
        self.execute(&program, &HashMap::from([(xs, x), (accs, acc)]))
    }
}

//! `add`: `acc += x` element by element (f32), for gradients that are sums of products.

use crate::cpu;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{Access, KernelSpec, LoopCost};
use crate::params::AddParams;

/// The specialization of `add` (none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Add;

impl KernelSpec for Add {
    type Params = AddParams;
    const NAME: &'static str = "add";
    const FILE: &'static str = include_str!("../../shaders/add.wgsl");
    const LONG_LOOP: &'static str = "(none)";

    fn bindings(&self) -> &'static [Access] {
        // x → acc
        &[Uniform, Read, ReadWrite]
    }

    /// One element per invocation, no loop.
    fn loop_cost(&self, _: &AddParams) -> (LoopCost, u64) {
        (LoopCost::NONE, 0)
    }

    fn twin(&self, p: &AddParams, buffers: &mut [Vec<u32>]) {
        cpu::add::run(p, buffers)
    }
}

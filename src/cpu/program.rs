//! The CPU executor: runs any [`Program`] through the kernels' twins, step by step, as the
//! GPU executor runs it through the shaders. Tests hold its results against the f64
//! reference, so every program the planner builds is checked without a GPU.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::program::{BufferId, Program, Role, Step};

/// Host buffers by id, as 32-bit words (f32 data by its bits: [`words`], [`floats`]).
pub type HostBuffers = HashMap<BufferId, Vec<u32>>;

/// The bits of `data`.
pub fn words(data: &[f32]) -> Vec<u32> {
    bytemuck::cast_slice(data).to_vec()
}

/// The floats whose bits are `data`.
pub fn floats(data: &[u32]) -> Vec<f32> {
    bytemuck::cast_slice(data).to_vec()
}

/// Runs `program` on `inputs` (one per declared input, at least its declared size) and
/// returns its outputs. Outputs and scratch start as NaN, so an element no step writes
/// stays NaN.
pub fn run(program: &Program, inputs: &HostBuffers) -> Result<HostBuffers> {
    let mut buffers: Vec<Vec<u32>> = Vec::with_capacity(program.buffers().len());
    for (id, decl) in program.declared() {
        let words = decl.bytes.div_ceil(4) as usize;
        buffers.push(match decl.role {
            Role::Input => {
                let given = inputs.get(&id).ok_or_else(|| {
                    Error::Argument(format!("input `{}` was not given", decl.name))
                })?;
                if given.len() < words {
                    return Err(Error::Shape(format!(
                        "input `{}` needs {words} words, got {}",
                        decl.name,
                        given.len()
                    )));
                }
                given.clone()
            }
            Role::Output | Role::Scratch => vec![f32::NAN.to_bits(); words],
            // Never read; a word for the kernels' binding.
            Role::Absent => vec![0; words],
        });
    }
    for step in program.steps() {
        match step {
            Step::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } => {
                let (from, to, n) = (
                    *src_offset as usize / 4,
                    *dst_offset as usize / 4,
                    *size as usize / 4,
                );
                let data = buffers[src.index()][from..from + n].to_vec();
                buffers[dst.index()][to..to + n].copy_from_slice(&data);
            }
            Step::Dispatch(d) => {
                // Each bound buffer moves out for the call and back after it.
                let mut bound: Vec<Vec<u32>> = d
                    .buffers
                    .iter()
                    .map(|id| std::mem::take(&mut buffers[id.index()]))
                    .collect();
                d.kernel.run_twin(&d.params, &mut bound);
                for (id, data) in d.buffers.iter().zip(bound) {
                    buffers[id.index()] = data;
                }
            }
        }
    }
    Ok(program
        .ids(Role::Output)
        .map(|id| (id, std::mem::take(&mut buffers[id.index()])))
        .collect())
}

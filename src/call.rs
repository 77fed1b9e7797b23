//! [`Prepared`]: one call (an attention or a layer forward) validated, planned and bound once.

use crate::engine::Output;
use crate::error::Result;
use crate::gpu::context::Context;
use crate::gpu::executor::{self, GpuTimer};
use crate::gpu::tensor::Tensor;
use crate::plan::Plan;

/// One call validated, planned and bound once ([`Engine::prepare`](crate::Engine::prepare),
/// [`MultiHeadAttention::prepare`](crate::MultiHeadAttention::prepare)): its program, inputs,
/// masks, outputs `O`, scratch, params and bind groups. Running it again allocates nothing
/// and reads the inputs' contents as they are at that time (a decoder writes the next query
/// into its input and runs again). Its scratch is its own, not the engine's pool: work it
/// recorded into a caller's encoder may still be unsubmitted when it is dropped.
#[derive(Debug)]
pub struct Prepared<O = Output> {
    ctx: Context,
    bound: executor::Bound,
    /// The attention's plan (attention calls only).
    plan: Option<Plan>,
    out: O,
}

impl<O> Prepared<O> {
    pub(crate) fn new(ctx: &Context, bound: executor::Bound, plan: Option<Plan>, out: O) -> Self {
        Self {
            ctx: ctx.clone(),
            bound,
            plan,
            out,
        }
    }

    /// Submits the call's passes and waits for them; reports any device error of this call.
    pub fn run(&self) -> Result<()> {
        self.bound.submit(&self.ctx, None)
    }

    /// [`Prepared::run`] with GPU timestamps around the call's passes: the milliseconds
    /// between the first pass's start and the last pass's end.
    pub fn run_timed(&self, timer: &GpuTimer) -> Result<f64> {
        self.bound.submit(&self.ctx, Some(timer))?;
        timer.read_ms(&self.ctx)
    }

    /// [`Prepared::run`] as a future: submits now and resolves when the device has finished,
    /// without blocking the awaiting thread (on native a waiter thread polls the device).
    pub async fn run_async(&self) -> Result<()> {
        let done = self.ctx.scoped(|| {
            self.bound.enqueue(&self.ctx, None);
            Ok(self
                .ctx
                .completion(|fire| self.ctx.queue.on_submitted_work_done(fire)))
        })?;
        done.await;
        self.ctx.settle().await
    }

    /// Records the call's passes into the caller's encoder, after whatever the caller
    /// recorded before and before what it records next; neither submits nor waits. Device
    /// errors of the recorded work surface where the caller submits (in its error scopes).
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        self.bound.record(encoder, None);
    }

    /// The outputs, as of the last completed run.
    pub fn output(&self) -> &O {
        &self.out
    }

    /// The outputs.
    pub fn into_output(self) -> O {
        self.out
    }

    /// Runs once and returns the outputs: the one-shot calls.
    pub(crate) fn finish(self) -> Result<O> {
        self.run()?;
        Ok(self.out)
    }
}

impl Prepared<Output> {
    /// O `[batch, M, q_heads, d_v]`, as of the last completed run.
    pub fn o(&self) -> &Tensor {
        &self.out.o
    }

    /// LSE `[batch, q_heads, M]`, as of the last completed run.
    pub fn lse(&self) -> &Tensor {
        &self.out.lse
    }

    /// The weights P, when the call asked for them.
    pub fn weights(&self) -> Option<&Tensor> {
        self.out.weights.as_ref()
    }

    /// What runs.
    pub fn plan(&self) -> &Plan {
        self.plan
            .as_ref()
            .expect("attention calls are prepared with their plan")
    }
}

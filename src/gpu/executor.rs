//! Turns a [`Program`] into compute passes and copies on the device.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::{lock_serial, Context, SerialLock};
use crate::gpu::pipelines::{Pipeline, PipelineCache};
use crate::gpu::pool::{BufferPool, Pooled};
use crate::gpu::tensor::Tensor;
use crate::program::{BufferId, Program, Role, Step};

/// GPU timestamps around a whole plan (on adapters with `TIMESTAMP_QUERY`).
#[derive(Debug)]
pub struct GpuTimer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    period_ns: f32,
}

impl GpuTimer {
    /// A timer, or `None` where the device has no timestamp queries.
    pub fn new(ctx: &Context) -> Option<Self> {
        if !ctx.has_timestamps() {
            return None;
        }
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("xattn.timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = ctx.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xattn.timer.resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Self {
            queries,
            resolve,
            period_ns: ctx.queue.get_timestamp_period(),
        })
    }

    /// Milliseconds between the first pass's start and the last pass's end of the last run.
    pub fn read_ms(&self, ctx: &Context) -> Result<f64> {
        ctx.blocking_read_allowed("reading GPU timestamps", "the host clock")?;
        ctx.scoped(|| {
            let staging = ctx.create_buffer(&wgpu::BufferDescriptor {
                label: Some("xattn.timer.read"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&self.resolve, 0, &staging, 0, 16);
            ctx.queue.submit([enc.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., |_| {});
            ctx.check()?;
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Gpu(format!("reading timestamps failed: {e}")))?;
            let t: &[u64] = bytemuck::cast_slice(&view);
            let ns = t[1].saturating_sub(t[0]) as f64 * f64::from(self.period_ns);
            Ok(ns / 1e6)
        })
    }
}

/// One recorded operation of a bound plan.
#[derive(Debug)]
enum Op {
    /// Consecutive dispatches in one compute pass.
    Pass(Vec<(Arc<Pipeline>, wgpu::BindGroup, [u32; 3])>),
    /// A buffer copy between passes.
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

/// A plan bound to its buffers: scratch allocated, params uploaded, pipelines compiled and
/// bind groups made. Recording it allocates nothing and reads the bound buffers' contents
/// at execution time; the bind groups keep every bound buffer alive.
#[derive(Debug)]
pub struct Bound {
    ops: Vec<Op>,
    passes: usize,
    /// Scratch and params, back to the pool when the bound plan is dropped.
    buffers: Vec<Pooled>,
    /// What it holds is dropped under it (see `context::SerialLock`).
    serial: SerialLock,
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _serial = lock_serial(&self.serial);
        self.ops.clear();
        self.buffers.clear();
    }
}

/// The caller's tensors for a program's inputs and outputs, by id.
pub type Bindings<'a> = HashMap<BufferId, &'a Tensor>;

/// Checks that `tensors` bind exactly the program's inputs and outputs, each large enough,
/// and that no output shares a wgpu buffer with an input (wgpu tracks usage per whole
/// buffer: one dispatch cannot read a buffer and write it).
fn check_bindings(program: &Program, tensors: &Bindings) -> Result<()> {
    for (id, decl) in program.declared() {
        match (decl.role, tensors.get(&id)) {
            (Role::Scratch, Some(_)) => {
                return Err(Error::Argument(format!(
                    "buffer `{}` is the program's scratch; it is not bound by the caller",
                    decl.name
                )))
            }
            (Role::Scratch, None) => {}
            (Role::Absent, Some(_)) => {
                return Err(Error::Argument(format!(
                    "buffer `{}` is absent from this program (its call has none); it is not \
                     bound by the caller",
                    decl.name
                )))
            }
            (Role::Absent, None) => {}
            (_, None) => {
                return Err(Error::Argument(format!(
                    "the program's {:?} buffer `{}` was not bound",
                    decl.role, decl.name
                )))
            }
            (_, Some(t)) if t.byte_len() < decl.bytes => {
                return Err(Error::Shape(format!(
                    "buffer `{}` needs {} bytes but its tensor {:?} holds {}",
                    decl.name,
                    decl.bytes,
                    t.dims(),
                    t.byte_len()
                )))
            }
            _ => {}
        }
    }
    if tensors.len() != program.ids(Role::Input).count() + program.ids(Role::Output).count() {
        return Err(Error::Argument(
            "a tensor is bound to a buffer the program does not declare".into(),
        ));
    }
    let of = |role| program.ids(role).map(|id| tensors[&id]);
    if let Some(shared) =
        of(Role::Output).find(|o| of(Role::Input).any(|i| i.buffer() == o.buffer()))
    {
        return Err(Error::Argument(format!(
            "an output {:?} shares its wgpu buffer with an input; wgpu cannot bind one buffer \
             for reading and writing in a dispatch, so outputs need buffers of their own \
             (inputs may share one)",
            shared.dims()
        )));
    }
    Ok(())
}

/// Binds `program` to the caller's tensors for its inputs and outputs (each at its own
/// offset) and to pooled buffers for its scratch. Device calls: run it inside
/// [`Context::scoped`].
pub fn bind(
    ctx: &Context,
    (cache, pool): (&PipelineCache, &Arc<BufferPool>),
    program: &Program,
    tensors: &Bindings,
) -> Result<Bound> {
    check_bindings(program, tensors)?;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let scratch: HashMap<BufferId, Pooled> = program
        .ids(Role::Scratch)
        .map(|id| {
            let decl = program.decl(id);
            let label = format!("xattn.scratch.{}", decl.name);
            (id, pool.take(ctx, &label, decl.bytes, usage))
        })
        .collect();
    // One placeholder for every absent input of the program.
    let absent = (program.ids(Role::Absent).count() > 0).then(|| {
        pool.take(
            ctx,
            "xattn.absent",
            crate::program::ABSENT_BYTES,
            wgpu::BufferUsages::STORAGE,
        )
    });
    let buffer = |id: BufferId| -> wgpu::BufferBinding {
        if program.decl(id).role == Role::Absent {
            let placeholder = absent
                .as_ref()
                .expect("taken where the program has absent inputs");
            return wgpu::BufferBinding {
                buffer: placeholder.buffer(),
                offset: 0,
                size: wgpu::BufferSize::new(crate::program::ABSENT_BYTES),
            };
        }
        match scratch.get(&id) {
            // A pooled buffer may be larger: bind the declared size.
            Some(b) => wgpu::BufferBinding {
                buffer: b.buffer(),
                offset: 0,
                size: wgpu::BufferSize::new(program.decl(id).bytes.max(4)),
            },
            None => {
                let t = tensors[&id];
                wgpu::BufferBinding {
                    buffer: t.buffer(),
                    offset: t.offset(),
                    size: wgpu::BufferSize::new(t.byte_len()),
                }
            }
        }
    };

    // All params in one uniform buffer, one aligned record per dispatch, each record as
    // large as the program's largest params.
    let largest = program
        .dispatches()
        .map(|d| d.params.len() as u64)
        .max()
        .unwrap_or(0);
    let stride = largest
        .max(1)
        .next_multiple_of(u64::from(ctx.limits.min_uniform_buffer_offset_alignment));
    let mut uniform_bytes = Vec::new();
    for d in program.dispatches() {
        uniform_bytes.extend_from_slice(&d.params);
        uniform_bytes.resize(uniform_bytes.len().next_multiple_of(stride as usize), 0);
    }
    if uniform_bytes.is_empty() {
        uniform_bytes.resize(stride as usize, 0);
    }
    let params = pool.take(
        ctx,
        "xattn.params",
        uniform_bytes.len() as u64,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    );
    let uniforms = params.buffer();
    ctx.queue.write_buffer(uniforms, 0, &uniform_bytes);

    // Consecutive dispatches share a pass; copies go between passes.
    let mut ops: Vec<Op> = Vec::new();
    let mut record = 0u64;
    for step in program.steps() {
        match step {
            Step::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } => {
                let (from, to) = (buffer(*src), buffer(*dst));
                ops.push(Op::Copy {
                    src: from.buffer.clone(),
                    src_offset: from.offset + *src_offset,
                    dst: to.buffer.clone(),
                    dst_offset: to.offset + *dst_offset,
                    size: *size,
                });
            }
            Step::Dispatch(d) => {
                let pipeline = cache.get(&ctx.device, d.kernel)?;
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: uniforms,
                        offset: record * stride,
                        size: wgpu::BufferSize::new(d.params.len() as u64),
                    }),
                }];
                for (i, slot) in d.buffers.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: i as u32 + 1,
                        resource: wgpu::BindingResource::Buffer(buffer(*slot)),
                    });
                }
                let group = ctx.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&d.kernel.label()),
                    layout: &pipeline.layout,
                    entries: &entries,
                });
                record += 1;
                let dispatch = (pipeline, group, d.grid);
                match ops.last_mut() {
                    Some(Op::Pass(pass)) => pass.push(dispatch),
                    _ => ops.push(Op::Pass(vec![dispatch])),
                }
            }
        }
    }
    let passes = ops.iter().filter(|op| matches!(op, Op::Pass(_))).count();
    let mut buffers: Vec<Pooled> = scratch.into_values().collect();
    buffers.push(params);
    buffers.extend(absent);
    Ok(Bound {
        ops,
        passes,
        buffers,
        serial: ctx.serial_lock(),
    })
}

impl Bound {
    /// Records the plan's passes and copies into `enc`; with a timer, timestamps bracket
    /// them. Neither submits nor waits.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, timer: Option<&GpuTimer>) {
        let mut pass_index = 0;
        for op in &self.ops {
            match op {
                Op::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size),
                Op::Pass(dispatches) => {
                    let timestamp_writes = timer.map(|t| wgpu::ComputePassTimestampWrites {
                        query_set: &t.queries,
                        beginning_of_pass_write_index: (pass_index == 0).then_some(0),
                        end_of_pass_write_index: (pass_index + 1 == self.passes).then_some(1),
                    });
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("xattn.pass"),
                        timestamp_writes,
                    });
                    for (pipeline, group, grid) in dispatches {
                        pass.set_pipeline(&pipeline.pipeline);
                        pass.set_bind_group(0, group, &[]);
                        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    }
                    pass_index += 1;
                }
            }
        }
        if let Some(t) = timer {
            enc.resolve_query_set(&t.queries, 0..2, &t.resolve, 0);
        }
    }

    /// Records into a new encoder and submits; neither waits nor opens error scopes.
    pub fn enqueue(&self, ctx: &Context, timer: Option<&GpuTimer>) {
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("xattn.plan"),
            });
        self.record(&mut enc, timer);
        ctx.queue.submit([enc.finish()]);
    }

    /// Records, submits and waits; reports any device error of this call.
    pub fn submit(&self, ctx: &Context, timer: Option<&GpuTimer>) -> Result<()> {
        ctx.scoped(|| {
            self.enqueue(ctx, timer);
            ctx.check()
        })
    }
}

/// Binds `program` (see [`bind`]) and runs it once: submits and waits, reporting any device
/// error of this call.
pub fn run(
    ctx: &Context,
    resources: (&PipelineCache, &Arc<BufferPool>),
    program: &Program,
    tensors: &Bindings,
    timer: Option<&GpuTimer>,
) -> Result<()> {
    let bound = ctx.scoped(|| bind(ctx, resources, program, tensors))?;
    bound.submit(ctx, timer)
}

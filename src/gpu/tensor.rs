//! Device-resident f32 tensors.

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::shape::{check_len, F32};

/// An f32 tensor in a device buffer, row-major with the given dims.
///
/// K and V uploaded once serve any number of attention calls (the decoder pattern).
#[derive(Debug)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    dims: Vec<usize>,
    ctx: Context,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn check_buffer_size(ctx: &Context, what: &str, dims: &[usize]) -> Result<u64> {
    let size = dims.iter().product::<usize>() as u64 * F32;
    if size > ctx.limits.max_buffer_size {
        return Err(Error::Limit {
            what: format!("{what} {dims:?}"),
            asked: size,
            limit_name: "max_buffer_size",
            limit: ctx.limits.max_buffer_size,
        });
    }
    Ok(size)
}

impl Tensor {
    /// Uploads `data` as a tensor of shape `dims`.
    pub fn upload(ctx: &Context, name: &'static str, data: &[f32], dims: &[usize]) -> Result<Self> {
        Self::upload_pod(ctx, name, data, dims)
    }

    /// Uploads 32-bit words (lengths, packed mask bits); the kernels read them as `u32`.
    /// `to_host` would reinterpret them as f32.
    pub fn upload_u32(
        ctx: &Context,
        name: &'static str,
        data: &[u32],
        dims: &[usize],
    ) -> Result<Self> {
        Self::upload_pod(ctx, name, data, dims)
    }

    fn upload_pod<T: bytemuck::Pod>(
        ctx: &Context,
        name: &'static str,
        data: &[T],
        dims: &[usize],
    ) -> Result<Self> {
        check_len(name, dims, data.len())?;
        if data.is_empty() {
            return Err(Error::Shape(format!("{name}: empty tensor {dims:?}")));
        }
        check_buffer_size(ctx, name, dims)?;
        let buffer = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(&format!("xattn.tensor.{name}")),
                contents: bytemuck::cast_slice(data),
                usage: USAGE,
            });
        Ok(Self {
            buffer,
            dims: dims.to_vec(),
            ctx: ctx.clone(),
        })
    }

    /// An uninitialized (zeroed by wgpu) tensor of shape `dims`.
    pub fn empty(ctx: &Context, name: &str, dims: &[usize]) -> Result<Self> {
        let size = check_buffer_size(ctx, name, dims)?;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(&format!("xattn.tensor.{name}")),
            size: size.max(F32),
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            buffer,
            dims: dims.to_vec(),
            ctx: ctx.clone(),
        })
    }

    /// The dims, row-major.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The wgpu buffer (for callers who record their own work around xattn's).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Overwrites the contents with `data` (same number of elements).
    pub fn write(&self, data: &[f32]) -> Result<()> {
        check_len("write", &self.dims, data.len())?;
        self.ctx
            .queue
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
        self.ctx.check()
    }

    /// Fills every element with `value` (tests poison outputs with NaN this way).
    pub fn fill(&self, value: f32) -> Result<()> {
        self.write(&vec![value; self.len()])
    }

    /// Copies the tensor back to the host, waiting for all queued work.
    pub fn to_host(&self) -> Result<Vec<f32>> {
        let size = self.len() as u64 * F32;
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xattn.readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("xattn.readback"),
            });
        enc.copy_buffer_to_buffer(&self.buffer, 0, &staging, 0, size);
        self.ctx.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.ctx.check()?;
        rx.recv()
            .map_err(|_| Error::DeviceLost("readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping the readback buffer failed: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("reading the readback buffer failed: {e}")))?;
        let out = bytemuck::cast_slice::<u8, f32>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

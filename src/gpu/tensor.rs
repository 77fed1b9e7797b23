//! Device-resident tensors of f32, f16 or bf16: xattn's own buffers, or a range of a caller's
//! buffer.

use std::sync::{Arc, Mutex};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::shape::check_len;

/// A tensor in a device buffer, row-major with the given dims, of one element type
/// ([`DType`]; half types pack two elements per 32-bit word, element `2j` in the low half),
/// starting `offset` bytes into the buffer (0 for xattn's own; any aligned offset for
/// [`Tensor::from_buffer`]).
///
/// K and V uploaded once serve any number of attention calls (the decoder pattern). A clone
/// is another handle to the same device memory (no copy).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Always `Some` until dropped (taken out to drop it under the device's serial lock).
    buffer: Option<wgpu::Buffer>,
    offset: u64,
    dims: Vec<usize>,
    dtype: DType,
    ctx: Context,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn check_buffer_size(ctx: &Context, what: &str, dims: &[usize], dtype: DType) -> Result<u64> {
    let size = dtype.bytes(dims.iter().product());
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
    /// Uploads `data` as an f32 tensor of shape `dims`.
    pub fn upload(ctx: &Context, name: &'static str, data: &[f32], dims: &[usize]) -> Result<Self> {
        Self::upload_pod(ctx, name, data, dims)
    }

    /// Uploads f32 `data` stored as `dtype` (rounded to nearest once, on the host).
    pub fn upload_as(
        ctx: &Context,
        name: &'static str,
        data: &[f32],
        dims: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        check_len(name, dims, data.len())?;
        Self::upload_bytes(ctx, name, &dtype.encode(data), dims, dtype)
    }

    /// Uploads f16 `data` as it is.
    pub fn upload_f16(
        ctx: &Context,
        name: &'static str,
        data: &[half::f16],
        dims: &[usize],
    ) -> Result<Self> {
        let halves = data.iter().map(|x| x.to_le_bytes());
        Self::upload_halves(ctx, name, halves, dims, DType::F16)
    }

    /// Uploads bf16 `data` as it is.
    pub fn upload_bf16(
        ctx: &Context,
        name: &'static str,
        data: &[half::bf16],
        dims: &[usize],
    ) -> Result<Self> {
        let halves = data.iter().map(|x| x.to_le_bytes());
        Self::upload_halves(ctx, name, halves, dims, DType::Bf16)
    }

    /// Uploads 16-bit elements (little-endian bytes) as `dtype`, padded to whole words.
    fn upload_halves(
        ctx: &Context,
        name: &'static str,
        halves: impl ExactSizeIterator<Item = [u8; 2]>,
        dims: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        let len = halves.len();
        check_len(name, dims, len)?;
        let mut bytes: Vec<u8> = halves.flatten().collect();
        bytes.resize(dtype.bytes(len) as usize, 0);
        Self::upload_bytes(ctx, name, &bytes, dims, dtype)
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
        Self::upload_bytes(ctx, name, bytemuck::cast_slice(data), dims, DType::F32)
    }

    /// Uploads `bytes` (the elements of `dims` in `dtype`, padded to whole words).
    pub(crate) fn upload_bytes(
        ctx: &Context,
        name: &'static str,
        bytes: &[u8],
        dims: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::Shape(format!("{name}: empty tensor {dims:?}")));
        }
        check_buffer_size(ctx, name, dims, dtype)?;
        let buffer = ctx.scoped(|| {
            Ok(ctx.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(&format!("xattn.tensor.{name}")),
                contents: bytes,
                usage: USAGE,
            }))
        })?;
        Ok(Self {
            buffer: Some(buffer),
            offset: 0,
            dims: dims.to_vec(),
            dtype,
            ctx: ctx.clone(),
        })
    }

    /// Wraps `dims` f32 elements of a caller's buffer starting `offset_bytes` into it, without
    /// a copy: xattn reads (or, for outputs, writes) that range in place. The buffer needs
    /// `STORAGE` usage (and `COPY_SRC` / `COPY_DST` for [`Tensor::to_host`] /
    /// [`Tensor::write`]); the offset must be a multiple of the device's
    /// `min_storage_buffer_offset_alignment`; the range must lie within the buffer.
    pub fn from_buffer(
        ctx: &Context,
        buffer: &wgpu::Buffer,
        offset_bytes: u64,
        dims: &[usize],
    ) -> Result<Self> {
        Self::from_buffer_as(ctx, buffer, offset_bytes, dims, DType::F32)
    }

    /// [`Tensor::from_buffer`] for elements of `dtype` (a half tensor spans whole words).
    pub fn from_buffer_as(
        ctx: &Context,
        buffer: &wgpu::Buffer,
        offset_bytes: u64,
        dims: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        let elems = dims.iter().product::<usize>();
        if elems == 0 {
            return Err(Error::Shape(format!("from_buffer: empty tensor {dims:?}")));
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::Argument(format!(
                "from_buffer: the buffer's usage {:?} lacks STORAGE, which the kernels bind",
                buffer.usage()
            )));
        }
        let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
        if !offset_bytes.is_multiple_of(align) {
            return Err(Error::Argument(format!(
                "from_buffer: offset {offset_bytes} is not a multiple of this device's \
                 min_storage_buffer_offset_alignment ({align})"
            )));
        }
        let size = dtype.bytes(elems);
        if offset_bytes
            .checked_add(size)
            .is_none_or(|end| end > buffer.size())
        {
            return Err(Error::Argument(format!(
                "from_buffer: {dims:?} at offset {offset_bytes} needs bytes up to {}, past the \
                 buffer's end ({} bytes)",
                offset_bytes.saturating_add(size),
                buffer.size()
            )));
        }
        Ok(Self {
            buffer: Some(buffer.clone()),
            offset: offset_bytes,
            dims: dims.to_vec(),
            dtype,
            ctx: ctx.clone(),
        })
    }

    /// The same device memory seen with other dims of the same element count (no copy; a
    /// handle like a clone): `[M, heads·d]` as `[1, M, heads, d]`.
    pub fn reshaped(&self, dims: &[usize]) -> Result<Self> {
        if dims.iter().product::<usize>() != self.len() {
            return Err(Error::Shape(format!(
                "cannot view {:?} ({} elements) as {dims:?}",
                self.dims,
                self.len()
            )));
        }
        let mut view = self.clone();
        view.dims = dims.to_vec();
        Ok(view)
    }

    /// An uninitialized (zeroed by wgpu) f32 tensor of shape `dims`.
    pub fn empty(ctx: &Context, name: &str, dims: &[usize]) -> Result<Self> {
        Self::empty_as(ctx, name, dims, DType::F32)
    }

    /// An uninitialized (zeroed by wgpu) tensor of shape `dims` and type `dtype`.
    pub fn empty_as(ctx: &Context, name: &str, dims: &[usize], dtype: DType) -> Result<Self> {
        let size = check_buffer_size(ctx, name, dims, dtype)?;
        let buffer = ctx.scoped(|| {
            Ok(ctx.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("xattn.tensor.{name}")),
                size: size.max(4),
                usage: USAGE,
                mapped_at_creation: false,
            }))
        })?;
        Ok(Self {
            buffer: Some(buffer),
            offset: 0,
            dims: dims.to_vec(),
            dtype,
            ctx: ctx.clone(),
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
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

    /// The wgpu buffer (for callers who record their own work around xattn's); the tensor
    /// occupies [`Tensor::byte_len`] bytes from [`Tensor::offset`].
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("a tensor has its buffer until dropped")
    }

    /// Where the tensor starts in [`Tensor::buffer`], in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The tensor's size in bytes (whole 32-bit words).
    pub fn byte_len(&self) -> u64 {
        self.dtype.bytes(self.len())
    }

    /// Overwrites the contents with `data` (same number of elements), rounded to the tensor's
    /// type. Does not wait: the write takes effect before any work submitted after it (a
    /// decoder writes the next query, then runs its prepared step).
    pub fn write(&self, data: &[f32]) -> Result<()> {
        check_len("write", &self.dims, data.len())?;
        let bytes = self.dtype.encode(data);
        self.ctx.scoped(|| {
            self.ctx
                .queue
                .write_buffer(self.buffer(), self.offset, &bytes);
            Ok(())
        })
    }

    /// Fills every element with `value` (tests poison outputs with NaN this way).
    pub fn fill(&self, value: f32) -> Result<()> {
        self.write(&vec![value; self.len()])
    }

    /// Copies the tensor back to the host as f32 (half types widened exactly), waiting for all
    /// queued work.
    pub fn to_host(&self) -> Result<Vec<f32>> {
        let bytes = self.to_host_bytes()?;
        Ok(self.dtype.decode(&bytes, self.len()))
    }

    /// The f16 elements as stored; an error for another type.
    pub fn to_host_f16(&self) -> Result<Vec<half::f16>> {
        let halves = self.to_host_halves(DType::F16)?;
        Ok(halves.into_iter().map(half::f16::from_le_bytes).collect())
    }

    /// The bf16 elements as stored; an error for another type.
    pub fn to_host_bf16(&self) -> Result<Vec<half::bf16>> {
        let halves = self.to_host_halves(DType::Bf16)?;
        Ok(halves.into_iter().map(half::bf16::from_le_bytes).collect())
    }

    /// The 16-bit elements as stored (little-endian bytes); an error unless they are `dtype`.
    fn to_host_halves(&self, dtype: DType) -> Result<Vec<[u8; 2]>> {
        self.expect_dtype(dtype)?;
        let bytes = self.to_host_bytes()?;
        Ok(bytes
            .chunks_exact(2)
            .take(self.len())
            .map(|b| [b[0], b[1]])
            .collect())
    }

    fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::Argument(format!(
                "the tensor {:?} holds {}, not {dtype}",
                self.dims, self.dtype
            )));
        }
        Ok(())
    }

    /// The stored bytes.
    pub(crate) fn to_host_bytes(&self) -> Result<Vec<u8>> {
        self.ctx
            .blocking_read_allowed("Tensor::to_host", "Tensor::to_host_async")?;
        self.ctx.scoped(|| {
            let staging = self.stage();
            let (tx, rx) = std::sync::mpsc::channel();
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            self.ctx.check()?;
            read_mapped(&staging, rx.recv().ok())
        })
    }

    /// [`Tensor::to_host`] as a future that does not block the awaiting thread (on native a
    /// waiter thread polls the device).
    pub async fn to_host_async(&self) -> Result<Vec<f32>> {
        let bytes = self.to_host_bytes_async().await?;
        Ok(self.dtype.decode(&bytes, self.len()))
    }

    async fn to_host_bytes_async(&self) -> Result<Vec<u8>> {
        let (staging, (done, mapped)) = self.ctx.scoped(|| {
            let staging = self.stage();
            let mapped: MapOutcome = Arc::default();
            let result = mapped.clone();
            let done = self.ctx.completion(|fire| {
                staging.map_async(wgpu::MapMode::Read, .., move |r| {
                    *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    fire();
                });
            });
            Ok((staging, (done, mapped)))
        })?;
        done.await;
        self.ctx.settle().await?;
        let outcome = mapped.lock().unwrap_or_else(|p| p.into_inner()).take();
        let bytes = read_mapped(&staging, outcome);
        let _serial = self.ctx.serial();
        drop(staging);
        bytes
    }

    /// Submits a copy of the tensor into a new mappable buffer.
    fn stage(&self) -> wgpu::Buffer {
        let size = self.byte_len();
        let staging = self.ctx.create_buffer(&wgpu::BufferDescriptor {
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
        enc.copy_buffer_to_buffer(self.buffer(), self.offset, &staging, 0, size);
        self.ctx.queue.submit([enc.finish()]);
        staging
    }
}

/// Where a `map_async` callback leaves its outcome.
type MapOutcome = Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>;

/// The contents of a staging buffer whose mapping finished with `outcome`.
fn read_mapped(
    staging: &wgpu::Buffer,
    outcome: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
) -> Result<Vec<u8>> {
    outcome
        .ok_or_else(|| Error::DeviceLost("readback callback never ran".into()))?
        .map_err(|e| Error::Gpu(format!("mapping the readback buffer failed: {e}")))?;
    let view = staging
        .get_mapped_range(..)
        .map_err(|e| Error::Gpu(format!("reading the readback buffer failed: {e}")))?;
    let out = view.to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}

impl Drop for Tensor {
    /// On GL, destroying a buffer takes wgpu's context lock: under xattn's serial lock, so a
    /// tensor dropped while another thread's call waits on the device queues behind it.
    fn drop(&mut self) {
        let _serial = self.ctx.serial();
        self.buffer = None;
    }
}

//! Scratch and uniform buffers reused across calls: a pool keyed by size and usage.
//!
//! A call's scratch (three-pass scores, split-K partials) and params buffer come from here and
//! go back when the call's bound plan is dropped, so a loop of one-shot calls of one shape
//! stops allocating after its first call. Sizes are rounded up to a power of two, so nearby
//! shapes share buffers; each size keeps at most a few idle buffers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::gpu::context::{lock_serial, SerialLock};

/// Idle buffers kept per (size, usage).
const IDLE_PER_KEY: usize = 4;

/// Buffers by (size, usage), and how many were ever created.
#[derive(Debug, Default)]
pub struct BufferPool {
    idle: Mutex<HashMap<(u64, u32), Vec<wgpu::Buffer>>>,
    created: AtomicU64,
    /// Buffers are destroyed under it (see `context::SerialLock`).
    serial: SerialLock,
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        let _serial = lock_serial(&self.serial);
        self.idle
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A buffer on loan from a pool; returns to it when dropped.
#[derive(Debug)]
pub struct Pooled {
    buffer: Option<wgpu::Buffer>,
    pool: Arc<BufferPool>,
}

impl Pooled {
    /// The buffer (at least the size asked for).
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("a pooled buffer is present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        let key = (buffer.size(), buffer.usage().bits());
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_KEY {
            list.push(buffer);
        } else {
            drop(idle);
            let _serial = lock_serial(&self.pool.serial);
            drop(buffer);
        }
    }
}

impl BufferPool {
    /// An empty pool for buffers of `ctx`'s device.
    pub fn new(ctx: &crate::gpu::context::Context) -> Self {
        Self {
            idle: Mutex::default(),
            created: AtomicU64::new(0),
            serial: ctx.serial_lock(),
        }
    }

    /// A buffer of at least `size` bytes with `usage`, idle or new.
    pub fn take(
        self: &Arc<Self>,
        ctx: &crate::gpu::context::Context,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Pooled {
        let size = size.max(4).next_power_of_two();
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.get_mut(&(size, usage.bits())).and_then(Vec::pop)
        };
        let buffer = reused.unwrap_or_else(|| {
            self.created.fetch_add(1, Ordering::Relaxed);
            ctx.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        });
        Pooled {
            buffer: Some(buffer),
            pool: self.clone(),
        }
    }

    /// How many buffers the pool has created so far.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}

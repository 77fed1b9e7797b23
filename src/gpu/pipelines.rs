//! The one place that creates compute pipelines: a cache keyed by [`Kernel`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::context::{lock_serial, SerialLock};
use crate::kernels::{Access, Kernel};

/// A compiled kernel and the bind group layout its bindings follow.
#[derive(Debug)]
pub struct Pipeline {
    /// The compute pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of `@group(0)`.
    pub layout: wgpu::BindGroupLayout,
}

/// Pipelines by kernel specialization, created on first use.
#[derive(Debug, Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<Kernel, Arc<Pipeline>>>,
    /// Pipelines are destroyed under it (see `context::SerialLock`).
    serial: SerialLock,
}

impl Drop for PipelineCache {
    fn drop(&mut self) {
        let _serial = lock_serial(&self.serial);
        self.pipelines
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl PipelineCache {
    /// An empty cache for pipelines of `ctx`'s device.
    pub fn new(ctx: &crate::gpu::context::Context) -> Self {
        Self {
            pipelines: Mutex::default(),
            serial: ctx.serial_lock(),
        }
    }

    /// The pipeline for `kernel`, compiling it on first use. The source is validated by naga
    /// first, so a shader bug surfaces as [`crate::Error::Shader`] with the kernel's label.
    pub fn get(&self, device: &wgpu::Device, kernel: Kernel) -> Result<Arc<Pipeline>> {
        let mut map = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(&kernel) {
            return Ok(p.clone());
        }
        kernel.validate()?;
        let label = kernel.label();
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, access)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match access {
                        Access::Uniform => wgpu::BufferBindingType::Uniform,
                        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            // Every kernel writes the workgroup memory it reads before reading it (tiles are
            // loaded whole, padding included; flags and sums are set by the kernel), so wgpu's
            // zero-fill is skipped. On wgpu's GL backend the fill is one invocation assigning a
            // constant array of the tile's length, which llvmpipe took 50 s to compile for the
            // 64×64 linear tile (0.4 s without); elsewhere it is a pass over memory each
            // workgroup writes anyway.
            compilation_options: wgpu::PipelineCompilationOptions {
                zero_initialize_workgroup_memory: false,
                ..Default::default()
            },
            cache: None,
        });
        let p = Arc::new(Pipeline { pipeline, layout });
        map.insert(kernel, p.clone());
        Ok(p)
    }
}

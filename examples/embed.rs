//! xattn inside an app's own GPU work: the app owns the device and one buffer holding Q, K and
//! V at aligned offsets. Each step, in one encoder and one submit, the app's own compute pass
//! writes the step's query, xattn's prepared call attends, and the app copies O out. The last
//! step is checked against the CPU reference.
//!
//! `cargo run --release --example embed`

mod common;

use xattn::{Attention, AttnShape, Context, Engine, Tensor};

/// The app's own kernel: the query of step `step`, q[i] = ((7i + 13·step) mod 17)/8 − 1 (exact
/// in f32 on any device, so the CPU can check the result).
const NEXT_QUERY: &str = r#"
@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<uniform> step: vec4<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let len = step.y;
    if id.x < len {
        qkv[step.z + id.x] = f32((7u * id.x + 13u * step.x) % 17u) / 8.0 - 1.0;
    }
}
"#;

fn next_query(len: usize, step: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((7 * i + 13 * step as usize) % 17) as f32 / 8.0 - 1.0)
        .collect()
}

fn main() -> xattn::Result<()> {
    // The app's device, opened the app's way.
    let instance = xattn::device::instance();
    let adapter =
        pollster::block_on(instance.request_adapter(&Default::default())).map_err(|e| {
            xattn::Error::NoAdapter {
                detail: format!(" ({e})"),
            }
        })?;
    let (device, queue) =
        pollster::block_on(adapter.request_device(&Default::default())).map_err(|e| {
            xattn::Error::RequestDevice {
                adapter: adapter.get_info().name,
                reason: e.to_string(),
            }
        })?;
    let ctx = Context::from_wgpu(device.clone(), queue.clone())?;
    println!("adapter: {}", ctx.describe());
    let engine = Engine::new(&ctx);

    // A decoder reading a 1500-frame source: one query row, 8 heads of 64.
    let s = AttnShape {
        batch: 1,
        m: 1,
        n: 1500,
        q_heads: 8,
        kv_heads: 8,
        d_k: 64,
        d_v: 64,
    };
    let lens = [
        s.q_dims().iter().product::<usize>(),
        s.k_dims().iter().product(),
        s.v_dims().iter().product(),
    ];
    // Q, K, V back to back in one buffer, each at an aligned offset.
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
    let mut offsets = [0u64; 3];
    let mut end = 0u64;
    for (off, len) in offsets.iter_mut().zip(lens) {
        *off = end;
        end = (end + 4 * len as u64).next_multiple_of(align);
    }
    let k_host: Vec<f32> = (0..lens[1])
        .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
        .collect();
    let v_host: Vec<f32> = (0..lens[2])
        .map(|i| ((i * 104_729) % 200) as f32 / 100.0 - 1.0)
        .collect();
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let qkv = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app.qkv"),
        size: end,
        usage: storage,
        mapped_at_creation: false,
    });
    queue.write_buffer(&qkv, offsets[1], bytemuck::cast_slice(&k_host));
    queue.write_buffer(&qkv, offsets[2], bytemuck::cast_slice(&v_host));
    // O in a buffer of its own (a dispatch cannot read and write one buffer), and where the
    // app copies it.
    let o_bytes = 4 * s.o_dims().iter().product::<usize>() as u64;
    let o_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app.o"),
        size: o_bytes,
        usage: storage,
        mapped_at_creation: false,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app.readback"),
        size: o_bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    // xattn's call, prepared once over the app's buffers.
    let wrap = |i: usize, dims: [usize; 4]| Tensor::from_buffer(&ctx, &qkv, offsets[i], &dims);
    let (q, k, v) = (
        wrap(0, s.q_dims())?,
        wrap(1, s.k_dims())?,
        wrap(2, s.v_dims())?,
    );
    let o = Tensor::from_buffer(&ctx, &o_buf, 0, &s.o_dims())?;
    let opts = Attention::default();
    let call = engine.prepare_into((&q, &k, &v), &o, None, &opts)?;
    println!("{}", call.plan());

    // The app's pipeline.
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("app.next_query"),
        source: wgpu::ShaderSource::Wgsl(NEXT_QUERY.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("app.next_query"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let step_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app.step"),
        size: 16,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("app.next_query"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: qkv.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: step_buf.as_entire_binding(),
            },
        ],
    });

    let steps = 8u32;
    let start = std::time::Instant::now();
    for step in 0..steps {
        queue.write_buffer(
            &step_buf,
            0,
            bytemuck::cast_slice(&[step, lens[0] as u32, 0, 0]),
        );
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups((lens[0] as u32).div_ceil(64), 1, 1);
        }
        call.encode(&mut enc);
        enc.copy_buffer_to_buffer(&o_buf, 0, &readback, 0, o_bytes);
        queue.submit([enc.finish()]);
    }
    readback.map_async(wgpu::MapMode::Read, .., |_| {});
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| xattn::Error::DeviceLost(e.to_string()))?;
    let got: Vec<f32> = bytemuck::cast_slice(
        &readback
            .get_mapped_range(..)
            .map_err(|e| xattn::Error::Gpu(e.to_string()))?,
    )
    .to_vec();
    println!(
        "{steps} steps (app pass + xattn + app copy, one submit each): {:.2} ms per step",
        start.elapsed().as_secs_f64() * 1e3 / f64::from(steps)
    );

    let q_last = next_query(lens[0], steps - 1);
    let want = xattn::cpu::reference::attention(
        &s,
        &q_last,
        &k_host,
        &v_host,
        f64::from(opts.scale_for(s.d_k)),
    );
    let max_err = common::max_abs_err(&got, &want.o);
    println!("last step: max |O − reference| = {max_err:.2e}");
    if max_err.is_nan() || max_err > 1e-4 {
        eprintln!("embed: the last step differs from the CPU reference");
        std::process::exit(1);
    }
    Ok(())
}

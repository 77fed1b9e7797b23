//! xattn inside a caller's GPU work: the caller's device (`Context::from_wgpu`) with its own
//! error handler left in place, and the caller's buffers at offsets (`Tensor::from_buffer`).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use xattn::cpu::reference;
use xattn::{Attention, AttnShape, Context, Engine, Error, Tensor};

/// A device of the caller's own on the test adapter, with an app error handler that records.
fn app_device(engine: &Engine) -> (Context, Arc<Mutex<Vec<String>>>) {
    let want = engine.context().info.name.clone();
    let adapter = xattn::device::adapters()
        .into_iter()
        .find(|a| a.get_info().name == want)
        .expect("the test adapter is listed");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
            .expect("a device on the test adapter");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        log.lock().unwrap().push(e.to_string());
    }));
    (Context::from_wgpu(device, queue).unwrap(), seen)
}

type HostQkv = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Seeded Q, K, V for `s`, on the host and uploaded.
fn uploaded(engine: &Engine, s: &AttnShape, seed: u64) -> (HostQkv, (Tensor, Tensor, Tensor)) {
    let (q, k, v) = qkv(s, 1.0, seed);
    let t = (
        engine.upload(&q, &s.q_dims()).unwrap(),
        engine.upload(&k, &s.k_dims()).unwrap(),
        engine.upload(&v, &s.v_dims()).unwrap(),
    );
    ((q, k, v), t)
}

#[test]
fn public_handles_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<Context>();
    both::<Engine>();
    both::<Tensor>();
}

/// Q, K, V in one caller buffer, O and LSE in another, all at aligned offsets: the result
/// equals the reference and not a byte outside O's and LSE's ranges changes. An output in the
/// inputs' buffer is refused (wgpu cannot read and write one buffer in a dispatch).
#[test]
fn attention_reads_and_writes_callers_buffers_at_offsets() {
    let Some(engine) = engine() else { return };
    let (ctx, app_errors) = app_device(engine);
    let engine = Engine::new(&ctx);
    let s = AttnShape {
        batch: 1,
        m: 5,
        n: 19,
        q_heads: 2,
        kv_heads: 1,
        d_k: 8,
        d_v: 4,
    };
    let (q, k, v) = qkv(&s, 1.0, 5);
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
    // Consecutive ranges from `align` on (not 0: offsets must be honoured), each aligned.
    let place = |lens: &[usize]| {
        let mut offsets = Vec::new();
        let mut at = align;
        for len in lens {
            offsets.push(at);
            at = (at + 4 * *len as u64).next_multiple_of(align);
        }
        (offsets, at + align)
    };
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let app_buffer = |label, host: &[f32]| {
        let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: 4 * host.len() as u64,
            usage,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(host));
        b
    };
    let (in_at, in_size) = place(&[q.len(), k.len(), v.len()]);
    let mut host_in = vec![f32::NAN; in_size as usize / 4];
    for (off, data) in in_at.iter().zip([&q, &k, &v]) {
        host_in[*off as usize / 4..][..data.len()].copy_from_slice(data);
    }
    let inputs = app_buffer("app.qkv", &host_in);
    let o_len = s.o_dims().iter().product::<usize>();
    let lse_len = s.lse_dims().iter().product::<usize>();
    let (out_at, out_size) = place(&[o_len, lse_len]);
    let host_out = vec![f32::NAN; out_size as usize / 4];
    let outputs = app_buffer("app.o_lse", &host_out);
    let wrap = |b, off, dims: &[usize]| Tensor::from_buffer(&ctx, b, off, dims).unwrap();
    let (tq, tk, tv) = (
        wrap(&inputs, in_at[0], &s.q_dims()),
        wrap(&inputs, in_at[1], &s.k_dims()),
        wrap(&inputs, in_at[2], &s.v_dims()),
    );
    let opts = Attention::default();
    let (o, lse) = (
        wrap(&outputs, out_at[0], &s.o_dims()),
        wrap(&outputs, out_at[1], &s.lse_dims()),
    );
    engine
        .prepare_into((&tq, &tk, &tv), &o, Some(&lse), &opts)
        .unwrap()
        .run()
        .unwrap();

    let after = wrap(&outputs, 0, &[out_size as usize / 4])
        .to_host()
        .unwrap();
    let want = reference::attention(&s, &q, &k, &v, f64::from(opts.scale_for(s.d_k)));
    let tol = budget(&s, opts.scale_for(s.d_k), &q, &k, &v);
    let (o_at, lse_at) = (out_at[0] as usize / 4, out_at[1] as usize / 4);
    assert_close(
        "O in the caller's buffer",
        &after[o_at..][..o_len],
        &want.o,
        tol.o,
    );
    assert_close(
        "LSE in the caller's buffer",
        &after[lse_at..][..lse_len],
        &want.lse,
        tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs()))),
    );
    for (i, x) in after.iter().enumerate() {
        let written = (o_at..o_at + o_len).contains(&i) || (lse_at..lse_at + lse_len).contains(&i);
        assert!(
            written || x.is_nan(),
            "element {i} outside O and LSE changed to {x}"
        );
    }
    let inputs_after = wrap(&inputs, 0, &[in_size as usize / 4]).to_host().unwrap();
    assert!(inputs_after
        .iter()
        .zip(&host_in)
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    let clash = wrap(&inputs, in_at[0], &s.o_dims());
    let e = engine
        .prepare_into((&tq, &tk, &tv), &clash, Some(&lse), &opts)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Argument(m) if m.contains("shares its wgpu buffer")),
        "{e}"
    );
    assert!(
        app_errors.lock().unwrap().is_empty(),
        "{:?}",
        app_errors.lock().unwrap()
    );
}

/// Bad wraps are typed errors; xattn's own invalid use comes back to its call, and the app's
/// errors stay with the app's handler.
#[test]
fn errors_go_to_the_call_that_caused_them() {
    let Some(engine) = engine() else { return };
    let (ctx, app_errors) = app_device(engine);
    let make = |usage, size| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("app.buffer"),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let no_storage = make(wgpu::BufferUsages::COPY_DST, 256);
    let e = Tensor::from_buffer(&ctx, &no_storage, 0, &[4]).unwrap_err();
    assert!(
        matches!(&e, Error::Argument(m) if m.contains("STORAGE")),
        "{e}"
    );
    let buf = make(storage, 1024);
    let e = Tensor::from_buffer(&ctx, &buf, 4, &[4]).unwrap_err();
    assert!(
        matches!(&e, Error::Argument(m) if m.contains("min_storage_buffer_offset_alignment")),
        "{e}"
    );
    let e = Tensor::from_buffer(&ctx, &buf, 0, &[257]).unwrap_err();
    assert!(
        matches!(&e, Error::Argument(m) if m.contains("past the buffer's end")),
        "{e}"
    );

    // Reading back a buffer the app made without COPY_SRC: xattn's call fails, the app's
    // handler hears nothing.
    let t = Tensor::from_buffer(&ctx, &buf, 0, &[16]).unwrap();
    let e = t.to_host().unwrap_err();
    assert!(matches!(e, Error::Gpu(_)), "{e}");
    assert!(
        app_errors.lock().unwrap().is_empty(),
        "{:?}",
        app_errors.lock().unwrap()
    );

    // The app's own invalid call still reaches the app's handler.
    let _ = make(wgpu::BufferUsages::MAP_READ | storage, 16);
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    assert_eq!(
        app_errors.lock().unwrap().len(),
        1,
        "the app's error reached its handler"
    );
}

/// Eight threads calling one engine at once, on every path, each checked against the
/// reference (on GL, xattn serializes its own device work, so wgpu's context lock never
/// times out).
#[test]
fn eight_threads_share_one_engine() {
    let Some(engine) = engine() else { return };
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            scope.spawn(move || {
                let s = AttnShape {
                    batch: 1,
                    m: 3 + t as usize,
                    n: 40 + 13 * t as usize,
                    q_heads: 2,
                    kv_heads: 1,
                    d_k: 8,
                    d_v: 8,
                };
                let (q, k, v) = qkv(&s, 1.0, 100 + t);
                for round in 0..3 {
                    let path = xattn::Path::ALL[(t as usize + round) % 3];
                    let opts = Attention::default().with_path(path);
                    let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts)
                        .unwrap_or_else(|e| panic!("thread {t} {}: {e}", path.name()));
                    let what = format!("thread {t} round {round} {}", path.name());
                    check_against_reference(&what, &s, opts.scale_for(s.d_k), (&q, &k, &v), &got);
                }
            });
        }
    });
}

/// A prepared call reads its inputs at each run: the decoder pattern (write the next query
/// into the same tensor, run again) gives each step's own answer.
#[test]
fn a_prepared_call_reads_its_inputs_at_every_run() {
    let Some(engine) = engine() else { return };
    let s = AttnShape {
        batch: 1,
        m: 1,
        n: 300,
        q_heads: 4,
        kv_heads: 2,
        d_k: 16,
        d_v: 16,
    };
    let (_, k, v) = qkv(&s, 1.0, 61);
    let tq = engine
        .upload(&random(s.q_dims().iter().product(), 1.0, 0), &s.q_dims())
        .unwrap();
    let tk = engine.upload(&k, &s.k_dims()).unwrap();
    let tv = engine.upload(&v, &s.v_dims()).unwrap();
    for path in xattn::Path::ALL {
        let opts = Attention::default().with_path(path);
        let call = engine.prepare(&tq, &tk, &tv, &opts).unwrap();
        for step in 1..=3u64 {
            let q = random(s.q_dims().iter().product(), 1.0, step);
            tq.write(&q).unwrap();
            call.o().fill(f32::NAN).unwrap();
            call.run().unwrap();
            let got = xattn::HostOutput {
                o: call.o().to_host().unwrap(),
                lse: call.lse().to_host().unwrap(),
                weights: call.weights().map(|w| w.to_host().unwrap()),
                stats: Default::default(),
            };
            let what = format!("{} step {step}", path.name());
            check_against_reference(&what, &s, opts.scale_for(s.d_k), (&q, &k, &v), &got);
        }
    }
}

/// The app's own work and xattn's prepared call in one encoder and one submit: the app copies
/// the query in, xattn attends, the app copies O out of xattn's caller-owned output.
#[test]
fn a_prepared_call_records_into_the_callers_encoder() {
    let Some(engine) = engine() else { return };
    let (ctx, app_errors) = app_device(engine);
    let engine = Engine::new(&ctx);
    let s = AttnShape {
        batch: 1,
        m: 2,
        n: 77,
        q_heads: 2,
        kv_heads: 2,
        d_k: 8,
        d_v: 8,
    };
    let (q, k, v) = qkv(&s, 1.0, 71);
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let app = |label, size: u64, usage| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let q_bytes = 4 * q.len() as u64;
    let o_len = s.o_dims().iter().product::<usize>();
    let staging_q = app(
        "app.next_q",
        q_bytes,
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    );
    let q_buf = app("app.q", q_bytes, usage);
    let o_buf = app("app.o", 4 * o_len as u64, usage);
    let o_copy = app("app.o_copy", 4 * o_len as u64, usage);
    let tq = Tensor::from_buffer(&ctx, &q_buf, 0, &s.q_dims()).unwrap();
    let tk = engine.upload(&k, &s.k_dims()).unwrap();
    let tv = engine.upload(&v, &s.v_dims()).unwrap();
    let to = Tensor::from_buffer(&ctx, &o_buf, 0, &s.o_dims()).unwrap();
    let opts = Attention::default();
    let call = engine
        .prepare_into((&tq, &tk, &tv), &to, None, &opts)
        .unwrap();
    ctx.queue
        .write_buffer(&staging_q, 0, bytemuck::cast_slice(&q));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&staging_q, 0, &q_buf, 0, q_bytes);
    call.encode(&mut enc);
    enc.copy_buffer_to_buffer(&o_buf, 0, &o_copy, 0, 4 * o_len as u64);
    ctx.queue.submit([enc.finish()]);
    let o = Tensor::from_buffer(&ctx, &o_copy, 0, &[o_len])
        .unwrap()
        .to_host()
        .unwrap();
    let want = reference::attention(&s, &q, &k, &v, f64::from(opts.scale_for(s.d_k)));
    let tol = budget(&s, opts.scale_for(s.d_k), &q, &k, &v);
    assert_close("O through the app's encoder", &o, &want.o, tol.o);
    assert!(
        app_errors.lock().unwrap().is_empty(),
        "{:?}",
        app_errors.lock().unwrap()
    );
}

/// A loop of one-shot calls of one shape takes its scratch and params from the engine's pool:
/// after the first call of each path, no more pooled buffers are created.
#[test]
fn repeated_calls_reuse_pooled_buffers() {
    let Some(engine) = engine() else { return };
    let engine = Engine::new(engine.context());
    let s = AttnShape {
        batch: 1,
        m: 2,
        n: 500,
        q_heads: 2,
        kv_heads: 1,
        d_k: 8,
        d_v: 8,
    };
    let (_, (tq, tk, tv)) = uploaded(&engine, &s, 81);
    for path in xattn::Path::ALL {
        let opts = Attention::default().with_path(path);
        engine.attention(&tq, &tk, &tv, &opts).unwrap();
        let after_first = engine.pooled_buffers_created();
        for _ in 0..20 {
            let out = engine.attention(&tq, &tk, &tv, &opts).unwrap();
            assert!(out.o.to_host().unwrap().iter().all(|x| x.is_finite()));
        }
        assert_eq!(
            engine.pooled_buffers_created(),
            after_first,
            "{}: 20 more calls created pooled buffers",
            path.name()
        );
    }
}

/// The async forms give the blocking forms' results: run_async, then to_host_async.
#[test]
fn async_run_and_readback_match_the_reference() {
    let Some(engine) = engine() else { return };
    let s = AttnShape {
        batch: 2,
        m: 7,
        n: 90,
        q_heads: 2,
        kv_heads: 2,
        d_k: 12,
        d_v: 12,
    };
    let ((q, k, v), (tq, tk, tv)) = uploaded(engine, &s, 91);
    for path in xattn::Path::ALL {
        let opts = Attention::default().with_path(path);
        let call = engine.prepare(&tq, &tk, &tv, &opts).unwrap();
        call.o().fill(f32::NAN).unwrap();
        pollster::block_on(call.run_async()).unwrap();
        let got = xattn::HostOutput {
            o: pollster::block_on(call.o().to_host_async()).unwrap(),
            lse: pollster::block_on(call.lse().to_host_async()).unwrap(),
            weights: None,
            stats: Default::default(),
        };
        check_against_reference(
            &format!("async {}", path.name()),
            &s,
            opts.scale_for(s.d_k),
            (&q, &k, &v),
            &got,
        );
    }
}

/// Resident memory of this process, from /proc (Linux), in bytes.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Two thousand one-shot calls keep the process's memory flat: what a call allocates (outputs,
/// masks, bind groups) is freed, and scratch and params come back to the pool.
#[test]
fn two_thousand_calls_keep_memory_flat() {
    let Some(engine) = engine() else { return };
    let Some(_) = rss_bytes() else {
        eprintln!("no /proc/self/statm here; nothing to measure");
        return;
    };
    let s = AttnShape {
        batch: 1,
        m: 4,
        n: 64,
        q_heads: 2,
        kv_heads: 2,
        d_k: 8,
        d_v: 8,
    };
    let (_, (tq, tk, tv)) = uploaded(engine, &s, 3);
    let opts = Attention::default().with_path(xattn::Path::SplitK);
    let call = || {
        let out = engine.attention(&tq, &tk, &tv, &opts).unwrap();
        out.o.to_host().unwrap()
    };
    for _ in 0..200 {
        call();
    }
    let before = rss_bytes().unwrap();
    for _ in 0..2000 {
        call();
    }
    let after = rss_bytes().unwrap();
    let growth = after.saturating_sub(before);
    eprintln!("2,000 calls: resident memory {before} → {after} bytes");
    assert!(
        growth < 8 << 20,
        "2,000 calls grew resident memory by {} KiB ({before} → {after} bytes)",
        growth >> 10
    );
}

/// A 32-step decode loop on a prepared layer (cached source) and on a prepared attention
/// call: after the first step, writing the next query and running creates no buffer and no
/// bind group, and the last step's output is the reference's.
#[test]
fn a_decode_loop_creates_no_device_objects_after_its_first_step() {
    use common::layer::{layer_tolerance, random_weights, reference_layer};
    use xattn::{MhaConfig, MhaOptions, MultiHeadAttention};
    let Some(engine) = engine() else { return };
    // A device of its own: the count is per context, and other tests share the engine's.
    let (ctx, _) = app_device(engine);
    let engine = Engine::new(&ctx);
    let c = MhaConfig::new(48, 4);
    let n = 300;
    let w = random_weights(&c, 71);
    let layer = MultiHeadAttention::new(&engine, c, &w).unwrap();
    let source_host = random(n * c.embed_dim, 1.0, 72);
    let source = engine.upload(&source_host, &[1, n, c.embed_dim]).unwrap();
    let cache = layer.project_source(&source, &source).unwrap();
    let queries: Vec<Vec<f32>> = (0..32).map(|i| random(c.embed_dim, 1.0, 100 + i)).collect();
    let q = engine.upload(&queries[0], &[1, 1, c.embed_dim]).unwrap();
    let step = layer
        .prepare_cached(&q, &cache, &MhaOptions::default())
        .unwrap();
    step.run().unwrap();
    let after_first = ctx.objects_created();
    for query in &queries[1..] {
        q.write(query).unwrap();
        step.run().unwrap();
    }
    assert_eq!(
        ctx.objects_created(),
        after_first,
        "31 more prepared layer steps created device objects"
    );
    let got = step.output().out.to_host().unwrap();
    let last = queries.last().unwrap();
    let (want, _) = reference_layer(
        &c,
        &w,
        1,
        (last, &source_host, &source_host),
        &Attention::default(),
    );
    let scale = f64::from(Attention::default().scale_for(c.head_dim()));
    let (tol, _) = layer_tolerance(&c, &w, [last, &source_host, &source_host], n, scale);
    assert_close("step 32 of the prepared layer", &got, &want, tol);

    // The attention alone, prepared, on every path.
    let s = AttnShape {
        batch: 1,
        m: 1,
        n,
        q_heads: 4,
        kv_heads: 4,
        d_k: 16,
        d_v: 16,
    };
    let ((_, k, v), (tq, tk, tv)) = uploaded(&engine, &s, 73);
    for path in xattn::Path::ALL {
        let opts = Attention::default().with_path(path);
        let call = engine.prepare(&tq, &tk, &tv, &opts).unwrap();
        call.run().unwrap();
        let after_first = ctx.objects_created();
        let mut last = Vec::new();
        for i in 1..32 {
            last = random(s.m * s.q_heads * s.d_k, 1.0, 200 + i);
            tq.write(&last).unwrap();
            call.run().unwrap();
        }
        assert_eq!(
            ctx.objects_created(),
            after_first,
            "{}: 31 more prepared steps created device objects",
            path.name()
        );
        let got = xattn::HostOutput {
            o: call.o().to_host().unwrap(),
            lse: call.lse().to_host().unwrap(),
            weights: None,
            stats: Default::default(),
        };
        check_against_reference(
            &format!("step 32 of prepared {}", path.name()),
            &s,
            opts.scale_for(s.d_k),
            (&last, &k, &v),
            &got,
        );
        // The count is live: a one-shot call creates its outputs, masks and bind groups.
        let before = ctx.objects_created();
        engine.attention(&tq, &tk, &tv, &opts).unwrap();
        assert!(
            ctx.objects_created() > before,
            "a one-shot call counted nothing"
        );
    }
}

//! A caller's device opened without what xattn wants: the results stay right, and the log
//! and `Context::degradations` say what it lacks and what that costs.

mod common;

use std::sync::Mutex;

use common::*;
use xattn::cpu::reference;
use xattn::{Attention, AttnShape, Context, Engine};

/// Every warning logged, as `target: message`.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = format!("{}: {}", record.target(), record.args());
            self.0.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

const FEATURES: [(wgpu::Features, &str); 3] = [
    (wgpu::Features::SUBGROUP, "SUBGROUP"),
    (wgpu::Features::SHADER_F16, "SHADER_F16"),
    (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
];

#[test]
fn a_device_without_the_wanted_features_says_what_it_lacks_and_stays_right() {
    let Some(engine) = engine() else { return };
    log::set_logger(&CAPTURE).expect("the only logger of this test binary");
    log::set_max_level(log::LevelFilter::Warn);
    let want = engine.context().info.name.clone();
    let adapter = xattn::device::adapters()
        .into_iter()
        .find(|a| a.get_info().name == want)
        .expect("the test adapter is listed");
    let wanted = xattn::device::wanted_features(&adapter);

    // The usual wgpu way: default features and limits.
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
            .expect("a device on the test adapter");
    let bare = Context::from_wgpu(device, queue).unwrap();
    let lacks = bare.degradations();
    let logged = CAPTURE.0.lock().unwrap().clone();
    assert_eq!(
        lacks.len(),
        3,
        "a default device has none of them: {lacks:?}"
    );
    for (_, name) in FEATURES {
        let said = |line: &String| line.contains(&format!("has no {name}: "));
        assert!(lacks.iter().any(said), "{name} not in {lacks:?}");
        assert!(
            logged
                .iter()
                .any(|l| said(l) && l.contains("wanted_features")),
            "no warning for {name} naming the fix: {logged:?}"
        );
    }

    // Opened with what xattn asks for: only what the adapter itself lacks is left.
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: wanted,
        required_limits: xattn::device::wanted_limits(&adapter),
        ..Default::default()
    }))
    .expect("a device with the wanted features");
    let full = Context::from_wgpu(device, queue).unwrap();
    let left: Vec<&str> = FEATURES
        .iter()
        .filter(|(f, _)| !wanted.contains(*f))
        .map(|(_, name)| *name)
        .collect();
    assert_eq!(full.degradations().len(), left.len(), "{left:?}");
    assert_eq!(full.limits, adapter.limits());

    // The bare device computes the same attention, by its slower kernels.
    let s = AttnShape {
        batch: 1,
        m: 3,
        n: 200,
        q_heads: 4,
        kv_heads: 2,
        d_k: 16,
        d_v: 16,
    };
    let (q, k, v) = qkv(&s, 1.0, 7);
    let opts = Attention::default();
    let (_, got) = run_poisoned(&Engine::new(&bare), &s, (&q, &k, &v), &opts).unwrap();
    let want = reference::attention(&s, &q, &k, &v, f64::from(opts.scale_for(s.d_k)));
    let tol = budget(&s, opts.scale_for(s.d_k), &q, &k, &v);
    assert_close("bare device O", &got.o, &want.o, tol.o);
}

//! Autotuning on the test device: a tuned plan says so and still matches the reference, a
//! second shape of the bucket takes the winner without timing again (from memory, and from
//! the cache file in a new engine), a forced configuration beats the cache, and a corrupt
//! cache file is ignored. Which candidate wins is the device's business: nothing here
//! depends on it. Every cache lives in a temporary folder, never the user's.

mod common;

use common::files::TempDir;
use common::*;
use xattn::tune::CACHE_FILE;
use xattn::{Attention, AttnShape, ConfigSource, Engine, FusedConfig, Plan};

/// The test engine with autotuning on, its winners in `dir`.
fn tuning(engine: &Engine, dir: &TempDir) -> Engine {
    let dir = dir.path("");
    Engine::new(engine.context())
        .with_autotune(true)
        .with_autotune_cache(Some(&dir))
}

/// M 200 and 150 share the bucket M ≤ 256, whose candidates are R = 1, 2 and 4 (each with
/// and without subgroup lanes where the device has them).
fn tiny(m: usize) -> AttnShape {
    shape(1, m, 37, 2, 2, 8)
}

/// Plans and runs `s` with NaN-poisoned outputs, checked against the f64 reference.
fn run_checked(engine: &Engine, s: &AttnShape, opts: &Attention, seed: u64) -> Plan {
    let (q, k, v) = qkv(s, 1.0, seed);
    let (plan, got) = run_poisoned(engine, s, (&q, &k, &v), opts).expect("runs");
    check_against_reference(
        &format!("{s}"),
        s,
        opts.scale_for(s.d_k),
        (&q, &k, &v),
        &got,
    );
    plan
}

/// The tuned source of `plan`, asserted to be one.
fn tuned(plan: &Plan) -> &xattn::fused_config::Tuned {
    match plan.fused().map(|c| &c.source) {
        Some(ConfigSource::Tuned(t)) => t,
        other => panic!("expected a tuned configuration, got {other:?}\n{plan}"),
    }
}

#[test]
fn a_bucket_is_timed_once_and_its_winner_reused() {
    let Some(engine) = engine() else { return };
    let dir = TempDir::new("autotune-reuse");
    let tuner = tuning(engine, &dir);
    let opts = Attention::default();

    let first = run_checked(&tuner, &tiny(200), &opts, 1);
    let t = tuned(&first);
    assert!(t.measured_now, "{first}");
    // Each R plain, and with subgroup lanes and with broadcast loads where the device has
    // subgroups.
    let variants = engine.caps().subgroup_lanes.map_or(1, |_| 3);
    assert_eq!(
        t.timings.len(),
        3 * variants,
        "R = 1, 2 and 4 timed: {first}"
    );
    assert_eq!(first.fused().unwrap().config, t.timings[0].0);
    assert!(first.to_string().contains("config: R="), "{first}");
    assert_eq!(tuner.autotune_measurements(), 1);
    assert!(dir.path(CACHE_FILE).is_file(), "the winner is saved");

    // Same bucket: the winner from memory, nothing timed.
    let second = run_checked(&tuner, &tiny(150), &opts, 2);
    assert!(!tuned(&second).measured_now, "{second}");
    assert_eq!(second.fused().unwrap().config, t.timings[0].0);
    assert_eq!(tuned(&second).timings, t.timings);
    assert!(second.to_string().contains("cached winner"), "{second}");
    assert_eq!(tuner.autotune_measurements(), 1);

    // A new engine reads the winner from the file.
    let fresh = tuning(engine, &dir);
    let third = run_checked(&fresh, &tiny(129), &opts, 3);
    assert!(!tuned(&third).measured_now, "{third}");
    assert_eq!(third.fused().unwrap().config, t.timings[0].0);
    assert_eq!(fresh.autotune_measurements(), 0);

    // Another bucket is timed.
    run_checked(&tuner, &tiny(300), &opts, 4);
    assert_eq!(tuner.autotune_measurements(), 2);
}

#[test]
fn forced_and_default_configs_are_not_tuned() {
    let Some(engine) = engine() else { return };
    let dir = TempDir::new("autotune-forced");
    let tuner = tuning(engine, &dir);
    for r in [1, 2, 4] {
        let opts = Attention::default().with_fused_config(FusedConfig::rows(r));
        let plan = run_checked(&tuner, &tiny(200), &opts, 5);
        let choice = plan.fused().expect("a fused plan");
        assert_eq!(choice.config, FusedConfig::rows(r), "{plan}");
        assert_eq!(choice.source, ConfigSource::Forced, "{plan}");
        assert!(
            plan.to_string().contains(&format!("R={r} (forced)")),
            "{plan}"
        );
    }
    // Forced beats a cached winner too.
    run_checked(&tuner, &tiny(200), &Attention::default(), 6);
    assert_eq!(tuner.autotune_measurements(), 1);
    let opts = Attention::default().with_fused_config(FusedConfig::rows(1));
    let plan = run_checked(&tuner, &tiny(200), &opts, 7);
    assert_eq!(plan.fused().unwrap().source, ConfigSource::Forced);
    // One candidate (M = 1 on a device without subgroup lanes): nothing to time, the default
    // runs.
    let plain = xattn::DeviceCaps {
        subgroup_lanes: None,
        scalar_lane_loads: false,
        matrix_units: None,
        ..*engine.caps()
    };
    let plain = Engine::with_caps(engine.context(), plain)
        .with_autotune(true)
        .with_autotune_cache(Some(&dir.path("")));
    let plan = run_checked(&plain, &shape(1, 1, 37, 2, 2, 8), &Attention::default(), 8);
    assert_eq!(plan.fused().unwrap().source, ConfigSource::Default);
    assert_eq!(plain.autotune_measurements(), 0);
    // Autotuning off: the default.
    let plan = run_checked(
        &tuner.clone().with_autotune(false),
        &tiny(200),
        &Attention::default(),
        9,
    );
    assert_eq!(plan.fused().unwrap().source, ConfigSource::Default);
    assert_eq!(tuner.autotune_measurements(), 1);
    // A configuration the kernel does not have is a typed error.
    let s = tiny(200);
    let (q, k, v) = qkv(&s, 1.0, 10);
    let opts = Attention::default().with_fused_config(FusedConfig::rows(3));
    let err = run_poisoned(&tuner, &s, (&q, &k, &v), &opts).unwrap_err();
    assert!(matches!(err, xattn::Error::Argument(_)), "{err}");
}

#[test]
fn a_corrupt_or_unwritable_cache_costs_nothing_but_time() {
    let Some(engine) = engine() else { return };
    let dir = TempDir::new("autotune-corrupt");
    std::fs::write(dir.path(CACHE_FILE), "{\"entries\": [{\"adapter\": 3}, ").unwrap();
    let tuner = tuning(engine, &dir);
    let plan = run_checked(&tuner, &tiny(200), &Attention::default(), 11);
    assert!(tuned(&plan).measured_now, "{plan}");
    // The file was replaced by one that reads back.
    let text = std::fs::read_to_string(dir.path(CACHE_FILE)).unwrap();
    assert_eq!(xattn::tune::parse_cache(&text).len(), 1, "{text}");

    // A cache "folder" that is a file: the winner stays in memory, the call succeeds.
    let blocked = TempDir::new("autotune-blocked");
    std::fs::write(blocked.path("file"), "").unwrap();
    let tuner = Engine::new(engine.context())
        .with_autotune(true)
        .with_autotune_cache(Some(&blocked.path("file")));
    run_checked(&tuner, &tiny(200), &Attention::default(), 12);
    let plan = run_checked(&tuner, &tiny(150), &Attention::default(), 13);
    assert!(!tuned(&plan).measured_now, "{plan}");
    assert_eq!(tuner.autotune_measurements(), 1);
}

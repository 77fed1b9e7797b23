//! Autotuning of the fused kernel's configuration: keys, buckets and the winners' cache.
//!
//! Where a caller allows it ([`crate::Engine::with_autotune`], `XATTN_AUTOTUNE=1`), the engine
//! times each candidate [`FusedConfig`] once per (adapter, shape bucket) on the call's own
//! inputs and runs the fastest; the winners are kept in memory and in a JSON file
//! ([`CACHE_FILE`]) in the user's cache folder ([`cache_dir`]). Every candidate computes the
//! same attention, so a stale, foreign or corrupt cache can cost speed, never correctness: a
//! file that cannot be read or parsed is ignored, one that cannot be written is a warning.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::dtype::Storage;
use crate::error::Result;
use crate::fused_config::FusedConfig;
use crate::plan::{DeviceCaps, Request};

/// The cache file's name; the version changes with its format or with what a key means.
pub const CACHE_FILE: &str = "autotune-v2.json";

/// Timed runs per candidate configuration at most, and the time after which the tuner
/// stops at the first round (a large shape's single run is steady enough).
pub(crate) const TUNE_RUNS: usize = 5;
pub(crate) const TUNE_BUDGET: Duration = Duration::from_millis(500);

/// The median time of each candidate, fastest first: a warm-up run each (it compiles the
/// pipelines), then rounds over all of them, so that drift touches every candidate alike,
/// [`TUNE_RUNS`] or as many as [`TUNE_BUDGET`] allows (at least one). `time_one` runs one
/// candidate and returns its milliseconds.
pub(crate) fn measure<C>(
    candidates: &[(FusedConfig, C)],
    mut time_one: impl FnMut(&C) -> Result<f64>,
) -> Result<Vec<(FusedConfig, f64)>> {
    for (_, c) in candidates {
        time_one(c)?;
    }
    let mut times = vec![Vec::new(); candidates.len()];
    let start = Instant::now();
    for round in 0..TUNE_RUNS {
        if round > 0 && start.elapsed() > TUNE_BUDGET {
            break;
        }
        for ((_, c), times) in candidates.iter().zip(&mut times) {
            times.push(time_one(c)?);
        }
    }
    let mut medians: Vec<(FusedConfig, f64)> = candidates
        .iter()
        .zip(times)
        .map(|((config, _), mut times)| {
            times.sort_by(f64::total_cmp);
            (*config, median(&times))
        })
        .collect();
    medians.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(medians)
}

/// The folder of the cache file, from the environment as `var` reads it: `$XATTN_CACHE_DIR`
/// if set, else `$XDG_CACHE_HOME/xattn`, else `$HOME/.cache/xattn`; `None` where none is set
/// (winners are then kept in memory only). Empty values count as unset, and so does a
/// relative `XDG_CACHE_HOME` (the XDG spec says to ignore it).
pub fn cache_dir(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("XATTN_CACHE_DIR") {
        return Some(dir);
    }
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("xattn"));
    }
    set("HOME").map(|home| home.join(".cache").join("xattn"))
}

/// The cache file of this process's environment ([`cache_dir`] + [`CACHE_FILE`]).
pub fn default_cache_file() -> Option<PathBuf> {
    cache_dir(|name| std::env::var_os(name)).map(|dir| dir.join(CACHE_FILE))
}

/// `x` rounded up to a power of two (0 and 1 to 1): one bucket holds the sizes in
/// `(b/2, b]`.
pub fn bucket(x: usize) -> usize {
    x.max(1).next_power_of_two()
}

/// The device a measurement belongs to: adapter name, backend and driver.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdapterId {
    /// `AdapterInfo::name`.
    pub name: String,
    /// The backend (`Vulkan`, `Metal`, …).
    pub backend: String,
    /// `AdapterInfo::driver` and `driver_info`.
    pub driver: String,
}

impl AdapterId {
    /// The id of the adapter `info` describes.
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        Self {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
        }
    }
}

impl fmt::Display for AdapterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.driver)
    }
}

/// What a measured winner serves: the adapter, everything that picks a different kernel or
/// grid (path asked for, masking, row statistics, storage, head dims as the kernel rounds
/// them, the device's fill estimate), and the sizes M, N and batch·heads each rounded up to a
/// power of two ([`bucket`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TuneKey {
    /// The device.
    pub adapter: AdapterId,
    /// The path asked for: `auto`, `fused` or `split-k`.
    pub path: String,
    /// Whether any masking applies (a kernel variant of its own).
    pub masked: bool,
    /// Whether the kernel writes row entropy and focus (a kernel variant of its own).
    pub stats: bool,
    /// How the kernel reads Q, K and V ([`Storage::name`]).
    pub storage: String,
    /// d_k rounded up to a multiple of 4, as the kernel is compiled.
    pub d_k: usize,
    /// d_v rounded up to a multiple of 4.
    pub d_v: usize,
    /// Workgroups the device runs at once ([`DeviceCaps::fill`]): it sets the key splits.
    pub fill: u32,
    /// The device's subgroup lanes ([`DeviceCaps::subgroup_lanes`]): whether the candidates
    /// include the lanes variants.
    pub subgroup_lanes: Option<u32>,
    /// M's bucket.
    pub m: usize,
    /// N's bucket.
    pub n: usize,
    /// batch·q_heads' bucket.
    pub bh: usize,
}

impl TuneKey {
    /// The key of `req` on `adapter` with `caps`: a pure function of them.
    pub fn new(adapter: &AdapterId, req: &Request, caps: &DeviceCaps) -> Self {
        let s = &req.shape;
        Self {
            adapter: adapter.clone(),
            path: req.path.map_or("auto", |p| p.name()).to_string(),
            masked: !req.masks.is_empty(),
            stats: req.stats.entropy || req.stats.focus,
            storage: Storage::of(req.dtype, caps.native_f16).name().to_string(),
            d_k: s.d_k.next_multiple_of(4),
            d_v: s.d_v.next_multiple_of(4),
            fill: caps.fill.workgroups,
            subgroup_lanes: caps.subgroup_lanes,
            m: bucket(s.m),
            n: bucket(s.n),
            bh: bucket(s.bh()),
        }
    }

    /// The configurations timed for this key: [`FusedConfig::candidates`] at the bucket's
    /// M, so that every shape of the bucket has the same list.
    pub fn candidates(&self) -> Vec<FusedConfig> {
        FusedConfig::candidates(self.d_k, self.d_v, self.m, self.subgroup_lanes)
    }

    /// The bucket, for people: `M≤1024 N≤128 B·H≤8 d64/64 f32 auto`.
    pub fn bucket(&self) -> String {
        format!(
            "M≤{} N≤{} B·H≤{} d{}/{} {} {}{}{}",
            self.m,
            self.n,
            self.bh,
            self.d_k,
            self.d_v,
            self.storage,
            self.path,
            if self.masked { " masked" } else { "" },
            if self.stats { " row-stats" } else { "" },
        )
    }

    fn to_json(&self, timings: &[(FusedConfig, f64)]) -> Value {
        let timings: Vec<Value> = timings
            .iter()
            .map(|(c, ms)| {
                json!({
                    "rows_per_invocation": c.rows_per_invocation,
                    "subgroup_lanes": c.subgroup_lanes,
                    "broadcast_loads": c.broadcast_loads,
                    "median_ms": ms,
                })
            })
            .collect();
        json!({
            "adapter": self.adapter.name,
            "backend": self.adapter.backend,
            "driver": self.adapter.driver,
            "path": self.path,
            "masked": self.masked,
            "stats": self.stats,
            "storage": self.storage,
            "d_k": self.d_k,
            "d_v": self.d_v,
            "fill": self.fill,
            "subgroup_lanes": self.subgroup_lanes,
            "m": self.m,
            "n": self.n,
            "bh": self.bh,
            "timings": timings,
        })
    }

    /// An entry of the cache file, or `None` where any field is missing or out of range or
    /// no timing names one of the key's candidates (a configuration the planner would not
    /// run there is not taken from a file, whoever wrote it).
    fn from_json(v: &Value) -> Option<(Self, Vec<(FusedConfig, f64)>)> {
        let text = |name: &str| Some(v.get(name)?.as_str()?.to_string());
        let flag = |name: &str| v.get(name)?.as_bool();
        let size = |name: &str| usize::try_from(v.get(name)?.as_u64()?).ok();
        let key = Self {
            adapter: AdapterId {
                name: text("adapter")?,
                backend: text("backend")?,
                driver: text("driver")?,
            },
            path: text("path")?,
            masked: flag("masked")?,
            stats: flag("stats")?,
            storage: text("storage")?,
            d_k: size("d_k")?,
            d_v: size("d_v")?,
            fill: u32::try_from(v.get("fill")?.as_u64()?).ok()?,
            subgroup_lanes: match v.get("subgroup_lanes")? {
                Value::Null => None,
                lanes => Some(u32::try_from(lanes.as_u64()?).ok()?),
            },
            m: size("m")?,
            n: size("n")?,
            bh: size("bh")?,
        };
        let candidates = key.candidates();
        let mut timings: Vec<(FusedConfig, f64)> = v
            .get("timings")?
            .as_array()?
            .iter()
            .filter_map(|t| {
                let r = u32::try_from(t.get("rows_per_invocation")?.as_u64()?).ok()?;
                // Absent: without lanes, without broadcast loads.
                let lanes = t
                    .get("subgroup_lanes")
                    .map_or(Some(false), Value::as_bool)?;
                let broadcast = t
                    .get("broadcast_loads")
                    .map_or(Some(false), Value::as_bool)?;
                let ms = t.get("median_ms")?.as_f64()?;
                let config = FusedConfig::rows(r)
                    .with_subgroup_lanes(lanes)
                    .with_broadcast_loads(broadcast);
                let valid = candidates.contains(&config) && ms.is_finite() && ms >= 0.0;
                valid.then_some((config, ms))
            })
            .collect();
        timings.sort_by(|a, b| a.1.total_cmp(&b.1));
        (!timings.is_empty()).then_some((key, timings))
    }
}

/// Measured candidates, fastest first, by key.
pub type Winners = HashMap<TuneKey, Vec<(FusedConfig, f64)>>;

/// The entries of a cache file's text; an entry that does not parse is left out, and text
/// that is not a cache file at all gives none.
pub fn parse_cache(text: &str) -> Winners {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Winners::new();
    };
    v.get("entries")
        .and_then(Value::as_array)
        .map(|entries| entries.iter().filter_map(TuneKey::from_json).collect())
        .unwrap_or_default()
}

/// The text of a cache file holding `winners` (sorted, so that a file changes only where
/// its entries do).
pub fn render_cache(winners: &Winners) -> String {
    let mut entries: Vec<Value> = winners.iter().map(|(k, t)| k.to_json(t)).collect();
    entries.sort_by_key(|e| e.to_string());
    let file = json!({"format": "xattn autotune cache", "version": 1, "entries": entries});
    serde_json::to_string_pretty(&file).expect("JSON values always serialize") + "\n"
}

/// The winners in memory, backed by a cache file where there is one. Shared by an engine's
/// clones.
#[derive(Debug)]
pub struct TuneCache {
    file: Option<PathBuf>,
    /// `None` until first used: the file is read then, not when the engine is made.
    winners: Mutex<Option<Winners>>,
    measured: AtomicU64,
    warned: AtomicBool,
}

impl TuneCache {
    /// A cache backed by `file` (`None`: memory only).
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            winners: Mutex::new(None),
            measured: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// The file backing the cache, if any.
    pub fn file(&self) -> Option<&FsPath> {
        self.file.as_deref()
    }

    /// Buckets timed through this cache so far ([`TuneCache::store`] calls).
    pub fn measurements(&self) -> u64 {
        self.measured.load(Ordering::Relaxed)
    }

    /// The winners, read from the file on first use.
    fn with_winners<T>(&self, f: impl FnOnce(&mut Winners) -> T) -> T {
        // A panic elsewhere while holding the lock leaves a map that is still whole.
        let mut guard = self.winners.lock().unwrap_or_else(|e| e.into_inner());
        let winners = guard.get_or_insert_with(|| self.read_file());
        f(winners)
    }

    fn read_file(&self) -> Winners {
        self.file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map_or_else(Winners::new, |text| parse_cache(&text))
    }

    /// The measured candidates of `key`, fastest first, if known.
    pub fn get(&self, key: &TuneKey) -> Option<Vec<(FusedConfig, f64)>> {
        self.with_winners(|w| w.get(key).cloned())
    }

    /// Keeps the candidates measured for `key` (fastest first) in memory and in the file,
    /// merged with what other processes wrote there since; a file that cannot be written is
    /// reported once on stderr and the winners stay in memory.
    pub fn store(&self, key: TuneKey, timings: Vec<(FusedConfig, f64)>) {
        self.measured.fetch_add(1, Ordering::Relaxed);
        self.with_winners(|w| {
            w.insert(key.clone(), timings.clone());
        });
        let Some(file) = &self.file else { return };
        let mut on_disk = self.read_file();
        on_disk.insert(key, timings);
        if let Err(e) = write_atomically(file, &render_cache(&on_disk)) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "xattn: warning: cannot save autotune results to {}: {e} (they are kept \
                     in memory)",
                    file.display()
                );
            }
        }
    }
}

/// Writes `text` to `file` through a temporary file and a rename, so that a reader never
/// sees half a file.
fn write_atomically(file: &FsPath, text: &str) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The median of sorted, non-empty `times` (the mean of the middle two for an even count):
/// how the tuner and `xattn bench` summarize runs.
pub fn median(sorted: &[f64]) -> f64 {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Attention;
    use crate::plan::LLVMPIPE_LOOP_CAP;
    use crate::shape::AttnShape;

    const CAPS: DeviceCaps = DeviceCaps {
        loop_cap: Some(LLVMPIPE_LOOP_CAP),
        subgroup_lanes: Some(8),
        scalar_lane_loads: false,
        matrix_units: None,
        ..crate::plan::tests::CAPS
    };

    fn adapter() -> AdapterId {
        AdapterId {
            name: "llvmpipe (LLVM 15.0.7, 256 bits)".into(),
            backend: "Vulkan".into(),
            driver: "llvmpipe Mesa 23.2.1".into(),
        }
    }

    fn key(m: usize, n: usize, heads: usize, d: usize, opts: &Attention) -> TuneKey {
        let shape = AttnShape {
            batch: 1,
            m,
            n,
            q_heads: heads,
            kv_heads: heads,
            d_k: d,
            d_v: d,
        };
        TuneKey::new(&adapter(), &opts.request(shape).unwrap(), &CAPS)
    }

    #[test]
    fn buckets_are_powers_of_two() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 77, 128, 129, 4096].map(bucket).to_vec();
        assert_eq!(got, [1, 1, 2, 4, 4, 8, 128, 128, 256, 4096]);
    }

    #[test]
    fn shapes_of_one_bucket_share_a_key() {
        let plain = Attention::default();
        let k = key(1000, 77, 8, 40, &plain);
        assert_eq!(k, key(513, 65, 5, 37, &plain));
        assert_eq!(k.bucket(), "M≤1024 N≤128 B·H≤8 d40/40 f32 auto");
        assert_eq!(k.candidates(), FusedConfig::ALL);
        for other in [
            key(1025, 77, 8, 40, &plain),
            key(1000, 129, 8, 40, &plain),
            key(1000, 77, 9, 40, &plain),
            key(1000, 77, 8, 44, &plain),
            key(
                1000,
                77,
                8,
                40,
                &plain.clone().with_path(crate::plan::Path::SplitK),
            ),
            key(
                1000,
                77,
                8,
                40,
                &plain.clone().with_causal(crate::mask::Alignment::TopLeft),
            ),
        ] {
            assert_ne!(k, other);
        }
    }

    #[test]
    fn the_cache_file_round_trips() {
        let mut winners = Winners::new();
        let timings = vec![(FusedConfig::rows(2), 0.5), (FusedConfig::rows(4), 0.75)];
        winners.insert(key(1000, 77, 8, 40, &Attention::default()), timings);
        winners.insert(
            key(1, 1500, 8, 64, &Attention::default()),
            vec![(FusedConfig::rows(1), 2.0)],
        );
        assert_eq!(parse_cache(&render_cache(&winners)), winners);
    }

    #[test]
    fn corrupt_caches_are_ignored_entry_by_entry() {
        let k = key(1000, 77, 8, 40, &Attention::default());
        let good = k.to_json(&[(FusedConfig::rows(2), 0.5)]);
        for text in [
            "",
            "not json",
            "[1, 2]",
            "{\"entries\": 3}",
            "{\"entries\": [{}]}",
        ] {
            assert!(parse_cache(text).is_empty(), "{text}");
        }
        // An unknown R or a broken time drops that timing; an entry left with none drops.
        let mut bad_r = good.clone();
        bad_r["timings"] = json!([{"rows_per_invocation": 3, "median_ms": 0.1}]);
        let mut negative_ms = good.clone();
        negative_ms["timings"] = json!([{"rows_per_invocation": 4, "median_ms": -1.0},
                                   {"rows_per_invocation": 2, "median_ms": 0.5}]);
        // R = 4 is no candidate where rows are long (d 256) or M is short.
        let mut long_rows = key(1000, 77, 8, 256, &Attention::default())
            .to_json(&[(FusedConfig::rows(4), 0.1), (FusedConfig::rows(1), 0.2)]);
        let short_m =
            key(64, 77, 8, 40, &Attention::default()).to_json(&[(FusedConfig::rows(4), 0.1)]);
        long_rows["note"] = json!("unknown fields are fine");
        let text = json!({"entries": [bad_r, negative_ms, {"m": "x"}, long_rows, short_m]});
        let parsed = parse_cache(&text.to_string());
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed[&k], [(FusedConfig::rows(2), 0.5)]);
        let long_key = key(1000, 77, 8, 256, &Attention::default());
        assert_eq!(parsed[&long_key], [(FusedConfig::rows(1), 0.2)]);
    }

    #[test]
    fn the_cache_folder_follows_the_environment() {
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, OsString)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            cache_dir(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let all = [
            ("XATTN_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&all), Some(PathBuf::from("/c")));
        assert_eq!(env(&all[1..]), Some(PathBuf::from("/x/xattn")));
        assert_eq!(env(&all[2..]), Some(PathBuf::from("/h/.cache/xattn")));
        let ignored = [
            ("XATTN_CACHE_DIR", ""),
            ("XDG_CACHE_HOME", "rel"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&ignored), Some(PathBuf::from("/h/.cache/xattn")));
        assert_eq!(env(&[]), None);
    }
}

//! The fused kernel's tunable configuration, and where a plan's configuration came from.
//!
//! Every configuration the planner may run computes the same attention (the tests run each
//! one on every path); they differ only in speed, which depends on the device. The planner's
//! default is a heuristic; the autotuner ([`crate::tune`]) may replace it with the fastest
//! candidate it measured on the device, and a caller may force one.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Invocations per fused workgroup; each owns R query rows, so a workgroup covers
/// `FUSED_ROWS · R` rows. (64 measured best on llvmpipe against 8, 16, 32 and 128 at R = 4.)
pub const FUSED_ROWS: u32 = 64;
/// Floats of Q and O rows one fused invocation may hold: R · (d_k + d_v) stays within this,
/// the footprint of one row at the largest head dim (256 + 256), so larger R only where rows
/// are short (R = 4 up to d_k + d_v = 128, R = 2 up to 256).
pub const FUSED_ROW_FLOATS: u32 = 512;

/// The choices of the fused kernel (`flash`) that change its speed, never its result. New
/// knobs (the key-tile width, …) are new fields; [`FusedConfig::ALL`] and
/// [`FusedConfig::candidates`] list their combinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FusedConfig {
    /// Query rows per invocation R (1, 2 or 4): each K/V element read from workgroup memory
    /// serves R rows, and a workgroup covers `FUSED_ROWS · R` rows.
    pub rows_per_invocation: u32,
    /// Whether the lanes of one subgroup share a row group's keys, merged by subgroup
    /// reductions (devices with one fixed subgroup size: `DeviceCaps::subgroup_lanes`), so
    /// that few query rows still occupy whole subgroups.
    pub subgroup_lanes: bool,
    /// Whether the lanes of one subgroup load each K and V row of the tile together, one vec4
    /// each, and pass the vec4s on by `subgroupBroadcast` (each invocation still owns its own
    /// R rows): on a CPU adapter every lane's load is a scalar load of its own
    /// (`DeviceCaps::scalar_lane_loads`), so one load per lane replaces one per lane per vec4.
    /// Needs a fixed subgroup size; not with `subgroup_lanes`.
    pub broadcast_loads: bool,
    /// Whether the fused kernel runs on the device's matrix units (`flash_coop`: cooperative
    /// matrices, [`crate::plan::DeviceCaps::matrix_units`]) instead: [`FusedConfig::MATRIX_UNITS`].
    pub matrix_units: bool,
}

impl FusedConfig {
    /// Every configuration of `flash`, smallest R first, each plain, with subgroup lanes and
    /// with broadcast loads.
    pub const ALL: [FusedConfig; 9] = [
        Self::rows(1),
        Self::rows(1).with_subgroup_lanes(true),
        Self::rows(1).with_broadcast_loads(true),
        Self::rows(2),
        Self::rows(2).with_subgroup_lanes(true),
        Self::rows(2).with_broadcast_loads(true),
        Self::rows(4),
        Self::rows(4).with_subgroup_lanes(true),
        Self::rows(4).with_broadcast_loads(true),
    ];

    /// The fused kernel on matrix units: one subgroup per workgroup computes Q·Kᵀ and P·V in
    /// matrix tiles. Only where forced: it has not yet run on a device with matrix units in
    /// xattn's tests, so neither the default nor the autotuner picks it (see README,
    /// "Matrix units").
    pub const MATRIX_UNITS: FusedConfig = FusedConfig {
        rows_per_invocation: 1,
        subgroup_lanes: true,
        broadcast_loads: false,
        matrix_units: true,
    };

    /// The configuration with `r` query rows per invocation, without subgroup lanes (checked
    /// by [`FusedConfig::validate`] where a plan uses it).
    pub const fn rows(r: u32) -> Self {
        Self {
            rows_per_invocation: r,
            subgroup_lanes: false,
            broadcast_loads: false,
            matrix_units: false,
        }
    }

    /// `self` with broadcast loads on or off (a plan refuses them on a device without
    /// subgroups of one fixed size).
    pub const fn with_broadcast_loads(self, on: bool) -> Self {
        Self {
            broadcast_loads: on,
            ..self
        }
    }

    /// `self` with subgroup lanes on or off (a plan refuses them on a device without).
    pub const fn with_subgroup_lanes(self, on: bool) -> Self {
        Self {
            subgroup_lanes: on,
            ..self
        }
    }

    /// `self` if the fused kernel has it, else [`Error::Argument`].
    pub fn validate(self) -> Result<Self> {
        if Self::ALL.contains(&self) || self == Self::MATRIX_UNITS {
            Ok(self)
        } else {
            Err(Error::Argument(format!(
                "the fused kernel has no configuration {self}: it runs 1, 2 or 4 query rows \
                 per invocation, plain, with subgroup lanes or with broadcast loads, or on \
                 matrix units"
            )))
        }
    }

    /// The configurations worth running for head dims `d_k`, `d_v` and `m` query rows on a
    /// device with `subgroup_lanes` (`DeviceCaps::subgroup_lanes`), smallest R first: R = 1,
    /// and each larger R whose Q and O rows fit [`FUSED_ROW_FLOATS`] and that M fills
    /// (R ≤ ⌈M / FUSED_ROWS⌉: a decode step's single row gains nothing from three idle ones);
    /// each with subgroup lanes and with broadcast loads too where the device has subgroups.
    /// The others are correct too, only slower.
    pub fn candidates(
        d_k: usize,
        d_v: usize,
        m: usize,
        subgroup_lanes: Option<u32>,
    ) -> Vec<FusedConfig> {
        let row = (d_k.next_multiple_of(4) + d_v.next_multiple_of(4)) as u64;
        let filled = m.div_ceil(FUSED_ROWS as usize) as u64;
        Self::ALL
            .into_iter()
            .filter(|c| {
                let r = u64::from(c.rows_per_invocation);
                (r == 1 || (r * row <= u64::from(FUSED_ROW_FLOATS) && r <= filled))
                    && (!(c.subgroup_lanes || c.broadcast_loads) || subgroup_lanes.is_some())
            })
            .collect()
    }

    /// The planner's default: the largest R of [`FusedConfig::candidates`], measured best on
    /// llvmpipe and a sound guess elsewhere; with broadcast loads where the device has
    /// subgroups and its lanes load one by one (`scalar_lane_loads`: CPU adapters; on
    /// lavapipe diffusion 3.5× faster than without, decode 4.6×, and 3.3× faster than subgroup
    /// lanes on decode: README, "Paths and the planner"), else with subgroup lanes where the
    /// device has them and
    /// M < [`FUSED_ROWS`] (a plain workgroup would leave invocations idle; with lanes a
    /// subgroup shares each row's keys instead).
    pub fn default_for(
        d_k: usize,
        d_v: usize,
        m: usize,
        subgroup_lanes: Option<u32>,
        scalar_lane_loads: bool,
    ) -> FusedConfig {
        let broadcast = subgroup_lanes.is_some() && scalar_lane_loads;
        let lanes = subgroup_lanes.is_some() && m < FUSED_ROWS as usize && !broadcast;
        let r = Self::candidates(d_k, d_v, m, None)
            .last()
            .expect("R = 1 is always a candidate")
            .rows_per_invocation;
        Self::rows(r)
            .with_subgroup_lanes(lanes)
            .with_broadcast_loads(broadcast)
    }
}

impl fmt::Display for FusedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.matrix_units {
            return write!(f, "matrix-units");
        }
        write!(f, "R={}", self.rows_per_invocation)?;
        if self.subgroup_lanes {
            write!(f, "+lanes")?;
        }
        if self.broadcast_loads {
            write!(f, "+bcast")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for FusedConfig {
    type Err = Error;

    /// A configuration as [`fmt::Display`] writes it: `R=1` … `R=4`, each with `+lanes` or
    /// `+bcast`, or `matrix-units`.
    fn from_str(text: &str) -> Result<Self> {
        if text == "matrix-units" {
            return Ok(Self::MATRIX_UNITS);
        }
        let (rows, lanes) = match text.strip_suffix("+lanes") {
            Some(rows) => (rows, true),
            None => (text, false),
        };
        let (rows, broadcast) = match rows.strip_suffix("+bcast") {
            Some(rows) => (rows, true),
            None => (rows, false),
        };
        rows.strip_prefix("R=")
            .and_then(|r| r.parse().ok())
            .map(|r| {
                Self::rows(r)
                    .with_subgroup_lanes(lanes)
                    .with_broadcast_loads(broadcast)
            })
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown fused configuration `{text}` (R=1, R=2 or R=4, each with \
                     +lanes or +bcast, or matrix-units)"
                ))
            })?
            .validate()
    }
}

/// What the autotuner measured for one bucket of shapes on one adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuned {
    /// The adapter, backend and driver measured on.
    pub adapter: String,
    /// The bucket of shapes the winner serves (see [`crate::tune::TuneKey`]), for people.
    pub bucket: String,
    /// Each candidate timed with its median in milliseconds, fastest first: the winner
    /// leads.
    pub timings: Vec<(FusedConfig, f64)>,
    /// Whether this plan's call measured them; else they came from the cache (in memory or
    /// the cache file).
    pub measured_now: bool,
}

impl Tuned {
    /// `tuned now` or `cached winner`.
    pub fn how(&self) -> &'static str {
        if self.measured_now {
            "tuned now"
        } else {
            "cached winner"
        }
    }

    /// Each candidate with its median, fastest first: `R=4 0.336 ms, R=2 0.404 ms, …`.
    pub fn medians(&self) -> String {
        let timings: Vec<String> = self
            .timings
            .iter()
            .map(|(c, ms)| format!("{c} {ms:.3} ms"))
            .collect();
        timings.join(", ")
    }
}

/// Where a plan's fused-kernel configuration came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigSource {
    /// The planner's heuristic ([`FusedConfig::default_for`]): no measurement.
    Default,
    /// Asked for by the caller (`Attention::with_fused_config`).
    Forced,
    /// The fastest candidate the autotuner measured for the shape's bucket on this adapter.
    Tuned(Arc<Tuned>),
}

/// A fused-kernel configuration and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigChoice {
    /// The configuration.
    pub config: FusedConfig,
    /// Why it runs.
    pub source: ConfigSource,
}

impl ConfigChoice {
    /// `config`, asked for by the caller.
    pub fn forced(config: FusedConfig) -> Self {
        Self {
            config,
            source: ConfigSource::Forced,
        }
    }
}

impl fmt::Display for ConfigChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.config)?;
        match &self.source {
            ConfigSource::Default => write!(
                f,
                "(default: the largest R of 4, 2, 1 whose Q and O rows fit {FUSED_ROW_FLOATS} \
                 floats and that M fills; broadcast loads on a CPU adapter with subgroups, \
                 else subgroup lanes where the device has them and M < {FUSED_ROWS})"
            ),
            ConfigSource::Forced => write!(f, "(forced)"),
            ConfigSource::Tuned(t) => write!(
                f,
                "({} for {}, bucket {}; medians {})",
                t.how(),
                t.adapter,
                t.bucket,
                t.medians()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_fit_the_rows_and_m() {
        let rs = |dk, dv, m| -> Vec<u32> {
            FusedConfig::candidates(dk, dv, m, None)
                .iter()
                .map(|c| c.rows_per_invocation)
                .collect()
        };
        assert_eq!(rs(64, 64, 4096), [1, 2, 4]);
        assert_eq!(rs(80, 80, 4096), [1, 2]);
        assert_eq!(rs(256, 256, 4096), [1]);
        assert_eq!(rs(64, 64, 1), [1]);
        assert_eq!(rs(64, 64, 65), [1, 2]);
        assert_eq!(rs(3, 5, 256), [1, 2, 4]);
        assert_eq!(
            FusedConfig::default_for(64, 64, 65, None, true),
            FusedConfig::rows(2)
        );
        // With subgroups: each R plain, with lanes and with broadcast loads; broadcast loads
        // by default where lanes load one by one, else lanes where M < FUSED_ROWS.
        assert_eq!(
            FusedConfig::candidates(64, 64, 65, Some(8)),
            FusedConfig::ALL[..6]
        );
        assert_eq!(
            FusedConfig::default_for(64, 64, 65, Some(8), false),
            FusedConfig::rows(2)
        );
        assert_eq!(
            FusedConfig::default_for(64, 64, 65, Some(8), true),
            FusedConfig::rows(2).with_broadcast_loads(true)
        );
        assert_eq!(
            FusedConfig::default_for(64, 64, 1, Some(8), false),
            FusedConfig::rows(1).with_subgroup_lanes(true)
        );
        assert_eq!(
            FusedConfig::default_for(64, 64, 1, Some(8), true),
            FusedConfig::rows(1).with_broadcast_loads(true)
        );
    }

    #[test]
    fn configs_parse_as_they_print() {
        for c in FusedConfig::ALL
            .into_iter()
            .chain([FusedConfig::MATRIX_UNITS])
        {
            assert_eq!(c.to_string().parse::<FusedConfig>().unwrap(), c);
        }
        for bad in [
            "R=3",
            "R=",
            "4",
            "R=2+lane",
            "matrix",
            "R=2+lanes+bcast",
            "R=2+bcast+lanes",
        ] {
            assert!(
                matches!(bad.parse::<FusedConfig>(), Err(Error::Argument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_the_kernels_configs_validate() {
        for c in FusedConfig::ALL
            .into_iter()
            .chain([FusedConfig::MATRIX_UNITS])
        {
            assert_eq!(c.validate().unwrap(), c);
        }
        let half_matrix = FusedConfig {
            subgroup_lanes: false,
            ..FusedConfig::MATRIX_UNITS
        };
        assert!(matches!(half_matrix.validate(), Err(Error::Argument(_))));
        for r in [0, 3, 8] {
            assert!(matches!(
                FusedConfig::rows(r).validate(),
                Err(Error::Argument(_))
            ));
        }
    }
}

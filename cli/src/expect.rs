//! `xattn run --expect`: the result O compared with a reference array, element by element,
//! as `numpy.allclose` does: |got − want| ≤ atol + rtol·|want|; an infinity matches only the
//! same-signed infinity, NaN never matches (numpy's default `equal_nan=False`). The reference
//! is read and its shape checked before the run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::npy::{read_floats, Array};
use crate::{parse_finite_f32, CliError, CliResult};

/// The exit status of a run whose result does not match `--expect`.
pub const MISMATCH: u8 = 3;

/// Options of the comparison.
#[derive(Debug, Args)]
#[command(next_help_heading = "Checking the result")]
pub struct ExpectArgs {
    /// Compare O with this float32 or float16 .npy (the shape and --layout of the O output):
    /// print the max abs and rel errors and the worst element, and exit with status 3 if any
    /// element has |got − want| > atol + rtol·|want|, 0 if none has. As numpy.allclose: an
    /// infinity matches only the same infinity, and NaN never matches (not even NaN).
    /// Outputs are written either way; --out is optional with --expect. A half O is compared
    /// as stored: an f16 O is within 2⁻¹¹·|O| of exact at best (bf16: 2⁻⁸), so give --rtol
    /// at least that.
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
    /// Relative tolerance of --expect.
    #[arg(
        long,
        value_name = "R",
        default_value = "1e-4",
        requires = "expect",
        allow_negative_numbers = true,
        value_parser = tolerance
    )]
    pub rtol: f32,
    /// Absolute tolerance of --expect.
    #[arg(
        long,
        value_name = "A",
        default_value = "1e-5",
        requires = "expect",
        allow_negative_numbers = true,
        value_parser = tolerance
    )]
    pub atol: f32,
}

/// Parses a finite tolerance ≥ 0.
fn tolerance(s: &str) -> Result<f32, String> {
    match parse_finite_f32(s)? {
        x if x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is negative; a tolerance is ≥ 0")),
    }
}

/// A reference for O, read before the run.
pub struct Expect {
    path: PathBuf,
    want: Array,
    rtol: f32,
    atol: f32,
}

impl ExpectArgs {
    /// The reference, if `--expect` is given, checked to have O's output shape `dims`.
    /// `other` is `(O's shape in the other layout, that layout's name)`, named when the
    /// reference has it.
    pub fn read(&self, dims: &[usize], other: (&[usize], &str)) -> CliResult<Option<Expect>> {
        let Some(path) = &self.expect else {
            return Ok(None);
        };
        let (want, _) = read_floats(path)?;
        if want.shape != dims {
            let hint = if want.shape == other.0 {
                format!(
                    "; that is O in --layout {}: give the reference in the layout of q, k, v",
                    other.1
                )
            } else {
                String::new()
            };
            return Err(CliError::new(format!(
                "--expect {} has shape {:?}, but O has shape {dims:?}{hint}",
                path.display(),
                want.shape
            )));
        }
        Ok(Some(Expect {
            path: path.clone(),
            want,
            rtol: self.rtol,
            atol: self.atol,
        }))
    }
}

/// How `got` compares with `want`.
#[derive(Debug, PartialEq)]
struct Comparison {
    /// Elements outside the tolerance.
    failed: usize,
    max_abs: f64,
    max_rel: f64,
    /// The flat index of the element furthest outside (or least inside) its tolerance.
    worst: usize,
}

/// The larger of `a` and `b`, NaN if either is.
fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Compares as `numpy.allclose(got, want, rtol, atol)` with its default `equal_nan=False`:
/// finite values within `atol + rtol·|want|`; an infinity matches only the same-signed
/// infinity (the tolerance `atol + rtol·∞` would otherwise let any value match it), and NaN
/// matches nothing, not even NaN.
fn compare(got: &[f32], want: &[f32], rtol: f64, atol: f64) -> Comparison {
    let mut c = Comparison {
        failed: 0,
        max_abs: 0.0,
        max_rel: 0.0,
        worst: 0,
    };
    let mut worst_ratio = f64::NEG_INFINITY;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        // (error, relative error, how far outside its tolerance: > 1 fails)
        let (diff, rel, ratio) = if g == w {
            (0.0, 0.0, 0.0)
        } else if g.is_nan() || w.is_nan() {
            (f64::NAN, f64::NAN, f64::INFINITY)
        } else if g.is_infinite() || w.is_infinite() {
            (f64::INFINITY, f64::INFINITY, f64::INFINITY)
        } else {
            let diff = (g - w).abs();
            let tol = atol + rtol * w.abs();
            (diff, diff / w.abs(), diff / tol)
        };
        if ratio > 1.0 {
            c.failed += 1;
        }
        c.max_abs = max_nan(c.max_abs, diff);
        c.max_rel = max_nan(c.max_rel, rel);
        if ratio > worst_ratio {
            (worst_ratio, c.worst) = (ratio, i);
        }
    }
    c
}

/// The index of flat element `i` of an array of shape `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (x, &d) in index.iter_mut().zip(dims).rev() {
        (*x, i) = (i % d, i / d);
    }
    index
}

impl Expect {
    /// Compares O (`got`) with the reference and prints the result in one line on stderr:
    /// success when every element is within the tolerance, [`MISMATCH`] otherwise.
    pub fn check(&self, got: &[f32]) -> ExitCode {
        let want = &self.want.data;
        let c = compare(got, want, f64::from(self.rtol), f64::from(self.atol));
        let verdict = if c.failed == 0 {
            "passed: |got − want| ≤ atol + rtol·|want| everywhere".to_string()
        } else {
            format!(
                "MISMATCH: |got − want| > atol + rtol·|want| in {} of {} elements",
                c.failed,
                want.len()
            )
        };
        eprintln!(
            "xattn: --expect {}: {verdict} (atol {:e}, rtol {:e}); max abs error {:.3e}, max rel \
             error {:.3e}; worst {:?}: got {}, want {}",
            self.path.display(),
            self.atol,
            self.rtol,
            c.max_abs,
            c.max_rel,
            unravel(c.worst, &self.want.shape),
            got[c.worst],
            want[c.worst]
        );
        if c.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(MISMATCH)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_atol_plus_rtol_of_want_and_nan_never_matches() {
        let want = [1.0, 0.0, -2.0, f32::INFINITY];
        let c = compare(&[1.0001, 1e-5, -2.0, f32::INFINITY], &want, 1e-4, 1e-5);
        assert_eq!(c.failed, 0, "{c:?}");
        assert_eq!(c.max_rel, f64::INFINITY, "an error where want is 0");
        let c = compare(&[1.0, 2e-5, -2.0, f32::INFINITY], &want, 1e-4, 1e-5);
        assert_eq!((c.failed, c.worst), (1, 1), "{c:?}");
        let c = compare(&[1.0, 0.0, f32::NAN, f32::INFINITY], &want, 1e-4, 1e-5);
        assert_eq!((c.failed, c.worst), (1, 2), "{c:?}");
        assert!(c.max_abs.is_nan());
        let c = compare(&[1.0, 0.0, -2.0, 1.0], &want, 0.0, 0.0);
        assert_eq!((c.failed, c.worst), (1, 3), "{c:?}");
        let c = compare(&want, &want, 0.0, 0.0);
        assert_eq!(
            (c.failed, c.max_abs, c.max_rel),
            (0, 0.0, 0.0),
            "exact match"
        );
    }

    /// numpy: `np.allclose(x, np.inf)` is False for every finite x and for -inf, whatever the
    /// tolerance; `np.allclose(np.nan, np.nan)` is False.
    #[test]
    fn infinities_match_only_themselves_as_in_numpy() {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        for (got, want, fails) in [
            (1e30, inf, true),
            (0.5, inf, true),
            (-inf, inf, true),
            (inf, -inf, true),
            (inf, 1e30, true),
            (-inf, -inf, false),
            (inf, inf, false),
            (nan, nan, true),
            (0.5, nan, true),
            (nan, 0.5, true),
        ] {
            for (rtol, atol) in [(1e-4, 1e-5), (1.0, 1.0), (0.0, 0.0)] {
                let c = compare(&[0.25, got], &[0.25, want], rtol, atol);
                assert_eq!(
                    c.failed,
                    usize::from(fails),
                    "got {got} want {want} rtol {rtol} atol {atol}: {c:?}"
                );
                if fails {
                    assert_eq!(c.worst, 1, "the worst element is the mismatch");
                }
            }
        }
    }

    #[test]
    fn unravel_gives_the_index_in_the_shape() {
        assert_eq!(unravel(0, &[2, 3, 4]), [0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), [1, 2, 3]);
        assert_eq!(unravel(13, &[2, 3, 4]), [1, 0, 1]);
    }
}

//! `--dtype` and `--out-dtype` of `xattn run` and `xattn mha`: the element type the inputs are
//! stored in on the device, and the type of the output.
//!
//! Files say their own type: float32 (`<f4`) and float16 (`<f2`) `.npy` files, and F32, F16 or
//! BF16 tensors of a `--qkv` safetensors file (numpy has no bfloat16). Without `--dtype` the
//! inputs are stored as they come, and must then share one type. `--dtype` converts on upload:
//! from float32 (rounding once, to nearest) or to f32 (widening, exact); a half type is never
//! rounded to the other, which would round twice.

use clap::{Args, ValueEnum};
use xattn::DType;

use crate::{CliError, CliResult};

/// A `--dtype` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// IEEE float32.
    F32,
    /// IEEE float16 (numpy float16).
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::Bf16,
        }
    }
}

/// An `--out-dtype` value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutDtype {
    /// The inputs' type (as stored, after --dtype).
    #[default]
    Same,
    /// float32, whatever the inputs' type.
    F32,
}

/// The precision options.
#[derive(Debug, Args)]
#[command(next_help_heading = "Precision")]
pub struct PrecisionArgs {
    /// Store the inputs as f32, f16 or bf16 on the device (computation is f32 in every case).
    /// Default: the type of the input files (float32 or float16 .npy; F32, F16 or BF16 tensors
    /// of --qkv), which must then be one type. float32 inputs are rounded to the type once, to
    /// nearest; half inputs widen exactly to f32, but are not rounded to the other half type.
    /// A value past the type's range (±65504 for f16), which would become ±inf, is an error
    /// naming the input and the element.
    #[arg(long, value_enum, value_name = "TYPE")]
    pub dtype: Option<DtypeArg>,
    /// Type of the output: same (the inputs' type: a float16 .npy for f16) or f32. numpy has
    /// no bfloat16, so a bf16 output is written as float32 .npy (its values exact). Other
    /// outputs (LSE, weights) are float32 always.
    #[arg(long, value_enum, value_name = "TYPE", default_value = "same")]
    pub out_dtype: OutDtype,
}

/// numpy's name of a stored type, for messages: `float32 (<f4)`, `float16 (<f2)`, `bfloat16
/// (BF16)` (safetensors' name: numpy has none).
pub fn numpy_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32 (<f4)",
        DType::F16 => "float16 (<f2)",
        DType::Bf16 => "bfloat16 (BF16)",
    }
}

/// The largest finite value of `d`, for messages.
fn largest(d: DType) -> &'static str {
    match d {
        DType::F32 => "3.4028235e38",
        DType::F16 => "65504",
        DType::Bf16 => "3.3895314e38",
    }
}

/// Checks that every finite value of `data` (the input `shown`, of shape `dims`) stays finite
/// when rounded to `dtype`: an error, not a warning, names the first that would not. A value
/// past a half type's range rounds to ±inf, and one infinite element of Q or K makes its whole
/// row of logits inf or NaN, so the output would be silently wrong rather than a little less
/// precise (which is all `--dtype` promises); the fix is the user's to choose (scale the input,
/// or a wider type), so nothing is clamped here. Values already infinite or NaN are the data's.
pub fn check_range(shown: &str, data: &[f32], dims: &[usize], dtype: DType) -> CliResult<()> {
    let overflows = |x: f32| match dtype {
        DType::F32 => false,
        DType::F16 => half::f16::from_f32(x).is_infinite(),
        DType::Bf16 => half::bf16::from_f32(x).is_infinite(),
    };
    let Some((i, x)) = data
        .iter()
        .enumerate()
        .find(|&(_, &x)| x.is_finite() && overflows(x))
    else {
        return Ok(());
    };
    let mut index = vec![0; dims.len()];
    let mut rest = i;
    for (at, &d) in index.iter_mut().zip(dims).rev() {
        (*at, rest) = (rest % d.max(1), rest / d.max(1));
    }
    let wider = match dtype {
        DType::F16 => "--dtype bf16 (float32's range) or f32",
        _ => "--dtype f32",
    };
    Err(CliError::new(format!(
        "{shown} holds {x:e} at {index:?}, beyond {}'s range (±{}): stored as {dtype} it would \
         become {}inf; scale the input down, or pass {wider}",
        numpy_name(dtype),
        largest(dtype),
        if *x < 0.0 { "-" } else { "+" }
    )))
}

impl PrecisionArgs {
    /// The type the inputs are stored in on the device: `--dtype`, or the one type of the
    /// `inputs` (each `(name shown in messages, type read)`).
    pub fn input_dtype(&self, inputs: &[(String, DType)]) -> CliResult<DType> {
        let listed = || {
            inputs
                .iter()
                .map(|(shown, d)| format!("{shown} is {}", numpy_name(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(want) = self.dtype.map(DType::from) {
            let twice = inputs
                .iter()
                .find(|(_, d)| *d != DType::F32 && want != DType::F32 && *d != want);
            if let Some((shown, d)) = twice {
                return Err(CliError::new(format!(
                    "--dtype {want} rounds float32 inputs, but {shown} is {}: rounding it to \
                     {want} would round twice; pass --dtype {d} (or f32), or save it as float32",
                    numpy_name(*d)
                )));
            }
            return Ok(want);
        }
        let first = inputs.first().map_or(DType::F32, |(_, d)| *d);
        if inputs.iter().all(|(_, d)| *d == first) {
            return Ok(first);
        }
        let halves: Vec<DType> = inputs
            .iter()
            .map(|(_, d)| *d)
            .filter(|&d| d != DType::F32)
            .collect();
        let fix = if halves.iter().all(|&d| d == halves[0]) {
            format!(
                "pass --dtype {} to round the float32 ones (or --dtype f32 to widen the others), \
                 or save them as one type",
                halves[0]
            )
        } else {
            "save them as one type (numpy: a.astype(np.float16) or np.float32)".to_string()
        };
        Err(CliError::new(format!(
            "the inputs must share one type: {}; {fix}",
            listed()
        )))
    }

    /// The output's type when `--out-dtype` names one (for
    /// [`xattn::Attention::with_out_dtype`]); `None` for the inputs' type.
    pub fn out_dtype(&self) -> Option<DType> {
        match self.out_dtype {
            OutDtype::Same => None,
            OutDtype::F32 => Some(DType::F32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dtype: Option<DtypeArg>) -> PrecisionArgs {
        PrecisionArgs {
            dtype,
            out_dtype: OutDtype::Same,
        }
    }

    fn inputs(types: [DType; 3]) -> Vec<(String, DType)> {
        ["q", "k", "v"]
            .iter()
            .zip(types)
            .map(|(n, d)| (n.to_string(), d))
            .collect()
    }

    #[test]
    fn values_past_a_half_range_are_refused_by_name_and_index() {
        let data = [1.0, -65504.0, 65519.0, f32::INFINITY, -70000.0, 1e30];
        let e = check_range("--q q.npy", &data, &[2, 3], DType::F16)
            .unwrap_err()
            .to_string();
        // 65504 and 65519 round to 65504; inf is the data's; -70000 is the first to overflow.
        for part in [
            "--q q.npy",
            "-7e4 at [1, 1]",
            "float16 (<f2)",
            "±65504",
            "-inf",
            "bf16",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(check_range("x", &data[..4], &[4], DType::F16).is_ok());
        assert!(check_range("x", &data, &[6], DType::Bf16).is_ok());
        assert!(check_range("x", &[3.4e38], &[1], DType::Bf16).is_err());
        assert!(check_range("x", &[f32::MAX], &[1], DType::F32).is_ok());
    }

    #[test]
    fn one_type_is_kept_and_a_mix_needs_dtype() {
        use DType::*;
        assert_eq!(args(None).input_dtype(&inputs([F16; 3])).unwrap(), F16);
        let e = args(None)
            .input_dtype(&inputs([F16, F32, F16]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("k is float32 (<f4)"), "{e}");
        assert!(e.contains("pass --dtype f16"), "{e}");
        let e = args(None)
            .input_dtype(&inputs([F16, Bf16, F32]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pass --dtype"), "{e}");
        let mixed = inputs([F16, F32, F16]);
        assert_eq!(args(Some(DtypeArg::F16)).input_dtype(&mixed).unwrap(), F16);
        assert_eq!(args(Some(DtypeArg::F32)).input_dtype(&mixed).unwrap(), F32);
        let e = args(Some(DtypeArg::Bf16))
            .input_dtype(&mixed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q is float16 (<f2)") && e.contains("twice"),
            "{e}"
        );
    }
}

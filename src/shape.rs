//! Shapes and layouts of attention problems, their validation and their cost.
//!
//! Layouts (row-major, f32):
//! - Q `[batch, M, q_heads, d_k]`, K `[batch, N, kv_heads, d_k]`, V `[batch, N, kv_heads, d_v]`
//! - O `[batch, M, q_heads, d_v]`, weights P `[batch, q_heads, M, N]`, LSE `[batch, q_heads, M]`

use crate::error::{Error, Result};

/// The dimensions of one attention problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnShape {
    /// Batch entries.
    pub batch: usize,
    /// Query rows (target sequence length).
    pub m: usize,
    /// Key/value rows (source sequence length).
    pub n: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; `q_heads` must be a multiple (GQA/MQA when smaller).
    pub kv_heads: usize,
    /// Query/key head dimension.
    pub d_k: usize,
    /// Value/output head dimension.
    pub d_v: usize,
}

/// Bytes in one f32 element.
pub const F32: u64 = 4;

fn dims_product(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::Shape(format!(
                "{name}: the product of dimensions {dims:?} overflows usize"
            ))
        })
}

impl AttnShape {
    /// Builds the shape from the Q, K and V tensor shapes, checking that they agree.
    pub fn from_qkv(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Self> {
        let [batch, m, q_heads, d_k] = q;
        let [kb, n, kv_heads, kd] = k;
        let [vb, vn, vh, d_v] = v;
        for (name, dims) in [("q", q), ("k", k), ("v", v)] {
            if let Some(pos) = dims.iter().position(|&d| d == 0) {
                return Err(Error::Shape(format!(
                    "{name} has a zero dimension at axis {pos}: {dims:?} (every dimension must be ≥ 1)"
                )));
            }
            dims_product(name, &dims)?;
        }
        if kb != batch || vb != batch {
            return Err(Error::Shape(format!(
                "batch sizes differ: q {batch}, k {kb}, v {vb}"
            )));
        }
        if vn != n {
            return Err(Error::Shape(format!("k has {n} rows but v has {vn}")));
        }
        if vh != kv_heads {
            return Err(Error::Shape(format!(
                "k has {kv_heads} heads but v has {vh}"
            )));
        }
        if kd != d_k {
            return Err(Error::Shape(format!(
                "q head dim {d_k} differs from k head dim {kd}"
            )));
        }
        if q_heads % kv_heads != 0 {
            return Err(Error::Shape(format!(
                "q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})"
            )));
        }
        let shape = Self {
            batch,
            m,
            n,
            q_heads,
            kv_heads,
            d_k,
            d_v,
        };
        // Everything later multiplies these; make sure the largest products fit.
        dims_product("weights", &[batch, q_heads, m, n])?;
        dims_product("output", &[batch, m, q_heads, d_v])?;
        Ok(shape)
    }

    /// Q shape `[batch, M, q_heads, d_k]`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.m, self.q_heads, self.d_k]
    }
    /// K shape `[batch, N, kv_heads, d_k]`.
    pub fn k_dims(&self) -> [usize; 4] {
        [self.batch, self.n, self.kv_heads, self.d_k]
    }
    /// V shape `[batch, N, kv_heads, d_v]`.
    pub fn v_dims(&self) -> [usize; 4] {
        [self.batch, self.n, self.kv_heads, self.d_v]
    }
    /// O shape `[batch, M, q_heads, d_v]`.
    pub fn o_dims(&self) -> [usize; 4] {
        [self.batch, self.m, self.q_heads, self.d_v]
    }
    /// Weights shape `[batch, q_heads, M, N]`.
    pub fn weights_dims(&self) -> [usize; 4] {
        [self.batch, self.q_heads, self.m, self.n]
    }
    /// LSE shape `[batch, q_heads, M]`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.q_heads, self.m]
    }
    /// batch × q_heads: the number of independent attention problems.
    pub fn bh(&self) -> usize {
        self.batch * self.q_heads
    }
    /// Query heads that share one K/V head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Floating-point operations of QKᵀ and PV: 2·B·H·M·N·(d_k + d_v) (= 4·B·H·M·N·d when equal).
    pub fn flops(&self) -> f64 {
        2.0 * (self.bh() as f64)
            * (self.m as f64)
            * (self.n as f64)
            * ((self.d_k + self.d_v) as f64)
    }
    /// Bytes of Q, K, V read and O written once each: the floor on memory traffic.
    pub fn min_bytes(&self) -> u64 {
        let e = |d: [usize; 4]| d.iter().product::<usize>() as u64 * F32;
        e(self.q_dims()) + e(self.k_dims()) + e(self.v_dims()) + e(self.o_dims())
    }
}

impl std::fmt::Display for AttnShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "B{} H{}", self.batch, self.q_heads)?;
        if self.kv_heads != self.q_heads {
            write!(f, "/{}", self.kv_heads)?;
        }
        write!(f, " M{} N{} d{}", self.m, self.n, self.d_k)?;
        if self.d_v != self.d_k {
            write!(f, "/{}", self.d_v)?;
        }
        Ok(())
    }
}

/// Checks that a host slice has exactly the elements its shape needs.
pub fn check_len(name: &'static str, dims: &[usize], got: usize) -> Result<()> {
    let expected = dims_product(name, dims)?;
    if expected != got {
        return Err(Error::Length {
            name,
            shape: dims.to_vec(),
            expected,
            got,
        });
    }
    Ok(())
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

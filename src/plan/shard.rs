//! The plan of a sharded call ([`crate::shard`]), with no device in it: where the keys and the
//! query rows are cut, each block's masks, and the bytes each mode moves between devices.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mask::{Block, Broadcast, Masking};
use crate::shape::AttnShape;

/// How the N keys are cut into one shard per device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// Shard `s` of `R` holds keys `⌊s·N/R⌋ .. ⌊(s+1)·N/R⌋`.
    Even,
    /// `R + 1` non-decreasing key positions from 0 to N: shard `s` holds keys
    /// `cuts[s] .. cuts[s+1]` (a shard may hold none).
    At(Vec<usize>),
}

/// `⌊s·len/parts⌋` for `s` in `0..=parts`: an even cut of `len` items into `parts`.
pub fn even_cuts(len: usize, parts: usize) -> Vec<usize> {
    (0..=parts).map(|s| s * len / parts).collect()
}

impl Split {
    /// The `parts + 1` cut positions over `n` keys, checked.
    pub fn cuts(&self, n: usize, parts: usize) -> Result<Vec<usize>> {
        match self {
            Split::Even => Ok(even_cuts(n, parts)),
            Split::At(cuts) => {
                if cuts.len() != parts + 1 {
                    return Err(Error::Argument(format!(
                        "{} shard boundaries given for {parts} devices; give {} positions, 0 \
                         first and N last",
                        cuts.len(),
                        parts + 1
                    )));
                }
                let ordered = cuts.windows(2).all(|w| w[0] <= w[1]);
                if cuts[0] != 0 || cuts[parts] != n || !ordered {
                    return Err(Error::Argument(format!(
                        "shard boundaries {cuts:?} must rise from 0 to N = {n}, so that the \
                         shards cover the keys once"
                    )));
                }
                Ok(cuts.clone())
            }
        }
    }
}

/// Rows `r0..r1` of the M query rows and keys `n0..n1` of the N keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Query rows.
    pub rows: (usize, usize),
    /// Keys.
    pub keys: (usize, usize),
}

impl Tile {
    /// Whether the tile has no row or no key (nothing to compute).
    pub fn is_empty(&self) -> bool {
        self.rows.0 == self.rows.1 || self.keys.0 == self.keys.1
    }

    /// The shape of the call on this tile's rows and keys (non-empty tiles only).
    pub fn shape(&self, s: &AttnShape) -> AttnShape {
        AttnShape {
            m: self.rows.1 - self.rows.0,
            n: self.keys.1 - self.keys.0,
            ..*s
        }
    }

    /// The whole call's masking `m` restricted to this tile: a [`Block`] of the whole
    /// sequences (lengths, diagonals and key segments stay the whole call's), the bool mask
    /// and the bias cut to the tile's rows and keys (broadcast dims kept).
    pub fn masking(&self, s: &AttnShape, m: &Masking) -> Masking {
        Masking {
            block: Some(Block {
                row_offset: self.rows.0,
                rows_total: s.m,
                key_offset: self.keys.0,
                keys_total: s.n,
            }),
            mask: m.mask.as_ref().map(|b| self.cut(b)),
            bias: m.bias.as_ref().map(|b| self.cut(b)),
            ..m.clone()
        }
    }

    /// `b` (dims `[batch|1, q_heads|1, M|1, N]`) cut to the tile's rows (unless broadcast)
    /// and keys.
    fn cut<T: Copy>(&self, b: &Broadcast<T>) -> Broadcast<T> {
        let [d0, d1, d2, n] = b.dims;
        let (r0, r1) = if d2 == 1 { (0, 1) } else { self.rows };
        let (k0, k1) = self.keys;
        let mut data = Vec::with_capacity(d0 * d1 * (r1 - r0) * (k1 - k0));
        for outer in 0..d0 * d1 {
            for r in r0..r1 {
                data.extend_from_slice(&b.data[(outer * d2 + r) * n + k0..][..k1 - k0]);
            }
        }
        Broadcast {
            dims: [d0, d1, r1 - r0, k1 - k0],
            data,
        }
    }
}

/// Bytes one device sends to and receives from the other devices, and loads from and
/// returns to the caller's host memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// To other devices.
    pub sent: u64,
    /// From other devices.
    pub received: u64,
    /// Inputs from the caller's host memory (Q, K, V, masks, bias).
    pub loaded: u64,
    /// Results to the caller's host memory.
    pub returned: u64,
}

/// Bytes of one query row's tensors that travel: Q in the inputs' type, O and LSE in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBytes {
    /// Q `[batch, ·, q_heads, d_k]`, per row.
    pub q: u64,
    /// O `[batch, ·, q_heads, d_v]` in f32, per row.
    pub o: u64,
    /// LSE `[batch, q_heads, ·]` in f32, per row.
    pub lse: u64,
    /// K and V `[batch, ·, kv_heads, d_k + d_v]`, per key.
    pub kv: u64,
    /// dQ `[batch, ·, q_heads, d_k]` in f32, per row (a backward's running gradient).
    pub dq: u64,
}

impl RowBytes {
    /// Per-row and per-key bytes of `s` with inputs of type `dtype`.
    pub fn of(s: &AttnShape, dtype: DType) -> Self {
        let heads = (s.batch * s.q_heads) as u64;
        RowBytes {
            q: heads * s.d_k as u64 * dtype.size(),
            o: heads * s.d_v as u64 * 4,
            lse: heads * 4,
            kv: (s.batch * s.kv_heads * (s.d_k + s.d_v)) as u64 * dtype.size(),
            dq: heads * s.d_k as u64 * 4,
        }
    }
}

/// The device that holds query block `block` after step `step` of the LV ring (it starts on
/// device `block` and moves to the next device after each step).
pub fn lv_holder(block: usize, step: usize, devices: usize) -> usize {
    (block + step) % devices
}

/// Bytes moved between devices by LV-XAttn over `devices` devices: query block `r`
/// (`rows[r]` rows) starts on device `r`; after each of the first R − 1 steps every device
/// sends the block it holds, its Q with its running O and LSE, to the next device
/// (`(Q + O + LSE)·rows` bytes); after the last step the finished (O, LSE) of each block goes
/// to device `out` (nothing where it is there already). K and V never move.
///
/// With even blocks of M/R rows, device p sends `(R − 1)·(M/R)·(q + o + lse)` plus
/// `(M/R)·(o + lse)` unless the block it ends with is on `out`, where per row
/// `q = batch·q_heads·d_k·e` (e bytes per input element), `o = batch·q_heads·d_v·4`,
/// `lse = batch·q_heads·4`.
pub fn lv_bytes(b: RowBytes, rows: &[usize], out: usize) -> Vec<Traffic> {
    let r_n = rows.len();
    let mut t = vec![Traffic::default(); r_n];
    for (block, &len) in rows.iter().enumerate() {
        let len = len as u64;
        for step in 0..r_n.saturating_sub(1) {
            let (from, to) = (lv_holder(block, step, r_n), lv_holder(block, step + 1, r_n));
            t[from].sent += len * (b.q + b.o + b.lse);
            t[to].received += len * (b.q + b.o + b.lse);
        }
        let last = lv_holder(block, r_n - 1, r_n);
        if last != out {
            t[last].sent += len * (b.o + b.lse);
            t[out].received += len * (b.o + b.lse);
        }
    }
    t
}

/// Bytes moved between devices by LV-XAttn's backward over `devices` devices: query block `r`
/// (`rows[r]` rows) starts on device `r` with its Q, the forward's O and LSE and the loss's dO
/// (f32, as O) and a running dQ (f32); after each of the first R − 1 steps the device that
/// holds it sends it on, `(q + 2·o + lse + dq)·rows` bytes (dK and dV stay where their keys
/// are); after the last step its finished dQ goes to device `out` (nothing where it is there
/// already). With `dq = batch·q_heads·d_k·4` per row, and `q`, `o`, `lse` as in [`lv_bytes`].
pub fn lv_backward_bytes(b: RowBytes, rows: &[usize], out: usize) -> Vec<Traffic> {
    let r_n = rows.len();
    let mut t = vec![Traffic::default(); r_n];
    for (block, &len) in rows.iter().enumerate() {
        let len = len as u64;
        for step in 0..r_n.saturating_sub(1) {
            let (from, to) = (lv_holder(block, step, r_n), lv_holder(block, step + 1, r_n));
            t[from].sent += len * (b.q + 2 * b.o + b.lse + b.dq);
            t[to].received += len * (b.q + 2 * b.o + b.lse + b.dq);
        }
        let last = lv_holder(block, r_n - 1, r_n);
        if last != out {
            t[last].sent += len * b.dq;
            t[out].received += len * b.dq;
        }
    }
    t
}

/// The shard device `device` holds at step `step` of the K/V ring (shard `s` starts on
/// device `s` and moves to the next device after each step).
pub fn ring_shard(device: usize, step: usize, devices: usize) -> usize {
    (device + devices - step % devices) % devices
}

/// Bytes moved between devices by Ring Attention over `devices` devices: device p keeps query
/// block p; shard s (`keys[s]` keys) starts on device s, and after each of the first R − 1
/// steps every device sends the K and V shard it holds to the next one
/// (`kv·keys` bytes, `kv = batch·kv_heads·(d_k + d_v)·e`); at the end each block's (O, LSE)
/// goes to device `out`.
///
/// With even shards of N/R keys, device p sends `(R − 1)·(N/R)·kv` plus
/// `rows[p]·(o + lse)` unless p is `out`.
pub fn ring_bytes(b: RowBytes, rows: &[usize], keys: &[usize], out: usize) -> Vec<Traffic> {
    let r_n = rows.len();
    let mut t = vec![Traffic::default(); r_n];
    for p in 0..r_n {
        for step in 0..r_n.saturating_sub(1) {
            let len = keys[ring_shard(p, step, r_n)] as u64;
            t[p].sent += len * b.kv;
            t[(p + 1) % r_n].received += len * b.kv;
        }
        if p != out {
            t[p].sent += rows[p] as u64 * (b.o + b.lse);
            t[out].received += rows[p] as u64 * (b.o + b.lse);
        }
    }
    t
}

/// Bytes moved between devices by the one-step sharded call: every device with keys
/// (`keys[p] > 0`) computes all M rows over its shard, and each such device other than `out`
/// sends its partial (O, LSE), `M·(o + lse)` bytes, to `out`, which merges them.
pub fn star_bytes(b: RowBytes, m: usize, keys: &[usize], out: usize) -> Vec<Traffic> {
    let mut t = vec![Traffic::default(); keys.len()];
    let partial = m as u64 * (b.o + b.lse);
    for p in (0..keys.len()).filter(|&p| p != out && keys[p] > 0) {
        t[p].sent += partial;
        t[out].received += partial;
    }
    t
}

/// Bytes of the sharded backward on resident K/V ([`crate::shard::ShardedAttention::backward_kv`]):
/// each device holding keys loads Q (in `dtype`), O, dO and the LSE of all M rows (f32) and
/// returns its partial dQ over all rows and its keys' dK and dV (f32); nothing moves between
/// devices.
pub fn backward_bytes(s: &AttnShape, dtype: DType, keys: &[usize]) -> Vec<Traffic> {
    let b = RowBytes::of(s, dtype);
    let m = s.m as u64;
    let dq_row = (s.batch * s.q_heads * s.d_k) as u64 * 4;
    let dkv_key = (s.batch * s.kv_heads * (s.d_k + s.d_v)) as u64 * 4;
    keys.iter()
        .map(|&n| match n as u64 {
            0 => Traffic::default(),
            n => Traffic {
                loaded: m * (b.q + 2 * b.o + b.lse),
                returned: m * dq_row + n * dkv_key,
                ..Traffic::default()
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_cover_the_keys() {
        assert_eq!(Split::Even.cuts(10, 3).unwrap(), vec![0, 3, 6, 10]);
        assert_eq!(Split::Even.cuts(2, 4).unwrap(), vec![0, 0, 1, 1, 2]);
        assert!(Split::At(vec![0, 5, 9]).cuts(10, 2).is_err());
        assert!(Split::At(vec![0, 6, 5, 10]).cuts(10, 3).is_err());
        assert!(Split::At(vec![0, 10]).cuts(10, 2).is_err());
        assert_eq!(
            Split::At(vec![0, 0, 10]).cuts(10, 2).unwrap(),
            vec![0, 0, 10]
        );
    }

    #[test]
    fn cut_keeps_broadcast_dims() {
        // dims [2, 1, 3, 4]: value = 100·b + 10·row + key.
        let data: Vec<i32> = (0..24)
            .map(|e| 100 * (e / 12) + 10 * ((e / 4) % 3) + e % 4)
            .collect();
        let b = Broadcast {
            dims: [2, 1, 3, 4],
            data,
        };
        let tile = Tile {
            rows: (1, 3),
            keys: (2, 4),
        };
        let c = tile.cut(&b);
        assert_eq!(c.dims, [2, 1, 2, 2]);
        assert_eq!(c.data, vec![12, 13, 22, 23, 112, 113, 122, 123]);
        let row = Broadcast {
            dims: [1, 1, 1, 4],
            data: vec![0, 1, 2, 3],
        };
        assert_eq!(tile.cut(&row).dims, [1, 1, 1, 2]);
        assert_eq!(tile.cut(&row).data, vec![2, 3]);
    }

    #[test]
    fn byte_models_balance() {
        let b = RowBytes {
            q: 3,
            o: 5,
            lse: 7,
            kv: 11,
            dq: 13,
        };
        for t in [
            lv_bytes(b, &[4, 4, 3], 0),
            ring_bytes(b, &[4, 4, 3], &[2, 0, 9], 1),
            star_bytes(b, 11, &[3, 0, 4], 2),
            lv_backward_bytes(b, &[4, 0, 3, 5], 2),
        ] {
            let sent: u64 = t.iter().map(|x| x.sent).sum();
            let received: u64 = t.iter().map(|x| x.received).sum();
            assert_eq!(sent, received);
        }
        // Even LV blocks: device p sends (R − 1)·rows·(q + o + lse), + rows·(o + lse) unless
        // it is `out` (block r ends on device r − 1: device 0 ends with block 1).
        let t = lv_bytes(b, &[4, 4, 4], 0);
        assert_eq!(t[0].sent, 2 * 4 * 15);
        assert_eq!(t[1].sent, 2 * 4 * 15 + 4 * 12);
        assert_eq!(t[2].sent, 2 * 4 * 15 + 4 * 12);
        assert_eq!(t[0].received, 2 * 4 * 15 + 2 * 4 * 12);
        assert_eq!(lv_bytes(b, &[4], 0)[0], Traffic::default());
        // The backward: per hop q + 2·o + lse + dq = 3 + 10 + 7 + 13 = 33 a row, then dQ.
        let t = lv_backward_bytes(b, &[4, 4, 4], 0);
        assert_eq!(t[0].sent, 2 * 4 * 33);
        assert_eq!(t[1].sent, 2 * 4 * 33 + 4 * 13);
        assert_eq!(t[0].received, 2 * 4 * 33 + 2 * 4 * 13);
        assert_eq!(lv_backward_bytes(b, &[4], 0)[0], Traffic::default());
    }
}

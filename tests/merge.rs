//! Exact merging of results over disjoint K/V shards equals attention over all of K/V.

mod common;

use common::*;
use xattn::{Attention, AttnShape, Path};

/// Rows `[from, to)` of a `[batch, N, heads, d]` tensor.
fn rows(x: &[f32], s: &AttnShape, d: usize, from: usize, to: usize) -> Vec<f32> {
    let per_row = s.kv_heads * d;
    let mut out = Vec::new();
    for b in 0..s.batch {
        out.extend_from_slice(&x[(b * s.n + from) * per_row..(b * s.n + to) * per_row]);
    }
    out
}

#[test]
fn merged_shards_equal_attention_over_all_keys() {
    let Some(engine) = engine() else { return };
    let s = AttnShape {
        batch: 2,
        m: 9,
        n: 300,
        q_heads: 4,
        kv_heads: 2,
        d_k: 40,
        d_v: 24,
    };
    let (q, k, v) = qkv(&s, 1.0, 31);
    let scale = 1.0 / (s.d_k as f32).sqrt();
    // 2 to 5 shards, one of them a single key; each shard by a different path.
    let cuts: [&[usize]; 4] = [&[150], &[1, 200], &[10, 11, 250], &[50, 51, 120, 299]];
    for (case, cut) in cuts.iter().enumerate() {
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(cut.iter().copied())
            .chain(std::iter::once(s.n))
            .collect();
        let q_t = engine.upload(&q, &s.q_dims()).unwrap();
        let mut outs = Vec::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let sh = AttnShape {
                n: w[1] - w[0],
                ..s
            };
            let k_t = engine
                .upload(&rows(&k, &s, s.d_k, w[0], w[1]), &sh.k_dims())
                .unwrap();
            let v_t = engine
                .upload(&rows(&v, &s, s.d_v, w[0], w[1]), &sh.v_dims())
                .unwrap();
            let path = Path::ALL[(case + i) % 3];
            let opts = Attention::default().with_scale(scale).with_path(path);
            outs.push(engine.attention(&q_t, &k_t, &v_t, &opts).unwrap());
        }
        let refs: Vec<_> = outs.iter().map(|o| (&o.o, &o.lse)).collect();
        let (o, lse) = engine.merge(&refs).unwrap();
        let got = xattn::HostOutput {
            o: o.to_host().unwrap(),
            lse: lse.to_host().unwrap(),
            weights: None,
            stats: Default::default(),
        };
        check_against_reference(
            &format!("merge of {} shards", bounds.len() - 1),
            &s,
            scale,
            (&q, &k, &v),
            &got,
        );

        // The host-slice form gives the same numbers.
        let host: Vec<(Vec<f32>, Vec<f32>)> = outs
            .iter()
            .map(|o| (o.o.to_host().unwrap(), o.lse.to_host().unwrap()))
            .collect();
        let slices: Vec<(&[f32], &[f32])> = host
            .iter()
            .map(|(o, l)| (o.as_slice(), l.as_slice()))
            .collect();
        let (ho, hl) = engine.merge_host(s.o_dims(), &slices).unwrap();
        assert_eq!((ho, hl), (got.o, got.lse));
    }
}

/// A shard that saw no key (LSE = −∞, O = 0) weighs nothing; all-empty gives 0 and −∞.
#[test]
fn empty_shards_weigh_nothing() {
    let Some(engine) = engine() else { return };
    let dims = [1, 2, 1, 4];
    let o1: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
    let lse1 = vec![0.7f32, -3.0];
    let empty_o = vec![0.0f32; 8];
    let empty_lse = vec![f32::NEG_INFINITY; 2];
    let (o, lse) = engine
        .merge_host(dims, &[(&empty_o, &empty_lse), (&o1, &lse1)])
        .unwrap();
    assert_eq!(o, o1);
    assert_eq!(lse, lse1);
    let (o, lse) = engine
        .merge_host(dims, &[(&empty_o, &empty_lse), (&empty_o, &empty_lse)])
        .unwrap();
    assert!(o.iter().all(|&x| x == 0.0), "{o:?}");
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "{lse:?}");
}

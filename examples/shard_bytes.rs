//! Bytes each device sends and receives under the three sharded schedules (merge on one
//! device, LV-XAttn, Ring Attention), counted and modelled, with the median time of each on
//! this machine's devices (R devices opened on the default adapter) next to one device's.
//!
//! The sharded backward's bytes loaded and returned per device follow (d_v = d_k, so Q
//! stands in for dO).
//!
//! `cargo run --release --example shard_bytes [M N heads d]`

use std::time::Instant;

use xattn::shard::{
    backward_bytes, lv_bytes, ring_bytes, star_bytes, RowBytes, ShardedAttention, Split,
};
use xattn::{Attention, AttnShape, Context, DType, Engine};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> xattn::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: M N heads d"))
        .collect();
    let [m, n, h, d] = <[usize; 4]>::try_from(args).unwrap_or([64, 4096, 4, 32]);
    let s = AttnShape {
        batch: 1,
        m,
        n,
        q_heads: h,
        kv_heads: h,
        d_k: d,
        d_v: d,
    };
    let engines: Vec<Engine> = (0..4)
        .map(|_| Context::new().map(|c| Engine::new(&c)))
        .collect::<xattn::Result<_>>()?;
    println!("device: {}", engines[0].context().describe());
    let fill =
        |len: usize, k: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * k).sin()).collect() };
    let q = fill(m * h * d, 0.37);
    let k = fill(n * h * d, 0.11);
    let v = fill(n * h * d, 0.23);
    let opts = Attention::default();
    let one = &engines[0];
    let (qt, kt, vt) = (
        one.upload(&q, &s.q_dims())?,
        one.upload(&k, &s.k_dims())?,
        one.upload(&v, &s.v_dims())?,
    );
    let mut t1 = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        one.attention(&qt, &kt, &vt, &opts)?.o.to_host()?;
        t1.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("shape {s}: one device {:.1} ms (median of 5)", median(t1));
    println!("| R | schedule | device | sent (counted) | sent (model) | received (counted) | received (model) | ms |");
    println!("|---|---|---|---|---|---|---|---|");
    let bytes = RowBytes::of(&s, DType::F32);
    for r in 2..=4 {
        let refs: Vec<&Engine> = engines[..r].iter().collect();
        let sharded = ShardedAttention::new(&refs, Split::Even)?;
        let kv = sharded.upload_kv(&k, &v, &s)?;
        let keys: Vec<usize> = kv.cuts().windows(2).map(|w| w[1] - w[0]).collect();
        let rows: Vec<usize> = (0..r).map(|p| (p + 1) * m / r - p * m / r).collect();
        for name in ["merge", "lv", "ring"] {
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..3 {
                let t = Instant::now();
                let out = match name {
                    "merge" => sharded.attention_kv(&q, &kv, &s, &opts, 0)?,
                    "lv" => sharded.lv_ring(&q, &kv, &s, &opts, 0)?,
                    _ => sharded.kv_ring(&q, &kv, &s, &opts, 0)?,
                };
                times.push(t.elapsed().as_secs_f64() * 1e3);
                last = Some(out);
            }
            let out = last.expect("ran 3 times");
            let model = match name {
                "merge" => star_bytes(bytes, m, &keys, 0),
                "lv" => lv_bytes(bytes, &rows, 0),
                _ => ring_bytes(bytes, &rows, &keys, 0),
            };
            let ms = median(times);
            for (p, (c, w)) in out.traffic.iter().zip(&model).enumerate() {
                println!(
                    "| {r} | {name} | {p} | {} | {} | {} | {} | {ms:.1} |",
                    c.sent, w.sent, c.received, w.received
                );
                assert_eq!(
                    (c.sent, c.received),
                    (w.sent, w.received),
                    "counted = model"
                );
            }
        }
        // The backward of the merge schedule's result: loads and returns only (see
        // `backward_bytes`), timed once.
        let out = sharded.attention_kv(&q, &kv, &s, &opts, 0)?;
        let t = Instant::now();
        let g = sharded.backward_kv(&q, &kv, (&out.o, &out.lse), &q, &s, &opts)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(
            g.traffic,
            backward_bytes(&s, DType::F32, &keys),
            "counted = model"
        );
        for (p, c) in g.traffic.iter().enumerate() {
            println!(
                "| {r} | backward | {p} | loaded {} | returned {} | 0 | 0 | {ms:.1} |",
                c.loaded, c.returned
            );
        }
    }
    Ok(())
}

//! `xattn grad` and `xattn bench --backward` end to end: gradients written from .npy files
//! (GQA, causal, d_v ≠ d_k; a broadcast bias with its dBias in bhsd files) against the f64
//! reference backward within the budgets `xattn::cpu::budget` derives; the usage and file
//! errors (checked on the host before a device is opened, so they need no GPU); and the
//! backward rows, ratio line and checks of `bench --backward`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path as FsPath;
use std::process::{Command, Output};

use common::files::*;
use common::*;
use xattn::cpu::budget::grad_budget;
use xattn::cpu::reference;
use xattn::{Alignment, Attention, AttnShape};

fn xattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xattn"))
        .env(
            "XATTN_CACHE_DIR",
            std::env::temp_dir().join("xattn-cli-autotune"),
        )
        .args(args)
        .output()
        .expect("start the xattn binary")
}

fn s(p: &FsPath) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Host inputs of one case: Q, K, V and dO, bshd.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

impl Inputs {
    fn new(sh: &AttnShape, seed: u64) -> Inputs {
        let (q, k, v) = qkv(sh, 1.0, seed);
        let d_o = random(sh.o_dims().iter().product(), 1.0, seed + 7);
        Inputs { q, k, v, d_o }
    }

    /// Writes q, k, v and do .npy files under `dir`, bshd.
    fn write(&self, dir: &TempDir, sh: &AttnShape) {
        write_npy(&dir.path("q.npy"), &self.q, &sh.q_dims());
        write_npy(&dir.path("k.npy"), &self.k, &sh.k_dims());
        write_npy(&dir.path("v.npy"), &self.v, &sh.v_dims());
        write_npy(&dir.path("do.npy"), &self.d_o, &sh.o_dims());
    }
}

/// `grad --q --k --v --d-o --dq --dk --dv` on the files under `dir`, plus `extra`.
fn grad_args(dir: &TempDir, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["grad".into()];
    for (flag, file) in [
        ("--q", "q.npy"),
        ("--k", "k.npy"),
        ("--v", "v.npy"),
        ("--d-o", "do.npy"),
        ("--dq", "dq.npy"),
        ("--dk", "dk.npy"),
        ("--dv", "dv.npy"),
    ] {
        a.push(flag.into());
        a.push(s(&dir.path(file)).into());
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn run(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    xattn(&args)
}

/// Reads `file` under `dir`, asserting its shape.
fn read(dir: &TempDir, file: &str, dims: &[usize]) -> Vec<f32> {
    let (data, shape) = read_npy::<f32>(&dir.path(file));
    assert_eq!(shape, dims, "{file}: shape");
    data
}

/// `[b, x, y, d]` bshd data as bhsd (or back: axes 1 and 2 swap).
fn swap12(data: &[f32], [b, x, y, d]: [usize; 4]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    for i in 0..b {
        for k in 0..y {
            for j in 0..x {
                let at = ((i * x + j) * y + k) * d;
                out.extend_from_slice(&data[at..at + d]);
            }
        }
    }
    out
}

#[test]
fn grad_of_causal_gqa_matches_the_reference() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("grad-gqa");
    let sh = AttnShape {
        batch: 2,
        m: 9,
        n: 13,
        q_heads: 4,
        kv_heads: 2,
        d_k: 8,
        d_v: 6,
    };
    let x = Inputs::new(&sh, 31);
    x.write(&dir, &sh);
    let out = run(&grad_args(
        &dir,
        &["--causal", "bottom-right", "--scale", "0.5", "--plan"],
    ));
    let err = stderr(&out);
    assert!(out.status.success(), "xattn grad failed: {err}");
    assert!(
        err.contains("backward of"),
        "--plan prints the backward plan: {err}"
    );
    assert!(err.contains("grad_kv"), "{err}");
    assert!(err.contains("backward") && err.contains("H4/2"), "{err}");
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_scale(0.5);
    let m = opts.masking();
    let want = reference::attention_backward(&sh, (&x.q, &x.k, &x.v), &x.d_o, 0.5, m);
    let b = grad_budget(&sh, 0.5, (&x.q, &x.k, &x.v, &x.d_o), m);
    for (file, dims, want, tol) in [
        ("dq.npy", sh.q_dims(), &want.dq, b.dq),
        ("dk.npy", sh.k_dims(), &want.dk, b.dk),
        ("dv.npy", sh.v_dims(), &want.dv, b.dv),
    ] {
        let got = read(&dir, file, &dims);
        let worst = assert_close(file, &got, want, tol);
        eprintln!("{file}: largest error {worst:e} (budget {tol:e})");
    }
}

#[test]
fn grad_with_a_broadcast_bias_writes_dbias_in_its_shape_in_bhsd() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("grad-bias");
    let sh = AttnShape {
        batch: 2,
        m: 7,
        n: 11,
        q_heads: 3,
        kv_heads: 3,
        d_k: 5,
        d_v: 5,
    };
    let x = Inputs::new(&sh, 41);
    // bhsd files, as PyTorch's SDPA takes them; a bias [H, 1, N] (one row per head, broadcast
    // over batch and rows).
    let bhsd = |d: [usize; 4]| [d[0], d[2], d[1], d[3]];
    for (file, data, dims) in [
        ("q.npy", &x.q, sh.q_dims()),
        ("k.npy", &x.k, sh.k_dims()),
        ("v.npy", &x.v, sh.v_dims()),
        ("do.npy", &x.d_o, sh.o_dims()),
    ] {
        write_npy(&dir.path(file), &swap12(data, dims), &bhsd(dims));
    }
    let bias = random(3 * 11, 1.0, 43);
    write_npy(&dir.path("bias.npy"), &bias, &[3, 1, 11]);
    let (bias_file, dbias_file) = (dir.path("bias.npy"), dir.path("dbias.npy"));
    let out = run(&grad_args(
        &dir,
        &[
            "--layout",
            "bhsd",
            "--bias",
            s(&bias_file),
            "--dbias",
            s(&dbias_file),
            "--softcap",
            "3",
        ],
    ));
    assert!(out.status.success(), "xattn grad failed: {}", stderr(&out));
    let opts = Attention::default()
        .with_bias([1, 3, 1, 11], bias)
        .with_softcap(3.0);
    let (scale, m) = (opts.scale_for(sh.d_k), opts.masking());
    let want = reference::attention_backward(&sh, (&x.q, &x.k, &x.v), &x.d_o, scale.into(), m);
    let b = grad_budget(&sh, scale, (&x.q, &x.k, &x.v, &x.d_o), m);
    for (file, dims, want, tol) in [
        ("dq.npy", sh.q_dims(), &want.dq, b.dq),
        ("dk.npy", sh.k_dims(), &want.dk, b.dk),
        ("dv.npy", sh.v_dims(), &want.dv, b.dv),
    ] {
        let got = swap12(&read(&dir, file, &bhsd(dims)), bhsd(dims));
        assert_close(file, &got, want, tol);
    }
    // Each element sums dS over batch and rows: 2·7 terms.
    let terms = 2 * 7;
    let tol = b.dbias_per_term * (b.dbias_len + terms as f64) * terms as f64;
    let got = read(&dir, "dbias.npy", &[3, 1, 11]);
    let want = reference::reduce_to(&sh, &want.ds, [1, 3, 1, 11]);
    assert_close("dbias", &got, &want, tol);
}

/// Runs the binary, expecting the exit status `code` and one error line; returns it.
fn fails_with(code: i32, args: &[String]) -> String {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn grad_usage_and_file_errors() {
    let dir = TempDir::new("grad-errors");
    let sh = AttnShape {
        batch: 1,
        m: 4,
        n: 6,
        q_heads: 2,
        kv_heads: 2,
        d_k: 8,
        d_v: 8,
    };
    Inputs::new(&sh, 51).write(&dir, &sh);
    let base = grad_args(&dir, &[]);
    // No output asked for: clap's usage error.
    let no_outputs: Vec<String> = base[..9].to_vec();
    let err = fails_with(2, &no_outputs);
    assert!(err.contains("--dq"), "{err}");
    // Ours: --dbias without a bias; flags of dropout without --dropout, or out of range.
    let with = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let dbias = dir.path("dbias.npy");
    let err = fails_with(2, &with(&["--dbias", s(&dbias)]));
    assert!(
        err.starts_with("xattn: error: --dbias needs a bias") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!dbias.exists(), "nothing written");
    fails_with(2, &with(&["--seed", "3"]));
    let err = fails_with(2, &with(&["--dropout", "1.5"]));
    assert!(err.contains("0 ≤ P < 1"), "{err}");
    // dO of another shape: an error naming O's shape, and the layout it fits.
    write_npy(&dir.path("do.npy"), &random(32, 1.0, 52), &[1, 2, 4, 4]);
    let err = fails_with(1, &base);
    assert!(
        err.contains("do.npy") && err.contains("[1, 4, 2, 8]"),
        "{err}"
    );
    write_npy(&dir.path("do.npy"), &random(64, 1.0, 53), &[1, 2, 4, 8]);
    let err = fails_with(1, &base);
    assert!(err.contains("pass --layout bhsd"), "{err}");
    // dO in another type than q, k, v: refused as run refuses mixed inputs.
    let halves: Vec<half::f16> = random(64, 1.0, 54)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    write_npy(&dir.path("do.npy"), &halves, &[1, 4, 2, 8]);
    let err = fails_with(1, &base);
    assert!(err.contains("share one type"), "{err}");
    assert!(!dir.path("dq.npy").exists(), "nothing written");
}

#[test]
fn bench_backward_times_checks_and_prints_the_ratio() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("bench-backward");
    let json = dir.path("b.json");
    let out = xattn(&[
        "bench",
        "--backward",
        "--m",
        "40",
        "--n",
        "70",
        "--dk",
        "8",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--name",
        "tiny",
        "--quick",
        "--check",
        "--causal",
        "top-left",
        "--dtype",
        "f32,f16",
        "--json",
        s(&json),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {text}\n{}",
        stderr(&out)
    );
    assert!(text.contains("2.5× the forward's FLOPs"), "{text}");
    assert!(text.contains("backward (err: d"), "{text}");
    let ratios = text
        .lines()
        .find(|l| l.contains("time ratios:"))
        .unwrap_or_else(|| panic!("no ratio line: {text}"));
    assert!(
        ratios.contains("backward/forward (f32)") && ratios.contains("backward/forward (f16)"),
        "{ratios}"
    );
    assert!(
        text.contains("verdict: checked against the f64 reference"),
        "{text}"
    );
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = records.as_array().expect("a JSON list");
    let backward: Vec<_> = records.iter().filter(|r| r["pass"] == "backward").collect();
    assert_eq!(backward.len(), 2, "{records:?}");
    for r in records {
        assert_eq!(r["check"], "passed", "{r}");
    }
    // The backward's GFLOP/s counts 2.5 times the forward's FLOPs.
    for r in backward {
        let flops = r["flops"].as_f64().unwrap();
        assert_eq!(flops, 2.5 * 2.0 * 4.0 * 40.0 * 70.0 * 16.0, "{r}");
        let gflops = r["gflops"].as_f64().unwrap();
        let ms = r["median_ms"].as_f64().unwrap();
        assert!((gflops - flops / (ms * 1e6)).abs() <= 1e-9 * gflops, "{r}");
    }
}

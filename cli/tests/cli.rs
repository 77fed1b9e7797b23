//! The `xattn` binary end to end: `run` with masks on .npy files written here, checked
//! against the f64 reference, and the errors a user gets for bad mask, length and alignment
//! input (checked on the host, before any device is opened, so they need no GPU).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Output};

use common::files::*;
use common::*;
use xattn::cpu::reference;
use xattn::{Alignment, Attention, AttnShape};

/// Autotune winners of the binaries these tests run, kept out of the user's cache folder
/// (one folder for every run: winners of an adapter stay valid).
fn autotune_cache() -> PathBuf {
    std::env::temp_dir().join("xattn-cli-autotune")
}

fn xattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xattn"))
        .env("XATTN_CACHE_DIR", autotune_cache())
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

/// Seeded bools, true with probability `p`.
fn bools(len: usize, p: f32, seed: u64) -> Vec<bool> {
    random(len, 1.0, seed)
        .into_iter()
        .map(|x| (x + 1.0) / 2.0 < p)
        .collect()
}

/// Q, K, V files for `sh` (4-D) under `dir`, and their host data.
fn write_qkv(dir: &TempDir, sh: &AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (q, k, v) = qkv(sh, 1.0, seed);
    write_npy(&dir.path("q.npy"), &q, &sh.q_dims());
    write_npy(&dir.path("k.npy"), &k, &sh.k_dims());
    write_npy(&dir.path("v.npy"), &v, &sh.v_dims());
    (q, k, v)
}

/// `run --q --k --v --out --lse` on the files of `write_qkv`, plus `extra`.
fn run_args(dir: &TempDir, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into()];
    for (flag, file) in [
        ("--q", "q.npy"),
        ("--k", "k.npy"),
        ("--v", "v.npy"),
        ("--out", "o.npy"),
        ("--lse", "lse.npy"),
    ] {
        a.push(flag.into());
        a.push(s(&dir.path(file)).into());
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Runs the binary, asserting success, and compares O and LSE with the masked reference.
fn run_and_check(
    what: &str,
    dir: &TempDir,
    sh: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    extra: &[&str],
    opts: &Attention,
) -> String {
    let args = run_args(dir, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xattn(&args);
    let err = stderr(&out);
    assert!(out.status.success(), "{what}: xattn failed: {err}");
    let scale = opts.scale_for(sh.d_k);
    let m = opts.masking();
    let want = reference::attention_masked(sh, q, k, v, f64::from(scale), m);
    let tol = budget_masked(sh, scale, (q, k, v), m);
    let (o, o_shape) = read_npy::<f32>(&dir.path("o.npy"));
    assert_eq!(o_shape, sh.o_dims(), "{what}: O shape");
    let worst = assert_close(&format!("{what} O"), &o, &want.o, tol.o);
    let (lse, _) = read_npy::<f32>(&dir.path("lse.npy"));
    let lse_max = want
        .lse
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |a, x| a.max(x.abs()));
    assert_close(
        &format!("{what} LSE"),
        &lse,
        &want.lse,
        tol.lse * (1.0 + lse_max),
    );
    eprintln!("{what}: largest O error {worst:e} (tolerance {:e})", tol.o);
    err
}

#[test]
fn run_with_every_mask_on_gqa_matches_the_reference() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("gqa");
    let sh = AttnShape {
        batch: 2,
        m: 9,
        n: 40,
        q_heads: 4,
        kv_heads: 2,
        d_k: 8,
        d_v: 6,
    };
    let (q, k, v) = write_qkv(&dir, &sh, 7);
    let q_lens = [9i32, 6];
    let kv_lens = [40i32, 25];
    let mask = bools(2 * 9 * 40, 0.8, 11); // [B, 1, M, N]
    let mut bias = random(4 * 40, 1.0, 12); // [H, 1, N] → [1, H, 1, N]
    bias[5] = f32::NEG_INFINITY;
    write_npy(&dir.path("ql.npy"), &q_lens, &[2]);
    write_npy(&dir.path("kl.npy"), &kv_lens, &[2]);
    write_npy(&dir.path("m.npy"), &mask, &[2, 1, 9, 40]);
    write_npy(&dir.path("b.npy"), &bias, &[4, 1, 40]);
    let (ql, kl, m, b) = (
        dir.path("ql.npy"),
        dir.path("kl.npy"),
        dir.path("m.npy"),
        dir.path("b.npy"),
    );
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_window(Alignment::BottomRight, 12, 3)
        .with_q_lens(vec![9, 6])
        .with_kv_lens(vec![40, 25])
        .with_mask([2, 1, 9, 40], mask.clone())
        .with_bias([1, 4, 1, 40], bias.clone())
        .with_softcap(2.5)
        .with_key_segment(0, 4, 1.5)
        .with_key_segment(30, 40, 0.5);
    for path in ["auto", "three-pass", "fused"] {
        let extra = [
            "--causal",
            "bottom-right",
            "--window",
            "12",
            "3",
            "--q-lens",
            s(&ql),
            "--kv-lens",
            s(&kl),
            "--mask",
            s(&m),
            "--bias",
            s(&b),
            "--softcap",
            "2.5",
            "--key-segment",
            "0",
            "4",
            "1.5",
            "--key-segment",
            "30",
            "40",
            "0.5",
            "--path",
            path,
        ];
        let what = format!("masked GQA via {path}");
        let err = run_and_check(&what, &dir, &sh, (&q, &k, &v), &extra, &opts);
        assert!(err.contains("H4/2"), "{what}: summary shows GQA: {err}");
        assert!(err.contains("masks:"), "{what}: summary shows masks: {err}");
    }
}

#[test]
fn run_with_a_2d_bool_mask_int64_lengths_and_3d_inputs() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("small");
    let sh = AttnShape {
        batch: 1,
        m: 12,
        n: 10,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    let (q, k, v) = qkv(&sh, 1.0, 21);
    // 3-D files: [seq, heads, d], batch 1.
    write_npy(&dir.path("q.npy"), &q, &sh.q_dims()[1..]);
    write_npy(&dir.path("k.npy"), &k, &sh.k_dims()[1..]);
    write_npy(&dir.path("v.npy"), &v, &sh.v_dims()[1..]);
    let mask = bools(12 * 10, 0.7, 22);
    write_npy(&dir.path("m.npy"), &mask, &[12, 10]); // [M, N] → [1, 1, M, N]
    write_npy(&dir.path("kl.npy"), &[8i64], &[1]);
    let (m, kl) = (dir.path("m.npy"), dir.path("kl.npy"));
    let opts = Attention::default()
        .with_causal(Alignment::TopLeft)
        .with_window(Alignment::TopLeft, 2, 5)
        .with_kv_lens(vec![8])
        .with_mask([1, 1, 12, 10], mask);
    let args = run_args(
        &dir,
        &[
            "--window",
            "2",
            "5",
            "--causal",
            "top-left",
            "--align",
            "top-left",
            "--mask",
            s(&m),
            "--kv-lens",
            s(&kl),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xattn(&args);
    assert!(out.status.success(), "xattn failed: {}", stderr(&out));
    let scale = opts.scale_for(sh.d_k);
    let want = reference::attention_masked(&sh, &q, &k, &v, f64::from(scale), opts.masking());
    let tol = budget_masked(&sh, scale, (&q, &k, &v), opts.masking());
    let (o, o_shape) = read_npy::<f32>(&dir.path("o.npy"));
    assert_eq!(o_shape, [12, 2, 4], "3-D inputs give 3-D outputs");
    assert_close("2-D mask O", &o, &want.o, tol.o);
    let (lse, _) = read_npy::<f32>(&dir.path("lse.npy"));
    // Rows 10, 11 of a top-left causal window over 8 keys see keys 8..=11: none is valid.
    for h in 0..2 {
        for i in [10, 11] {
            assert_eq!(lse[h * 12 + i], f32::NEG_INFINITY, "head {h} row {i}");
        }
    }
}

/// Runs `args`, asserts failure, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = xattn(args);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "xattn {args:?} should fail; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention `{p}`: {err}");
    }
}

/// A small valid problem on disk for the error cases: B2 H2 M4 N6 d3.
fn error_setup(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let sh = AttnShape {
        batch: 2,
        m: 4,
        n: 6,
        q_heads: 2,
        kv_heads: 2,
        d_k: 3,
        d_v: 3,
    };
    write_qkv(&dir, &sh, 1);
    dir
}

fn run_err(dir: &TempDir, extra: &[&str]) -> String {
    fails_in(dir, &run_args(dir, extra))
}

/// [`fails`] on `args`, asserting that no output or temporary file is left in `dir`.
fn fails_in(dir: &TempDir, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&args);
    for file in std::fs::read_dir(dir.path("")).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        let output = matches!(name.as_str(), "o.npy" | "lse.npy" | "w.npy");
        assert!(
            !output && !name.ends_with(".tmp"),
            "{name} is left after an error: {err}"
        );
    }
    err
}

/// An integer 0/1 mask (Hugging Face's int64 attention_mask: 1 = keep; PyTorch's old uint8
/// masks: 1 = masked out) does not say its polarity, so --mask never takes one as it is; the
/// error gives both conversions (once, it said a.astype(bool) for every integer mask).
#[test]
fn integer_masks_are_refused_with_both_conversions() {
    let dir = error_setup("intmask");
    let m = dir.path("m.npy");
    let keep = bools(24, 0.7, 5);
    let ones = |x: &bool| u8::from(*x);
    for dtype in ["int64", "int32", "uint8", "uint8 with a 2"] {
        match dtype {
            "int64" => write_npy(
                &m,
                &keep.iter().map(|x| i64::from(ones(x))).collect::<Vec<_>>(),
                &[4, 6],
            ),
            "int32" => write_npy(
                &m,
                &keep.iter().map(|x| i32::from(ones(x))).collect::<Vec<_>>(),
                &[4, 6],
            ),
            "uint8" => write_npy(&m, &keep.iter().map(ones).collect::<Vec<_>>(), &[4, 6]),
            _ => {
                let mut data: Vec<u8> = keep.iter().map(ones).collect();
                data[7] = 2;
                write_npy(&m, &data, &[4, 6]);
            }
        }
        let err = run_err(&dir, &["--mask", s(&m)]);
        assert_mentions(
            &err,
            &[
                "m.npy",
                dtype.split(' ').next().unwrap(),
                "true = may attend",
                "does not say whether 1 keeps or removes a key",
                "1 = keep) pass (a != 0)",
                "masked out (nn.MultiheadAttention's byte masks) pass (a == 0)",
                "--attention-mask",
                "a.sum(1) to --kv-lens",
            ],
        );
        assert!(!err.contains("astype(bool)"), "{err}");
    }
}

/// `--attention-mask` takes Hugging Face's attention_mask as it is (int64 [batch, N], 1 =
/// keep) and gives exactly what --mask gives for the bool mask it stands for; a padding hole
/// in the middle shows it is a mask, not lengths.
#[test]
fn attention_mask_equals_the_bool_mask_it_stands_for() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("hfmask");
    let sh = shape(2, 5, 9, 2, 2, 8);
    let (q, k, v) = write_qkv(&dir, &sh, 61);
    // Batch 0: keys 0..9 but 3; batch 1: right-padded to 6.
    let keep: Vec<bool> = (0..18)
        .map(|i| if i < 9 { i != 3 } else { i - 9 < 6 })
        .collect();
    let hf: Vec<i64> = keep.iter().map(|&x| i64::from(x)).collect();
    let (a, m) = (dir.path("am.npy"), dir.path("m.npy"));
    write_npy(&a, &hf, &[2, 9]);
    write_npy(&m, &keep, &[2, 1, 1, 9]);
    let opts = Attention::default().with_mask([2, 1, 1, 9], keep.clone());
    run_and_check(
        "--attention-mask",
        &dir,
        &sh,
        (&q, &k, &v),
        &["--attention-mask", s(&a)],
        &opts,
    );
    let (by_hf, _) = read_npy::<f32>(&dir.path("o.npy"));
    run_and_check("--mask", &dir, &sh, (&q, &k, &v), &["--mask", s(&m)], &opts);
    let (by_mask, _) = read_npy::<f32>(&dir.path("o.npy"));
    assert_eq!(
        by_hf, by_mask,
        "--attention-mask a is --mask (a != 0)[:, None, None, :]"
    );
    let unmasked = run_and_check("none", &dir, &sh, (&q, &k, &v), &[], &Attention::default());
    let (plain, _) = read_npy::<f32>(&dir.path("o.npy"));
    assert_ne!(plain, by_hf, "the mask removes keys: {unmasked}");
    // Values other than 0 and 1, a wrong shape, and --mask as well are refused.
    for out in ["o.npy", "lse.npy"] {
        std::fs::remove_file(dir.path(out)).unwrap();
    }
    let mut bad = hf.clone();
    bad[4] = 2;
    write_npy(&a, &bad, &[2, 9]);
    let err = run_err(&dir, &["--attention-mask", s(&a)]);
    assert_mentions(
        &err,
        &["am.npy", "holds 2 at flat index 4", "only 1 (keep) and 0"],
    );
    write_npy(&a, &hf, &[18]);
    let err = run_err(&dir, &["--attention-mask", s(&a)]);
    assert_mentions(&err, &["--attention-mask", "[18]", "[batch, N] = [2, 9]"]);
    write_npy(&a, &hf, &[2, 9]);
    let err = run_err(&dir, &["--attention-mask", s(&a), "--mask", s(&m)]);
    assert_mentions(&err, &["--attention-mask", "--mask", "cannot be combined"]);
}

/// Issue 13: casting as the hints once said would invert a PyTorch float mask (0 / −inf
/// becomes false / true) and turn a bool mask into a +1/0 bias; each belongs to the other flag.
#[test]
fn a_float_mask_points_to_bias_and_a_bool_bias_to_mask() {
    let dir = error_setup("hints");
    let m = dir.path("m.npy");
    for (i, dtype) in ["float32", "float64"].into_iter().enumerate() {
        let mask = [0.0, f32::NEG_INFINITY].repeat(12);
        if i == 0 {
            write_npy(&m, &mask, &[4, 6]);
        } else {
            let mask: Vec<f64> = mask.iter().map(|&x| f64::from(x)).collect();
            write_npy(&m, &mask, &[4, 6]);
        }
        let err = run_err(&dir, &["--mask", s(&m)]);
        assert_mentions(
            &err,
            &[
                "m.npy",
                dtype,
                "additive",
                "pass it as --bias (as float32) instead",
                "a.astype(bool) would invert it",
            ],
        );
        assert!(!err.contains("convert with"), "{err}");
    }
    let b = dir.path("b.npy");
    write_npy(&b, &[true, false].repeat(12), &[4, 6]);
    let err = run_err(&dir, &["--bias", s(&b)]);
    assert_mentions(
        &err,
        &[
            "b.npy",
            "bool",
            "a bool array is a mask (true = may attend): pass it as --mask instead",
            "removes no key",
        ],
    );
    assert!(!err.contains("convert with"), "{err}");
}

#[test]
fn mismatched_mask_dims_are_rejected() {
    let dir = error_setup("maskdims");
    let m = dir.path("m.npy");
    write_npy(&m, &[true; 15], &[3, 5]); // M = 4, N = 6
    let err = run_err(&dir, &["--mask", s(&m)]);
    assert_mentions(
        &err,
        &["--mask", "m.npy", "[3, 5]", "broadcast", "[2, 2, 4, 6]"],
    );
    let m5 = dir.path("m5.npy");
    write_npy(&m5, &[true; 48], &[1, 2, 1, 4, 6]);
    let err = run_err(&dir, &["--mask", s(&m5)]);
    assert_mentions(&err, &["m5.npy", "at most 4 dims"]);
}

#[test]
fn mismatched_bias_dims_are_rejected() {
    let dir = error_setup("biasdims");
    let b = dir.path("b.npy");
    write_npy(&b, &[0.5f32; 3 * 6], &[3, 1, 6]); // heads is 2
    let err = run_err(&dir, &["--bias", s(&b)]);
    assert_mentions(&err, &["--bias", "b.npy", "broadcast"]);
}

#[test]
fn window_without_alignment_is_rejected() {
    let dir = error_setup("window");
    let err = run_err(&dir, &["--window", "2", "0"]);
    assert_mentions(&err, &["--window", "--align", "top-left", "bottom-right"]);
}

#[test]
fn causal_and_align_must_agree() {
    let dir = error_setup("disagree");
    let err = run_err(
        &dir,
        &[
            "--causal",
            "top-left",
            "--window",
            "2",
            "0",
            "--align",
            "bottom-right",
        ],
    );
    assert_mentions(
        &err,
        &["--causal top-left", "--align bottom-right", "disagree"],
    );
}

#[test]
fn lens_of_the_wrong_length_are_rejected() {
    let dir = error_setup("lens");
    let kl = dir.path("kl.npy");
    write_npy(&kl, &[6i32, 6, 6], &[3]); // batch is 2
    let err = run_err(&dir, &["--kv-lens", s(&kl)]);
    assert_mentions(&err, &["--kv-lens", "kl.npy", "3 entries", "batch"]);
}

#[test]
fn negative_or_float_lens_are_rejected() {
    let dir = error_setup("badlens");
    let ql = dir.path("ql.npy");
    write_npy(&ql, &[4i32, -1], &[2]);
    let err = run_err(&dir, &["--q-lens", s(&ql)]);
    assert_mentions(&err, &["ql.npy[1] = -1", "between 0"]);
    let qf = dir.path("qf.npy");
    write_npy(&qf, &[4.0f32, 3.0], &[2]);
    let err = run_err(&dir, &["--q-lens", s(&qf)]);
    assert_mentions(&err, &["qf.npy", "float32", "int32", "astype(np.int32)"]);
    let too_long = dir.path("ql5.npy");
    write_npy(&too_long, &[5i32, 4], &[2]); // M = 4
    let err = run_err(&dir, &["--q-lens", s(&too_long)]);
    assert_mentions(&err, &["--q-lens", "entry 0 is 5", "more than M = 4"]);
    write_npy(&too_long, &[6i32, 7], &[2]); // N = 6
    let err = run_err(&dir, &["--kv-lens", s(&too_long)]);
    assert_mentions(&err, &["--kv-lens", "entry 1 is 7", "more than N = 6"]);
}

#[test]
fn bad_key_segments_and_softcap_are_rejected() {
    let dir = error_setup("segments");
    let err = run_err(
        &dir,
        &[
            "--key-segment",
            "0",
            "3",
            "2",
            "--key-segment",
            "2",
            "5",
            "1",
        ],
    );
    assert_mentions(&err, &["--key-segment", "overlap"]);
    let err = run_err(&dir, &["--key-segment", "0", "x", "2"]);
    assert_mentions(&err, &["--key-segment", "END `x`"]);
    let err = run_err(&dir, &["--softcap", "-1"]);
    assert_mentions(&err, &["--softcap", "softcap must be > 0 and at most 1e30"]);
}

#[test]
fn align_needs_window() {
    let dir = error_setup("align");
    let err = run_err(&dir, &["--align", "top-left"]);
    assert_mentions(&err, &["--window"]);
}

#[test]
fn a_truncated_npy_header_says_truncated() {
    let dir = error_setup("trunchead");
    truncate(&dir.path("q.npy"), 30);
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &["q.npy", "truncated header", "after 30 bytes", "needs 128"],
    );
}

#[test]
fn npy_header_errors_name_the_token_or_dtype_in_one_line() {
    let dir = error_setup("badhead");
    let q = dir.path("q.npy");
    let dict = |descr: &str, order: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': (2, 4, 2, 3), }}")
    };
    write_npy_raw(&q, &dict("<f4", "Flase"), &[0; 4 * 48]);
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &["q.npy", "does not parse at `Flase`", "column 35", "False"],
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("-->"), "no parser diagnostic: {err}");
    write_npy_raw(&q, &dict("<q9", "False"), &[0; 4 * 48]);
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &["q.npy", "dtype `<q9`", "not a numpy type string", "float32"],
    );
}

/// Type strings numpy reads as this machine's order are read too: `=f4` (native), `|f4` and
/// `|f2` (numpy: "not applicable", read as native), `|u1`, `=i8`; they give exactly what the
/// `<` files give. `>f4` (big-endian) is read as such.
#[test]
fn native_and_not_applicable_byte_orders_are_read_as_numpy_reads_them() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("byteorder");
    let sh = shape(2, 4, 6, 2, 2, 3);
    let (q, k, v) = write_qkv(&dir, &sh, 71);
    let hf: Vec<u8> = (0..12).map(|i| u8::from(i % 6 != 2)).collect();
    write_npy(&dir.path("am.npy"), &hf, &[2, 6]);
    write_npy(&dir.path("kl.npy"), &[6i64, 5], &[2]);
    let flags = |am: &str, kl: &str| {
        let mut a = run_args(&dir, &[]);
        for (flag, file) in [("--attention-mask", am), ("--kv-lens", kl)] {
            a.extend([flag.into(), s(&dir.path(file)).into()]);
        }
        a
    };
    let o = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = xattn(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        read_npy::<f32>(&dir.path("o.npy"))
    };
    let (want, want_shape) = o(&flags("am.npy", "kl.npy"));
    let dict = |descr: &str, shape: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
    };
    let f32_bytes = |x: &[f32], be: bool| -> Vec<u8> {
        x.iter()
            .flat_map(|v| if be { v.to_be_bytes() } else { v.to_le_bytes() })
            .collect()
    };
    let dims = |d: [usize; 4]| format!("({}, {}, {}, {})", d[0], d[1], d[2], d[3]);
    write_npy_raw(
        &dir.path("q.npy"),
        &dict("=f4", &dims(sh.q_dims())),
        &f32_bytes(&q, false),
    );
    write_npy_raw(
        &dir.path("k.npy"),
        &dict("|f4", &dims(sh.k_dims())),
        &f32_bytes(&k, false),
    );
    write_npy_raw(
        &dir.path("v.npy"),
        &dict(">f4", &dims(sh.v_dims())),
        &f32_bytes(&v, true),
    );
    write_npy_raw(&dir.path("am1.npy"), &dict("|u1", "(2, 6)"), &hf);
    let kl: Vec<u8> = [6i64, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_npy_raw(&dir.path("kl1.npy"), &dict("=i8", "(2,)"), &kl);
    let (got, got_shape) = o(&flags("am1.npy", "kl1.npy"));
    assert_eq!(
        (got, got_shape),
        (want.clone(), want_shape),
        "=f4, |f4, >f4, |u1, =i8"
    );
    // float16 as |f2 gives what <f2 gives.
    let halves = |x: &[f32]| -> Vec<u8> {
        x.iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()
    };
    let mut by_order = Vec::new();
    for order in ["<", "|"] {
        for (file, x, d) in [
            ("q.npy", &q, sh.q_dims()),
            ("k.npy", &k, sh.k_dims()),
            ("v.npy", &v, sh.v_dims()),
        ] {
            write_npy_raw(
                &dir.path(file),
                &dict(&format!("{order}f2"), &dims(d)),
                &halves(x),
            );
        }
        let args: Vec<String> = run_args(&dir, &["--out-dtype", "f32"]);
        by_order.push(o(&args).0);
    }
    assert_eq!(by_order[0], by_order[1], "|f2 is float16");
    assert_ne!(by_order[0], want, "the f16 run ran in f16");
}

#[test]
fn string_arrays_are_not_numbers() {
    let dir = error_setup("strings");
    let dict = |descr: &str, shape: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
    };
    let m = dir.path("m.npy");
    write_npy_raw(&m, &dict("|S1", "(4, 6)"), &[b'1'; 24]);
    let err = run_err(&dir, &["--mask", s(&m)]);
    assert_mentions(&err, &["m.npy", "strings", "not numbers", "bool"]);
    assert!(!err.contains("astype"), "no cast for strings: {err}");
    write_npy_raw(
        &dir.path("q.npy"),
        &dict("<U2", "(2, 4, 2, 3)"),
        &[0; 8 * 48],
    );
    let err = run_err(&dir, &[]);
    assert_mentions(&err, &["q.npy", "strings", "not numbers", "float32"]);
    assert!(!err.contains("astype"), "no cast for strings: {err}");
}

#[test]
fn a_truncated_bool_mask_gets_no_value_hint() {
    let dir = error_setup("truncmask");
    let m = dir.path("m.npy");
    write_npy(&m, &[true; 24], &[4, 6]);
    truncate(&m, std::fs::metadata(&m).unwrap().len() - 10);
    let err = run_err(&dir, &["--mask", s(&m)]);
    assert_mentions(&err, &["m.npy", "truncated", "24 elements"]);
    assert!(!err.contains("0 and 1"), "{err}");
}

#[test]
fn outputs_are_checked_before_the_run_and_left_whole_or_not_at_all() {
    let dir = error_setup("outputs");
    let args = |flag: &str, file: &FsPath| with(run_args(&dir, &[]), flag, s(file));
    // A file where a folder should be.
    let err = fails_in(&dir, &args("--out", &dir.path("q.npy").join("o.npy")));
    assert_mentions(&err, &["--out", "q.npy is a file, not a folder"]);
    // The last output unwritable: nothing is computed and no other output is written.
    let err = fails_in(&dir, &args("--lse", &dir.path("none").join("lse.npy")));
    assert_mentions(&err, &["--lse", "folder", "none", "does not exist"]);
    let err = fails_in(&dir, &args("--lse", &dir.path("o.npy")));
    assert_mentions(&err, &["--lse", "--out writes it too"]);
}

/// An output target that exists and is not a regular file (a symbolic link, a FIFO, a
/// device, a folder) is refused before the run, by what it is, and left as it was: the
/// atomic rename would replace it with a regular file.
#[cfg(unix)]
#[test]
fn outputs_that_are_not_regular_files_are_refused_and_left_alone() {
    use std::os::unix::fs::FileTypeExt;
    let dir = error_setup("notregular");
    let real = dir.path("real.bin");
    std::fs::write(&real, "keep").unwrap();
    let link = dir.path("link.npy");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let dangling = dir.path("dangling.npy");
    std::os::unix::fs::symlink(dir.path("nowhere.npy"), &dangling).unwrap();
    let args = |flag: &str, file: &FsPath| with(run_args(&dir, &[]), flag, s(file));
    for (flag, target) in [("--out", &link), ("--lse", &link), ("--out", &dangling)] {
        let err = fails_in(&dir, &args(flag, target));
        assert_mentions(
            &err,
            &[
                flag,
                s(target),
                "a symbolic link",
                "does not write outputs through links",
            ],
        );
        assert!(std::fs::symlink_metadata(target)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "keep");
    // Statistics and weights outputs too.
    let w = with(
        run_args(&dir, &["--path", "three-pass"]),
        "--weights",
        s(&link),
    );
    assert_mentions(&fails_in(&dir, &w), &["--weights", "a symbolic link"]);
    let e = with(run_args(&dir, &[]), "--entropy", s(&dangling));
    assert_mentions(&fails_in(&dir, &e), &["--entropy", "a symbolic link"]);
    let folder = dir.path("folder.npy");
    std::fs::create_dir(&folder).unwrap();
    assert_mentions(
        &fails_in(&dir, &args("--lse", &folder)),
        &["--lse", "it is a folder"],
    );
    let fifo = dir.path("pipe.npy");
    if make_fifo(&fifo) {
        let err = fails_quickly(&dir, &args("--out", &fifo));
        assert_mentions(&err, &["--out", "pipe.npy", "a FIFO", "not a regular file"]);
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    }
    // A character device like /dev/null (made here, so that a broken check replaces only it).
    let null = dir.path("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status();
    if made.is_ok_and(|st| st.success()) {
        let err = fails_in(&dir, &args("--lse", &null));
        assert_mentions(&err, &["--lse", "a character device", "leave --lse out"]);
        assert!(std::fs::metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device());
    } else {
        eprintln!("no mknod here: the device case is skipped");
    }
}

/// A run interrupted by SIGTERM or SIGINT after its temporary files exist removes them and
/// dies of the signal, leaving no output. (SIGKILL cannot be caught.)
#[cfg(unix)]
#[test]
fn an_interrupted_run_leaves_no_temporary_file() {
    use std::os::unix::process::ExitStatusExt;
    let Some(_) = engine() else { return };
    let dir = TempDir::new("interrupted");
    let temps = || {
        std::fs::read_dir(dir.path(""))
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                e.file_name().to_string_lossy().ends_with(".tmp")
            })
            .count()
    };
    let mut interrupted = 0;
    // Larger problems until one is caught mid-run (the run must outlast the polling).
    let tries = [
        ("TERM", 256),
        ("INT", 256),
        ("TERM", 2048),
        ("INT", 2048),
        ("TERM", 16384),
    ];
    for (try_, (sig, n)) in tries.into_iter().enumerate() {
        let sh = shape(1, 64, n, 8, 8, 64);
        write_qkv(&dir, &sh, 40 + try_ as u64);
        let args = run_args(&dir, &[]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_xattn"))
            .env("XATTN_CACHE_DIR", autotune_cache())
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while temps() < 2 && start.elapsed().as_secs() < 60 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let during = temps();
        let sent = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status();
        if sent.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("no kill command here: the case is skipped");
            return;
        }
        let status = child.wait().unwrap();
        // Whenever the signal came: no temporary file remains.
        assert_eq!(temps(), 0, "SIG{sig} (n {n}) left temporary files");
        let written = dir.path("o.npy").exists();
        if status.signal().is_none() || written {
            eprintln!("n {n}: the run was done before the signal; trying again");
            let _ = std::fs::remove_file(dir.path("o.npy"));
            let _ = std::fs::remove_file(dir.path("lse.npy"));
            continue;
        }
        assert_eq!(during, 2, "the temporary files of --out and --lse existed");
        let want = if sig == "TERM" { 15 } else { 2 };
        assert_eq!(status.signal(), Some(want), "dies of the signal");
        assert!(!dir.path("lse.npy").exists(), "no output is left");
        interrupted += 1;
        if interrupted == 2 {
            break;
        }
    }
    assert!(
        interrupted > 0,
        "no run lasted long enough to be interrupted"
    );
}

/// The heatmaps are part of the all-or-none set: a map that cannot be written (a folder in its
/// place) fails the run before any work, and no other output is written.
#[test]
fn a_heatmap_that_cannot_be_written_fails_before_the_run_and_writes_nothing() {
    let dir = error_setup("heatmap_clobber");
    let maps = dir.path("maps");
    std::fs::create_dir_all(maps.join("b1_h0.png")).unwrap();
    let err = run_err(&dir, &["--heatmap", s(&maps)]);
    assert_mentions(
        &err,
        &["--heatmap", "b1_h0.png", "a folder is where this map goes"],
    );
    let mut left: Vec<String> = std::fs::read_dir(&maps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["b1_h0.png"], "no map and no temporary file is left");
}

#[test]
fn an_overflowing_scale_says_so() {
    let dir = error_setup("scale");
    let err = run_err(&dir, &["--scale", "1e39"]);
    assert_mentions(&err, &["--scale", "1e39", "overflows f32"]);
    assert!(!err.contains("got inf"), "{err}");
}

/// Logits f32 cannot hold, from finite inputs, are refused before the run, naming the inputs,
/// the head, the row and key and the bound; without the check the run wrote inf or NaN.
#[test]
fn logits_past_what_f32_holds_are_refused_by_name() {
    let dir = TempDir::new("logit-overflow");
    let sh = AttnShape {
        batch: 1,
        m: 4,
        n: 6,
        q_heads: 2,
        kv_heads: 2,
        d_k: 3,
        d_v: 3,
    };
    let (mut q, mut k, v) = qkv(&sh, 1.0, 81);
    // [batch, seq, heads, d]: query row 1 and key 2 of head 1, dim 0.
    let at = |row: usize, d: usize| (row * sh.q_heads + 1) * sh.d_k + d;
    q[at(1, 0)] = 3e19;
    k[at(2, 0)] = 3e19;
    write_npy(&dir.path("q.npy"), &q, &sh.q_dims());
    write_npy(&dir.path("k.npy"), &k, &sh.k_dims());
    write_npy(&dir.path("v.npy"), &v, &sh.v_dims());
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &[
            "the logit at head 1 (batch 0), query row 1 of --q ",
            "q.npy and key 2 of --k ",
            "k.npy is 5.196e38",
            "±5e37",
        ],
    );
    // bf16 keeps 3.3e38 finite (3.4e38 it would round to inf, refused as such), but times an
    // ordinary q it is no logit f32 holds.
    let (q, mut k, _) = qkv(&sh, 1.0, 82);
    k[at(5, 2)] = 3.3e38;
    write_npy(&dir.path("q.npy"), &q, &sh.q_dims());
    write_npy(&dir.path("k.npy"), &k, &sh.k_dims());
    let err = run_err(&dir, &["--dtype", "bf16"]);
    assert_mentions(&err, &["head 1 (batch 0)", "key 5 of --k", "±5e37"]);
}

/// Large logits f32 does hold run and match the f64 reference on every path: up to 1e37, and
/// up to ±4.8e37, just inside the limit (5e37), where the cheap bound ‖q‖·‖k‖ is past it and
/// the exact check decides. Rows alternate between all-positive and all-negative logits: a
/// kept logit of −4.8e37 (−6.9e37 in the kernels' log2 units) must not pass for a removed key.
#[test]
fn large_logits_within_f32_run_and_match_the_reference() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("logit-large");
    let sh = AttnShape {
        batch: 1,
        m: 4,
        n: 6,
        q_heads: 2,
        kv_heads: 2,
        d_k: 3,
        d_v: 3,
    };
    let (q, k, v) = qkv(&sh, 1.0, 83);
    // Keys near (1, 0, 0), query rows near ±(1, 0, 0), the sign alternating by row: every
    // logit of a row has the row's sign, magnitudes within ±30% of each other. Queries have no
    // third component, so key 0's, 3, adds to its norm (and the cheap bound) but to no logit.
    let near_x = |x: &[f32], sign: &dyn Fn(usize) -> f32, z: f32| -> Vec<f32> {
        x.chunks(3)
            .enumerate()
            .flat_map(|(r, c)| [sign(r) * (1.0 + 0.1 * c[0]), 0.3 * c[1], z * c[2]])
            .collect()
    };
    let q = near_x(
        &q,
        &|r| {
            if (r / sh.q_heads).is_multiple_of(2) {
                1.0
            } else {
                -1.0
            }
        },
        0.0,
    );
    let mut k = near_x(&k, &|_| 1.0, 0.3);
    k[2] = 3.0;
    let opts = Attention::default();
    let scale = f64::from(opts.scale_for(sh.d_k));
    for target in [1e37, 4.8e37] {
        // Both scaled by s: logits by s², to a largest |logit| of `target`.
        let unit = largest_logit(&sh, &q, &k, scale);
        let s = (target / unit).sqrt() as f32;
        let (q, k): (Vec<f32>, Vec<f32>) = (
            q.iter().map(|x| x * s).collect(),
            k.iter().map(|x| x * s).collect(),
        );
        let largest = largest_logit(&sh, &q, &k, scale);
        assert!(
            (0.99 * target..=1.01 * target).contains(&largest),
            "logits up to {largest:e}"
        );
        let norm = |x: &[f32]| {
            x.chunks(3)
                .map(|r| r.iter().map(|&y| f64::from(y).powi(2)).sum::<f64>().sqrt())
                .fold(0.0f64, f64::max)
        };
        let cheap = scale * norm(&q) * norm(&k);
        eprintln!("largest |logit| {largest:e}, cheap bound {cheap:e}");
        if target > 4e37 {
            assert!(cheap > 5e37, "the exact check decides: bound {cheap:e}");
        }
        write_npy(&dir.path("q.npy"), &q, &sh.q_dims());
        write_npy(&dir.path("k.npy"), &k, &sh.k_dims());
        write_npy(&dir.path("v.npy"), &v, &sh.v_dims());
        let want = reference::attention_masked(&sh, &q, &k, &v, scale, opts.masking());
        assert!(want.lse.iter().any(|&x| x < -0.5 * target), "negative rows");
        for path in ["three-pass", "fused", "split-k"] {
            let args = run_args(&dir, &["--path", path]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = xattn(&args);
            let what = format!("{path}, logits up to {target:e}");
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            // One key dominates each row by far more than f32's rounding of the logits: O is
            // that key's value, LSE its logit, to f32 rounding.
            let (o, _) = read_npy::<f32>(&dir.path("o.npy"));
            assert_close(&format!("{what}: O"), &o, &want.o, 1e-6);
            let (lse, _) = read_npy::<f32>(&dir.path("lse.npy"));
            assert_close(&format!("{what}: LSE"), &lse, &want.lse, 1e-5 * target);
        }
    }
}

/// The largest |scale·q_i·k_j| of `sh`'s heads, in f64.
fn largest_logit(sh: &AttnShape, q: &[f32], k: &[f32], scale: f64) -> f64 {
    let d = sh.d_k;
    let group = sh.q_heads / sh.kv_heads;
    let mut largest = 0.0f64;
    for b in 0..sh.batch {
        for h in 0..sh.q_heads {
            for i in 0..sh.m {
                let qi = &q[((b * sh.m + i) * sh.q_heads + h) * d..][..d];
                for j in 0..sh.n {
                    let kj = &k[((b * sh.n + j) * sh.kv_heads + h / group) * d..][..d];
                    let dot: f64 = qi
                        .iter()
                        .zip(kj)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum();
                    largest = largest.max((scale * dot).abs());
                }
            }
        }
    }
    largest
}

#[test]
fn a_negative_window_says_sides_are_at_least_zero() {
    let dir = error_setup("negwindow");
    let err = run_err(&dir, &["--causal", "top-left", "--window", "-1", "0"]);
    assert_mentions(&err, &["--window", "`-1`", "≥ 0"]);
}

/// [`fails`] for a command that must fail at once (on the host, before any device work), with
/// a deadline: a FIFO opened for reading would block a broken binary forever.
fn fails_quickly(dir: &TempDir, args: &[String]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xattn"));
    cmd.env("XATTN_CACHE_DIR", autotune_cache()).args(args);
    let out = output_within(cmd, 60);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "xattn {args:?} should fail; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    for file in std::fs::read_dir(dir.path("")).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !matches!(name.as_str(), "o.npy" | "lse.npy" | "w.npy") && !name.ends_with(".tmp"),
            "{name} is left after an error: {err}"
        );
    }
    err
}

/// Every file input is refused at once when it is not a regular file: a FIFO (which would
/// block the read forever), a device, a folder.
#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let dir = error_setup("fifo");
    let fifo = dir.path("f.npy");
    if make_fifo(&fifo) {
        let maps = dir.path("maps");
        for flags in [
            vec!["--mask", s(&fifo)],
            vec!["--q-lens", s(&fifo)],
            vec!["--expect", s(&fifo)],
            vec!["--heatmap", s(&maps), "--q-labels", s(&fifo)],
            vec!["--heatmap", s(&maps), "--k-labels", s(&fifo)],
        ] {
            let err = fails_quickly(&dir, &run_args(&dir, &flags));
            assert_mentions(&err, &["f.npy", "FIFO", "regular files"]);
            if flags.len() > 2 {
                assert_mentions(&err, &[flags[2]]);
            }
        }
        let q_fifo = with(run_args(&dir, &[]), "--q", s(&fifo));
        let err = fails_quickly(&dir, &q_fifo);
        assert_mentions(&err, &["f.npy", "FIFO", "regular files"]);
        let qkv = vec![
            "run".into(),
            "--qkv".into(),
            s(&fifo).into(),
            "--expect".into(),
            s(&dir.path("o.npy")).into(),
        ];
        let err = fails_quickly(&dir, &qkv);
        assert_mentions(&err, &["f.npy", "FIFO", "regular files"]);
    }
    let err = run_err(&dir, &["--bias", "/dev/null"]);
    assert_mentions(&err, &["/dev/null", "a character device", "regular files"]);
    let err = run_err(&dir, &["--bias", s(&dir.path(""))]);
    assert_mentions(&err, &["a folder", "regular files"]);
}

/// Three-pass is limited to 65535 · 64 keys where a grid dim is limited to 65535 workgroups
/// (the WebGPU default); fused and split-K are not.
#[test]
fn a_three_pass_limit_names_the_limit_and_the_way_out() {
    let Some(engine) = engine() else { return };
    let workgroups = engine.caps().max_workgroups as usize;
    let n = workgroups * 64 + 1;
    if n > 1 << 24 {
        eprintln!("max_compute_workgroups_per_dimension {workgroups}: the case would be too big");
        return;
    }
    let dir = TempDir::new("threepass");
    write_npy(&dir.path("q.npy"), &[1.0f32], &[1, 1, 1, 1]);
    write_npy(&dir.path("k.npy"), &vec![0.0f32; n], &[1, n, 1, 1]);
    write_npy(&dir.path("v.npy"), &vec![0.0f32; n], &[1, n, 1, 1]);
    let w = dir.path("w.npy");
    for (flags, fix) in [
        (["--path", "three-pass"], "drop --path three-pass"),
        (["--weights", s(&w)], "drop --weights"),
    ] {
        let err = run_err(&dir, &flags);
        assert_mentions(
            &err,
            &[
                "max_compute_workgroups_per_dimension",
                "fused and split-k",
                fix,
            ],
        );
    }
}

/// `bench --json` is an output like the others: a FIFO there is refused before any timing
/// (opening it to write would block until a reader came).
#[cfg(unix)]
#[test]
fn bench_json_must_be_a_regular_file() {
    let dir = TempDir::new("benchjson");
    let fifo = dir.path("b.json");
    if !make_fifo(&fifo) {
        return;
    }
    let args: Vec<String> = [
        "bench",
        "--m",
        "4",
        "--n",
        "4",
        "--dk",
        "4",
        "--json",
        s(&fifo),
    ]
    .map(String::from)
    .to_vec();
    let err = fails_quickly(&dir, &args);
    assert_mentions(&err, &["--json", "b.json", "a FIFO"]);
}

/// The exit status the README promises: 2 for a usage error, ours (flags that do not go
/// together) as clap's (an unknown flag), 1 for any other error.
#[test]
fn usage_errors_exit_2_and_other_errors_1() {
    let dir = error_setup("usage");
    let status = |extra: &[&str]| {
        let args = run_args(&dir, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = xattn(&args);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{err}");
        (out.status.code(), err)
    };
    for extra in [
        &["--bogus"][..],
        &["--window", "1", "1"],
        &[
            "--causal",
            "top-left",
            "--align",
            "bottom-right",
            "--window",
            "1",
            "1",
        ],
        &["--key-segment", "0", "x", "1.5"],
        &["--rtol", "1e-3"],
    ] {
        let (code, err) = status(extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
    }
    let (code, err) = status(&["--window", "1", "1"]);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("xattn: error: --window needs an alignment"),
        "{code:?} {err}"
    );
    // A file that does not fit: an error, not a usage error.
    let m = dir.path("m.npy");
    write_npy(&m, &[true; 5], &[5]);
    let (code, err) = status(&["--mask", s(&m)]);
    assert_eq!(code, Some(1), "{err}");
    let out = xattn(&["bench", "--suite", "standard", "--only", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `run --help` shows the statistics under their own heading, not under "Precision".
#[test]
fn run_help_groups_the_statistics_under_their_own_heading() {
    for cmd in ["run", "mha"] {
        let out = xattn(&[cmd, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success());
        let heading = |name: &str| {
            text.lines()
                .position(|l| l == name)
                .unwrap_or_else(|| panic!("{cmd}: no heading {name}: {text}"))
        };
        let flag = |name: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("{cmd}: no {name}"))
        };
        let (precision, stats) = (
            heading("Precision:"),
            heading("Statistics and heatmaps of P:"),
        );
        assert!(
            precision < flag("--dtype") && flag("--out-dtype") < stats,
            "{cmd}: {text}"
        );
        for f in [
            "--entropy",
            "--focus",
            "--coverage",
            "--heatmap",
            "--q-labels",
        ] {
            assert!(
                flag(f) > stats,
                "{cmd}: {f} under the statistics heading: {text}"
            );
        }
    }
}

#[test]
fn bench_only_names_a_shape() {
    let err = fails(&["bench", "--suite", "standard", "--only", "nope"]);
    assert_mentions(&err, &["--only nope", "square"]);
}

#[test]
fn bench_causal_checks_against_the_masked_reference() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("bench");
    let json = dir.path("b.json");
    let out = xattn(&[
        "bench",
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
        "bottom-right",
        "--json",
        s(&json),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {text}\n{}",
        stderr(&out)
    );
    assert!(text.contains("causal bottom-right"), "{text}");
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = records.as_array().expect("a JSON list");
    assert!(!records.is_empty());
    for r in records {
        assert_eq!(r["masks"], "causal bottom-right", "{r}");
        assert_eq!(r["check"], "passed", "{r}");
    }
}

/// The fixture file `file` of case `case` (computed by PyTorch, bshd).
fn fixture(case: &str, file: &str) -> PathBuf {
    common::repo_dir()
        .join("tests/fixtures/masks")
        .join(case)
        .join(file)
}

/// `data` of bshd `shape` [b, s, h, d] in PyTorch SDPA's layout, bhsd [b, h, s, d].
fn to_bhsd(data: &[f32], shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let &[b, s, h, d] = shape else {
        panic!("4-D, got {shape:?}")
    };
    let mut out = vec![0.0; data.len()];
    for (i, &x) in data.iter().enumerate() {
        let (bi, si, hi, di) = (i / (s * h * d), i / (h * d) % s, i / d % h, i % d);
        out[((bi * h + hi) * s + si) * d + di] = x;
    }
    (out, vec![b, h, s, d])
}

fn assert_exit(what: &str, out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{what}: {err}");
    err
}

/// `--layout bhsd` on PyTorch SDPA's layout (4-D, and 3-D for batch 1): O is bshd's O
/// transposed, bit for bit, and matches PyTorch's (`--expect`).
#[test]
fn layout_bhsd_reads_and_writes_pytorch_sdpa_tensors() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("bhsd");
    // gqa_r2: q [2, 12, 4, 8], k, v [2, 20, 2, 8]; mqa_h3: q [1, 10, 3, 8], k, v [1, 18, 1, 8].
    for (case, three_d) in [("gqa_r2", false), ("mqa_h3", true)] {
        let file = |name: &str| dir.path(&format!("{case}_{name}.npy"));
        for name in ["q", "k", "v", "o"] {
            let (data, shape) = read_npy::<f32>(&fixture(case, &format!("{name}.npy")));
            let (data, shape) = to_bhsd(&data, &shape);
            write_npy(&file(name), &data, &shape[usize::from(three_d)..]);
        }
        let mask = fixture(case, "mask.npy");
        let bshd_o = file("o_bshd");
        let input = |name: &str| fixture(case, &format!("{name}.npy"));
        let out = xattn(&[
            "run",
            "--q",
            s(&input("q")),
            "--k",
            s(&input("k")),
            "--v",
            s(&input("v")),
            "--mask",
            s(&mask),
            "--out",
            s(&bshd_o),
        ]);
        assert_exit(case, &out, 0);
        let bhsd_o = file("o_bhsd");
        let out = xattn(&[
            "run",
            "--layout",
            "bhsd",
            "--q",
            s(&file("q")),
            "--k",
            s(&file("k")),
            "--v",
            s(&file("v")),
            "--mask",
            s(&mask),
            "--out",
            s(&bhsd_o),
            "--expect",
            s(&file("o")),
        ]);
        let err = assert_exit(case, &out, 0);
        assert_mentions(&err, &["passed", "max abs error"]);
        let (got, got_shape) = read_npy::<f32>(&bhsd_o);
        let (want, want_shape) = read_npy::<f32>(&bshd_o);
        let (want, want_shape) = to_bhsd(&want, &want_shape);
        assert_eq!(got_shape, want_shape[usize::from(three_d)..], "{case}");
        assert!(
            got == want,
            "{case}: bhsd O is bshd's transposed, bit for bit"
        );
    }
}

#[test]
fn a_layout_mix_up_names_the_layout_the_files_fit() {
    let dir = error_setup("mixup"); // bshd: q [2, 4, 2, 3], k, v [2, 6, 2, 3]
    let err = run_err(&dir, &["--layout", "bhsd"]);
    assert_mentions(
        &err,
        &[
            "read as --layout bhsd",
            "they fit --layout bshd",
            "pass --layout bshd",
        ],
    );
    // The same files as PyTorch holds them, read in the default layout: 4 heads over 6.
    for name in ["q", "k", "v"] {
        let path = dir.path(&format!("{name}.npy"));
        let (data, shape) = read_npy::<f32>(&path);
        let (data, shape) = to_bhsd(&data, &shape);
        write_npy(&path, &data, &shape);
    }
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &[
            "q heads (4) must be a multiple of k/v heads (6)",
            "read as --layout bshd",
            "pass --layout bhsd",
        ],
    );
}

/// Equal lengths and head counts fit both layouts: no error can catch a mix-up, so without
/// --layout a note asks to name it.
#[test]
fn shapes_that_fit_both_layouts_get_a_note_unless_the_layout_is_named() {
    let dir = TempDir::new("ambiguous");
    let x = random(2 * 4 * 4 * 3, 1.0, 5);
    for name in ["q.npy", "k.npy", "v.npy"] {
        write_npy(&dir.path(name), &x, &[2, 4, 4, 3]);
    }
    // The run stops at the missing output folder, after the shapes are read.
    let args = with(
        run_args(&dir, &[]),
        "--out",
        s(&dir.path("none").join("o.npy")),
    );
    let err = fails_in(&dir, &args);
    assert_mentions(
        &err,
        &["note: q, k, v fit both layouts", "pass --layout", "bhsd"],
    );
    for layout in ["bshd", "bhsd"] {
        let err = fails_in(&dir, &with(args.clone(), "--layout", layout));
        assert!(!err.contains("note"), "{layout}: {err}");
    }
}

#[test]
fn expect_passes_within_tolerance_and_exits_3_on_a_mismatch() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("expect");
    let sh = AttnShape {
        batch: 2,
        m: 5,
        n: 7,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    let (q, k, v) = write_qkv(&dir, &sh, 31);
    let opts = Attention::default();
    let scale = f64::from(opts.scale_for(sh.d_k));
    let want = reference::attention_masked(&sh, &q, &k, &v, scale, opts.masking());
    let mut o: Vec<f32> = want.o.iter().map(|&x| x as f32).collect();
    let reference = dir.path("ref.npy");
    write_npy(&reference, &o, &sh.o_dims());
    let (qp, kp, vp) = (dir.path("q.npy"), dir.path("k.npy"), dir.path("v.npy"));
    let run = |extra: &[&str]| {
        let base = ["run", "--q", s(&qp), "--k", s(&kp), "--v", s(&vp)];
        xattn(&[&base[..], &["--expect", s(&reference)], extra].concat())
    };
    let err = assert_exit("expect, no --out", &run(&[]), 0);
    assert_mentions(
        &err,
        &[
            "ref.npy: passed",
            "max abs error",
            "max rel error",
            "worst [",
        ],
    );
    // One element off by 0.01, beyond atol 1e-5 + rtol 1e-4·|want|.
    o[13] += 0.01;
    write_npy(&reference, &o, &sh.o_dims());
    let o_file = dir.path("o.npy");
    let err = assert_exit("mismatch", &run(&["--out", s(&o_file)]), 3);
    assert_mentions(
        &err,
        &[
            "ref.npy: MISMATCH: |got − want| > atol + rtol·|want| in 1 of 80 elements",
            "(atol 1e-5, rtol 1e-4)",
            "max abs error 1.000e-2",
            "worst [0, 1, 1, 1]",
        ],
    );
    assert!(o_file.exists(), "O is written on a mismatch too");
    assert_exit("--atol 0.02", &run(&["--atol", "0.02"]), 0);
    // numpy.allclose: a finite O never matches an infinity (atol + rtol·∞ is ∞, yet
    // np.allclose(0.5, np.inf) is False), and NaN never matches, at any tolerance.
    for (bad, what) in [(f32::INFINITY, "inf"), (f32::NAN, "NaN")] {
        let mut o_bad = o.clone();
        o_bad[13] = bad;
        write_npy(&reference, &o_bad, &sh.o_dims());
        let loose = ["--atol", "10", "--rtol", "10"];
        let err = assert_exit(&format!("want {what}"), &run(&loose), 3);
        assert_mentions(
            &err,
            &["MISMATCH", "in 1 of 80 elements", "worst [0, 1, 1, 1]"],
        );
    }
}

#[test]
fn expect_is_checked_before_the_run() {
    let dir = error_setup("expectshape"); // O is [2, 4, 2, 3]
    let reference = dir.path("ref.npy");
    write_npy(&reference, &[0.0f32; 48], &[2, 2, 4, 3]);
    let err = run_err(&dir, &["--expect", s(&reference)]);
    assert_mentions(
        &err,
        &[
            "ref.npy has shape [2, 2, 4, 3], but O has shape [2, 4, 2, 3]",
            "O in --layout bhsd",
        ],
    );
    let err = run_err(&dir, &["--rtol", "1e-3"]);
    assert_mentions(&err, &["--rtol", "--expect"]);
    let err = run_err(&dir, &["--expect", s(&reference), "--atol", "-1"]);
    assert_mentions(&err, &["--atol", "negative"]);
}

/// A fixture's inputs in one safetensors file, as `safetensors.torch.save_file` writes them
/// (lengths int64, as torch makes them), give the numbers of the separate files.
#[test]
fn qkv_from_one_safetensors_file_equals_separate_files() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("qkv");
    let case = "lens_mask_bias";
    let input = |name: &str| fixture(case, &format!("{name}.npy"));
    let mut tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ["q", "k", "v", "bias"] {
        let (data, shape) = read_npy::<f32>(&input(name));
        let bytes = le_bytes(&data, f32::to_le_bytes);
        tensors.push((name, safetensors::Dtype::F32, shape, bytes));
    }
    let (mask, shape) = read_npy::<bool>(&input("mask"));
    let bytes = le_bytes(&mask, |x| [u8::from(x)]);
    tensors.push(("mask", safetensors::Dtype::BOOL, shape, bytes));
    for name in ["q_lens", "kv_lens"] {
        let (lens, shape) = read_npy::<i32>(&input(name));
        let bytes = le_bytes(&lens, |x| i64::from(x).to_le_bytes());
        tensors.push((name, safetensors::Dtype::I64, shape, bytes));
    }
    let file = dir.path("inputs.safetensors");
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, t, shape, bytes)| (*n, *t, &shape[..], &bytes[..]))
        .collect();
    write_safetensors_raw(&file, &list);
    let (separate, bundled) = (dir.path("o_files.npy"), dir.path("o_qkv.npy"));
    let mut args = vec!["run".to_string()];
    for (flag, name) in [
        ("--q", "q"),
        ("--k", "k"),
        ("--v", "v"),
        ("--mask", "mask"),
        ("--bias", "bias"),
        ("--q-lens", "q_lens"),
        ("--kv-lens", "kv_lens"),
    ] {
        args.extend([flag.to_string(), s(&input(name)).to_string()]);
    }
    args.extend(["--out".to_string(), s(&separate).to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_exit("separate files", &xattn(&args), 0);
    let out = xattn(&[
        "run",
        "--qkv",
        s(&file),
        "--out",
        s(&bundled),
        "--expect",
        s(&input("o")),
    ]);
    let err = assert_exit("--qkv", &out, 0);
    assert_mentions(&err, &["passed"]);
    assert_eq!(
        read_npy::<f32>(&bundled),
        read_npy::<f32>(&separate),
        "--qkv gives the numbers of the separate files"
    );
}

#[test]
fn qkv_files_are_checked_by_name_and_dtype() {
    use safetensors::Dtype::{BF16, BOOL, F32};
    let dir = error_setup("qkverr"); // q [2, 4, 2, 3], k, v [2, 6, 2, 3]
    let read = |name: &str| {
        let (data, shape) = read_npy::<f32>(&dir.path(&format!("{name}.npy")));
        (le_bytes(&data, f32::to_le_bytes), shape)
    };
    let ((q, qs), (k, ks), (v, vs)) = (read("q"), read("k"), read("v"));
    let qkv = [
        ("q", F32, &qs[..], &q[..]),
        ("k", F32, &ks, &k),
        ("v", F32, &vs, &v),
    ];
    let file = dir.path("x.safetensors");
    let o = dir.path("o.npy");
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["run", "--qkv", s(&file), "--out", s(&o)]
            .map(String::from)
            .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let err_with = |extra: &[(&str, safetensors::Dtype, &[usize], &[u8])], flags: &[&str]| {
        write_safetensors_raw(&file, &[&qkv[..], extra].concat());
        fails_in(&dir, &args(flags))
    };
    let err = err_with(&[("attn_mask", BOOL, &[4, 6], &[1; 24])], &[]);
    assert_mentions(
        &err,
        &[
            "x.safetensors holds a tensor `attn_mask`, which xattn does not read",
            "q, k, v, mask, bias, q_lens, kv_lens",
        ],
    );
    let float_mask = le_bytes(&[0.0f32; 24], f32::to_le_bytes);
    let err = err_with(&[("mask", F32, &[4, 6], &float_mask)], &[]);
    assert_mentions(
        &err,
        &["tensor `mask` of --qkv", "save it as the tensor `bias`"],
    );
    let m = dir.path("m.npy");
    write_npy(&m, &[true; 24], &[4, 6]);
    let err = err_with(&[("mask", BOOL, &[4, 6], &[1; 24])], &["--mask", s(&m)]);
    assert_mentions(&err, &["--mask", "m.npy", "both give `mask`", "drop one"]);
    write_safetensors_raw(
        &file,
        &[qkv[0], qkv[1], ("v", BF16, &vs, &v[..v.len() / 2])],
    );
    let err = fails_in(&dir, &args(&[]));
    assert_mentions(
        &err,
        &[
            "share one type",
            "tensor `v`",
            "BF16",
            "float32",
            "--dtype bf16",
        ],
    );
    write_safetensors_raw(&file, &qkv[..2]);
    let err = fails_in(&dir, &args(&[]));
    assert_mentions(&err, &["no tensor `v`", "save_file"]);
    std::fs::write(&file, b"PK\x03\x04 an npz").unwrap();
    let err = fails_in(&dir, &args(&[]));
    assert_mentions(&err, &["zip archive (.npz)", "safetensors"]);
    // --qkv replaces --q, --k, --v: clap refuses both, with its usage status.
    let mut both = args(&[]);
    both.extend(["--q".to_string(), s(&o).to_string()]);
    let out = xattn(&both.iter().map(String::as_str).collect::<Vec<_>>());
    let err = assert_exit("--qkv with --q", &out, 2);
    assert_mentions(&err, &["--qkv", "--q"]);
}

/// Without XDG_RUNTIME_DIR (containers, CI, ssh without a session) Mesa's drivers would print
/// "XDG_RUNTIME_DIR is invalid or not set" on every start; the CLI gives itself a private one.
#[test]
fn the_cli_is_quiet_without_a_runtime_dir() {
    let out = Command::new(env!("CARGO_BIN_EXE_xattn"))
        .arg("info")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("start the xattn binary");
    let err = stderr(&out);
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Half precision: float16 .npy files, --dtype, --out-dtype.

/// The unit roundoff (half an ulp, relative) of a stored half value: 2⁻¹¹ for f16, 2⁻⁸ for bf16.
const F16_UNIT: f64 = 1.0 / 2048.0;
const BF16_UNIT: f64 = 1.0 / 256.0;

/// A GQA shape, not tile multiples, M ≠ N, for the half-precision runs.
fn half_shape() -> AttnShape {
    AttnShape {
        batch: 2,
        m: 7,
        n: 19,
        q_heads: 4,
        kv_heads: 2,
        d_k: 8,
        d_v: 6,
    }
}

/// Seeded Q, K, V for `sh`, each value passed through `round`.
fn rounded_qkv(sh: &AttnShape, seed: u64, round: fn(f32) -> f32) -> [Vec<f32>; 3] {
    let (q, k, v) = qkv(sh, 1.0, seed);
    [q, k, v].map(|x| x.into_iter().map(round).collect())
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Writes `x` as a float16 .npy (values f16 holds exactly).
fn write_f16(path: &FsPath, x: &[f32], shape: &[usize]) {
    let halves: Vec<half::f16> = x.iter().map(|&y| half::f16::from_f32(y)).collect();
    write_npy(path, &halves, shape);
}

/// The reference O on `q, k, v` (unmasked) and the f32 error budget of O.
fn reference_o(sh: &AttnShape, [q, k, v]: &[Vec<f32>; 3]) -> (Vec<f64>, f64) {
    let opts = Attention::default();
    let scale = opts.scale_for(sh.d_k);
    let want = reference::attention_masked(sh, q, k, v, f64::from(scale), opts.masking());
    let tol = budget_masked(sh, scale, (q, k, v), opts.masking());
    (want.o, tol.o)
}

fn abs_max(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |a, y| a.max(y.abs()))
}

/// float16 .npy inputs run as f16 and give a float16 O, within the f32 budget on those inputs
/// plus the one rounding of O (half an ulp of max|O|); `--plan` says f16, LSE stays float32,
/// and `--expect` compares the f16 O.
#[test]
fn float16_npy_inputs_give_a_float16_o() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("f16");
    let sh = half_shape();
    let x = rounded_qkv(&sh, 61, f16_round);
    for (name, data, dims) in [
        ("q.npy", &x[0], sh.q_dims()),
        ("k.npy", &x[1], sh.k_dims()),
        ("v.npy", &x[2], sh.v_dims()),
    ] {
        write_f16(&dir.path(name), data, &dims);
    }
    let (want, tol) = reference_o(&sh, &x);
    let bound = tol + F16_UNIT * abs_max(&want);
    let reference_file = dir.path("ref.npy");
    let want32: Vec<f32> = want.iter().map(|&w| w as f32).collect();
    write_npy(&reference_file, &want32, &sh.o_dims());
    for path in ["fused", "three-pass", "split-k"] {
        let args = run_args(
            &dir,
            &[
                "--path",
                path,
                "--plan",
                "--expect",
                s(&reference_file),
                "--rtol",
                "1e-3",
                "--atol",
                "1e-4",
            ],
        );
        let out = xattn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = assert_exit(path, &out, 0);
        assert_mentions(&err, &["dtype: q, k, v f16", "o f16", " f16 on ", "passed"]);
        // read_npy::<f16> fails on any other dtype: O is float16.
        let (o, shape) = read_npy::<half::f16>(&dir.path("o.npy"));
        assert_eq!(shape, sh.o_dims(), "{path}");
        let o: Vec<f32> = o.into_iter().map(half::f16::to_f32).collect();
        let worst = assert_close(&format!("f16 {path} O"), &o, &want, bound);
        let (lse, _) = read_npy::<f32>(&dir.path("lse.npy"));
        assert_eq!(lse.len(), sh.batch * sh.q_heads * sh.m, "LSE is float32");
        eprintln!("f16 {path}: largest O error {worst:e} (bound {bound:e})");
    }
}

/// --dtype bf16 rounds float32 inputs once on upload; O is bf16, written as float32 (numpy
/// has no bfloat16) holding bf16 values; with --out-dtype f32 O is f32, held to the f32 budget
/// on the rounded inputs with no output rounding. --out-dtype f32 on float16 files likewise.
#[test]
fn dtype_bf16_and_out_dtype_f32() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("bf16");
    let sh = half_shape();
    write_qkv(&dir, &sh, 62);
    let x = rounded_qkv(&sh, 62, bf16_round);
    let (want, tol) = reference_o(&sh, &x);
    let run = |extra: &[&str]| {
        let args = run_args(&dir, extra);
        let out = xattn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = assert_exit(&format!("{extra:?}"), &out, 0);
        let (o, shape) = read_npy::<f32>(&dir.path("o.npy"));
        assert_eq!(shape, sh.o_dims(), "{extra:?}");
        (o, err)
    };
    let (o, err) = run(&["--dtype", "bf16", "--plan"]);
    assert_mentions(&err, &["dtype: q, k, v bf16", "o bf16"]);
    assert!(
        o.iter().all(|&y| bf16_round(y) == y),
        "a bf16 O holds bf16 values"
    );
    assert_close("bf16 O", &o, &want, tol + BF16_UNIT * abs_max(&want));
    let (o, err) = run(&["--dtype", "bf16", "--out-dtype", "f32", "--plan"]);
    assert_mentions(&err, &["o f32", " bf16→f32 on "]);
    assert!(
        o.iter().any(|&y| bf16_round(y) != y),
        "an f32 O is not rounded to bf16"
    );
    let worst = assert_close("bf16 → f32 O", &o, &want, tol);
    eprintln!("bf16 → f32: largest O error {worst:e} (bound {tol:e})");

    let x = rounded_qkv(&sh, 63, f16_round);
    for (name, data, dims) in [
        ("q.npy", &x[0], sh.q_dims()),
        ("k.npy", &x[1], sh.k_dims()),
        ("v.npy", &x[2], sh.v_dims()),
    ] {
        write_f16(&dir.path(name), data, &dims);
    }
    let (want, tol) = reference_o(&sh, &x);
    let (o, _) = run(&["--out-dtype", "f32"]);
    assert_close("f16 → f32 O", &o, &want, tol);
}

/// Inputs of different types are refused before the run, with the files and the way out;
/// --dtype rounds float32 inputs but not one half type to the other.
/// `--dtype f16` would turn a value past ±65504 into ±inf (and a row of logits into inf or
/// NaN): refused before the run, naming the input, the element and the bound; bf16 (float32's
/// range) and f32 take the same file.
#[test]
fn dtype_f16_refuses_values_past_its_range() {
    let dir = error_setup("f16range");
    let (mut k, shape) = read_npy::<f32>(&dir.path("k.npy"));
    k[5] = 70000.0;
    write_npy(&dir.path("k.npy"), &k, &shape);
    let err = run_err(&dir, &["--dtype", "f16"]);
    assert_mentions(
        &err,
        &[
            "--k",
            "k.npy",
            "7e4 at [0, 0, 1, 2]",
            "float16 (<f2)'s range (±65504)",
            "+inf",
            "--dtype bf16",
        ],
    );
    if engine().is_some() {
        for dtype in ["bf16", "f32"] {
            let args = run_args(&dir, &["--dtype", dtype]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = xattn(&args);
            assert!(out.status.success(), "--dtype {dtype}: {}", stderr(&out));
            let (o, _) = read_npy::<f32>(&dir.path("o.npy"));
            assert!(o.iter().all(|x| x.is_finite()), "--dtype {dtype}");
        }
    }
}

#[test]
fn mixed_input_types_are_refused() {
    let dir = error_setup("mixed"); // q [2, 4, 2, 3], k, v [2, 6, 2, 3], float32
    let (k, shape) = read_npy::<f32>(&dir.path("k.npy"));
    write_f16(&dir.path("k.npy"), &k, &shape);
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &[
            "the inputs must share one type",
            "k.npy is float16 (<f2)",
            "q.npy is float32 (<f4)",
            "pass --dtype f16",
        ],
    );
    let err = run_err(&dir, &["--dtype", "bf16"]);
    assert_mentions(
        &err,
        &["--dtype bf16", "k.npy is float16 (<f2)", "round twice"],
    );
    let err = run_err(&dir, &["--out-dtype", "half"]);
    assert_mentions(&err, &["--out-dtype", "same", "f32"]);
    let (q, shape) = read_npy::<f32>(&dir.path("q.npy"));
    write_npy(
        &dir.path("q.npy"),
        &q.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        &shape,
    );
    let err = run_err(&dir, &[]);
    assert_mentions(
        &err,
        &[
            "q.npy has dtype float64 (<f8)",
            "float32 (<f4) or float16 (<f2)",
        ],
    );
}

/// q, k, v as F16 or BF16 tensors of a --qkv file run in that type, as separate files would.
#[test]
fn qkv_files_hold_half_tensors() {
    use safetensors::Dtype::{BF16, F16};
    let Some(_) = engine() else { return };
    let dir = TempDir::new("qkvhalf");
    let sh = half_shape();
    let file = dir.path("x.safetensors");
    let o = dir.path("o.npy");
    let dims = [sh.q_dims(), sh.k_dims(), sh.v_dims()].map(|d| d.to_vec());
    for (dtype, seed) in [(F16, 64), (BF16, 65)] {
        let f16 = dtype == F16;
        let x = rounded_qkv(&sh, seed, if f16 { f16_round } else { bf16_round });
        let unit = if f16 { F16_UNIT } else { BF16_UNIT };
        // Bit-exact: x holds values of the type.
        let bytes = x.each_ref().map(|t| {
            if f16 {
                le_bytes(t, |y| half::f16::from_f32(y).to_le_bytes())
            } else {
                le_bytes(t, |y| half::bf16::from_f32(y).to_le_bytes())
            }
        });
        write_safetensors_raw(
            &file,
            &[
                ("q", dtype, &dims[0], &bytes[0]),
                ("k", dtype, &dims[1], &bytes[1]),
                ("v", dtype, &dims[2], &bytes[2]),
            ],
        );
        let out = xattn(&["run", "--qkv", s(&file), "--out", s(&o), "--plan"]);
        let err = assert_exit(&format!("{dtype:?}"), &out, 0);
        let name = if dtype == F16 { "f16" } else { "bf16" };
        assert_mentions(&err, &[&format!("dtype: q, k, v {name}")]);
        let got: Vec<f32> = if dtype == F16 {
            let (h, _) = read_npy::<half::f16>(&o);
            h.into_iter().map(half::f16::to_f32).collect()
        } else {
            read_npy::<f32>(&o).0
        };
        let (want, tol) = reference_o(&sh, &x);
        assert_close(
            &format!("--qkv {name} O"),
            &got,
            &want,
            tol + unit * abs_max(&want),
        );
    }
}

/// `bench` on a tiny shape (M 20, N 37, d 8, 2 heads, quick, checked) plus `extra`: asserts
/// success and returns the table.
fn tiny_bench(extra: &[&str]) -> String {
    let mut args = vec![
        "bench", "--m", "20", "--n", "37", "--dk", "8", "--heads", "2", "--name", "tiny",
        "--quick", "--check",
    ];
    args.extend_from_slice(extra);
    let out = xattn(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {text}\n{}",
        stderr(&out)
    );
    text
}

/// The benchmark's last line is its verdict: checked and all within the tolerance, or which
/// results were not (exit status 1), or timed only.
#[test]
fn bench_ends_with_a_verdict() {
    let Some(_) = engine() else { return };
    let text = tiny_bench(&[]);
    let last = text.lines().last().unwrap_or_default();
    // The verdict, then how long the whole run took.
    let (verdict, took) = last.rsplit_once(" (").unwrap_or_default();
    assert_eq!(
        verdict,
        "verdict: checked against the f64 reference: all 3 result(s) within the tolerance \
         (--tolerance 1e-3, plus a half O's rounding)",
        "{text}"
    );
    let seconds = took.strip_suffix(" s in all)").map(str::parse::<f64>);
    assert!(matches!(seconds, Some(Ok(t)) if t >= 0.0), "{text}");
    // A tolerance no f32 result meets: every case is named, and the exit status is 1.
    let args = [
        "bench",
        "--m",
        "20",
        "--n",
        "37",
        "--dk",
        "8",
        "--heads",
        "2",
        "--name",
        "tiny",
        "--quick",
        "--check",
        "--tolerance",
        "1e-15",
    ];
    let out = xattn(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert_mentions(
        last,
        &[
            "verdict: FAILED: 3 of 3 result(s)",
            "tiny three-pass f32 (max |err|",
            "tiny fused f32 (max |err|",
            "tiny split-k f32 (max |err|",
            "> 1.00e-15",
        ],
    );
    assert_mentions(
        &stderr(&out),
        &["3 result(s) above the tolerance", "verdict line"],
    );
    // Without --check a custom shape is timed only, and says so.
    let args = [
        "bench", "--m", "8", "--n", "9", "--dk", "4", "--quick", "--path", "fused",
    ];
    let out = xattn(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    let last = text.lines().last().unwrap_or_default();
    assert_eq!(
        last.rsplit_once(" (").map(|(verdict, _)| verdict),
        Some("verdict: timed only, not checked against the reference (pass --check)"),
        "{text}"
    );
}

/// `bench` autotunes the fused kernel before timing and notes what it picked (M 200: R = 1, 2
/// and 4 are candidates); --no-autotune times the planner's default. The JSON records name
/// the configuration and where it came from, whichever candidate won.
#[test]
fn bench_autotunes_unless_told_not_to() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("benchtune");
    let json = dir.path("b.json");
    for (extra, label, sources) in [
        (None, "autotune: on", &["tuned", "cached"][..]),
        (
            Some("--no-autotune"),
            "autotune: off (--no-autotune)",
            &["default"][..],
        ),
    ] {
        let mut args = vec![
            "bench",
            "--m",
            "200",
            "--n",
            "37",
            "--dk",
            "8",
            "--heads",
            "2",
            "--quick",
            "--path",
            "fused",
            "--json",
            s(&json),
        ];
        args.extend(extra);
        let out = xattn(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bench failed: {text}\n{}",
            stderr(&out)
        );
        assert!(text.contains(label), "{text}");
        assert_eq!(text.contains("autotune: R="), extra.is_none(), "{text}");
        let records: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let record = &records.as_array().expect("a JSON list")[0];
        let config = record["config"].as_str().unwrap_or_default();
        // Whichever candidate won: R = 1, 2 or 4, plain, with lanes or with broadcast loads.
        let parsed: xattn::FusedConfig = config.parse().unwrap_or_else(|e| panic!("{record}: {e}"));
        assert!(!parsed.matrix_units, "{record}");
        let source = record["config_source"].as_str().unwrap_or_default();
        assert!(sources.contains(&source), "{record}");
    }
}

/// `bench --dtype` on a tiny shape: every record names its type and storage, passes --check
/// against the reference on the rounded inputs, and is allowed no more than --tolerance plus
/// the half O's rounding (|O| ≤ max|V| ≤ 1 here); the table gives the dtype time ratios.
#[test]
fn bench_dtype_checks_half_runs_against_the_rounded_reference() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("benchhalf");
    let json = dir.path("b.json");
    let text = tiny_bench(&[
        "--dtype",
        "f32,f16,bf16",
        "--tolerance",
        "1e-4",
        "--json",
        s(&json),
    ]);
    assert_mentions(
        &text,
        &[
            "dtypes: f32",
            "bf16 (read as bf16-packed)",
            "f16/f32 fused",
            "bf16/f32 fused",
        ],
    );
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = records.as_array().expect("a JSON list");
    for (dtype, unit) in [("f32", 0.0), ("f16", F16_UNIT), ("bf16", BF16_UNIT)] {
        let of_type: Vec<_> = records.iter().filter(|r| r["dtype"] == dtype).collect();
        assert!(of_type.len() >= 2, "{dtype}: {records:?}");
        for r in of_type {
            assert_eq!(r["check"], "passed", "{r}");
            assert!(r["storage"].as_str().unwrap().starts_with(dtype), "{r}");
            let tol = r["tolerance"].as_f64().unwrap();
            assert!(
                tol >= 1e-4 && tol <= 1e-4 + unit,
                "{dtype}: tolerance {tol}: {r}"
            );
            let size = if dtype == "f32" { 4 } else { 2 };
            let elems = 2 * (20 * 8 + 37 * 8 + 37 * 8 + 20 * 8);
            assert_eq!(r["min_bytes"], elems * size, "{r}");
        }
    }
}

/// `bench --packed-f16` reads f16 as packed pairs even where the device could read it
/// natively, and still passes --check.
#[test]
fn bench_packed_f16_times_the_packed_storage() {
    let Some(_) = engine() else { return };
    let text = tiny_bench(&["--dtype", "f16", "--packed-f16", "--path", "fused"]);
    assert_mentions(&text, &["f16-packed"]);
    assert!(!text.contains("read as f16)"), "native f16 storage: {text}");
}

#[test]
fn run_writes_entropy_focus_and_coverage_on_every_path() {
    use common::weight_stats::check_present_stats;
    let sh = AttnShape {
        batch: 2,
        m: 21,
        n: 300,
        q_heads: 4,
        kv_heads: 2,
        d_k: 16,
        d_v: 8,
    };
    let dir = TempDir::new("cli_stats");
    let (q, k, v) = write_qkv(&dir, &sh, 2101);
    let opts = Attention::default().with_causal(Alignment::BottomRight);
    let scale = opts.scale_for(sh.d_k);
    let reference = reference::attention_masked(&sh, &q, &k, &v, f64::from(scale), opts.masking());
    let base = budget(&sh, scale, &q, &k, &v).lse;
    for path in ["fused", "split-k", "three-pass"] {
        let (e, f, c) = (
            dir.path("entropy.npy"),
            dir.path("focus.npy"),
            dir.path("coverage.npy"),
        );
        run_and_check(
            &format!("stats {path}"),
            &dir,
            &sh,
            (&q, &k, &v),
            &[
                "--causal",
                "bottom-right",
                "--path",
                path,
                "--entropy",
                s(&e),
                "--focus",
                s(&f),
                "--coverage",
                s(&c),
            ],
            &opts,
        );
        let read = |file: &PathBuf, dims: [usize; 3]| {
            let (got, shape) = read_npy::<f32>(file);
            assert_eq!(shape, dims, "{path} {}", file.display());
            Some(got)
        };
        let got = xattn::StatsOutput {
            entropy: read(&e, [2, 4, 21]),
            focus: read(&f, [2, 4, 21]),
            coverage: read(&c, [2, 4, 300]),
            pooled: None,
        };
        check_present_stats(
            &format!("stats {path}"),
            &sh,
            &got,
            &reference.weights,
            None,
            base,
        );
    }
}

#[test]
fn run_writes_heatmaps_per_head_and_averaged_with_labels_where_they_fit() {
    use xattn::heatmap::{HeatmapStyle, Layout};
    let dir = TempDir::new("cli_heatmap");
    let labels = |name: &str, count: usize| {
        let text: Vec<String> = (0..count).map(|i| format!("{name}{i}")).collect();
        let path = dir.path(&format!("{name}.txt"));
        std::fs::write(&path, text.join("\n")).unwrap();
        (path, text)
    };
    // Small: one value per (query, key), labels on both axes. Large: N = 4100 keys pooled by
    // blocks of 3 (at most 2048 columns), so the key labels are left out.
    for (sh, pooled_cols) in [
        (shape(2, 12, 20, 2, 1, 8), 20),
        (shape(1, 9, 4100, 2, 2, 8), 1367),
    ] {
        write_qkv(&dir, &sh, 2201);
        let maps = dir.path(&format!("maps_{}", sh.n));
        let (q_file, q_labels) = labels("q", sh.m);
        let (k_file, _) = labels("k", sh.n);
        let args = run_args(
            &dir,
            &[
                "--heatmap",
                s(&maps),
                "--q-labels",
                s(&q_file),
                "--k-labels",
                s(&k_file),
            ],
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = xattn(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        if sh.n > 2048 {
            assert!(stderr(&out).contains("not pooled"), "{}", stderr(&out));
        }
        let mut names: Vec<String> = std::fs::read_dir(&maps)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..sh.batch)
            .flat_map(|b| {
                (0..sh.q_heads)
                    .map(move |h| format!("b{b}_h{h}.png"))
                    .chain([format!("b{b}_mean.png")])
            })
            .collect();
        want.sort();
        assert_eq!(names, want);
        // The picture has the size the renderer documents for this map and its labels.
        let style = HeatmapStyle {
            q_labels: Some(q_labels),
            k_labels: (pooled_cols == sh.n).then(|| (0..sh.n).map(|j| format!("k{j}")).collect()),
            caption: Some(String::new()),
            range: None,
        };
        let layout = Layout::new(sh.m, pooled_cols, &style).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(maps.join("b0_mean.png")).unwrap(),
        ));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!(
            (info.width, info.height),
            (layout.width, layout.height),
            "{sh}"
        );
    }
}

#[test]
fn heatmap_labels_must_match_the_axis() {
    let dir = TempDir::new("cli_heatmap_labels");
    let sh = shape(1, 5, 7, 1, 1, 4);
    write_qkv(&dir, &sh, 2301);
    std::fs::write(dir.path("q.txt"), "a\nb\nc").unwrap();
    let maps = dir.path("maps");
    let err = run_err(
        &dir,
        &["--heatmap", s(&maps), "--q-labels", s(&dir.path("q.txt"))],
    );
    assert_mentions(&err, &["--q-labels", "3 lines", "5 of them"]);
}

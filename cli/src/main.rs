//! `xattn`: the command-line face of the library.
//!
//! - `xattn info` lists the adapters wgpu can see and which one [`xattn::Context::new`] picks.
//! - `xattn run` computes attention on `.npy` files.
//! - `xattn grad` computes its gradients (dQ, dK, dV, dBias) from dO on `.npy` files.
//! - `xattn mha` runs a multi-head attention layer (weights from safetensors) on `.npy` files.
//! - `xattn bench` times every path on standard or custom shapes, headless.
//!
//! Every failure a user can cause ends the process with a non-zero status and one line on
//! stderr, `xattn: error: ...`; nothing a user does should reach a panic.

mod analytics;
mod bench;
mod distributed;
mod expect;
mod grad;
mod graph;
mod info;
mod inputs;
mod layout;
mod logits;
mod masks;
mod mha;
mod npy;
mod outputs;
mod precision;
mod qkv;
mod run;
mod suite;

use std::fmt;
use std::fs::{File, FileType};
use std::path::Path as FsPath;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xattn::{DeviceCaps, Request};
use xattn::{Path, Plan};

/// Cross-attention on any GPU wgpu reaches (Vulkan, Metal, DX12, GL).
///
/// Adapter selection: WGPU_BACKEND restricts the backends (vulkan, gl, metal, dx12),
/// WGPU_ADAPTER_NAME picks an adapter by a substring of its name.
#[derive(Debug, Parser)]
#[command(name = "xattn", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the adapters, their limits and features, and the one used by default.
    Info(info::InfoArgs),
    /// Compute attention on .npy files: O = softmax(scale · Q·Kᵀ) · V.
    ///
    /// Inputs are float32 or float16 (one type; --dtype converts), C order: Q [batch, M,
    /// heads, d_k], K [batch, N, kv_heads, d_k], V [batch, N, kv_heads, d_v]; 3-D inputs [seq,
    /// heads, d] mean batch 1 and give outputs without the batch axis. Outputs: O [batch, M,
    /// heads, d_v] in the inputs' type (--out-dtype), weights [batch, heads, M, N] and LSE
    /// [batch, heads, M] in float32. With --layout bhsd, Q, K, V and O are [batch, heads, seq, d]
    /// instead (PyTorch SDPA). Query head h reads K/V head h / (heads / kv_heads) (GQA/MQA
    /// when kv_heads < heads; the summary shows it as H<heads>/<kv_heads>).
    ///
    /// Masks and logit controls (causal, window, lengths, bool mask, bias, softcap, key
    /// segments) combine; a row left with no key outputs zeros and LSE −inf. Logits the f32
    /// kernels cannot hold (|scale·q·k| past 5e37, or dot products whose terms may overflow)
    /// are refused before the run, naming the inputs, the head, the query row and the key.
    ///
    /// What attends to what, on any path and without storing P: --entropy, --focus and
    /// --coverage write statistics of the weights (float32 .npy), --heatmap DIR writes PNG
    /// maps of P per head and averaged, pooled on the GPU where larger than 2048 a side.
    ///
    /// Outputs are written all or none: each to a temporary file beside it, renamed onto its
    /// target once every output (heatmaps included) is written. An existing target must be a
    /// regular file, which is replaced; a symbolic link, FIFO, device or folder there is
    /// refused before the run, neither replaced nor written through (links are not followed:
    /// name the file itself). Inputs must be regular files (or links to them).
    ///
    /// Exit status: 0 done (and O matches --expect), 1 an error, 2 a usage error, 3 O does
    /// not match --expect.
    Run(run::RunArgs),
    /// The gradients of attention on .npy files: dQ, dK, dV (and dBias) from dO.
    ///
    /// Runs the forward of `xattn run` on the device (the same inputs, layouts, masks and
    /// logit controls, --scale, --path, --dtype), then its backward, FlashAttention-2's: P
    /// rebuilt tile by tile from the forward's LSE, nothing M×N stored, accumulated in f32.
    /// --d-o is the gradient of the loss with respect to O, in O's shape and layout. Outputs
    /// (at least one): --dq like q, --dk like k, --dv like v (with GQA/MQA summed over the
    /// query heads of each K/V head), in the inputs' type (--grad-dtype f32 for float32), and
    /// --dbias (float32) in the bias's own shape: the logits' gradient summed over the dims
    /// it broadcasts over, as PyTorch autograd's bias.grad. Rows that see no key get zero
    /// gradients. To compare with PyTorch autograd (through
    /// torch.nn.functional.scaled_dot_product_attention, or a softmax written out), the
    /// README's "Gradients" section has a script that writes the files and compares.
    ///
    /// --dropout P --seed S --offset O drops weights with probability P in the forward and
    /// the backward alike (the same mask, regenerated from the seed; see xattn::dropout).
    ///
    /// `mpirun -n R xattn grad --distributed ...` (the tool built with --features mpi) runs
    /// the forward and the backward across R ranks, each holding one shard of the keys
    /// (--shards): LV-XAttn's ring carries each query block with its Q, O, LSE, dO and
    /// running dQ; dK and dV stay with their keys until rank 0 gathers them to write. Rank 0
    /// prints each rank's bytes (counted and modelled), compute and wait times.
    ///
    /// Outputs are written all or none, and an existing target must be a regular file, as
    /// for `xattn run`. Exit status: 0 done, 1 an error, 2 a usage error.
    Grad(grad::GradArgs),
    /// Attention over a graph's edge list on .npy files: each destination node attends to its
    /// in-neighbours only.
    ///
    /// Q holds the destination nodes [M, heads, d_k], K and V the source nodes [N, kv_heads,
    /// d_k] and [N, kv_heads, d_v] (M ≠ N for bipartite graphs; 4-D inputs with batch 1 too),
    /// float32 or float16. The edges come as PyTorch Geometric's edge_index [2, E] (sources,
    /// then destinations) or as CSR by destination (--row-ptr, --col-idx). Destination i's
    /// softmax runs over its in-edges: logit scale·q_i·(k_j + f_e) (+ bias[e, h]), value
    /// v_j + f_e with edge features f (--edge-attr, as TransformerConv's edge_attr);
    /// duplicates count as often as they appear, self-loops as any edge, none are added. A
    /// destination with no in-edge outputs 0 with LSE −inf, as PyTorch Geometric's
    /// TransformerConv outputs 0 there. No M×N mask or score matrix exists: work and memory
    /// grow with E·d. Outputs: O [M, heads, d_v] (--mean-heads: [M, 1, d_v]) and LSE [heads,
    /// M]; --entropy and --focus per destination, --coverage per source; float32, written
    /// all or none.
    Graph(graph::GraphArgs),
    /// Run a multi-head attention layer (PyTorch nn.MultiheadAttention, Hugging Face
    /// Whisper/BART/T5, diffusers Attention) on .npy files.
    ///
    /// Q = query·W_qᵀ + b_q, K = key·W_kᵀ + b_k, V = value·W_vᵀ + b_v, split into heads;
    /// attention per head; heads concatenated and projected: out = O·W_oᵀ + b_o.
    ///
    /// Inputs are float32 or float16 (one type; --dtype converts), C order, batch first
    /// (PyTorch batch_first=True): query [batch, M, E], key [batch, N, kdim], value [batch, N,
    /// vdim]; with --layout sbe, seq first as nn.MultiheadAttention takes them by default
    /// ([M, batch, E], ..., and the output [M, batch, E]); 2-D inputs [seq, features] mean
    /// batch 1 and give outputs without the batch axis.
    /// E, kdim and vdim are read from the inputs' last dims, and the weights must fit them.
    /// Output: [batch, M, E], in the inputs' type (--out-dtype). The weights are kept in the
    /// inputs' type (--dtype) on the device.
    ///
    /// Weights: PyTorch, Hugging Face, diffusers or T5 names under --prefix, detected (see the
    /// list after the options); biases where the file has them; the inner width (heads × head
    /// dim) comes from the weights. Any other tensor under --prefix (add_bias_kv's bias_k and
    /// bias_v, diffusers' qk_norm and cross_attention_norm, T5's relative_attention_bias, a
    /// name xattn does not know) changes what the model computes: the file is refused, naming
    /// each, unless --ignore-tensors names them. Logits of the projected query and key that the
    /// f32 kernels cannot hold are refused before the run, as for `xattn run`.
    ///
    /// The masks and logit controls of `xattn run` apply to the attention inside, with heads =
    /// --heads and d = inner width / H; --key-padding-mask adds PyTorch's padding mask (true =
    /// ignore), --attention-mask Hugging Face's (1 = keep); an integer 0/1 array is refused
    /// as --key-padding-mask or --mask, with both conversions, as it does not say which it is. A query row left with no key gets a zero attention output, so out = b_o there,
    /// as PyTorch gives with need_weights=False (with need_weights=True it gives NaN).
    /// --entropy, --focus, --coverage and --heatmap work as for `xattn run`, per head (the
    /// heatmaps also averaged over heads). Outputs are written all or none, and an existing
    /// target must be a regular file, as for `xattn run` (links, FIFOs, devices are refused).
    Mha(mha::MhaArgs),
    /// Time the attention paths on standard or custom shapes.
    ///
    /// Without --suite or a custom shape (--m, --n, --dk …) the quick suite runs (small sizes,
    /// checked against the CPU reference; about 10 s with autotuning on lavapipe on a 2-core
    /// host, the verdict line says how long it took); with both,
    /// the custom shape runs after the suite; --only NAME keeps the shapes of that name.
    /// --causal ALIGN masks every shape. Times are to GPU completion (GPU timestamps where the
    /// adapter has them, else the host clock around a waited run). The fused kernel's
    /// configuration is autotuned per shape bucket before the timed runs (--no-autotune
    /// times the planner's default); the table notes what was picked. The last line is the
    /// verdict: checked against the reference and all within the tolerance, or which results
    /// were not and which runs failed (the exit status is then 1), or timed only.
    Bench(bench::BenchArgs),
}

/// A failure reported to the user as one line: `xattn: error: <message>`.
#[derive(Debug)]
pub struct CliError {
    msg: String,
    /// A usage error (flags that do not go together, a flag's value): exit status 2, as for
    /// the errors clap finds, rather than 1.
    usage: bool,
}

/// The exit status of a usage error, clap's and ours alike (the README and `run --help`).
pub const USAGE: u8 = 2;

impl CliError {
    /// A failure with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self {
            msg: msg.into(),
            usage: false,
        }
    }

    /// A usage error with this message: the command line itself is wrong, whatever the files
    /// hold (exit status [`USAGE`]).
    pub fn usage(msg: impl Into<String>) -> Self {
        Self {
            msg: msg.into(),
            usage: true,
        }
    }

    /// The exit status for this failure: [`USAGE`] for a usage error, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        if self.usage {
            ExitCode::from(USAGE)
        } else {
            ExitCode::FAILURE
        }
    }
}

/// `s` with every run of whitespace, newlines included, folded into one space: wgpu
/// validation errors span several lines, and scripts rely on an error being one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&one_line(&self.msg))
    }
}

impl From<xattn::Error> for CliError {
    fn from(e: xattn::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// Result of the subcommands.
pub type CliResult<T> = Result<T, CliError>;

/// A `--path` value: a forced [`Path`], or `None` for the planner's choice (`auto`).
///
/// A newtype because clap reads a field of type `Option<T>` as "flag may be absent".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathChoice(pub Option<Path>);

/// Parses `auto` or a [`Path`] name (the library's `FromStr`, so the names live in one place).
pub fn parse_path_choice(s: &str) -> Result<PathChoice, String> {
    if s == "auto" {
        return Ok(PathChoice(None));
    }
    s.parse::<Path>()
        .map(|p| PathChoice(Some(p)))
        .map_err(|_| path_names_hint(s, &["auto"]))
}

/// "unknown path `x`; expected one of ..." listing the library's path names plus `extra`.
pub fn path_names_hint(got: &str, extra: &[&str]) -> String {
    let names: Vec<&str> = extra
        .iter()
        .copied()
        .chain(Path::ALL.iter().map(|p| p.name()))
        .collect();
    format!("unknown path `{got}`; expected one of {}", names.join(", "))
}

/// Parses a finite f32. A literal beyond f32's range is named as such, not as the infinity
/// it would round to.
pub fn parse_finite_f32(s: &str) -> Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if x.is_finite() {
        Ok(x)
    } else if x.is_nan() || s.to_ascii_lowercase().contains("inf") {
        Err(format!("`{s}` is not finite; give a finite number"))
    } else {
        Err(format!(
            "`{s}` overflows f32 (whose largest value is {:e}); give a smaller number",
            f32::MAX
        ))
    }
}

/// What a file type is, for the messages refusing what is not a regular file ("a FIFO (named
/// pipe)", "a character device", "a symbolic link", "a folder", ...).
pub fn file_kind(t: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens the input `path` and returns it with its length. Only a regular file (or a symbolic
/// link to one) is opened: a folder or a device is refused by what it is, and a FIFO without
/// blocking on it.
pub fn open_file(path: &FsPath) -> CliResult<(File, u64)> {
    let fail = |e: std::io::Error| CliError::new(format!("cannot open {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(fail)?;
    if !meta.is_file() {
        return Err(CliError::new(format!(
            "{} is {}; inputs must be regular files",
            path.display(),
            file_kind(meta.file_type())
        )));
    }
    Ok((File::open(path).map_err(fail)?, meta.len()))
}

/// `e`, with the way out when it is a device limit hit by the three-pass path that `forced_by`
/// (the flags that require it) imposed, and the fused path (with split-K) plans the same
/// attention, `req()`, within the limits of `caps`.
pub fn three_pass_limit(
    e: xattn::Error,
    forced_by: &[&str],
    req: impl FnOnce() -> xattn::Result<Request>,
    caps: &DeviceCaps,
) -> CliError {
    if !matches!(e, xattn::Error::Limit { .. }) || forced_by.is_empty() {
        return e.into();
    }
    let Ok(req) = req() else { return e.into() };
    let plan = |path, weights| {
        Plan::new(
            &Request {
                path: Some(path),
                weights,
                ..req.clone()
            },
            caps,
        )
    };
    let three_pass_hits_it =
        matches!(plan(Path::ThreePass, req.weights), Err(p) if p.to_string() == e.to_string());
    if !three_pass_hits_it || plan(Path::Fused, false).is_err() {
        return e.into();
    }
    let flags = forced_by.join(" and ");
    CliError::new(format!(
        "the three-pass path, which {flags} requires, hits a device limit: {e}; the fused and \
         split-k paths handle this shape: drop {flags}"
    ))
}

/// Replaces the default panic message (several lines and a backtrace hint) with the same
/// one-line shape as every other error, so a bug still reads as `xattn: error: ...`.
/// With RUST_BACKTRACE set, the default hook runs as well, for whoever debugs it.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info: &std::panic::PanicHookInfo<'_>| {
        let msg = CliError::new(format!(
            "internal error (a bug in xattn, please report it): {info}"
        ));
        eprintln!("xattn: error: {msg}");
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default(info);
        }
    }));
}

/// Mesa's Vulkan and EGL drivers print "XDG_RUNTIME_DIR is invalid or not set" on every start
/// where the variable is missing (containers, CI, ssh without a session), though they need no
/// runtime files to compute. Give the process a private one (0700, owned by this user) before
/// any instance exists; a valid setting is left alone, and any other failure stays visible.
#[cfg(target_os = "linux")]
fn ensure_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let valid = |d: &std::path::Path| {
        std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o077 == 0)
    };
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| valid(d.as_ref())) {
        return;
    }
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("xattn-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let ours = std::fs::metadata(&dir).is_ok_and(|m| m.uid() == uid);
    if ours && valid(&dir) {
        // Single-threaded still: nothing else reads the environment yet.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(not(target_os = "linux"))]
fn ensure_runtime_dir() {}

fn main() -> ExitCode {
    ensure_runtime_dir();
    // Warnings (xattn's: what a device lacks; wgpu's own) on stderr; RUST_LOG overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    install_panic_hook();
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Info(args) => info::info(&args),
        Command::Run(args) => run::run(&args),
        Command::Grad(args) => grad::grad(&args),
        Command::Graph(args) => graph::graph(&args),
        Command::Mha(args) => mha::mha(&args),
        Command::Bench(args) => bench::bench(&args),
    });
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("xattn: error: {e}");
            e.exit_code()
        }
        // The hook has already printed the one line.
        Err(_) => ExitCode::FAILURE,
    }
}

//! The kernel registry: one module per kernel, one line per kernel in `registry!`.
//!
//! A kernel lives in four places that share its name: `shaders/<name>.wgsl`, its module
//! here (`src/kernels/<name>.rs`: its specialization, the pipeline cache key part, with
//! bindings, label, generated WGSL prelude, workgroup memory, loop cost and the call of its
//! twin, all as one [`KernelSpec`] impl), its CPU twin `src/cpu/<name>.rs` (`run`, which
//! unpacks the bindings, beside the loops shaped like the shader's) and one line of the
//! registry below. Bindings follow the house convention: binding 0 is the params uniform,
//! then read-only inputs in argument order, then read-write outputs. `tests/shaders.rs`
//! checks these lists against what naga reads from each shader, validates every
//! specialization the planners produce, and fails if a file in `shaders/` is not registered.
//!
//! # Adding a kernel
//! 1. `shaders/<name>.wgsl`: entry point `main`, params at binding 0 (its struct in
//!    `shaders/common/params.wgsl` or the file itself).
//! 2. Its params struct, `#[repr(C)]` and `Pod`, in `src/params.rs` (or reuse
//!    [`AttnParams`](crate::params::AttnParams)); `tests/shaders.rs` compares its layout
//!    with naga's.
//! 3. `src/kernels/<name>.rs`: the specialization struct and its [`KernelSpec`] impl.
//! 4. One line in `registry!` below (and `pub mod <name>;` beside the others).
//! 5. `src/cpu/<name>.rs`: the twin, `run(params, specialization…, buffers)` unpacking the
//!    bindings, and `pub mod <name>;` in `src/cpu/mod.rs`.
//! 6. Its planner function (under `src/plan/`), which calls
//!    [`Program::dispatch`](crate::program::Program::dispatch) with the specialization and
//!    its params.
//! 7. Its tests: the planner's specializations reach `tests/shaders.rs` through
//!    `all_kernels`, the twin and the device through `tests/cpu_twins.rs` and the path's own
//!    test file.
//!
//! Workgroup memory starts undefined: pipelines are made without wgpu's zero-fill
//! (`gpu::pipelines`, where the reason is), so a kernel writes every workgroup element it
//! reads — tiles whole, padding included; flags and sums set by the kernel — before a barrier.

use std::fmt;

use crate::dtype::Storage;
use crate::error::{Error, Result};

pub mod add;
mod common;
pub mod flash;
pub mod flash_coop;
pub mod grad_bias;
pub mod grad_kv;
pub mod grad_q;
pub mod grad_rowdot;
pub mod graph_attention;
pub mod graph_grad_kv;
pub mod graph_grad_q;
pub mod graph_merge;
pub mod graph_stats;
pub mod key_coverage;
pub mod linear;
pub mod linear_grad;
mod loop_cost;
pub mod mean_heads;
pub mod merge_partials;
pub mod pack;
pub mod qk_scores;
pub mod softmax_rows;
pub mod weight_blocks;
pub mod weighted_sum;

pub use common::resolve_includes;
pub(crate) use loop_cost::looped;
pub use loop_cost::LoopCost;

/// How one binding of a kernel is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>` params.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// What a kernel is: every fact the planner, the pipeline cache, the executors and the tests
/// need about one kernel, implemented by its specialization (the part of the pipeline key
/// that is compiled in; sequence lengths and batch sizes travel in [`KernelSpec::Params`]).
pub trait KernelSpec: Copy + fmt::Debug + Into<Kernel> {
    /// The uniform params of one dispatch (binding 0), mirrored in WGSL.
    type Params: bytemuck::Pod;
    /// The file name without `.wgsl`, also the first part of the label.
    const NAME: &'static str;
    /// The shader file, embedded at build time.
    const FILE: &'static str;
    /// What the kernel's long loop runs over (for messages).
    const LONG_LOOP: &'static str;

    /// Bindings of `@group(0)` in order.
    fn bindings(&self) -> &'static [Access];

    /// Pipeline label: name plus specialization, e.g. `xattn.flash_dk64_dv64_bc32_br64_r2`.
    fn label(&self) -> String {
        format!("xattn.{}", Self::NAME)
    }

    /// Workgroup-memory bytes the kernel declares (checked against the device limit).
    fn workgroup_bytes(&self) -> u64 {
        0
    }

    /// What bounds the kernel's loops for a dispatch with params `p` (see [`LoopCost`]), and
    /// the long loop's length in that dispatch.
    fn loop_cost(&self, p: &Self::Params) -> (LoopCost, u64);

    /// How the kernel reads its element arrays (empty for kernels that read only f32).
    fn storages(&self) -> Vec<Storage> {
        Vec::new()
    }

    /// Whether the shader declares f16 values (`enable f16`).
    fn needs_f16(&self) -> bool {
        self.storages().iter().any(|s| s.needs_f16())
    }

    /// Naga capabilities beyond f16 (subgroups, cooperative matrices).
    fn capabilities(&self) -> naga::valid::Capabilities {
        naga::valid::Capabilities::empty()
    }

    /// The WGSL generated for this specialization, put between `enable f16;` (where
    /// [`KernelSpec::needs_f16`]) and the file.
    fn prelude(&self) -> String {
        String::new()
    }

    /// Runs the CPU twin (`src/cpu/<name>.rs`) on host buffers in binding order (bindings
    /// 1..) as 32-bit words; what the kernel writes is written in place.
    fn twin(&self, p: &Self::Params, buffers: &mut [Vec<u32>]);
}

/// [`KernelSpec`] with its params as bytes: what [`Kernel`] forwards to.
trait Erased {
    fn name(&self) -> &'static str;
    fn file(&self) -> &'static str;
    fn long_loop(&self) -> &'static str;
    fn params_size(&self) -> usize;
    fn bindings(&self) -> &'static [Access];
    fn label(&self) -> String;
    fn workgroup_bytes(&self) -> u64;
    fn loop_cost(&self, params: &[u8]) -> (LoopCost, u64);
    fn storages(&self) -> Vec<Storage>;
    fn needs_f16(&self) -> bool;
    fn capabilities(&self) -> naga::valid::Capabilities;
    fn prelude(&self) -> String;
    fn twin(&self, params: &[u8], buffers: &mut [Vec<u32>]);
}

/// `K`'s params from the bytes of a dispatch, whose size [`Kernel::params_size`] checked
/// when the dispatch was built.
fn params_of<K: KernelSpec>(kernel: &K, bytes: &[u8]) -> K::Params {
    assert_eq!(
        bytes.len(),
        std::mem::size_of::<K::Params>(),
        "{} params",
        kernel.label()
    );
    bytemuck::pod_read_unaligned(bytes)
}

impl<K: KernelSpec> Erased for K {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn file(&self) -> &'static str {
        K::FILE
    }
    fn long_loop(&self) -> &'static str {
        K::LONG_LOOP
    }
    fn params_size(&self) -> usize {
        std::mem::size_of::<K::Params>()
    }
    fn bindings(&self) -> &'static [Access] {
        KernelSpec::bindings(self)
    }
    fn label(&self) -> String {
        KernelSpec::label(self)
    }
    fn workgroup_bytes(&self) -> u64 {
        KernelSpec::workgroup_bytes(self)
    }
    fn loop_cost(&self, params: &[u8]) -> (LoopCost, u64) {
        KernelSpec::loop_cost(self, &params_of(self, params))
    }
    fn storages(&self) -> Vec<Storage> {
        KernelSpec::storages(self)
    }
    fn needs_f16(&self) -> bool {
        KernelSpec::needs_f16(self)
    }
    fn capabilities(&self) -> naga::valid::Capabilities {
        KernelSpec::capabilities(self)
    }
    fn prelude(&self) -> String {
        KernelSpec::prelude(self)
    }
    fn twin(&self, params: &[u8], buffers: &mut [Vec<u32>]) {
        KernelSpec::twin(self, &params_of(self, params), buffers)
    }
}

/// Declares [`Kernel`] (one variant per kernel module, the typed, hashable pipeline cache
/// key), its conversions from each specialization and [`SHADER_FILES`].
macro_rules! registry {
    ($($variant:ident($module:ident::$spec:ident)),* $(,)?) => {
        /// A kernel together with its compile-time specialization: the pipeline cache key.
        /// Sequence lengths and batch sizes are never part of it; they travel in params.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $(
                #[doc = concat!("See [`", stringify!($module), "`].")]
                $variant($module::$spec),
            )*
        }

        $(
            impl From<$module::$spec> for Kernel {
                fn from(k: $module::$spec) -> Kernel {
                    Kernel::$variant(k)
                }
            }
        )*

        /// The shader file of each kernel name, embedded at build time.
        pub const SHADER_FILES: &[(&str, &str)] = &[
            $((<$module::$spec as KernelSpec>::NAME, <$module::$spec as KernelSpec>::FILE),)*
        ];

        impl Kernel {
            fn spec(&self) -> &dyn Erased {
                match self {
                    $(Kernel::$variant(k) => k,)*
                }
            }
        }
    };
}

registry! {
    QkScores(qk_scores::QkScores),
    SoftmaxRows(softmax_rows::SoftmaxRows),
    WeightedSum(weighted_sum::WeightedSum),
    Flash(flash::Flash),
    FlashCoop(flash_coop::FlashCoop),
    MergePartials(merge_partials::MergePartials),
    Linear(linear::Linear),
    LinearGrad(linear_grad::LinearGrad),
    MeanHeads(mean_heads::MeanHeads),
    Pack(pack::Pack),
    Add(add::Add),
    WeightBlocks(weight_blocks::WeightBlocks),
    KeyCoverage(key_coverage::KeyCoverage),
    GradRowdot(grad_rowdot::GradRowdot),
    GradQ(grad_q::GradQ),
    GradKv(grad_kv::GradKv),
    GradBias(grad_bias::GradBias),
    GraphAttention(graph_attention::GraphAttention),
    GraphMerge(graph_merge::GraphMerge),
    GraphStats(graph_stats::GraphStats),
    GraphGradQ(graph_grad_q::GraphGradQ),
    GraphGradKv(graph_grad_kv::GraphGradKv),
}

impl Kernel {
    /// The file name (without `.wgsl`) of this kernel, also the first part of its label.
    pub fn name(&self) -> &'static str {
        self.spec().name()
    }

    /// Bindings of `@group(0)` in order.
    pub fn bindings(&self) -> &'static [Access] {
        self.spec().bindings()
    }

    /// Pipeline label: name plus specialization, e.g. `xattn.flash_dk64_dv64_bc32_br64_r2`.
    pub fn label(&self) -> String {
        self.spec().label()
    }

    /// Workgroup-memory bytes the kernel declares (checked against the device limit).
    pub fn workgroup_bytes(&self) -> u64 {
        self.spec().workgroup_bytes()
    }

    /// What the kernel's long loop runs over (for messages).
    pub fn long_loop(&self) -> &'static str {
        self.spec().long_loop()
    }

    /// Bytes of the kernel's params struct.
    pub fn params_size(&self) -> usize {
        self.spec().params_size()
    }

    /// What bounds this kernel's loops for a dispatch with `params` (the bytes of its params
    /// struct; see [`LoopCost`]), and the long loop's length in that dispatch.
    pub fn loop_cost(&self, params: &[u8]) -> (LoopCost, u64) {
        self.spec().loop_cost(params)
    }

    /// Runs the kernel's CPU twin (see [`KernelSpec::twin`]) with `params` as bytes.
    /// Panics if the buffers do not match the bindings (a program bug).
    pub fn run_twin(&self, params: &[u8], buffers: &mut [Vec<u32>]) {
        self.spec().twin(params, buffers)
    }

    /// How the kernel reads its element arrays (empty for kernels that read only f32).
    pub fn storages(&self) -> Vec<Storage> {
        self.spec().storages()
    }

    /// The full WGSL source: `enable f16;` where needed, the specialization's prelude, the
    /// file with its includes resolved.
    pub fn source(&self) -> String {
        let spec = self.spec();
        let mut out = String::new();
        if spec.needs_f16() {
            out.push_str("enable f16;\n");
        }
        out.push_str(&spec.prelude());
        out.push_str(&resolve_includes(spec.file()));
        out
    }

    /// Parses and validates the source with naga; returns the module for introspection.
    pub fn validate(&self) -> Result<naga::Module> {
        let label = self.label();
        let source = self.source();
        let module = naga::front::wgsl::parse_str(&source).map_err(|e| Error::Shader {
            kernel: label.clone(),
            message: e.emit_to_string(&source),
        })?;
        // (Un)packing f16 in u32 words needs SHADER_FLOAT16_IN_FLOAT32, which wgpu grants on
        // every native backend (downlevel flag SHADER_F16_IN_F32).
        let mut capabilities =
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32 | self.spec().capabilities();
        if self.spec().needs_f16() {
            capabilities |= naga::valid::Capabilities::SHADER_FLOAT16;
        }
        let mut validator =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities);
        if capabilities.contains(naga::valid::Capabilities::SUBGROUP) {
            validator
                .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                .subgroup_operations(naga::valid::SubgroupOperationSet::all());
        }
        validator.validate(&module).map_err(|e| Error::Shader {
            kernel: label,
            message: e.emit_to_string(&source),
        })?;
        Ok(module)
    }
}

//! The one error type of the crate.

/// Everything that can go wrong in xattn. Variants carry the numbers that explain the failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No wgpu adapter could be opened.
    #[error(
        "no GPU adapter found{detail}. On Linux without a GPU install Mesa's software Vulkan \
         driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`), or select another \
         backend with WGPU_BACKEND=vulkan|gl|metal|dx12"
    )]
    NoAdapter {
        /// What was asked for (backend, adapter name filter), if anything.
        detail: String,
    },
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter `{adapter}`: {reason}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// The driver's reason.
        reason: String,
    },
    /// A tensor's shape does not fit the operation.
    #[error("shape error: {0}")]
    Shape(String),
    /// A host slice has the wrong number of elements for the shape it is said to have.
    #[error("{name}: expected {expected} elements for shape {shape:?}, got {got}")]
    Length {
        /// Which argument.
        name: &'static str,
        /// The shape given.
        shape: Vec<usize>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// A buffer or dispatch exceeds a device limit and no split of the work can help.
    #[error("{what} needs {asked} but the device limit `{limit_name}` is {limit}")]
    Limit {
        /// What was being sized.
        what: String,
        /// The size or count asked for.
        asked: u64,
        /// The wgpu limit's name.
        limit_name: &'static str,
        /// The device's value of that limit.
        limit: u64,
    },
    /// Layer weights missing, mis-shaped or of an unsupported dtype in a weights file.
    #[error("weights: {0}")]
    Weights(String),
    /// An argument outside its domain (e.g. a non-finite scale).
    #[error("invalid argument: {0}")]
    Argument(String),
    /// An option combination the chosen path cannot serve.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The device reported a validation or out-of-memory error.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The device was lost (driver reset, removal, or destroyed).
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// A shader failed naga validation (a bug in xattn, reported with the kernel name).
    #[error("shader `{kernel}` is invalid: {message}")]
    Shader {
        /// Pipeline label of the kernel specialization.
        kernel: String,
        /// naga's diagnostic.
        message: String,
    },
    /// Another rank of a distributed call failed or disagreed; its own error is on its stderr.
    #[error("rank {rank} of {ranks}: {reason}")]
    Rank {
        /// The first rank (of the communicator) that failed.
        rank: usize,
        /// Ranks in the call.
        ranks: usize,
        /// What went wrong there, as far as this rank knows.
        reason: String,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

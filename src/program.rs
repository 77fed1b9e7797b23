//! The program IR: what every plan compiles to and every executor runs.
//!
//! A [`Program`] is a list of [`Step`]s (kernel dispatches and buffer copies) over buffers
//! it declares itself: each declaration gets a [`BufferId`], a name for people, a
//! [`Role`] and a byte size. Inputs and outputs are bound by the caller (device tensors on
//! the GPU executor, host vectors on the CPU one); scratch is the executor's to provide. The
//! attention planner, the merge and the layer all build programs, so one executor on each
//! side runs them all. Programs hold no wgpu objects.

use std::fmt;

use crate::kernels::{Access, Kernel};
use crate::shape::human_bytes;

/// A buffer of one [`Program`], issued by the program's builder methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(u32);

impl BufferId {
    /// Position in [`Program::buffers`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Who provides a buffer and who reads it afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Bound by the caller; read (never written) by the program.
    Input,
    /// Bound by the caller; written by the program.
    Output,
    /// Provided by the executor for the program's own use.
    Scratch,
    /// An optional input the call does not have (a mask, a bias): its kernels' params say
    /// they never read it, and the executor binds one shared placeholder (a binding cannot be
    /// empty). The caller binds nothing.
    Absent,
}

/// Bytes of the placeholder an executor binds for an absent input: one word.
pub const ABSENT_BYTES: u64 = 4;

/// One declared buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferDecl {
    /// For plans, errors and labels (`q`, `scores`, `layer.w_q`).
    pub name: String,
    /// Who provides it.
    pub role: Role,
    /// Bytes the program reads or writes (a bound buffer may be larger).
    pub bytes: u64,
}

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Kernel and specialization.
    pub kernel: Kernel,
    /// Its uniform params: the bytes of the kernel's params struct (`KernelSpec::Params`).
    pub params: Vec<u8>,
    /// Workgroups in x, y, z (each ≤ `max_workgroups`).
    pub grid: [u32; 3],
    /// Buffers for bindings 1.. (binding 0 is the params uniform).
    pub buffers: Vec<BufferId>,
}

impl Dispatch {
    /// The params as `P`, or `None` where `P` is not the size of the kernel's params type.
    pub fn params_as<P: bytemuck::Pod>(&self) -> Option<P> {
        (self.params.len() == std::mem::size_of::<P>())
            .then(|| bytemuck::pod_read_unaligned(&self.params))
    }
}

/// A step of a program, executed in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// Run a kernel.
    Dispatch(Dispatch),
    /// Copy bytes between buffers.
    Copy {
        /// Source buffer.
        src: BufferId,
        /// Byte offset in the source.
        src_offset: u64,
        /// Destination buffer.
        dst: BufferId,
        /// Byte offset in the destination.
        dst_offset: u64,
        /// Bytes to copy.
        size: u64,
    },
}

/// Steps over declared buffers (see the module docs). Built by [`Program::input`],
/// [`Program::output`], [`Program::scratch`], [`Program::dispatch`] and [`Program::copy`].
#[derive(Clone, Debug, Default)]
pub struct Program {
    buffers: Vec<BufferDecl>,
    steps: Vec<Step>,
}

impl Program {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    fn declare(&mut self, name: &str, role: Role, bytes: u64) -> BufferId {
        let id = BufferId(u32::try_from(self.buffers.len()).expect("fewer than 2^32 buffers"));
        self.buffers.push(BufferDecl {
            name: name.to_string(),
            role,
            bytes,
        });
        id
    }

    /// Declares a buffer the caller binds and the program only reads.
    pub fn input(&mut self, name: &str, bytes: u64) -> BufferId {
        self.declare(name, Role::Input, bytes)
    }

    /// Declares a buffer the caller binds and the program writes.
    pub fn output(&mut self, name: &str, bytes: u64) -> BufferId {
        self.declare(name, Role::Output, bytes)
    }

    /// Declares a buffer the executor provides.
    pub fn scratch(&mut self, name: &str, bytes: u64) -> BufferId {
        self.declare(name, Role::Scratch, bytes)
    }

    /// Declares an optional input the call does not have ([`Role::Absent`]).
    pub fn absent(&mut self, name: &str) -> BufferId {
        self.declare(name, Role::Absent, ABSENT_BYTES)
    }

    /// Declares `name` as an input of `bytes` where `present`, else as absent.
    pub fn optional_input(&mut self, name: &str, bytes: u64, present: bool) -> BufferId {
        if present {
            self.input(name, bytes)
        } else {
            self.absent(name)
        }
    }

    /// Appends a dispatch of `kernel` with `params` on `buffers` (bindings 1.. in order).
    ///
    /// Panics (a planner bug, caught by the tests) if `params` is not the kernel's params
    /// type in size, if the buffers do not match the kernel's bindings in number, or if the
    /// kernel would write an input.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        kernel: impl Into<Kernel>,
        params: &P,
        grid: [u32; 3],
        buffers: &[BufferId],
    ) {
        let kernel = kernel.into();
        let params = bytemuck::bytes_of(params).to_vec();
        assert_eq!(
            params.len(),
            kernel.params_size(),
            "{} takes params of {} bytes",
            kernel.label(),
            kernel.params_size()
        );
        let access = &kernel.bindings()[1..];
        assert_eq!(
            access.len(),
            buffers.len(),
            "{} takes {} buffers",
            kernel.label(),
            access.len()
        );
        for (id, a) in buffers.iter().zip(access) {
            let decl = &self.buffers[id.index()];
            assert!(
                !(*a == Access::ReadWrite && decl.role == Role::Input),
                "{} would write input `{}`",
                kernel.label(),
                decl.name
            );
        }
        self.steps.push(Step::Dispatch(Dispatch {
            kernel,
            params,
            grid,
            buffers: buffers.to_vec(),
        }));
    }

    /// Appends a copy of `size` bytes.
    pub fn copy(
        &mut self,
        (src, src_offset): (BufferId, u64),
        (dst, dst_offset): (BufferId, u64),
        size: u64,
    ) {
        assert_ne!(
            self.buffers[dst.index()].role,
            Role::Input,
            "a copy would write input `{}`",
            self.buffers[dst.index()].name
        );
        self.steps.push(Step::Copy {
            src,
            src_offset,
            dst,
            dst_offset,
            size,
        });
    }

    /// Every declared buffer, indexed by [`BufferId::index`].
    pub fn buffers(&self) -> &[BufferDecl] {
        &self.buffers
    }

    /// The declaration of `id`.
    pub fn decl(&self, id: BufferId) -> &BufferDecl {
        &self.buffers[id.index()]
    }

    /// Every declared buffer with its id.
    pub fn declared(&self) -> impl Iterator<Item = (BufferId, &BufferDecl)> {
        (0u32..).map(BufferId).zip(&self.buffers)
    }

    /// Ids of the buffers with `role`.
    pub fn ids(&self, role: Role) -> impl Iterator<Item = BufferId> + '_ {
        self.declared()
            .filter(move |(_, d)| d.role == role)
            .map(|(id, _)| id)
    }

    /// The steps in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The dispatches in order.
    pub fn dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.steps.iter().filter_map(|s| match s {
            Step::Dispatch(d) => Some(d),
            Step::Copy { .. } => None,
        })
    }

    /// Bytes of all buffers with `role`.
    pub fn bytes(&self, role: Role) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.role == role)
            .map(|b| b.bytes)
            .sum()
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let copies = self.steps.len() - self.dispatches().count();
        writeln!(
            f,
            "  steps: {} dispatches, {} copies",
            self.dispatches().count(),
            copies
        )?;
        let mut kernels: Vec<String> = Vec::new();
        for d in self.dispatches() {
            let label = d.kernel.label();
            if !kernels.contains(&label) {
                kernels.push(label);
            }
        }
        writeln!(f, "  kernels: {}", kernels.join(", "))?;
        for b in self
            .buffers
            .iter()
            .filter(|b| matches!(b.role, Role::Output | Role::Scratch))
        {
            let role = if b.role == Role::Output {
                "output"
            } else {
                "scratch"
            };
            writeln!(f, "  {role} {}: {}", b.name, human_bytes(b.bytes))?;
        }
        write!(
            f,
            "  allocated: {}",
            human_bytes(self.bytes(Role::Scratch) + self.bytes(Role::Output))
        )
    }
}

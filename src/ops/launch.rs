//! Kernel launch plans: what one launch of a `kernels/*.cu` kernel needs (the
//! kernel's name, grid, block, dynamic shared bytes and argument list), computed
//! from candle's layouts in plain Rust. The CUDA path runs a plan with cudarc
//! ([`super::cuda`]) and the host harness runs the same plan on the CPU
//! ([`super::host`]), so offsets, strides, grids and argument lists are tested
//! without a GPU.

use candle_core::{DType, Result};

/// A buffer a kernel argument points into: one of the op's inputs, or one of the
/// buffers the op allocates for the launch (outputs and scratch), by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The op's input number `i`, in the order the op passes them.
    Input(usize),
    /// The plan's allocation number `i` ([`Alloc`]), outputs first.
    Output(usize),
}

/// One kernel argument, in the order of the kernel's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A pointer `offset` elements (of the buffer's dtype) into `buffer`.
    Ptr {
        /// The buffer pointed into.
        buffer: Buffer,
        /// Elements from its start.
        offset: usize,
    },
    /// The same address, passed as bytes (`const uint8_t *`): kernels that read
    /// a buffer of any dtype through its raw bits.
    Bytes {
        /// The buffer pointed into.
        buffer: Buffer,
        /// Elements (of the buffer's dtype, not bytes) from its start.
        offset: usize,
    },
    /// `int`.
    I32(i32),
    /// `long long`, `int64_t`.
    I64(i64),
    /// `size_t`, `unsigned long long`.
    U64(u64),
}

/// A buffer the op allocates for its launches (uninitialised on the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alloc {
    /// The element type.
    pub dtype: DType,
    /// The number of elements.
    pub len: usize,
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The kernel file's stem (`mean_pool` for `kernels/mean_pool.cu`).
    pub module: &'static str,
    /// The kernel's C name, e.g. `mean_pool_fwd_vec_f32`.
    pub kernel: String,
    /// Blocks per grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per block (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// The kernel's arguments, in parameter order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// A launch of `kernel` from `module` with no arguments yet.
    pub fn new(
        module: &'static str,
        kernel: impl Into<String>,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
    ) -> Self {
        Self {
            module,
            kernel: kernel.into(),
            grid,
            block,
            shared_bytes: 0,
            args: Vec::new(),
        }
    }

    /// Appends a typed pointer argument.
    pub fn ptr(mut self, buffer: Buffer, offset: usize) -> Self {
        self.args.push(Arg::Ptr { buffer, offset });
        self
    }

    /// Appends a byte-pointer argument (the kernel reads the buffer's raw bits).
    pub fn bytes(mut self, buffer: Buffer, offset: usize) -> Self {
        self.args.push(Arg::Bytes { buffer, offset });
        self
    }

    /// Appends an `int` argument.
    pub fn i32(mut self, v: i32) -> Self {
        self.args.push(Arg::I32(v));
        self
    }

    /// Appends a `long long` argument.
    pub fn i64(mut self, v: i64) -> Self {
        self.args.push(Arg::I64(v));
        self
    }

    /// Appends a `size_t` argument.
    pub fn u64(mut self, v: u64) -> Self {
        self.args.push(Arg::U64(v));
        self
    }

    /// The parameter types this launch passes, as the host harness spells a
    /// kernel's (`p:f32,i64,i32`), given each buffer's dtype.
    pub fn signature(&self, dtype_of: impl Fn(Buffer) -> DType) -> String {
        let parts: Vec<String> = self
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Ptr { buffer, .. } => format!("p:{}", type_name(dtype_of(buffer))),
                Arg::Bytes { .. } => "p:u8".to_string(),
                Arg::I32(_) => "i32".to_string(),
                Arg::I64(_) => "i64".to_string(),
                Arg::U64(_) => "u64".to_string(),
            })
            .collect();
        parts.join(",")
    }
}

/// The C type names of `kernels/host/registry.h` (f8e4m3 is read as bytes).
fn type_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::U8 => "u8",
        DType::U32 => "u32",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        _ => "u8",
    }
}

/// `base_f32`, `base_f16`, ...: a kernel's instance for the float `dtype`.
pub fn kernel_name(base: &str, dtype: DType) -> Result<String> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {
            Ok(format!("{base}_{}", type_name(dtype)))
        }
        other => candle_core::bail!("{base}: no kernel for dtype {other:?}"),
    }
}

/// The kernel-name part of a label dtype (`dual_ce_fwd_<label>_<float>`), or an
/// `Err` naming `op` for a dtype the label kernels have no instance of.
pub fn label_tag(op: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::I64 | DType::I32 | DType::I16 | DType::U32 | DType::U8 => Ok(type_name(dtype)),
        other => candle_core::bail!("{op}: labels must have an integer dtype, got {other:?}"),
    }
}

/// `n` as a kernel's `int` argument, or an `Err` naming `op` and `what`.
pub fn as_i32(op: &str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{op}: {what} = {n} is too large for the CUDA kernel (at most {})",
            i32::MAX
        ))
    })
}

/// Runs launch plans on one device: the CUDA device (cudarc) or the host harness.
pub trait Executor {
    /// The device's storage: candle's `CudaStorage`, or the harness's buffers.
    type Storage;

    /// The element type of `storage`.
    fn dtype(storage: &Self::Storage) -> DType;

    /// A buffer of `len` elements (at least one: a zero-byte device allocation
    /// is an error), uninitialised.
    fn alloc(&self, alloc: Alloc) -> Result<Self::Storage>;

    /// Launches `launch` with its arguments resolved against `inputs` and `outputs`.
    fn launch(
        &self,
        launch: &Launch,
        inputs: &[&Self::Storage],
        outputs: &[&Self::Storage],
    ) -> Result<()>;

    /// Copies an i64 buffer to the host (a synchronisation on a GPU).
    fn read_i64(&self, storage: &Self::Storage) -> Result<Vec<i64>>;

    /// The address of element `offset` of `storage` as the kernels see it: for
    /// kernels that reach many buffers through a table of addresses (a
    /// multi-tensor launch) rather than through arguments. Neither executor
    /// checks what a kernel writes through such an address.
    fn address(&self, storage: &Self::Storage, offset: usize) -> Result<u64>;
}

/// The storage `buffer` names, among a launch's `inputs` and `outputs`.
pub fn resolve<'a, S>(
    launch: &Launch,
    buffer: Buffer,
    inputs: &[&'a S],
    outputs: &[&'a S],
) -> Result<&'a S> {
    let found = match buffer {
        Buffer::Input(i) => inputs.get(i),
        Buffer::Output(i) => outputs.get(i),
    };
    found.copied().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{}: launch plan names a missing {buffer:?}",
            launch.kernel
        ))
    })
}

/// Allocates `allocs`, then runs `launches` in order on them: the outputs.
pub fn run<E: Executor>(
    exec: &E,
    inputs: &[&E::Storage],
    allocs: &[Alloc],
    launches: &[Launch],
) -> Result<Vec<E::Storage>> {
    let outputs = allocs
        .iter()
        .map(|&a| exec.alloc(a))
        .collect::<Result<Vec<_>>>()?;
    let output_refs: Vec<&E::Storage> = outputs.iter().collect();
    for launch in launches {
        exec.launch(launch, inputs, &output_refs)?;
    }
    Ok(outputs)
}

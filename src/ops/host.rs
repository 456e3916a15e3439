//! The host harness: the fused ops' CUDA kernels (`kernels/*.cu`, compiled for
//! the CPU by build.rs against `kernels/host/`) run on the CPU through the same
//! launch plans as on a GPU, so that kernel correctness is tested by every
//! `cargo test`, with no GPU.
//!
//! [`run`] turns it on for the current thread: inside it the fused ops
//! (`masked_mean_pool`, the cosine ops, `dual_head_cross_entropy`,
//! `multi_head_cross_entropy`, `layer_norm`, `layer_norm_residual`,
//! `attention_packed`, forward and backward; `multi_tensor_adamw`) take their
//! CUDA path for CPU tensors, with the harness as the
//! device. The harness models device memory as a kernel sees it: every buffer
//! starts 256-byte aligned (as `cudaMalloc`'s do) between guard bytes,
//! allocations start poisoned (all bits set: NaN in every float dtype), and
//! after each launch a write outside a buffer, or into an input, is an `Err`.
//! The launch itself checks the grid and block as the driver does and the
//! plan's argument types against the kernel's parameters; a deadlocked barrier
//! is an `Err` too.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::hash::{DefaultHasher, Hasher};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result};

use super::launch::{resolve, Alloc, Arg, Buffer, Executor, Launch};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the fused ops executing their CUDA kernels on the host harness
/// (this thread only; the previous setting is restored afterwards).
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(true)));
    f()
}

/// True inside [`run`]: the ops' `cpu_fwd` then takes the kernel path.
pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

extern "C" {
    /// kernels/host/runtime.cpp.
    fn smtl_host_launch(
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: usize,
        signature: *const c_char,
        args: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// Device allocations are 256-byte aligned; the guards are that wide too.
const ALIGN: usize = 256;
/// The fill of guards and fresh allocations: NaN in f32/f16/bf16/f64, -1 in integers.
const POISON: u8 = 0xff;

/// A buffer in the harness's "device memory".
pub struct HostBuffer {
    dtype: DType,
    len: usize,
    mem: Vec<u8>,
    /// `mem`'s address, taken from a mutable borrow: the kernels write through it.
    base: *mut u8,
    /// Where the data starts in `mem` (256-byte aligned, after a guard).
    start: usize,
    /// A hash of an input's bytes, checked after every launch (kernels never
    /// write their inputs).
    input_hash: Option<u64>,
}

// SAFETY: a HostBuffer owns its memory; `base` points into its own `mem`, and
// kernels write through it only during a launch, which borrows the buffer.
unsafe impl Send for HostBuffer {}
// SAFETY: as above; shared references only read (a launch's writes happen
// while the launching thread holds the buffer, as a device would).
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn new(dtype: DType, len: usize) -> Self {
        let bytes = len * dtype.size_in_bytes();
        let mut mem = vec![POISON; bytes + 3 * ALIGN];
        let base = mem.as_mut_ptr();
        let misalign = base as usize % ALIGN;
        let start = ALIGN + (ALIGN - misalign) % ALIGN;
        Self {
            dtype,
            len,
            mem,
            base,
            start,
            input_hash: None,
        }
    }

    fn byte_len(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }

    fn data(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.byte_len()]
    }

    fn guards_intact(&self) -> bool {
        let end = self.start + self.byte_len();
        self.mem[..self.start].iter().all(|&b| b == POISON)
            && self.mem[end..].iter().all(|&b| b == POISON)
    }

    /// A copy of a CPU storage (all of it: layouts index into the whole buffer,
    /// as they do into a `CudaStorage`).
    pub fn upload(storage: &CpuStorage) -> Result<Self> {
        let (bytes, len) = storage_bytes(storage)?;
        let mut buffer = Self::new(storage.dtype(), len);
        let start = buffer.start;
        buffer.mem[start..start + bytes.len()].copy_from_slice(bytes);
        buffer.base = buffer.mem.as_mut_ptr();
        buffer.input_hash = Some(hash(bytes));
        Ok(buffer)
    }

    /// A copy of a CPU storage that kernels may update in place (reached
    /// through an address table, see [`Executor::address`]): unlike an
    /// [`upload`](Self::upload)ed input, writes into it are not an error.
    pub fn upload_writable(storage: &CpuStorage) -> Result<Self> {
        let mut buffer = Self::upload(storage)?;
        buffer.input_hash = None;
        Ok(buffer)
    }

    /// The buffer's elements as a CPU storage.
    pub fn download(&self) -> Result<CpuStorage> {
        fn vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
            bytemuck::pod_collect_to_vec(bytes)
        }
        let b = self.data();
        Ok(match self.dtype {
            DType::U8 => CpuStorage::U8(b.to_vec()),
            DType::U32 => CpuStorage::U32(vec(b)),
            DType::I16 => CpuStorage::I16(vec(b)),
            DType::I32 => CpuStorage::I32(vec(b)),
            DType::I64 => CpuStorage::I64(vec(b)),
            DType::F16 => CpuStorage::F16(vec(b)),
            DType::BF16 => CpuStorage::BF16(vec(b)),
            DType::F32 => CpuStorage::F32(vec(b)),
            DType::F64 => CpuStorage::F64(vec(b)),
            other => candle_core::bail!("host kernels: cannot download a {other:?} buffer"),
        })
    }

    fn address(&self, offset: usize) -> Result<*mut c_void> {
        if offset > self.len {
            candle_core::bail!(
                "host kernels: a launch argument points {offset} elements into a buffer of {}",
                self.len
            );
        }
        let at = self.start + offset * self.dtype.size_in_bytes();
        Ok(self.base.wrapping_add(at).cast::<c_void>())
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// The raw bytes and element count of a CPU storage.
fn storage_bytes(storage: &CpuStorage) -> Result<(&[u8], usize)> {
    fn raw<T: Copy>(values: &[T]) -> (&[u8], usize) {
        // SAFETY: plain numeric data; the byte view covers exactly the slice.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        (bytes, values.len())
    }
    Ok(match storage {
        CpuStorage::U8(v) => raw(v),
        CpuStorage::U32(v) => raw(v),
        CpuStorage::I16(v) => raw(v),
        CpuStorage::I32(v) => raw(v),
        CpuStorage::I64(v) => raw(v),
        CpuStorage::F16(v) => raw(v),
        CpuStorage::BF16(v) => raw(v),
        CpuStorage::F32(v) => raw(v),
        CpuStorage::F64(v) => raw(v),
        CpuStorage::F8E4M3(v) => raw(v),
        other => candle_core::bail!("host kernels: cannot upload a {:?} buffer", other.dtype()),
    })
}

/// One argument's value, where the kernel thunk reads it (cuLaunchKernel style).
#[repr(C)]
#[derive(Clone, Copy)]
union Slot {
    ptr: *mut c_void,
    i32: i32,
    i64: i64,
    u64: u64,
}

/// The host harness as an [`Executor`].
pub struct HostExecutor;

impl Executor for HostExecutor {
    type Storage = HostBuffer;

    fn dtype(storage: &HostBuffer) -> DType {
        storage.dtype
    }

    fn alloc(&self, alloc: Alloc) -> Result<HostBuffer> {
        Ok(HostBuffer::new(alloc.dtype, alloc.len.max(1)))
    }

    fn launch(
        &self,
        launch: &Launch,
        inputs: &[&HostBuffer],
        outputs: &[&HostBuffer],
    ) -> Result<()> {
        let buffer = |b: Buffer| resolve(launch, b, inputs, outputs);
        let mut slots = Vec::with_capacity(launch.args.len());
        for arg in &launch.args {
            slots.push(match *arg {
                Arg::Ptr { buffer: b, offset } => Slot {
                    ptr: buffer(b)?.address(offset)?,
                },
                Arg::Bytes { buffer: b, offset } => Slot {
                    ptr: buffer(b)?.address(offset)?,
                },
                Arg::I32(v) => Slot { i32: v },
                Arg::I64(v) => Slot { i64: v },
                Arg::U64(v) => Slot { u64: v },
            });
        }
        // Every buffer was resolved above, so the lookup cannot fail here.
        let signature = launch.signature(|b| buffer(b).map_or(DType::U8, |b| b.dtype));
        let mut arg_ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut Slot).cast::<c_void>())
            .collect();
        let name = CString::new(launch.kernel.as_str()).map_err(candle_core::Error::wrap)?;
        let signature = CString::new(signature).map_err(candle_core::Error::wrap)?;
        let grid = [launch.grid.0, launch.grid.1, launch.grid.2];
        let block = [launch.block.0, launch.block.1, launch.block.2];
        let mut error = vec![0 as c_char; 1024];
        // SAFETY: every pointer argument points into a live buffer (checked by
        // `address`), each slot holds the value of the type the signature names,
        // and the runtime checks that signature against the kernel's parameters.
        let rc = unsafe {
            smtl_host_launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                launch.shared_bytes as usize,
                signature.as_ptr(),
                arg_ptrs.as_mut_ptr(),
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the runtime writes a NUL-terminated message on failure.
            let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
            candle_core::bail!("host kernels: {}", message.to_string_lossy());
        }
        for (what, b) in inputs
            .iter()
            .map(|b| ("input", *b))
            .chain(outputs.iter().map(|b| ("output", *b)))
        {
            if !b.guards_intact() {
                candle_core::bail!(
                    "host kernels: {} wrote outside an {what} buffer ({:?}, {} elements)",
                    launch.kernel,
                    b.dtype,
                    b.len
                );
            }
            if let Some(expected) = b.input_hash {
                if hash(b.data()) != expected {
                    candle_core::bail!(
                        "host kernels: {} wrote into an input buffer",
                        launch.kernel
                    );
                }
            }
        }
        Ok(())
    }

    fn read_i64(&self, storage: &HostBuffer) -> Result<Vec<i64>> {
        match storage.download()? {
            CpuStorage::I64(v) => Ok(v),
            other => candle_core::bail!("host kernels: read_i64 of a {:?} buffer", other.dtype()),
        }
    }

    fn address(&self, storage: &HostBuffer, offset: usize) -> Result<u64> {
        Ok(storage.address(offset)? as u64)
    }
}

/// Runs `f` on host-harness copies of CPU storages `inputs` and downloads the
/// buffer it returns: a `cpu_fwd` taking its CUDA path under [`run`].
pub fn on_host<const N: usize>(
    inputs: [&CpuStorage; N],
    f: impl FnOnce(&HostExecutor, [&HostBuffer; N]) -> Result<HostBuffer>,
) -> Result<CpuStorage> {
    let buffers = inputs
        .iter()
        .map(|s| HostBuffer::upload(s))
        .collect::<Result<Vec<_>>>()?;
    let refs: [&HostBuffer; N] = std::array::from_fn(|i| &buffers[i]);
    f(&HostExecutor, refs)?.download()
}

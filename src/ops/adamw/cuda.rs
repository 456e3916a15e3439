//! The launch plan of `kernels/adamw.cu`: the table of every tensor's buffer
//! addresses and coefficients, and the one launch over all of them, run on the
//! CUDA device in place, or on the host harness (buffers uploaded writable,
//! then written back into the CPU tensors).

use candle_core::{Result, Storage, Tensor};

use super::{AdamWConsts, AdamWTensor, OP};
use crate::ops::launch::{self, as_i32, kernel_name, Buffer, Executor, Launch};

const MODULE: &str = "adamw";
const BLOCK: u32 = 256;
/// Elements per block (the kernel's ADAMW_CHUNK).
const CHUNK: usize = 4096;

/// One tensor's row of the table: its five buffer addresses (0 for no master
/// weights) and its coefficients.
struct Record {
    addresses: [u64; 5],
    len: usize,
    decay: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl Record {
    fn new(t: &AdamWTensor<'_>, consts: &AdamWConsts, addresses: [u64; 5]) -> Self {
        Self {
            addresses,
            len: t.param.elem_count(),
            decay: t.decay(),
            step_size: t.step_size(consts),
            bias_correction2_sqrt: t.bias_correction2_sqrt(consts),
        }
    }
}

/// The kernel's table (see `kernels/adamw.cu`) and the grid's block count.
fn table(records: &[Record], consts: &AdamWConsts) -> Result<(Vec<i64>, u32)> {
    let bits = |v: f64| v.to_bits() as i64;
    let mut words = vec![
        bits(consts.beta1),
        bits(consts.beta2),
        bits(consts.eps),
        bits(consts.grad_scale),
    ];
    let mut blocks = 0usize;
    for r in records {
        words.extend(r.addresses.map(|a| a as i64));
        words.extend([
            r.len as i64,
            blocks as i64,
            bits(r.decay),
            bits(r.step_size),
            bits(r.bias_correction2_sqrt),
        ]);
        blocks += r.len.div_ceil(CHUNK);
    }
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: {blocks} blocks are too many")))?;
    Ok((words, grid))
}

/// Runs the launch on `exec` with the table (input 0) on its device.
fn launch_with<E: Executor>(
    exec: &E,
    table: &E::Storage,
    tensors: usize,
    grid: u32,
    dtype: candle_core::DType,
) -> Result<()> {
    let launch = Launch::new(
        MODULE,
        kernel_name("adamw_step", dtype)?,
        (grid, 1, 1),
        (BLOCK, 1, 1),
    )
    .ptr(Buffer::Input(0), 0)
    .i32(as_i32(OP, "tensors", tensors)?);
    launch::run(exec, &[table], &[], &[launch]).map(|_| ())
}

/// The five tensors of one entry, in table order (master last, if any).
fn parts<'a>(t: &AdamWTensor<'a>, grad: &'a Tensor) -> [Option<&'a Tensor>; 5] {
    [Some(t.param), Some(grad), Some(t.m), Some(t.v), t.master]
}

/// On a CUDA device: the buffers are updated where they are.
#[cfg(feature = "cuda")]
pub(super) fn run_on_cuda(
    group: &[(&AdamWTensor<'_>, &Tensor)],
    consts: &AdamWConsts,
) -> Result<()> {
    let candle_core::Device::Cuda(dev) = group[0].0.param.device() else {
        candle_core::bail!("{OP}: not a CUDA device");
    };
    let exec = crate::ops::cuda::CudaExecutor::new(dev);
    let mut records = Vec::with_capacity(group.len());
    for (t, grad) in group {
        let mut addresses = [0u64; 5];
        for (slot, part) in parts(t, grad).into_iter().enumerate() {
            let Some(part) = part else { continue };
            let (storage, layout) = part.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                candle_core::bail!("{OP}: a buffer is not on the CUDA device");
            };
            addresses[slot] = exec.address(storage, layout.start_offset())?;
        }
        records.push(Record::new(t, consts, addresses));
    }
    let (words, grid) = table(&records, consts)?;
    let len = words.len();
    let table = Tensor::from_vec(words, len, group[0].0.param.device())?;
    let (table, _) = table.storage_and_layout();
    let Storage::Cuda(table) = &*table else {
        candle_core::bail!("{OP}: the table is not on the CUDA device");
    };
    launch_with(&exec, table, group.len(), grid, group[0].0.param.dtype())
}

/// On the host harness: each tensor's whole storage is copied into the
/// harness's memory (writable where the kernel updates it), the launch runs,
/// and the updated buffers are written back into the CPU tensors.
#[cfg(feature = "host-kernels")]
pub(super) fn run_on_host(
    group: &[(&AdamWTensor<'_>, &Tensor)],
    consts: &AdamWConsts,
) -> Result<()> {
    use crate::ops::host::{HostBuffer, HostExecutor};
    let exec = HostExecutor;
    let mut buffers: Vec<[Option<HostBuffer>; 5]> = Vec::with_capacity(group.len());
    let mut records = Vec::with_capacity(group.len());
    for (t, grad) in group {
        let mut addresses = [0u64; 5];
        let mut uploaded: [Option<HostBuffer>; 5] = Default::default();
        for (slot, part) in parts(t, grad).into_iter().enumerate() {
            let Some(part) = part else { continue };
            let (storage, layout) = part.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("{OP}: a buffer is not on the CPU");
            };
            // Slot 1, the gradient, is only read.
            let buffer = if slot == 1 {
                HostBuffer::upload(storage)?
            } else {
                HostBuffer::upload_writable(storage)?
            };
            addresses[slot] = exec.address(&buffer, layout.start_offset())?;
            uploaded[slot] = Some(buffer);
        }
        buffers.push(uploaded);
        records.push(Record::new(t, consts, addresses));
    }
    let (words, grid) = table(&records, consts)?;
    let table = HostBuffer::upload(&candle_core::CpuStorage::I64(words))?;
    launch_with(&exec, &table, group.len(), grid, group[0].0.param.dtype())?;
    for ((t, grad), uploaded) in group.iter().zip(buffers) {
        for ((slot, part), buffer) in parts(t, grad).into_iter().enumerate().zip(uploaded) {
            if let (Some(part), Some(buffer), true) = (part, buffer, slot != 1) {
                let op = WriteBack(std::sync::Mutex::new(Some(buffer.download()?)));
                part.inplace_op1(&op)?;
            }
        }
    }
    Ok(())
}

/// Replaces a CPU tensor's storage with the harness's updated copy of it.
#[cfg(feature = "host-kernels")]
struct WriteBack(std::sync::Mutex<Option<candle_core::CpuStorage>>);

#[cfg(feature = "host-kernels")]
impl candle_core::InplaceOp1 for WriteBack {
    fn name(&self) -> &'static str {
        "adamw-host-write-back"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let Some(updated) = self.0.lock().expect("write-back lock").take() else {
            candle_core::bail!("{OP}: write-back applied twice");
        };
        if updated.dtype() != storage.dtype() {
            candle_core::bail!(
                "{OP}: write-back of a {:?} buffer into {:?}",
                updated.dtype(),
                storage.dtype()
            );
        }
        *storage = updated;
        Ok(())
    }
}

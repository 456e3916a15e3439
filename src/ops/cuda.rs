//! The CUDA executor of launch plans ([`super::launch`]): the embedded PTX, the
//! PTX for the device's compute capability, loaded once per CUDA context, and
//! the cudarc launch of a plan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaModule, CudaView, DevicePtr, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{DType, Result};

use super::launch::{resolve, Alloc, Arg, Buffer, Executor, Launch};

/// The PTX of each kernel file, one per target architecture (from build.rs).
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The device's compute capability as `major * 10 + minor` (90 for an H100/H200).
pub fn compute_capability(dev: &CudaDevice) -> Result<u32> {
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    Ok((major * 10 + minor) as u32)
}

/// Modules already loaded, per driver context (the `CUcontext` handle, which
/// every `Device::new_cuda` of one GPU shares: its primary context) and module:
/// loading PTX JIT-compiles it, which must happen once per process and GPU, not
/// per launch or per candle device.
type ModuleCache = Mutex<HashMap<(usize, &'static str), Arc<CudaModule>>>;
static MODULES: OnceLock<ModuleCache> = OnceLock::new();

/// The loaded module of kernel file `module`: the newest PTX target not above the device.
fn module(dev: &CudaDevice, module: &'static str) -> Result<Arc<CudaModule>> {
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let key = (ctx.cu_ctx() as usize, module);
    let mut modules = MODULES.get_or_init(Default::default).lock().unwrap();
    if let Some(m) = modules.get(&key) {
        return Ok(m.clone());
    }
    let targets = ptx::by_module(module)
        .ok_or_else(|| candle_core::Error::Msg(format!("no kernel file named {module}.cu")))?;
    let cc = compute_capability(dev)?;
    let (_, code) = targets
        .iter()
        .filter(|(arch, _)| *arch <= cc)
        .max_by_key(|(arch, _)| *arch)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{module}: no PTX for compute capability {cc} (built for {:?}; \
                 set SENTENCE_MTL_CUDA_ARCHS)",
                targets.iter().map(|(a, _)| a).collect::<Vec<_>>()
            ))
        })?;
    let loaded = ctx.load_module(Ptx::from_src(*code)).w()?;
    modules.insert(key, loaded.clone());
    Ok(loaded)
}

/// All of a storage's bytes, as the kernels' raw device pointer.
fn bytes_of(storage: &CudaStorage) -> Result<CudaView<'_, u8>> {
    macro_rules! bytes {
        ($s:expr, $t:ty) => {{
            let len = $s.len() * std::mem::size_of::<$t>();
            // SAFETY: a byte view of the same allocation, used only as a kernel pointer.
            unsafe { $s.transmute::<u8>(len) }
        }};
    }
    let view = match &storage.slice {
        CudaStorageSlice::U8(s) => bytes!(s, u8),
        CudaStorageSlice::U32(s) => bytes!(s, u32),
        CudaStorageSlice::I16(s) => bytes!(s, i16),
        CudaStorageSlice::I32(s) => bytes!(s, i32),
        CudaStorageSlice::I64(s) => bytes!(s, i64),
        CudaStorageSlice::BF16(s) => bytes!(s, half::bf16),
        CudaStorageSlice::F16(s) => bytes!(s, half::f16),
        CudaStorageSlice::F32(s) => bytes!(s, f32),
        CudaStorageSlice::F64(s) => bytes!(s, f64),
        CudaStorageSlice::F8E4M3(s) => bytes!(s, u8),
        _ => None,
    };
    view.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "CUDA kernels: cannot pass a {:?} buffer",
            storage.dtype()
        ))
    })
}

/// A resolved kernel argument, alive until the launch.
enum Value<'a> {
    Ptr(CudaView<'a, u8>),
    I32(i32),
    I64(i64),
    U64(u64),
}

/// The CUDA device as an [`Executor`].
pub struct CudaExecutor<'a> {
    dev: &'a CudaDevice,
}

impl<'a> CudaExecutor<'a> {
    pub fn new(dev: &'a CudaDevice) -> Self {
        Self { dev }
    }
}

impl Executor for CudaExecutor<'_> {
    type Storage = CudaStorage;

    fn dtype(storage: &CudaStorage) -> DType {
        storage.dtype()
    }

    fn alloc(&self, alloc: Alloc) -> Result<CudaStorage> {
        let len = alloc.len.max(1);
        let dev = self.dev;
        // SAFETY (each arm): the launches write every element the op returns.
        let slice = match alloc.dtype {
            DType::U8 => CudaStorageSlice::U8(unsafe { dev.alloc::<u8>(len)? }),
            DType::U32 => CudaStorageSlice::U32(unsafe { dev.alloc::<u32>(len)? }),
            DType::I64 => CudaStorageSlice::I64(unsafe { dev.alloc::<i64>(len)? }),
            DType::F16 => CudaStorageSlice::F16(unsafe { dev.alloc::<half::f16>(len)? }),
            DType::BF16 => CudaStorageSlice::BF16(unsafe { dev.alloc::<half::bf16>(len)? }),
            DType::F32 => CudaStorageSlice::F32(unsafe { dev.alloc::<f32>(len)? }),
            DType::F64 => CudaStorageSlice::F64(unsafe { dev.alloc::<f64>(len)? }),
            other => candle_core::bail!("CUDA kernels: cannot allocate a {other:?} buffer"),
        };
        Ok(CudaStorage {
            slice,
            device: dev.clone(),
        })
    }

    fn launch(
        &self,
        launch: &Launch,
        inputs: &[&CudaStorage],
        outputs: &[&CudaStorage],
    ) -> Result<()> {
        let buffer = |b: Buffer| resolve(launch, b, inputs, outputs);
        let pointer = |b: Buffer, offset: usize| -> Result<Value<'_>> {
            let storage = buffer(b)?;
            let byte = offset * Self::dtype(storage).size_in_bytes();
            let bytes = bytes_of(storage)?;
            match bytes.try_slice(byte..) {
                Some(view) => Ok(Value::Ptr(view)),
                None => candle_core::bail!(
                    "{}: a launch argument points {offset} elements past its buffer",
                    launch.kernel
                ),
            }
        };
        let values = launch
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Ptr { buffer, offset } | Arg::Bytes { buffer, offset } => {
                    pointer(buffer, offset)
                }
                Arg::I32(v) => Ok(Value::I32(v)),
                Arg::I64(v) => Ok(Value::I64(v)),
                Arg::U64(v) => Ok(Value::U64(v)),
            })
            .collect::<Result<Vec<_>>>()?;
        let module = module(self.dev, launch.module)?;
        let func = module.load_function(&launch.kernel).w()?;
        let stream = self.dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        for value in &values {
            match value {
                Value::Ptr(view) => builder.arg(view),
                Value::I32(v) => builder.arg(v),
                Value::I64(v) => builder.arg(v),
                Value::U64(v) => builder.arg(v),
            };
        }
        let config = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: launch.grid,
            block_dim: launch.block,
            shared_mem_bytes: launch.shared_bytes,
        };
        // SAFETY: the plan's argument list matches the kernel's parameters (the
        // host harness checks every plan against the kernel's own signature), and
        // every pointer lies inside its buffer.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }

    fn read_i64(&self, storage: &CudaStorage) -> Result<Vec<i64>> {
        match &storage.slice {
            CudaStorageSlice::I64(s) => self.dev.clone_dtoh(s),
            _ => candle_core::bail!("CUDA kernels: read_i64 of a non-i64 buffer"),
        }
    }

    fn address(&self, storage: &CudaStorage, offset: usize) -> Result<u64> {
        let bytes = bytes_of(storage)?;
        let byte = offset * storage.dtype().size_in_bytes();
        if byte > bytes.len() {
            candle_core::bail!(
                "CUDA kernels: an address {offset} elements into a buffer of {}",
                bytes.len() / storage.dtype().size_in_bytes()
            );
        }
        let stream = self.dev.cuda_stream();
        // The stream waits for the buffer's pending writes (where cudarc tracks
        // them); the kernels run on this same stream.
        let (ptr, _sync) = bytes.device_ptr(&stream);
        Ok(ptr + byte as u64)
    }
}

//! CUDA plumbing shared by the ops: the embedded PTX, picking the PTX for the
//! device's compute capability, and loading a kernel instance by dtype.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchArgs};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

use super::dtype::FloatElem;

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

/// A loaded kernel and the device stream it launches on.
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch on the device's stream (push the arguments, then `launch`).
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Modules already loaded, per CUDA context and module name: loading PTX JIT-compiles
/// it, which must happen once, not per launch.
type ModuleCache = Mutex<HashMap<(usize, String), Arc<CudaModule>>>;
static MODULES: OnceLock<ModuleCache> = OnceLock::new();

/// Loads `kernel` from a kernel file's PTX: the newest target not above the device.
pub fn load(
    dev: &CudaDevice,
    module: &'static str,
    ptx: &'static [(u32, &'static str)],
    kernel: &str,
) -> Result<Kernel> {
    let cc = compute_capability(dev)?;
    let (arch, code) = ptx
        .iter()
        .filter(|(arch, _)| *arch <= cc)
        .max_by_key(|(arch, _)| *arch)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{module}: no PTX for compute capability {cc} (built for {:?}; \
                 set SENTENCE_MTL_CUDA_ARCHS)",
                ptx.iter().map(|(a, _)| a).collect::<Vec<_>>()
            ))
        })?;
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let key = (Arc::as_ptr(&ctx) as usize, format!("{module}_sm{arch}"));
    let loaded = {
        let mut modules = MODULES.get_or_init(Default::default).lock().unwrap();
        match modules.get(&key) {
            Some(m) => m.clone(),
            None => {
                let m = ctx.load_module(Ptx::from_src(*code)).w()?;
                modules.insert(key, m.clone());
                m
            }
        }
    };
    let func = loaded.load_function(kernel).w()?;
    Ok(Kernel { func, stream })
}

/// `base_f32`, `base_f16`, ...: the name of a kernel's instance for dtype `T`.
pub fn kernel_name<T: FloatElem>(base: &str) -> String {
    format!("{base}_{}", T::KERNEL_SUFFIX)
}

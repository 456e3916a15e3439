//! AdamW over many parameter tensors in one kernel launch (per parameter
//! dtype), in place: the optimiser step of training on a GPU
//! (`kernels/adamw.cu`, launch plans in `cuda.rs`).
//!
//! For each tensor, at its step `t`, with `g` the gradient times `grad_scale`:
//!
//! ```text
//! m = β1·m + (1 − β1)·g;   v = β2·v + (1 − β2)·g²
//! p = p·(1 − lr·wd) − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
//! ```
//!
//! as `torch.optim.AdamW` computes it (decoupled weight decay). The moments are
//! kept in the accumulation dtype (f32; f64 for f64 parameters). A parameter in
//! f16 or bf16 may have **master weights**: an f32 copy that the update reads
//! and writes, the parameter then being the master rounded once to its dtype
//! (mixed-precision training: small updates are not lost to bf16's 8-bit
//! mantissa).
//!
//! The kernel reaches each tensor's buffers through a table of device
//! addresses, so one launch updates any number of tensors of any sizes: a
//! training step's optimiser is one launch instead of about ten element-wise
//! launches and four temporaries per parameter tensor. On the CPU the crate's
//! optimiser (`train::AdamW`) has its own fused loop; here the CPU runs the
//! kernel only on the host harness (`ops::host::run`), for tests.

use candle_core::{DType, Device, Result, Tensor};

#[cfg(any(feature = "cuda", feature = "host-kernels"))]
mod cuda;

const OP: &str = "multi_tensor_adamw";

/// The update's constants, shared by every tensor of a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConsts {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the bias-corrected `sqrt(v)`.
    pub eps: f64,
    /// Multiplies every gradient first (gradient clipping).
    pub grad_scale: f64,
}

/// One tensor's part in a [`multi_tensor_adamw`] call. `param`, `m`, `v` and
/// `master` are updated in place (every tensor sharing their storage sees it).
#[derive(Debug, Clone, Copy)]
pub struct AdamWTensor<'a> {
    /// The parameter (f32, f16, bf16 or f64), contiguous.
    pub param: &'a Tensor,
    /// Its gradient: the parameter's shape and dtype, any layout.
    pub grad: &'a Tensor,
    /// The first moment: the parameter's shape, the accumulation dtype, contiguous.
    pub m: &'a Tensor,
    /// The second moment, likewise.
    pub v: &'a Tensor,
    /// Master weights (f16/bf16 parameters only): the parameter's shape in f32,
    /// contiguous; the update reads and writes them and rounds into `param`.
    pub master: Option<&'a Tensor>,
    /// This tensor's learning rate at this step.
    pub lr: f64,
    /// Its decoupled weight decay.
    pub weight_decay: f64,
    /// Its step count `t` (≥ 1), for the bias corrections.
    pub step: u64,
}

// The kernel's coefficients (read by the launch plan, under `cuda` or `host-kernels`).
#[cfg_attr(not(any(feature = "cuda", feature = "host-kernels")), allow(dead_code))]
impl AdamWTensor<'_> {
    fn decay(&self) -> f64 {
        1.0 - self.lr * self.weight_decay
    }

    fn step_size(&self, consts: &AdamWConsts) -> f64 {
        self.lr / (1.0 - consts.beta1.powf(self.step as f64))
    }

    fn bias_correction2_sqrt(&self, consts: &AdamWConsts) -> f64 {
        (1.0 - consts.beta2.powf(self.step as f64)).sqrt()
    }
}

/// The dtype moments and master weights are kept in for parameters of `dtype`.
pub fn state_dtype(dtype: DType) -> DType {
    super::dtype::accumulation_dtype(dtype)
}

/// One AdamW update of every tensor in `tensors`, in place: one kernel launch
/// per parameter dtype among them. All on one CUDA device (or on the CPU inside
/// `ops::host::run`).
///
/// Errors: tensors on different devices, a CPU device outside the host
/// harness, a non-float or mismatched dtype, a shape mismatch, a
/// non-contiguous parameter, moment or master, master weights for an f32/f64
/// parameter, a step of 0, or non-finite constants.
pub fn multi_tensor_adamw(tensors: &[AdamWTensor<'_>], consts: &AdamWConsts) -> Result<()> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    let device = first.param.device().clone();
    check_consts(consts)?;
    for (i, t) in tensors.iter().enumerate() {
        check_tensor(i, t, &device)?;
    }
    // Gradients may come in any layout; the kernel reads them contiguous.
    let grads: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.grad.contiguous())
        .collect::<Result<_>>()?;
    let mut dtypes: Vec<DType> = Vec::new();
    for t in tensors {
        if !dtypes.contains(&t.param.dtype()) {
            dtypes.push(t.param.dtype());
        }
    }
    for dtype in dtypes {
        let group: Vec<(&AdamWTensor<'_>, &Tensor)> = tensors
            .iter()
            .zip(&grads)
            .filter(|(t, _)| t.param.dtype() == dtype && t.param.elem_count() > 0)
            .collect();
        if !group.is_empty() {
            launch(&device, &group, consts)?;
        }
    }
    Ok(())
}

fn check_consts(c: &AdamWConsts) -> Result<()> {
    for (what, v) in [
        ("beta1", c.beta1),
        ("beta2", c.beta2),
        ("eps", c.eps),
        ("grad_scale", c.grad_scale),
    ] {
        if !v.is_finite() {
            candle_core::bail!("{OP}: {what} is {v}; the constants must be finite");
        }
    }
    Ok(())
}

fn check_tensor(i: usize, t: &AdamWTensor<'_>, device: &Device) -> Result<()> {
    let dtype = t.param.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        candle_core::bail!(
            "{OP}: tensor {i}: parameters must be f32, f16, bf16 or f64, got {dtype:?}"
        );
    }
    let state = state_dtype(dtype);
    let named = [
        ("grad", Some(t.grad), dtype),
        ("m", Some(t.m), state),
        ("v", Some(t.v), state),
        ("master", t.master, DType::F32),
    ];
    for (what, tensor, want) in named {
        let Some(tensor) = tensor else { continue };
        if !tensor.device().same_device(device) {
            candle_core::bail!(
                "{OP}: tensor {i}: {what} is on {:?} but the first parameter on {device:?}",
                tensor.device()
            );
        }
        if tensor.dims() != t.param.dims() {
            candle_core::bail!(
                "{OP}: tensor {i}: {what} has shape {:?}, the parameter {:?}",
                tensor.dims(),
                t.param.dims()
            );
        }
        if tensor.dtype() != want {
            candle_core::bail!(
                "{OP}: tensor {i}: {what} is {:?}, expected {want:?} for a {dtype:?} parameter",
                tensor.dtype()
            );
        }
    }
    if t.master.is_some() && !matches!(dtype, DType::F16 | DType::BF16) {
        candle_core::bail!(
            "{OP}: tensor {i}: master weights are for f16/bf16 parameters, not {dtype:?}"
        );
    }
    for (what, tensor) in [
        ("param", Some(t.param)),
        ("m", Some(t.m)),
        ("v", Some(t.v)),
        ("master", t.master),
    ] {
        if tensor.is_some_and(|x| !x.is_contiguous()) {
            candle_core::bail!(
                "{OP}: tensor {i}: {what} must be contiguous (it is updated in place)"
            );
        }
    }
    if t.step == 0 {
        candle_core::bail!("{OP}: tensor {i}: step must be >= 1");
    }
    if !(t.lr.is_finite() && t.weight_decay.is_finite()) {
        candle_core::bail!(
            "{OP}: tensor {i}: lr {} and weight decay {} must be finite",
            t.lr,
            t.weight_decay
        );
    }
    Ok(())
}

/// One launch for `group` (one parameter dtype, gradients contiguous).
#[cfg_attr(
    not(any(feature = "cuda", feature = "host-kernels")),
    allow(unused_variables)
)]
fn launch(
    device: &Device,
    group: &[(&AdamWTensor<'_>, &Tensor)],
    consts: &AdamWConsts,
) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::run_on_cuda(group, consts),
        #[cfg(feature = "host-kernels")]
        Device::Cpu if super::host::enabled() => cuda::run_on_host(group, consts),
        _ => candle_core::bail!(
            "{OP}: runs on a CUDA device (or on the CPU inside ops::host::run), not {device:?}"
        ),
    }
}

//! AdamW with parameter groups, as PyTorch's `torch.optim.AdamW` computes it.
//!
//! candle-nn's `AdamW` has one learning rate and keeps its moments private, so a
//! run could neither give the backbone and the heads different learning rates nor
//! be resumed with its optimiser state. This one has named groups (each with its
//! own learning rate and weight decay), exposes its state for checkpoints, and
//! updates f32 CPU parameters in one fused, parallel pass in place (parameter,
//! both moments, gradient scale). On a CUDA device every parameter is updated
//! by one kernel launch per step ([`crate::ops::multi_tensor_adamw`]), in
//! place, with f32 moments and, for f16/bf16 parameters, f32 master weights
//! (mixed-precision training: the bf16 weights are the f32 masters rounded).
//! Other CPU dtypes and layouts use candle tensor ops.
//!
//! Per parameter, at its step `t` (counted only when it has a gradient):
//! `p *= 1 - lr·wd; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
//! p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{
    bail, CpuStorage, DType, Device, InplaceOp2, Layout, Result, Storage, Tensor, Var,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ops::adamw::{self, AdamWConsts, AdamWTensor};
use crate::ops::multi_tensor_adamw;

/// The hyper-parameters shared by all groups (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Decay rate of the first moment (the gradient's running mean); default 0.9.
    pub beta1: f64,
    /// Decay rate of the second moment (the squared gradient's); default 0.999.
    pub beta2: f64,
    /// Added to the bias-corrected `sqrt(v)` in the denominator; default 1e-8.
    pub eps: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A named set of parameters with its own base learning rate and weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A label for logs and [`AdamW::group_summary`], e.g. `backbone` or `heads`.
    pub name: String,
    /// The base learning rate; each step multiplies it by the schedule's factor.
    pub lr: f64,
    /// Decoupled weight decay: each update scales the parameters by `1 - lr·wd`.
    pub weight_decay: f64,
    /// `(parameter name, variable)`; names are unique across all groups.
    pub params: Vec<(String, Var)>,
}

/// The optimiser's view of one group: its settings and its parameters' state.
#[derive(Debug)]
struct Group {
    name: String,
    lr: f64,
    weight_decay: f64,
    params: Vec<ParamState>,
}

#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    /// Optimiser steps this parameter has taken (it had a gradient).
    steps: u64,
    moments: Moments,
}

/// First and second moments: host vectors for the fused f32 CPU path; tensors
/// in the accumulation dtype (and f32 master weights for f16/bf16) for the
/// kernel path; tensors of the parameter's dtype for everything else.
#[derive(Debug)]
enum Moments {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Kernel {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
    Tensor {
        m: Tensor,
        v: Tensor,
    },
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        if kernel_path(var) {
            let state = adamw::state_dtype(var.dtype());
            let m = Tensor::zeros(var.shape(), state, var.device())?;
            Ok(Self::Kernel {
                v: m.zeros_like()?,
                m,
                master: master_weights(var)?,
            })
        } else if fused_path(var) {
            let n = var.elem_count();
            Ok(Self::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            })
        } else {
            Ok(Self::Tensor {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            })
        }
    }
}

fn fused_path(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
}

/// Parameters the AdamW kernel updates: contiguous ones on a CUDA device (and
/// on the CPU inside the host kernel harness, which runs the same kernel).
fn kernel_path(var: &Var) -> bool {
    var.is_contiguous() && (var.device().is_cuda() || on_host_harness(var))
}

#[cfg(feature = "host-kernels")]
fn on_host_harness(var: &Var) -> bool {
    var.device().is_cpu() && crate::ops::host::enabled()
}

#[cfg(not(feature = "host-kernels"))]
fn on_host_harness(_var: &Var) -> bool {
    false
}

/// f32 master weights for an f16/bf16 parameter on the kernel path.
fn master_weights(var: &Var) -> Result<Option<Tensor>> {
    match var.dtype() {
        DType::F16 | DType::BF16 => Ok(Some(var.as_tensor().to_dtype(DType::F32)?)),
        _ => Ok(None),
    }
}

/// A group's learning rate and the step count for one update.
#[derive(Debug, Clone, Copy)]
struct StepCoefs {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Multiplies the gradient first (gradient clipping).
    grad_scale: f64,
    step: u64,
}

impl StepCoefs {
    fn bias_correction1(&self) -> f64 {
        1.0 - self.beta1.powf(self.step as f64)
    }

    fn bias_correction2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powf(self.step as f64)).sqrt()
    }
}

/// AdamW over named parameter groups, with state that checkpoints can save and
/// restore (see the module docs for the update).
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<Group>,
    params: AdamWParams,
}

impl AdamW {
    /// An optimiser over `groups` with zeroed moments and step counts. Fails if a
    /// parameter is not of a float dtype or its name occurs more than once.
    pub fn new(groups: Vec<ParamGroup>, params: AdamWParams) -> Result<Self> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(groups.len());
        for group in groups {
            let mut states = Vec::with_capacity(group.params.len());
            for (name, var) in group.params {
                if !var.dtype().is_float() {
                    bail!(
                        "AdamW: parameter {name} has non-float dtype {:?}",
                        var.dtype()
                    );
                }
                if !seen.insert(name.clone()) {
                    bail!("AdamW: parameter {name} is in more than one group");
                }
                let moments = Moments::zeros(&var)?;
                states.push(ParamState {
                    name,
                    var,
                    steps: 0,
                    moments,
                });
            }
            out.push(Group {
                name: group.name,
                lr: group.lr,
                weight_decay: group.weight_decay,
                params: states,
            });
        }
        Ok(Self {
            groups: out,
            params,
        })
    }

    /// `(group name, base lr, number of parameter tensors, number of elements)`.
    pub fn group_summary(&self) -> Vec<(String, f64, usize, usize)> {
        self.groups
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    g.lr,
                    g.params.len(),
                    g.params.iter().map(|p| p.var.elem_count()).sum(),
                )
            })
            .collect()
    }

    /// Every parameter the optimiser updates, by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|p| (p.name.as_str(), &p.var)))
    }

    /// Whether no group has any parameter, so that a step changes nothing.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.params.is_empty())
    }

    /// The L2 norm of all the optimiser's gradients together (as
    /// `torch.nn.utils.clip_grad_norm_` measures it), accumulated in f64. On a
    /// GPU the per-tensor sums stay on the device and are read back once.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum_sq = 0f64;
        let mut on_device: Option<Tensor> = None;
        for (_, var) in self.vars() {
            let Some(g) = grads.get(var) else { continue };
            if g.device().is_cpu() {
                sum_sq += sum_of_squares(g)?;
            } else {
                let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
                on_device = Some(match on_device {
                    Some(total) => (total + s)?,
                    None => s,
                });
            }
        }
        if let Some(total) = on_device {
            sum_sq += total.to_scalar::<f64>()?;
        }
        Ok(sum_sq.sqrt())
    }

    /// One update of every parameter that has a gradient in `grads`, at each
    /// group's base learning rate times `lr_factor`, with every gradient first
    /// multiplied by `grad_scale`.
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64, grad_scale: f64) -> Result<()> {
        let AdamWParams { beta1, beta2, eps } = self.params;
        for group in &mut self.groups {
            for p in &mut group.params {
                let Some(grad) = grads.get(&p.var) else {
                    continue;
                };
                p.steps += 1;
                let coefs = StepCoefs {
                    lr: group.lr * lr_factor,
                    weight_decay: group.weight_decay,
                    beta1,
                    beta2,
                    eps,
                    grad_scale,
                    step: p.steps,
                };
                match &mut p.moments {
                    Moments::Host { m, v } => {
                        let op = FusedCpuStep {
                            m: RefCell::new(m),
                            v: RefCell::new(v),
                            coefs,
                        };
                        p.var.as_tensor().inplace_op2(&grad.contiguous()?, &op)?;
                    }
                    Moments::Tensor { m, v } => tensor_step(&p.var, m, v, grad, &coefs)?,
                    Moments::Kernel { .. } => {} // all together, below
                }
            }
        }
        // Every kernel-path parameter with a gradient: one launch per dtype.
        let updates: Vec<AdamWTensor<'_>> = self
            .groups
            .iter()
            .flat_map(|group| {
                group.params.iter().filter_map(move |p| {
                    let Moments::Kernel { m, v, master } = &p.moments else {
                        return None;
                    };
                    Some(AdamWTensor {
                        param: p.var.as_tensor(),
                        grad: grads.get(&p.var)?,
                        m,
                        v,
                        master: master.as_ref(),
                        lr: group.lr * lr_factor,
                        weight_decay: group.weight_decay,
                        step: p.steps,
                    })
                })
            })
            .collect();
        let consts = AdamWConsts {
            beta1,
            beta2,
            eps,
            grad_scale,
        };
        multi_tensor_adamw(&updates, &consts)
    }

    /// The state as named CPU tensors: `{param}.exp_avg` and `{param}.exp_avg_sq`
    /// (PyTorch's names), `{param}.step`, a one-element f64 (exact up to 2^53),
    /// and `{param}.master`, the f32 master weights of an f16/bf16 parameter
    /// on the kernel path.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in self.groups.iter().flat_map(|g| &g.params) {
            let (m, v) = match &p.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, p.var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, p.var.shape(), &Device::Cpu)?,
                ),
                Moments::Tensor { m, v } => {
                    (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?)
                }
                // Copies: the kernel updates these in place, and on the CPU
                // (the host harness) `to_device` would share their storage.
                Moments::Kernel { m, v, .. } => (
                    m.to_device(&Device::Cpu)?.copy()?,
                    v.to_device(&Device::Cpu)?.copy()?,
                ),
            };
            out.insert(format!("{}.exp_avg", p.name), m);
            out.insert(format!("{}.exp_avg_sq", p.name), v);
            if let Moments::Kernel {
                master: Some(master),
                ..
            } = &p.moments
            {
                out.insert(
                    format!("{}.master", p.name),
                    master.to_device(&Device::Cpu)?.copy()?,
                );
            }
            out.insert(
                format!("{}.step", p.name),
                Tensor::new(&[p.steps as f64], &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Restores what [`state_tensors`](Self::state_tensors) saved. Every
    /// parameter of this optimiser must be present with matching shapes.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| -> Result<&Tensor> {
            tensors.get(&key).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimiser state: {key} is missing"))
            })
        };
        for p in self.groups.iter_mut().flat_map(|g| &mut g.params) {
            let m = get(format!("{}.exp_avg", p.name))?;
            let v = get(format!("{}.exp_avg_sq", p.name))?;
            for t in [m, v] {
                if t.shape() != p.var.shape() {
                    bail!(
                        "optimiser state for {}: shape {:?}, parameter {:?}",
                        p.name,
                        t.shape(),
                        p.var.shape()
                    );
                }
            }
            let steps = get(format!("{}.step", p.name))?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let [steps] = steps[..] else {
                bail!("optimiser state for {}: step must hold one value", p.name)
            };
            p.steps = steps as u64;
            p.moments = match p.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    v: v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                },
                Moments::Tensor { .. } => {
                    let (dtype, device) = (p.var.dtype(), p.var.device());
                    Moments::Tensor {
                        m: m.to_dtype(dtype)?.to_device(device)?,
                        v: v.to_dtype(dtype)?.to_device(device)?,
                    }
                }
                // Saved master weights, else the parameter's own values; each
                // a copy of its own (the kernel updates them in place).
                Moments::Kernel { .. } => {
                    let (dtype, device) = (adamw::state_dtype(p.var.dtype()), p.var.device());
                    let master = match (
                        master_weights(&p.var)?,
                        tensors.get(&format!("{}.master", p.name)),
                    ) {
                        (Some(_), Some(saved)) if saved.shape() == p.var.shape() => Some(
                            saved
                                .to_dtype(DType::F32)?
                                .to_device(device)?
                                .contiguous()?,
                        ),
                        (derived, _) => derived,
                    };
                    Moments::Kernel {
                        m: m.to_dtype(dtype)?.to_device(device)?.copy()?,
                        v: v.to_dtype(dtype)?.to_device(device)?.copy()?,
                        master,
                    }
                }
            };
        }
        Ok(())
    }
}

/// Σ g², read straight from f32 CPU storage where possible.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            // Per-chunk sums collected in order, then added in order: the same
            // result on every run (a parallel reduce's tree may vary).
            let partial: Vec<f64> = data[start..end]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum())
                .collect();
            return Ok(partial.iter().sum());
        }
    }
    g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Elements per rayon task in the fused passes.
const CHUNK: usize = 1 << 14;

/// The whole AdamW update of one f32 CPU parameter in one pass, in place.
struct FusedCpuStep<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    coefs: StepCoefs,
}

impl InplaceOp2 for FusedCpuStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        tl: &Layout,
        grad: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (theta, grad) else {
            bail!("adamw-step: the fused path takes f32 parameters and gradients")
        };
        let (Some((t0, t1)), Some((g0, g1))) = (tl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            bail!("adamw-step: parameter and gradient must be contiguous")
        };
        let (theta, grad) = (&mut theta[t0..t1], &grad[g0..g1]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if grad.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            bail!(
                "adamw-step: parameter of {} elements, gradient {}, state {}",
                theta.len(),
                grad.len(),
                m.len()
            );
        }
        let k = &self.coefs;
        let decay = (1.0 - k.lr * k.weight_decay) as f32;
        let (b1, b2) = (k.beta1 as f32, k.beta2 as f32);
        let step_size = (k.lr / k.bias_correction1()) as f32;
        let bc2_sqrt = k.bias_correction2_sqrt() as f32;
        let (eps, scale) = (k.eps as f32, k.grad_scale as f32);
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((theta, m), v), grad)| {
                for (((p, m), v), &g) in theta
                    .iter_mut()
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                    .zip(grad)
                {
                    let g = g * scale;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p = *p * decay - step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            });
        Ok(())
    }
}

/// The same update with candle tensor ops (any device, any float dtype).
fn tensor_step(
    var: &Var,
    m: &mut Tensor,
    v: &mut Tensor,
    grad: &Tensor,
    k: &StepCoefs,
) -> Result<()> {
    let g = (grad * k.grad_scale)?;
    *m = ((&*m * k.beta1)? + (&g * (1.0 - k.beta1))?)?;
    *v = ((&*v * k.beta2)? + (g.sqr()? * (1.0 - k.beta2))?)?;
    let denom = ((v.sqrt()? / k.bias_correction2_sqrt())? + k.eps)?;
    let update = ((&*m / denom)? * (k.lr / k.bias_correction1()))?;
    var.set(&((var.as_tensor() * (1.0 - k.lr * k.weight_decay))? - update)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads_for(vars: &[&Var], loss: impl Fn(&[&Tensor]) -> Result<Tensor>) -> GradStore {
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        loss(&ts).unwrap().backward().unwrap()
    }

    /// The fused CPU pass and the tensor-op path agree step for step, and both
    /// match a scalar transcription of PyTorch's update.
    #[test]
    fn fused_and_tensor_paths_agree_with_the_formula() {
        let init: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let fused = Var::from_slice(&init, (37,), &Device::Cpu).unwrap();
        let plain = Var::from_slice(&init, (37,), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let plain = Var::from_tensor(&plain).unwrap();
        let group = |name: &str, var: &Var| ParamGroup {
            name: "g".into(),
            lr: 0.01,
            weight_decay: 0.1,
            params: vec![(name.into(), var.clone())],
        };
        let mut opt_fused = AdamW::new(vec![group("w", &fused)], AdamWParams::default()).unwrap();
        let mut opt_plain = AdamW::new(vec![group("w", &plain)], AdamWParams::default()).unwrap();
        assert!(matches!(
            opt_fused.groups[0].params[0].moments,
            Moments::Host { .. }
        ));
        assert!(matches!(
            opt_plain.groups[0].params[0].moments,
            Moments::Tensor { .. }
        ));

        let (mut p, mut m, mut v) = (
            init.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            vec![0f64; 37],
            vec![0f64; 37],
        );
        for step in 1..=5u64 {
            // loss = Σ w³/3  =>  g = w²
            let cube = |t: &[&Tensor]| (t[0].sqr()? * t[0])?.sum_all()? / 3.0;
            let gf = grads_for(&[&fused], cube);
            let gp = grads_for(&[&plain], cube);
            let (factor, scale) = (0.5 + 0.1 * step as f64, 0.8);
            opt_fused.step(&gf, factor, scale).unwrap();
            opt_plain.step(&gp, factor, scale).unwrap();
            let lr = 0.01 * factor;
            // The update written out per element, in f64.
            for ((p, m), v) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = *p * *p * scale;
                *m = 0.9 * *m + 0.1 * g;
                *v = 0.999 * *v + 0.001 * g * g;
                let mh = *m / (1.0 - 0.9f64.powi(step as i32));
                let vh = *v / (1.0 - 0.999f64.powi(step as i32));
                *p = *p * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
            let fused_vals: Vec<f32> = fused.as_tensor().to_vec1().unwrap();
            let plain_vals: Vec<f64> = plain.as_tensor().to_vec1().unwrap();
            for (i, ((&f, &t), &want)) in fused_vals.iter().zip(&plain_vals).zip(&p).enumerate() {
                assert!((f as f64 - want).abs() < 1e-5, "fused step {step} elem {i}");
                assert!((t - want).abs() < 1e-10, "tensor step {step} elem {i}");
            }
        }
    }

    #[test]
    fn only_parameters_with_gradients_move_and_state_round_trips() {
        let a = Var::from_slice(&[1f32, 2.0, 3.0], (3,), &Device::Cpu).unwrap();
        let b = Var::from_slice(&[4f32, 5.0], (2,), &Device::Cpu).unwrap();
        let groups = vec![
            ParamGroup {
                name: "a".into(),
                lr: 0.1,
                weight_decay: 0.0,
                params: vec![("a".into(), a.clone())],
            },
            ParamGroup {
                name: "b".into(),
                lr: 0.1,
                weight_decay: 0.5,
                params: vec![("b".into(), b.clone())],
            },
        ];
        let mut opt = AdamW::new(groups.clone(), AdamWParams::default()).unwrap();
        let grads = grads_for(&[&a], |t| t[0].sqr()?.sum_all());
        let b_before: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        opt.step(&grads, 1.0, 1.0).unwrap();
        assert_eq!(
            b.as_tensor().to_vec1::<f32>().unwrap(),
            b_before,
            "no gradient: no weight decay either"
        );
        assert_ne!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);

        let state = opt.state_tensors().unwrap();
        assert_eq!(state["a.step"].to_vec1::<f64>().unwrap(), vec![1.0]);
        assert_eq!(state["b.step"].to_vec1::<f64>().unwrap(), vec![0.0]);
        let mut restored = AdamW::new(groups, AdamWParams::default()).unwrap();
        restored.load_state_tensors(&state).unwrap();
        let again = restored.state_tensors().unwrap();
        let as_f64 = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(state.len(), again.len());
        for (k, t) in &state {
            assert_eq!(as_f64(t), as_f64(&again[k]), "{k}");
        }
        let mut missing = state.clone();
        missing.remove("a.exp_avg");
        let err = restored
            .load_state_tensors(&missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.exp_avg is missing"), "{err}");
    }

    #[test]
    fn grad_norm_and_duplicate_names() {
        let a = Var::from_slice(&[3f32, 0.0], (2,), &Device::Cpu).unwrap();
        let b = Var::from_slice(&[0f64, 4.0], (2,), &Device::Cpu).unwrap();
        let opt = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                lr: 1.0,
                weight_decay: 0.0,
                params: vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            }],
            AdamWParams::default(),
        )
        .unwrap();
        // loss = Σ a²/2 + Σ b²/2  =>  grads are a and b: norm 5.
        let grads = ((a.as_tensor().sqr().unwrap().sum_all().unwrap() / 2.0).unwrap()
            + (b.as_tensor().sqr().unwrap().sum_all().unwrap() / 2.0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap())
        .unwrap()
        .backward()
        .unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 5.0).abs() < 1e-6);
        let dup = ParamGroup {
            name: "x".into(),
            lr: 1.0,
            weight_decay: 0.0,
            params: vec![("a".into(), a.clone()), ("a".into(), a)],
        };
        assert!(AdamW::new(vec![dup], AdamWParams::default())
            .unwrap_err()
            .to_string()
            .contains("more than one group"));
    }
}

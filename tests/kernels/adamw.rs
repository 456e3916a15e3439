//! The kernel of `kernels/adamw.cu` (`multi_tensor_adamw`) against the f64
//! reference: several tensors of odd sizes (one element, one block and one
//! more, several blocks) updated together in one launch over three steps, every
//! parameter dtype, f16/bf16 with and without master weights, per-tensor
//! learning rates, weight decay and step counts, a gradient scale, strided
//! gradients and an offset parameter; and the errors for bad input. On the
//! kernel target of the including binary (the host harness in
//! `tests/host_kernels`, a CUDA device in `tests/gpu`).

use crate::common::*;
use candle_core::{DType, Device, Result, Tensor};
use sentence_mtl::ops::adamw::{state_dtype, AdamWConsts, AdamWTensor};
use sentence_mtl::ops::multi_tensor_adamw;
use sentence_mtl::ops::reference::adamw::adamw_step;

const CONSTS: AdamWConsts = AdamWConsts {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    grad_scale: 0.8,
};

/// Shapes of the tensors updated together: one element, odd sizes, exactly one
/// block (4096) and one more, several blocks.
const SHAPES: [&[usize]; 5] = [&[1], &[33, 5], &[4097], &[4096], &[3, 3001]];

/// One tensor's state on the device and the reference's f64 copy of it.
struct Slot {
    param: Tensor,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
    want: [Vec<f64>; 3],
    lr: f64,
    weight_decay: f64,
    step: u64,
}

#[test]
fn kernel_matches_the_reference_over_three_steps() -> Result<()> {
    let Some(target) = crate::kernel_target("kernel_matches_the_reference_over_three_steps") else {
        return Ok(());
    };
    let device = target.device();
    for (d, dtype) in FLOAT_DTYPES.into_iter().enumerate() {
        let mut rng = rng(40 + d as u64);
        let state = state_dtype(dtype);
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let mut slots = Vec::new();
        for (i, dims) in SHAPES.iter().enumerate() {
            let param = random_tensor(&mut rng, dims, dtype, &Device::Cpu)?;
            let values0 = values(&param);
            // The second tensor is an offset view into a larger buffer.
            let param = if i == 1 {
                strided_view_on(&param, Strided::Offset, &device)?
            } else {
                param.to_device(&device)?
            };
            let master = (half && i % 2 == 0)
                .then(|| param.to_dtype(DType::F32))
                .transpose()?;
            let zeros = Tensor::zeros(param.dims(), state, &device)?;
            slots.push(Slot {
                param,
                m: zeros.clone(),
                v: zeros.copy()?,
                master,
                want: [
                    values0,
                    vec![0.0; zeros.elem_count()],
                    vec![0.0; zeros.elem_count()],
                ],
                lr: 1e-3 * (1 + i) as f64,
                weight_decay: if i == 3 { 0.0 } else { 0.01 },
                step: i as u64, // different step counts per tensor
            });
        }
        for round in 0..3 {
            let grads: Vec<Tensor> = slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let g = random_tensor(&mut rng, s.param.dims(), dtype, &Device::Cpu)?;
                    // Odd tensors' gradients come transposed (non-contiguous).
                    let kind = if i % 2 == 1 {
                        Strided::Transposed
                    } else {
                        Strided::Contiguous
                    };
                    strided_view_on(&g, kind, &device)
                })
                .collect::<Result<_>>()?;
            for s in &mut slots {
                s.step += 1;
            }
            let updates: Vec<AdamWTensor<'_>> = slots
                .iter()
                .zip(&grads)
                .map(|(s, g)| AdamWTensor {
                    param: &s.param,
                    grad: g,
                    m: &s.m,
                    v: &s.v,
                    master: s.master.as_ref(),
                    lr: s.lr,
                    weight_decay: s.weight_decay,
                    step: s.step,
                })
                .collect();
            target.run(|_| multi_tensor_adamw(&updates, &CONSTS))?;
            for (i, (s, g)) in slots.iter_mut().zip(&grads).enumerate() {
                let [p, m, v] = &s.want;
                let (p, m, v) = adamw_step(
                    (p, &values(g), m, v),
                    (s.lr, s.weight_decay, s.step),
                    &CONSTS,
                );
                let what =
                    |part: &str| format!("{dtype:?} tensor {i} {part} after step {}", round + 1);
                // Moments and master weights are kept in f32 (f64 for f64).
                assert_close(&what("m"), &values(&s.m), &m, state);
                // 1 − β2 rounds to f32 4.7e-5 off 0.001: v's relative error.
                let v_rtol = if state == DType::F32 { 1e-4 } else { 1e-10 };
                assert_close_tol(&what("v"), &values(&s.v), &v, v_rtol, 1e-12);
                match &s.master {
                    Some(master) => {
                        assert_close(&what("master"), &values(master), &p, DType::F32);
                        // The parameter is the master rounded once to its dtype.
                        let rounded = values(&master.to_dtype(dtype)?);
                        assert_eq!(values(&s.param), rounded, "{}", what("param vs master"));
                    }
                    None => assert_close(&what("param"), &values(&s.param), &p, dtype),
                }
                s.want = [p, m, v];
            }
        }
    }
    Ok(())
}

#[test]
fn kernel_gives_clear_errors_for_bad_input() -> Result<()> {
    let Some(target) = crate::kernel_target("kernel_gives_clear_errors_for_bad_input") else {
        return Ok(());
    };
    let device = target.device();
    let p = random_tensor(&mut rng(1), &[4, 3], DType::F32, &device)?;
    let g = random_tensor(&mut rng(2), &[4, 3], DType::F32, &device)?;
    let z = p.zeros_like()?;
    let ok = AdamWTensor {
        param: &p,
        grad: &g,
        m: &z,
        v: &z,
        master: None,
        lr: 1e-3,
        weight_decay: 0.0,
        step: 1,
    };
    let wrong_shape = Tensor::zeros((3, 4), DType::F32, &device)?;
    let wrong_dtype = Tensor::zeros((4, 3), DType::BF16, &device)?;
    let transposed = Tensor::zeros((3, 4), DType::F32, &device)?.t()?;
    let cases = [
        (
            AdamWTensor {
                grad: &wrong_shape,
                ..ok
            },
            "grad has shape [3, 4]",
        ),
        (
            AdamWTensor {
                m: &wrong_dtype,
                ..ok
            },
            "m is BF16, expected F32",
        ),
        (
            AdamWTensor {
                master: Some(&z),
                ..ok
            },
            "master weights are for f16/bf16",
        ),
        (
            AdamWTensor {
                param: &transposed,
                grad: &transposed,
                m: &transposed,
                v: &transposed,
                ..ok
            },
            "param must be contiguous",
        ),
        (AdamWTensor { step: 0, ..ok }, "step must be >= 1"),
        (AdamWTensor { lr: f64::NAN, ..ok }, "must be finite"),
    ];
    for (case, want) in cases {
        let err = target
            .run(|_| multi_tensor_adamw(&[ok, case], &CONSTS))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor 1") && err.contains(want),
            "{want}: {err}"
        );
    }
    let bad_consts = AdamWConsts {
        eps: f64::INFINITY,
        ..CONSTS
    };
    let err = target
        .run(|_| multi_tensor_adamw(&[ok], &bad_consts))
        .unwrap_err()
        .to_string();
    assert!(err.contains("eps is inf"), "{err}");
    if target.is_host() {
        // Outside the harness a CPU tensor has no kernel to run on.
        let err = multi_tensor_adamw(&[ok], &CONSTS).unwrap_err().to_string();
        assert!(err.contains("runs on a CUDA device"), "{err}");
    }
    // Nothing was updated by a failed call.
    assert_eq!(values(&z), vec![0.0; 12]);
    Ok(())
}

/// The trainer's optimiser on the kernel path (a CUDA device, or the CPU
/// inside the host harness): two groups, f32 and bf16 parameters (the bf16
/// one with f32 master weights), one launch per dtype and step, against the
/// f64 formula; its saved state restores into a fresh optimiser that then
/// takes the same step.
#[test]
fn optimiser_uses_the_kernel_and_keeps_master_weights() -> Result<()> {
    use sentence_mtl::train::optim::{AdamW, AdamWParams, ParamGroup};
    let Some(target) = crate::kernel_target("optimiser_uses_the_kernel_and_keeps_master_weights")
    else {
        return Ok(());
    };
    let device = target.device();
    let init: Vec<f64> = (0..37)
        .map(|i| ((i * 7919) % 97) as f64 / 50.0 - 1.0)
        .collect();
    let var = |dtype: DType| -> Result<candle_core::Var> {
        candle_core::Var::from_tensor(&Tensor::new(init.as_slice(), &device)?.to_dtype(dtype)?)
    };
    let (w32, w16) = (var(DType::F32)?, var(DType::BF16)?);
    let groups = || {
        vec![
            ParamGroup {
                name: "a".into(),
                lr: 0.01,
                weight_decay: 0.1,
                params: vec![("w32".into(), w32.clone())],
            },
            ParamGroup {
                name: "b".into(),
                lr: 0.02,
                weight_decay: 0.0,
                params: vec![("w16".into(), w16.clone())],
            },
        ]
    };
    let mut opt = target.run(|_| AdamW::new(groups(), AdamWParams::default()))?;
    // The f64 formula, per group: (parameter, m, v).
    let mut want = [
        (values(w32.as_tensor()), vec![0.0; 37], vec![0.0; 37]),
        (values(w16.as_tensor()), vec![0.0; 37], vec![0.0; 37]),
    ];
    let consts = AdamWConsts {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        grad_scale: 0.8,
    };
    let cube = |t: &Tensor| t.sqr()?.mul(t);
    for step in 1..=3u64 {
        // loss = Σ w³/3 over both  =>  g = w² (of the values each holds)
        let loss = ((cube(w32.as_tensor())?.sum_all()?
            + cube(&w16.as_tensor().to_dtype(DType::F32)?)?.sum_all()?)?
            / 3.0)?;
        let grads = loss.backward()?;
        let factor = 0.5 + 0.1 * step as f64;
        let g16 = values(grads.get(w16.as_tensor()).expect("bf16 gradient"));
        let g32 = values(grads.get(w32.as_tensor()).expect("f32 gradient"));
        target.run(|_| opt.step(&grads, factor, consts.grad_scale))?;
        for (k, (g, lr, wd)) in [(g32, 0.01, 0.1), (g16, 0.02, 0.0)].into_iter().enumerate() {
            let (p, m, v) = &want[k];
            want[k] = adamw_step((p, &g, m, v), (lr * factor, wd, step), &consts);
        }
        assert_close(
            &format!("f32 step {step}"),
            &values(w32.as_tensor()),
            &want[0].0,
            DType::F32,
        );
        // bf16 keeps f32 masters: the parameter is the formula's value rounded
        // once, however small the updates (without masters they would be lost).
        let rounded =
            values(&Tensor::new(want[1].0.as_slice(), &Device::Cpu)?.to_dtype(DType::BF16)?);
        let got = values(w16.as_tensor());
        let off = got.iter().zip(&rounded).filter(|(a, b)| a != b).count();
        assert!(
            off <= 2,
            "bf16 step {step}: {off} of 37 differ from the rounded formula: {got:?} vs {rounded:?}"
        );
    }
    // Save, restore into a fresh optimiser, and both take the same fourth step.
    let state = opt.state_tensors()?;
    let mut again = target.run(|_| AdamW::new(groups(), AdamWParams::default()))?;
    again.load_state_tensors(&state)?;
    let (before32, before16) = (w32.as_tensor().copy()?, w16.as_tensor().copy()?);
    let loss =
        ((w32.as_tensor().sum_all()? + w16.as_tensor().to_dtype(DType::F32)?.sum_all()?)? * 1.0)?;
    let grads = loss.backward()?;
    target.run(|_| opt.step(&grads, 1.0, 1.0))?;
    let (after32, after16) = (values(w32.as_tensor()), values(w16.as_tensor()));
    w32.set(&before32)?;
    w16.set(&before16)?;
    target.run(|_| again.step(&grads, 1.0, 1.0))?;
    assert_eq!(values(w32.as_tensor()), after32, "restored f32 step");
    assert_eq!(
        values(w16.as_tensor()),
        after16,
        "restored bf16 step (masters saved)"
    );
    Ok(())
}

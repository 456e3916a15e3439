//! Kernel tests of packed attention (`attention_packed`,
//! `attention_packed_seeded`) and of padded `attention`, which takes the same
//! kernels for right-padded masks: the kernels of `kernels/attention.cu`, forward
//! and backward, against the fused CPU op on the same inputs (f16 and bf16
//! against the CPU op in f32 on the same rounded values), with poisoned
//! allocations so that an element the kernels fail to write shows. In-kernel
//! dropout is checked against the CPU op fed `packed_dropout_mask` for the same
//! seed. They run on the kernel target of the binary that includes them: the
//! host harness (`tests/host_kernels`) or a CUDA device (`tests/gpu`).

use crate::common;

use crate::common::{random_tensor, rng, strided_view, values, KernelTarget, Strided};
use candle_core::{DType, Device, Result, Tensor, Var};
use sentence_mtl::ops::attention::{
    attention, attention_packed, attention_packed_seeded, packed_dropout_mask, SeededDropout,
};

/// One packed attention problem.
#[derive(Debug, Clone)]
struct Case {
    lengths: Vec<usize>,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    layout: Strided,
    dropout: Option<SeededDropout>,
}

/// Inputs drawn once on the CPU: qkv `[N, 3H]` and the loss weights `[N, H]`,
/// both rounded to the case's dtype.
struct Inputs {
    qkv: Tensor,
    weight: Tensor,
}

impl Case {
    fn new(lengths: &[usize], heads: usize, head_dim: usize, dtype: DType) -> Self {
        Self {
            lengths: lengths.to_vec(),
            heads,
            head_dim,
            dtype,
            layout: Strided::Contiguous,
            dropout: None,
        }
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn inputs(&self, seed: u64) -> Result<Inputs> {
        let mut r = rng(seed);
        let n: usize = self.lengths.iter().sum();
        Ok(Inputs {
            qkv: random_tensor(&mut r, &[n, 3 * self.hidden()], self.dtype, &Device::Cpu)?,
            weight: random_tensor(&mut r, &[n, self.hidden()], self.dtype, &Device::Cpu)?,
        })
    }

    /// The fused CPU op (f32 for f16/bf16 inputs) with the dropout mask the
    /// kernels draw: (out, d qkv) as f64.
    fn cpu(&self, inputs: &Inputs) -> Result<(Vec<f64>, Vec<f64>)> {
        let dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let var = Var::from_tensor(&inputs.qkv.to_dtype(dtype)?)?;
        let mask = self
            .dropout
            .map(|d| packed_dropout_mask(&self.lengths, self.heads, d, dtype, &Device::Cpu))
            .transpose()?;
        let out = attention_packed(var.as_tensor(), &self.lengths, self.heads, mask.as_ref())?;
        let grads = (&out * inputs.weight.to_dtype(dtype)?)?
            .sum_all()?
            .backward()?;
        let grad = grads.get(var.as_tensor()).expect("gradient of qkv");
        Ok((values(&out), values(grad)))
    }

    /// The kernels on `target`: (out, d qkv) as f64.
    fn kernels(&self, target: &KernelTarget, inputs: &Inputs) -> Result<(Vec<f64>, Vec<f64>)> {
        target.run(|device| {
            common::poison_device(device)?;
            let var = Var::from_tensor(&inputs.qkv.to_device(device)?)?;
            let qkv = strided_view(var.as_tensor(), self.layout)?;
            let out = attention_packed_seeded(&qkv, &self.lengths, self.heads, self.dropout)?;
            let grads = (&out * inputs.weight.to_device(device)?)?
                .sum_all()?
                .backward()?;
            let grad = grads.get(var.as_tensor()).expect("gradient of qkv");
            Ok((values(&out), values(grad)))
        })
    }

    fn what(&self) -> String {
        format!(
            "lengths {:?}, {} heads × {}, {:?}, {:?}, dropout {:?}",
            self.lengths, self.heads, self.head_dim, self.dtype, self.layout, self.dropout
        )
    }
}

/// Relative tolerance of the kernels against the CPU op, per dtype: f32 and
/// f64 to their rounding (the sums run in another order), f16/bf16 to the
/// rounding of the output (and of O in rowsum(dO∘O)).
fn rtol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        other => panic!("no tolerance for {other:?}"),
    }
}

/// `|got − want| ≤ rtol·(|want| + max|want|)`: relative to the tensor's scale,
/// as an output element or gradient that is a sum of signed terms can be near 0.
fn assert_matches(what: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zeros");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= rtol * (w.abs() + scale),
            "{what}: element {i} is {g}, want {w} (scale {scale:.3e}, rtol {rtol:.0e})"
        );
    }
}

fn check(target: &KernelTarget, case: &Case, seed: u64) -> Result<()> {
    let inputs = case.inputs(seed)?;
    let (cpu_out, cpu_grad) = case.cpu(&inputs)?;
    let (out, grad) = case.kernels(target, &inputs)?;
    let what = case.what();
    let tol = rtol(case.dtype);
    assert_matches(&format!("{what} forward"), &out, &cpu_out, tol);
    assert_matches(&format!("{what} backward"), &grad, &cpu_grad, tol);
    Ok(())
}

/// Every dtype on sentences of uneven lengths (1 token, several query and key
/// tiles), head sizes 32 and 64, 2 to 12 heads.
#[test]
fn kernels_match_cpu_forward_and_backward() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_match_cpu_forward_and_backward") else {
        return Ok(());
    };
    let shapes: [(&[usize], usize, usize); 3] = [
        (&[1, 5, 17, 64], 2, 32),
        (&[9, 40, 3], 3, 64),
        (&[6, 11], 12, 32),
    ];
    let mut seed = 100;
    for dtype in common::FLOAT_DTYPES {
        for (lengths, heads, head_dim) in shapes {
            seed += 1;
            check(&target, &Case::new(lengths, heads, head_dim, dtype), seed)?;
        }
    }
    Ok(())
}

/// A sentence longer than four key tiles and several query tiles, and head
/// size 128 (not in f64: no kernel).
#[test]
fn kernels_match_cpu_on_long_sentences_and_wide_heads() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_match_cpu_on_long_sentences_and_wide_heads")
    else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        check(&target, &Case::new(&[130, 2], 1, 64, dtype), 200)?;
        check(&target, &Case::new(&[3, 33], 1, 128, dtype), 201)?;
    }
    check(&target, &Case::new(&[33, 7], 2, 128, DType::F16), 202)?;
    Ok(())
}

/// qkv with row offsets, rows wider than 3H (a narrow: read in place) and a
/// transposed layout (copied first): the same results.
#[test]
fn kernels_take_strided_qkv() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_take_strided_qkv") else {
        return Ok(());
    };
    for (i, layout) in [Strided::Offset, Strided::PaddedRows, Strided::Transposed]
        .into_iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::F16] {
            let mut case = Case::new(&[4, 19, 1], 2, 32, dtype);
            case.layout = layout;
            check(&target, &case, 300 + i as u64)?;
        }
    }
    Ok(())
}

/// The kernels' dropout is the multiplier `packed_dropout_mask` gives: the CPU
/// op fed that mask computes the same forward and backward.
#[test]
fn kernel_dropout_matches_cpu_with_the_same_mask() -> Result<()> {
    let Some(target) = crate::kernel_target("kernel_dropout_matches_cpu_with_the_same_mask") else {
        return Ok(());
    };
    for (i, dtype) in [DType::F32, DType::BF16, DType::F64]
        .into_iter()
        .enumerate()
    {
        let mut case = Case::new(&[5, 40, 17], 3, 32, dtype);
        case.dropout = Some(SeededDropout {
            p: 0.25,
            seed: 7 + i as u64,
        });
        check(&target, &case, 400 + i as u64)?;
    }
    let mut case = Case::new(&[33, 2], 2, 64, DType::F32);
    case.layout = Strided::PaddedRows;
    case.dropout = Some(SeededDropout { p: 0.1, seed: 99 });
    check(&target, &case, 410)
}

/// Same seed, same outputs and gradients to the bit (the kernels are
/// deterministic: no atomics); another seed, other outputs; p = 0, no dropout.
#[test]
fn kernel_dropout_repeats_for_a_seed() -> Result<()> {
    let Some(target) = crate::kernel_target("kernel_dropout_repeats_for_a_seed") else {
        return Ok(());
    };
    let mut case = Case::new(&[12, 30], 2, 32, DType::F32);
    let inputs = case.inputs(500)?;
    let no_dropout = case.kernels(&target, &inputs)?;
    case.dropout = Some(SeededDropout { p: 0.2, seed: 1 });
    let first = case.kernels(&target, &inputs)?;
    let again = case.kernels(&target, &inputs)?;
    assert_eq!(first, again, "the same seed gave other results");
    case.dropout = Some(SeededDropout { p: 0.2, seed: 2 });
    let other = case.kernels(&target, &inputs)?;
    let differ = first.0.iter().zip(&other.0).filter(|(a, b)| a != b).count();
    assert!(
        differ > first.0.len() / 2,
        "another seed changed only {differ} of {} outputs",
        first.0.len()
    );
    assert_ne!(first.0, no_dropout.0, "dropout changed nothing");
    case.dropout = Some(SeededDropout { p: 0.0, seed: 3 });
    assert_eq!(
        case.kernels(&target, &inputs)?,
        no_dropout,
        "p = 0 is not a no-op"
    );
    Ok(())
}

/// Bad input on the kernel path is an `Err` naming the problem.
#[test]
fn kernels_reject_bad_inputs() -> Result<()> {
    let Some(target) = crate::kernel_target("kernels_reject_bad_inputs") else {
        return Ok(());
    };
    let device = target.device();
    let err = |r: Result<Tensor>| r.expect_err("bad input accepted").to_string();
    // Head size 16: no kernel.
    let qkv = Tensor::ones((7, 3 * 32), DType::F32, &device)?;
    let message = target.run(|_| err(attention_packed(&qkv, &[7], 2, None)));
    assert!(message.contains("head sizes 32, 64 and 128"), "{message}");
    // Head size 128 in f64: no kernel either.
    let qkv = Tensor::ones((7, 3 * 128), DType::F64, &device)?;
    let message = target.run(|_| err(attention_packed(&qkv, &[7], 1, None)));
    assert!(message.contains("got 128 in F64"), "{message}");
    let qkv = Tensor::ones((7, 3 * 64), DType::F32, &device)?;
    // A multiplier tensor: the kernels draw their own.
    let drop = Tensor::ones(2 * 49, DType::F32, &device)?;
    let message = target.run(|_| err(attention_packed(&qkv, &[7], 2, Some(&drop))));
    assert!(message.contains("attention_packed_seeded"), "{message}");
    let message = target.run(|_| err(attention_packed(&qkv, &[3, 3], 2, None)));
    assert!(message.contains("sum to 6"), "{message}");
    for p in [1.0, -0.1, f32::NAN] {
        let dropout = Some(SeededDropout { p, seed: 1 });
        let message = target.run(|_| err(attention_packed_seeded(&qkv, &[7], 2, dropout)));
        assert!(message.contains("dropout probability"), "{message}");
    }
    let ints = qkv.to_dtype(DType::U32)?;
    let message = target.run(|_| err(attention_packed(&ints, &[7], 2, None)));
    assert!(message.contains("U32"), "{message}");
    Ok(())
}

/// A padded batch `[B, T, 3H]` whose mask rows have these real-token counts
/// (right-padded; 0 = all padding), or `left_padded` to put the padding first.
struct PaddedCase {
    real: Vec<usize>,
    len: usize,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    layout: Strided,
    left_padded: bool,
}

impl PaddedCase {
    fn new(real: &[usize], len: usize, heads: usize, head_dim: usize, dtype: DType) -> Self {
        Self {
            real: real.to_vec(),
            len,
            heads,
            head_dim,
            dtype,
            layout: Strided::Contiguous,
            left_padded: false,
        }
    }

    fn mask(&self) -> Result<Tensor> {
        let rows: Vec<u32> = self
            .real
            .iter()
            .flat_map(|&r| {
                (0..self.len).map(move |t| {
                    let real = if self.left_padded {
                        t >= self.len - r
                    } else {
                        t < r
                    };
                    u32::from(real)
                })
            })
            .collect();
        Tensor::from_vec(rows, (self.real.len(), self.len), &Device::Cpu)
    }

    /// (qkv, loss weights over every row, padding queries included), rounded
    /// to the case's dtype.
    fn inputs(&self, seed: u64) -> Result<(Tensor, Tensor)> {
        let mut r = rng(seed);
        let (b, t, h) = (self.real.len(), self.len, self.heads * self.head_dim);
        Ok((
            random_tensor(&mut r, &[b, t, 3 * h], self.dtype, &Device::Cpu)?,
            random_tensor(&mut r, &[b, t, h], self.dtype, &Device::Cpu)?,
        ))
    }

    /// `attention` on `device` (inside the kernel target, or the plain CPU):
    /// (out, d qkv) as f64.
    fn run(&self, device: &Device, qkv: &Tensor, weight: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
        let var = Var::from_tensor(&qkv.to_device(device)?)?;
        let view = strided_view(var.as_tensor(), self.layout)?;
        let out = attention(&view, &self.mask()?.to_device(device)?, self.heads, None)?;
        let grads = (&out * weight.to_device(device)?)?.sum_all()?.backward()?;
        let grad = grads.get(var.as_tensor()).expect("gradient of qkv");
        Ok((values(&out), values(grad)))
    }

    fn check(&self, target: &KernelTarget, seed: u64) -> Result<()> {
        let (qkv, weight) = self.inputs(seed)?;
        // The fused CPU op, in f32 on the rounded values for f16/bf16.
        let cpu = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let (want_out, want_grad) =
            self.run(&Device::Cpu, &qkv.to_dtype(cpu)?, &weight.to_dtype(cpu)?)?;
        let (out, grad) = target.run(|device| {
            common::poison_device(device)?;
            self.run(device, &qkv, &weight)
        })?;
        let what = format!(
            "padded: real {:?} of {}, {} heads × {}, {:?}, {:?}, left-padded {}",
            self.real,
            self.len,
            self.heads,
            self.head_dim,
            self.dtype,
            self.layout,
            self.left_padded
        );
        let tol = rtol(self.dtype);
        assert_matches(&format!("{what} forward"), &out, &want_out, tol);
        assert_matches(&format!("{what} backward"), &grad, &want_grad, tol);
        Ok(())
    }
}

/// Padded `attention` on the kernel target gives the CPU op's outputs and
/// gradients for right-padded masks in every dtype: one-token rows, an
/// all-padding row (it attends to every position), rows across key tiles,
/// padding queries (their outputs and dQ count too) and strided qkv; and so do
/// its other paths there (left padding, head size 16).
#[test]
fn padded_attention_matches_cpu() -> Result<()> {
    let Some(target) = crate::kernel_target("padded_attention_matches_cpu") else {
        return Ok(());
    };
    let mut seed = 600;
    for dtype in common::FLOAT_DTYPES {
        seed += 1;
        PaddedCase::new(&[5, 1, 0, 37], 37, 2, 32, dtype).check(&target, seed)?;
        seed += 1;
        PaddedCase::new(&[70, 33, 2], 70, 3, 64, dtype).check(&target, seed)?;
    }
    for layout in [Strided::Offset, Strided::PaddedRows, Strided::Transposed] {
        let mut case = PaddedCase::new(&[9, 0, 4], 12, 2, 32, DType::F32);
        case.layout = layout;
        case.check(&target, 610)?;
    }
    let mut left = PaddedCase::new(&[9, 3, 0], 12, 2, 32, DType::F32);
    left.left_padded = true;
    left.check(&target, 611)?;
    PaddedCase::new(&[9, 3, 0], 12, 2, 16, DType::F32).check(&target, 612)
}

/// The padded op really runs the packed kernels for a right-padded mask: each
/// row's real tokens get, to the bit, what `attention_packed` gives the real
/// tokens alone (the same kernel over the same keys in the same order), and
/// the padding keys get gradient exactly 0.
#[test]
fn padded_attention_runs_the_packed_kernels() -> Result<()> {
    let Some(target) = crate::kernel_target("padded_attention_runs_the_packed_kernels") else {
        return Ok(());
    };
    let case = PaddedCase::new(&[7, 40, 1], 40, 2, 32, DType::F32);
    let (qkv, _) = case.inputs(620)?;
    let hidden = case.heads * case.head_dim;
    let real_rows = |t: &Tensor| -> Result<Tensor> {
        let rows: Vec<Tensor> = case
            .real
            .iter()
            .enumerate()
            .map(|(b, &r)| t.get(b)?.narrow(0, 0, r))
            .collect::<Result<_>>()?;
        Tensor::cat(&rows, 0)
    };
    let (padded, packed, dqkv) = target.run(|device| -> Result<_> {
        let var = Var::from_tensor(&qkv.to_device(device)?)?;
        let mask = case.mask()?.to_device(device)?;
        let out = attention(var.as_tensor(), &mask, case.heads, None)?;
        let grad = out.sum_all()?.backward()?;
        let dqkv = grad.get(var.as_tensor()).expect("gradient of qkv").clone();
        let packed = attention_packed(
            &real_rows(&qkv.to_device(device)?)?,
            &case.real,
            case.heads,
            None,
        )?;
        Ok((
            values(&real_rows(&out)?),
            values(&packed),
            dqkv.to_device(&Device::Cpu)?,
        ))
    })?;
    assert_eq!(
        padded, packed,
        "the real rows differ from the packed kernels'"
    );
    for (b, &r) in case.real.iter().enumerate() {
        let keys_and_values =
            dqkv.get(b)?
                .narrow(0, r, case.len - r)?
                .narrow(1, hidden, 2 * hidden)?;
        let nonzero = values(&keys_and_values)
            .iter()
            .filter(|&&g| g != 0.0)
            .count();
        assert_eq!(nonzero, 0, "row {b}: padding keys got a gradient");
    }
    Ok(())
}

//! `ops::attention` (fused multi-head self-attention on a `[B, T, 3H]`
//! query-key-value tensor) against the same computation composed from candle
//! ops in f64: outputs and the gradient of the input, every dtype, contiguous
//! and strided inputs, odd sizes, masks with padding, holes and no real token,
//! with and without a dropout multiplier; a finite-difference check of the
//! fused backward; padding keys that cannot leak; and bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use common::{random_tensor, rng, strided_view, values, FLOAT_DTYPES, STRIDED_KINDS};
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::attention::{attention, attention_composed};

/// (batch, tokens, heads, head_size): one token, one head, head sizes that are
/// not multiples of 8, and MiniLM's 12 × 32.
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1),
    (2, 7, 3, 5),
    (3, 17, 2, 13),
    (1, 40, 1, 64),
    (4, 9, 4, 8),
    (2, 33, 12, 32),
];

/// A `[B, T]` mask: row 0 all real, row 1 (if any) all padding, row 2 with a
/// hole, the rest right-padded at random lengths.
fn mask(r: &mut StdRng, batch: usize, len: usize) -> Result<Tensor> {
    let mut m = vec![0u32; batch * len];
    for b in 0..batch {
        let row = &mut m[b * len..(b + 1) * len];
        match b {
            0 => row.fill(1),
            1 => {}
            2 => {
                row.fill(1);
                row[len / 2] = 0;
            }
            _ => {
                let real = r.random_range(1..=len);
                row[..real].fill(1);
            }
        }
    }
    Tensor::from_vec(m, (batch, len), &Device::Cpu)
}

/// A dropout multiplier of `[B, heads, T, T]`: 0 with probability 0.2, 1.25 otherwise.
fn dropout(r: &mut StdRng, dims: (usize, usize, usize), dtype: DType) -> Result<Tensor> {
    let (batch, heads, len) = dims;
    let v: Vec<f64> = (0..batch * heads * len * len)
        .map(|_| if r.random_bool(0.2) { 0.0 } else { 1.25 })
        .collect();
    Tensor::from_vec(v, (batch, heads, len, len), &Device::Cpu)?.to_dtype(dtype)
}

/// The plainest softmax: the reference side, in f64 (shifted by the row
/// maximum: a row of padding only would otherwise be 0/0).
fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let exp = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Relative tolerance, and absolute tolerance relative to the largest value,
/// for results that pass through two products and a softmax in `dtype`.
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-11),
        DType::F32 => (2e-5, 2e-6),
        DType::F16 => (1e-2, 5e-3),
        DType::BF16 => (5e-2, 3e-2),
        other => panic!("no tolerance for {other:?}"),
    }
}

fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let want = values(want);
    let largest = want.iter().fold(1f64, |m, w| m.max(w.abs()));
    let (r, a) = tolerance(dtype);
    common::assert_close_tol(what, &values(got), &want, r, a * largest);
}

#[test]
fn matches_the_composed_reference_with_gradients() -> Result<()> {
    let mut r = rng(21);
    for (batch, len, heads, head_size) in SHAPES {
        let hidden = heads * head_size;
        let qkv =
            (random_tensor(&mut r, &[batch, len, 3 * hidden], DType::F64, &Device::Cpu)? * 1.5)?;
        let key_mask = mask(&mut r, batch, len)?;
        for dtype in FLOAT_DTYPES {
            for with_dropout in [false, true] {
                let drop = dropout(&mut r, (batch, heads, len), dtype)?;
                let drop = with_dropout.then_some(&drop);
                for kind in STRIDED_KINDS {
                    let what = format!(
                        "attention {dtype:?} {kind:?} B={batch} T={len} heads={heads} \
                         head_size={head_size} dropout={with_dropout}"
                    );
                    let ours = Var::from_tensor(&qkv.to_dtype(dtype)?)?;
                    let reference = Var::from_tensor(&ours.as_tensor().to_dtype(DType::F64)?)?;
                    let input = strided_view(ours.as_tensor(), kind)?;
                    let y = attention(&input, &key_mask, heads, drop)?;
                    let drop64 = drop.map(|d| d.to_dtype(DType::F64)).transpose()?;
                    let y_ref = attention_composed(
                        reference.as_tensor(),
                        &key_mask,
                        heads,
                        drop64.as_ref(),
                        softmax_reference,
                    )?;
                    assert_eq!(y.dims(), [batch, len, hidden], "{what}: shape");
                    assert_eq!(y.dtype(), dtype, "{what}: dtype");
                    check(&format!("{what} forward"), &y, &y_ref, dtype);

                    let w = random_tensor(&mut rng(9), y.dims(), dtype, &Device::Cpu)?
                        .to_dtype(DType::F64)?;
                    let grads = (y.to_dtype(DType::F64)? * &w)?.sum_all()?.backward()?;
                    let grads_ref = (y_ref * &w)?.sum_all()?.backward()?;
                    let g = grads.get(&ours).expect("a gradient reaches the Var");
                    let g_ref = grads_ref.get(&reference).expect("reference gradient");
                    check(&format!("{what} d/d qkv"), g, g_ref, dtype);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn backward_matches_finite_differences_in_f64() -> Result<()> {
    let mut r = rng(22);
    let (batch, len, heads, head_size) = (3, 5, 2, 3);
    let qkv = random_tensor(
        &mut r,
        &[batch, len, 3 * heads * head_size],
        DType::F64,
        &Device::Cpu,
    )?;
    let key_mask = mask(&mut r, batch, len)?;
    let drop = dropout(&mut r, (batch, heads, len), DType::F64)?;
    let w = random_tensor(
        &mut r,
        &[batch, len, heads * head_size],
        DType::F64,
        &Device::Cpu,
    )?;
    for drop in [None, Some(&drop)] {
        let loss = |x: &Tensor| -> Result<f64> {
            (attention(x, &key_mask, heads, drop)? * &w)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let var = Var::from_tensor(&qkv)?;
        let grads = (attention(var.as_tensor(), &key_mask, heads, drop)? * &w)?
            .sum_all()?
            .backward()?;
        let analytic = values(grads.get(&var).expect("gradient"));
        let x0 = values(&qkv);
        let h = 1e-6;
        for (i, &a) in analytic.iter().enumerate() {
            let mut plus = x0.clone();
            plus[i] += h;
            let mut minus = x0.clone();
            minus[i] -= h;
            let shape = qkv.shape();
            let numeric = (loss(&Tensor::from_vec(plus, shape, &Device::Cpu)?)?
                - loss(&Tensor::from_vec(minus, shape, &Device::Cpu)?)?)
                / (2.0 * h);
            assert!(
                (numeric - a).abs() <= 1e-7 + 1e-6 * numeric.abs(),
                "element {i} (dropout {}): analytic {a}, numeric {numeric}",
                drop.is_some()
            );
        }
    }
    Ok(())
}

#[test]
fn padding_keys_never_reach_real_tokens() -> Result<()> {
    // Changing what sits at padding positions leaves every real token's output
    // bit-identical: padding gets weight exactly 0, not a small one.
    let mut r = rng(23);
    let (batch, len, heads, head_size) = (2, 12, 3, 7);
    let hidden = heads * head_size;
    let mask = Tensor::from_vec(
        [vec![1u8; 5], vec![0; 7], vec![1; 12]].concat(),
        (batch, len),
        &Device::Cpu,
    )?;
    let qkv = random_tensor(&mut r, &[batch, len, 3 * hidden], DType::F32, &Device::Cpu)?;
    let noise =
        (random_tensor(&mut r, &[batch, len, 3 * hidden], DType::F32, &Device::Cpu)? * 100.0)?;
    let keep = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let changed = (&qkv + noise.broadcast_mul(&(1.0 - keep)?)?)?;
    let y = attention(&qkv, &mask, heads, None)?.narrow(1, 0, 5)?;
    let y_changed = attention(&changed, &mask, heads, None)?.narrow(1, 0, 5)?;
    assert_eq!(
        y.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?,
        y_changed.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?
    );
    // And a sentence alone gives what it gives inside the batch.
    let alone = attention(
        &qkv.narrow(0, 0, 1)?.narrow(1, 0, 5)?,
        &mask.narrow(0, 0, 1)?.narrow(1, 0, 5)?,
        heads,
        None,
    )?;
    let batched = values(&y.narrow(0, 0, 1)?);
    common::assert_close_tol("alone vs batched", &values(&alone), &batched, 1e-6, 1e-7);
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let qkv = Tensor::ones((2, 5, 12), DType::F32, &dev)?;
    let mask = Tensor::ones((2, 5), DType::U32, &dev)?;
    let expect_err = |r: Result<Tensor>, needle: &str| {
        let e = r.expect_err("bad input accepted").to_string();
        assert!(
            e.contains(needle),
            "error {e:?} does not mention {needle:?}"
        );
    };
    expect_err(
        attention(&qkv.flatten_to(1)?, &mask, 2, None),
        "qkv must have rank 3",
    );
    expect_err(attention(&qkv, &mask, 0, None), "3·heads·head_size");
    expect_err(attention(&qkv, &mask, 3, None), "3·heads·head_size");
    expect_err(
        attention(&qkv, &mask.narrow(1, 0, 4)?, 2, None),
        "key_mask must have shape [2, 5]",
    );
    expect_err(
        attention(&qkv.to_dtype(DType::U32)?, &mask, 2, None),
        "unsupported dtype",
    );
    let drop = Tensor::ones((2, 2, 5, 5), DType::F32, &dev)?;
    expect_err(
        attention(&qkv, &mask, 2, Some(&drop.narrow(3, 0, 4)?)),
        "dropout must have shape [2, 2, 5, 5]",
    );
    expect_err(
        attention(&qkv, &mask, 2, Some(&drop.to_dtype(DType::F64)?)),
        "same dtype",
    );
    // A good call, for contrast.
    assert_eq!(attention(&qkv, &mask, 2, Some(&drop))?.dims(), [2, 5, 4]);
    Ok(())
}

#[test]
fn packed_sentences_match_the_padded_batch() -> Result<()> {
    // The same right-padded batch both ways: packed rows (real tokens only)
    // give the padded op's outputs at the real tokens, and the same gradients,
    // with dropout too (each sentence's multiplier is the padded one's
    // top-left block).
    let mut r = rng(24);
    for (batch, len, heads, head_size) in [(1, 1, 1, 1), (3, 9, 2, 5), (4, 33, 12, 32)] {
        let hidden = heads * head_size;
        let lengths: Vec<usize> = (0..batch)
            .map(|b| if b == 0 { len } else { r.random_range(1..=len) })
            .collect();
        let mask: Vec<u32> = lengths
            .iter()
            .flat_map(|&l| (0..len).map(move |t| u32::from(t < l)))
            .collect();
        let mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu)?;
        let real: Vec<u32> = (0..batch * len)
            .filter(|&i| i % len < lengths[i / len])
            .map(|i| i as u32)
            .collect();
        let real = Tensor::new(real.as_slice(), &Device::Cpu)?;
        for dtype in [DType::F32, DType::F64] {
            let padded_drop = dropout(&mut r, (batch, heads, len), dtype)?;
            let mut blocks = Vec::new();
            for (b, &l) in lengths.iter().enumerate() {
                for h in 0..heads {
                    let block = padded_drop
                        .get(b)?
                        .get(h)?
                        .narrow(0, 0, l)?
                        .narrow(1, 0, l)?;
                    blocks.push(block.flatten_all()?);
                }
            }
            let packed_drop = Tensor::cat(&blocks, 0)?;
            for drop in [None, Some((&padded_drop, &packed_drop))] {
                let what = format!("{dtype:?} B={batch} T={len} dropout={}", drop.is_some());
                let qkv = Var::from_tensor(
                    &random_tensor(&mut r, &[batch, len, 3 * hidden], DType::F64, &Device::Cpu)?
                        .to_dtype(dtype)?,
                )?;
                let y = attention(qkv.as_tensor(), &mask, heads, drop.map(|d| d.0))?
                    .reshape((batch * len, hidden))?
                    .index_select(&real, 0)?;
                let packed_in = qkv
                    .as_tensor()
                    .reshape((batch * len, 3 * hidden))?
                    .index_select(&real, 0)?;
                let y_packed = sentence_mtl::ops::attention::attention_packed(
                    &packed_in,
                    &lengths,
                    heads,
                    drop.map(|d| d.1),
                )?;
                let (rt, at) = tolerance(dtype);
                common::assert_close_tol(
                    &format!("{what} forward"),
                    &values(&y_packed),
                    &values(&y),
                    rt,
                    at,
                );
                let w = random_tensor(&mut r, y.dims(), dtype, &Device::Cpu)?;
                let g = (y * &w)?.sum_all()?.backward()?;
                let g_packed = (y_packed * &w)?.sum_all()?.backward()?;
                common::assert_close_tol(
                    &format!("{what} d/d qkv"),
                    &values(g_packed.get(&qkv).expect("packed gradient")),
                    &values(g.get(&qkv).expect("padded gradient")),
                    rt,
                    at,
                );
            }
        }
    }
    Ok(())
}

#[test]
fn packed_bad_input_is_an_error() -> Result<()> {
    use sentence_mtl::ops::attention::attention_packed;
    let qkv = Tensor::ones((7, 12), DType::F32, &Device::Cpu)?;
    let err = |r: Result<Tensor>| r.expect_err("bad input accepted").to_string();
    assert!(err(attention_packed(&qkv, &[3, 3], 2, None)).contains("sum to 6"));
    assert!(err(attention_packed(&qkv.unsqueeze(0)?, &[7], 2, None)).contains("rank 2"));
    assert!(err(attention_packed(&qkv, &[7], 5, None)).contains("3·heads·head_size"));
    let drop = Tensor::ones(2 * 49, DType::F32, &Device::Cpu)?;
    assert!(err(attention_packed(
        &qkv,
        &[7],
        2,
        Some(&drop.narrow(0, 0, 90)?)
    ))
    .contains("shape [98]"));
    assert!(
        err(attention_packed(&qkv.to_dtype(DType::F16)?, &[7], 2, None)).contains("f32 or f64")
    );
    assert_eq!(
        attention_packed(&qkv, &[3, 4], 2, Some(&drop.narrow(0, 0, 50)?))?.dims(),
        [7, 4]
    );
    Ok(())
}

/// The seeded dropout's mask: each weight 0 or 1/(1−p), about `p` of them 0,
/// laid out per sentence `[heads, len, len]` as `dropout_multiplier` draws
/// them; a seed repeats its mask, another seed does not; on the CPU
/// `attention_packed_seeded` is `attention_packed` with that mask.
#[test]
fn seeded_dropout_mask_is_the_kernels_multiplier() -> Result<()> {
    use sentence_mtl::ops::attention::{
        attention_packed, attention_packed_seeded, dropout_multiplier, packed_dropout_mask,
        SeededDropout,
    };
    let (lengths, heads) = ([30usize, 1, 47], 3);
    let dropout = SeededDropout { p: 0.3, seed: 5 };
    let mask = packed_dropout_mask(&lengths, heads, dropout, DType::F32, &Device::Cpu)?;
    let values = mask.to_vec1::<f32>()?;
    assert_eq!(values.len(), heads * (30 * 30 + 1 + 47 * 47));
    let scale = (1.0 / (1.0 - 0.3f64)) as f32;
    assert!(values.iter().all(|&v| v == 0.0 || v == scale));
    let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    assert!((dropped - 0.3).abs() < 0.02, "dropped {dropped}");
    // Sentence 2 (rows 31..78), head 1, query 4, key 9.
    let at = heads * (30 * 30 + 1) + 47 * 47 + 4 * 47 + 9;
    assert_eq!(values[at], dropout_multiplier(dropout, 1, 31 + 4, 31 + 9)?);
    let again = packed_dropout_mask(&lengths, heads, dropout, DType::F32, &Device::Cpu)?;
    assert_eq!(again.to_vec1::<f32>()?, values);
    let other = SeededDropout { p: 0.3, seed: 6 };
    let other = packed_dropout_mask(&lengths, heads, other, DType::F32, &Device::Cpu)?;
    assert_ne!(other.to_vec1::<f32>()?, values);
    let none = SeededDropout { p: 0.0, seed: 5 };
    let none = packed_dropout_mask(&lengths, heads, none, DType::F32, &Device::Cpu)?;
    assert!(none.to_vec1::<f32>()?.iter().all(|&v| v == 1.0));
    assert!(packed_dropout_mask(
        &lengths,
        heads,
        SeededDropout { p: 1.0, seed: 1 },
        DType::F32,
        &Device::Cpu
    )
    .is_err());

    let n: usize = lengths.iter().sum();
    let qkv = random_tensor(&mut rng(77), &[n, 3 * heads * 4], DType::F32, &Device::Cpu)?;
    let seeded = attention_packed_seeded(&qkv, &lengths, heads, Some(dropout))?;
    let masked = attention_packed(&qkv, &lengths, heads, Some(&mask))?;
    assert_eq!(seeded.to_vec2::<f32>()?, masked.to_vec2::<f32>()?);
    Ok(())
}

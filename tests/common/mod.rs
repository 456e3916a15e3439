//! Helpers shared by the integration tests: random inputs, strided views of them,
//! dtype-fitting tolerances, and the CUDA device (or a clean skip).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod ce_heads;
mod shared;
#[allow(unused_imports)] // only the test files that read shared/ use it
pub use shared::shared_dir;

pub const FLOAT_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale), never all zero.
pub fn random_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A random tensor of `dtype`, drawn in f64 and rounded once to `dtype`.
pub fn random_tensor(
    rng: &mut StdRng,
    dims: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_vec(random_values(rng, n, 2.0), dims, device)?.to_dtype(dtype)
}

/// The tensor's values as f64, row-major (exactly what the op saw, after rounding).
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64 vec")
}

/// Ways to present the same values through a non-contiguous layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strided {
    /// The tensor itself.
    Contiguous,
    /// A `narrow` of a larger tensor: non-zero start offset, contiguous rows.
    Offset,
    /// Rows padded with extra columns then narrowed: row stride > row length.
    PaddedRows,
    /// The transpose of a contiguous transpose: unit stride on the first dim.
    Transposed,
}

pub const STRIDED_KINDS: [Strided; 4] = [
    Strided::Contiguous,
    Strided::Offset,
    Strided::PaddedRows,
    Strided::Transposed,
];

/// A view with the same values as `t` (rank >= 1) but the layout `kind`.
pub fn strided_view(t: &Tensor, kind: Strided) -> Result<Tensor> {
    let rank = t.rank();
    let last = rank - 1;
    match kind {
        Strided::Contiguous => Ok(t.clone()),
        Strided::Offset => {
            let pad = t.narrow(0, 0, 1)?.ones_like()?;
            Tensor::cat(&[&pad, t], 0)?.narrow(0, 1, t.dim(0)?)
        }
        Strided::PaddedRows => {
            let mut pad_dims = t.dims().to_vec();
            pad_dims[last] = 3;
            let pad = Tensor::ones(pad_dims, t.dtype(), t.device())?;
            Tensor::cat(&[t, &pad], last)?.narrow(last, 0, t.dim(last)?)
        }
        Strided::Transposed => {
            if rank < 2 {
                return strided_view(t, Strided::Offset);
            }
            t.transpose(rank - 2, last)?
                .contiguous()?
                .transpose(rank - 2, last)
        }
    }
}

/// (relative, absolute) tolerance for results computed in `dtype` against f64.
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-12),
        DType::F32 => (1e-5, 1e-6),
        DType::F16 => (5e-3, 1e-3),
        DType::BF16 => (1e-2, 1e-2),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// The spacing of the dtype's subnormal numbers: its absolute resolution near 0.
pub fn subnormal_step(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-133),
        DType::F32 => 2f64.powi(-149),
        _ => 0.0,
    }
}

/// Asserts |got - want| <= atol + rtol·|want| element-wise, and that nothing is NaN.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], dtype: DType) {
    let (rtol, atol) = tolerance(dtype);
    assert_close_tol(what, got, want, rtol, atol)
}

pub fn assert_close_tol(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g}, want {w}");
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i} is {g}, want {w} (|diff| {:.3e} > {atol:.1e} + {rtol:.1e}·|want|)",
            (g - w).abs()
        );
    }
}

/// Stride-0 inputs (`broadcast_as` views, one row or one column repeated):
/// `op` on the views built by `views` from `sources` must give what it gives on
/// contiguous copies of them, forward and in the gradients reaching `sources`
/// (through a weighted sum of the output, so that no gradient is trivially 0).
pub fn assert_broadcast_views_match_copies(
    what: &str,
    sources: &[Var],
    views: impl Fn(&[Var]) -> Result<Vec<Tensor>>,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    dtype: DType,
) -> Result<()> {
    let run = |copy: bool| -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
        let mut inputs = views(sources)?;
        if copy {
            inputs = inputs
                .iter()
                .map(Tensor::contiguous)
                .collect::<Result<_>>()?;
        } else {
            assert!(
                inputs.iter().any(|t| t.stride().contains(&0)),
                "{what}: no input has a stride of 0"
            );
        }
        let out = op(&inputs)?;
        let n = out.elem_count();
        let weights = Tensor::arange(0f64, n as f64, out.device())?
            .affine(0.7, 0.3)?
            .sin()?
            .reshape(out.shape())?;
        let grads = out
            .to_dtype(DType::F64)?
            .mul(&weights)?
            .sum_all()?
            .backward()?;
        let grads = sources
            .iter()
            .map(|v| {
                grads
                    .get(v)
                    .map(values)
                    .expect("a gradient reaches every source")
            })
            .collect();
        Ok((values(&out), grads))
    };
    let ((out, grads), (want_out, want_grads)) = (run(false)?, run(true)?);
    assert_close(&format!("{what} {dtype:?}: output"), &out, &want_out, dtype);
    for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
        assert_close(
            &format!("{what} {dtype:?}: gradient of source {i}"),
            g,
            w,
            dtype,
        );
    }
    Ok(())
}

/// Where a kernel test runs the ops' CUDA kernels: on a CUDA device, or on the
/// CPU under the host harness (`ops::host::run`: the same kernels/*.cu, executed
/// on the host with CUDA semantics, through the same launch plans).
#[derive(Clone, Debug)]
pub enum KernelTarget {
    Cuda(Device),
    Host,
}

impl KernelTarget {
    /// The device tensors for this target live on.
    pub fn device(&self) -> Device {
        match self {
            Self::Cuda(device) => device.clone(),
            Self::Host => Device::Cpu,
        }
    }

    /// Runs `f` on this target's device; on the host, with the fused ops taking
    /// their kernel path.
    pub fn run<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        match self {
            Self::Cuda(device) => f(device),
            Self::Host => host_kernels(|| f(&Device::Cpu)),
        }
    }

    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host)
    }
}

#[cfg(feature = "host-kernels")]
fn host_kernels<R>(f: impl FnOnce() -> R) -> R {
    sentence_mtl::ops::host::run(f)
}

#[cfg(not(feature = "host-kernels"))]
fn host_kernels<R>(_f: impl FnOnce() -> R) -> R {
    panic!("the host kernel harness needs the `host-kernels` feature (on in every `cargo test`)")
}

/// The CUDA device, or `None` after printing why the GPU test is skipped.
/// With `SENTENCE_MTL_REQUIRE_GPU=1` (set by `scripts/gpu/run.sh` on a GPU
/// machine) a missing device fails the test instead of skipping it.
pub fn cuda_device(test: &str) -> Option<Device> {
    #[cfg(feature = "cuda")]
    let why = match Device::new_cuda(0) {
        Ok(device) => return Some(device),
        Err(e) => format!("no CUDA device could be opened ({e})"),
    };
    #[cfg(not(feature = "cuda"))]
    let why = "built without the `cuda` feature".to_string();
    if std::env::var("SENTENCE_MTL_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: SENTENCE_MTL_REQUIRE_GPU=1 but {why}");
    }
    eprintln!("{test}: skipped, {why}");
    None
}

/// Fills and frees a large block of device memory with NaN, so that the next
/// allocations (the op's outputs) start poisoned and an unwritten element shows.
/// (The host harness poisons every allocation itself.)
pub fn poison_device(device: &Device) -> Result<()> {
    if device.is_cuda() {
        let junk = Tensor::full(f32::NAN, 64 << 20, device)?;
        device.synchronize()?;
        drop(junk);
    }
    Ok(())
}

/// `strided_view(t, kind)` on `device`, built without a copy on the device: the
/// padded or transposed base is made on the CPU, moved, and only viewed there
/// (candle's CUDA backend has no copy kernel for some dtypes, e.g. i32).
pub fn strided_view_on(t: &Tensor, kind: Strided, device: &Device) -> Result<Tensor> {
    let t = t.to_device(&Device::Cpu)?;
    let rank = t.rank();
    let last = rank - 1;
    match kind {
        Strided::Contiguous => t.to_device(device),
        Strided::Offset => {
            let pad = t.narrow(0, 0, 1)?.ones_like()?;
            Tensor::cat(&[&pad, &t], 0)?
                .to_device(device)?
                .narrow(0, 1, t.dim(0)?)
        }
        Strided::PaddedRows => {
            let mut pad_dims = t.dims().to_vec();
            pad_dims[last] = 3;
            let pad = Tensor::ones(pad_dims, t.dtype(), &Device::Cpu)?;
            Tensor::cat(&[&t, &pad], last)?
                .to_device(device)?
                .narrow(last, 0, t.dim(last)?)
        }
        Strided::Transposed => {
            if rank < 2 {
                return strided_view_on(&t, Strided::Offset, device);
            }
            t.transpose(rank - 2, last)?
                .contiguous()?
                .to_device(device)?
                .transpose(rank - 2, last)
        }
    }
}

/// Checks a top-k result (`scores`, `indices`, both `[Q, k]`) against the f64
/// brute force on the values the op saw: scores best first and close to the
/// reference's k best in order, each index's own reference score close to the
/// score returned for it, no index twice; with `exact_indices`, each index the
/// reference's wherever its score has no near-tie (closer than the dtype's
/// rounding), which may come in either order.
pub fn assert_top_k_matches_reference(
    what: &str,
    (scores, indices): (&Tensor, &Tensor),
    (queries, corpus): (&[f64], &[f64]),
    h: usize,
    k: usize,
    dtype: DType,
    exact_indices: bool,
) {
    use sentence_mtl::ops::reference::cosine::cosine_top_k;
    let m = corpus.len() / h;
    let want = cosine_top_k(queries, corpus, h, k);
    let all = cosine_top_k(queries, corpus, h, m);
    let got_scores = scores
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let got_indices = indices.to_vec2::<u32>().unwrap();
    let (rtol, atol) = tolerance(dtype);
    // Each score's error is that of a dtype-rounded cosine, in [-1, 1].
    let tol = atol + rtol;
    assert_eq!(got_scores.len(), want.len(), "{what}: query count");
    for (qi, want_row) in want.iter().enumerate() {
        let (s, ix) = (&got_scores[qi], &got_indices[qi]);
        assert_eq!(s.len(), k.min(m), "{what}: query {qi} width");
        assert_eq!(ix.len(), k.min(m), "{what}: query {qi} width");
        let by_index: std::collections::HashMap<usize, f64> = all[qi].iter().copied().collect();
        let mut seen = std::collections::HashSet::new();
        for j in 0..s.len() {
            let index = ix[j] as usize;
            assert!(index < m, "{what}: query {qi} hit {j} index {index} >= {m}");
            assert!(seen.insert(index), "{what}: query {qi} index {index} twice");
            assert!(
                s[j].is_finite(),
                "{what}: query {qi} hit {j} score {}",
                s[j]
            );
            if j > 0 {
                assert!(
                    s[j] <= s[j - 1],
                    "{what}: query {qi} scores not best first: {s:?}"
                );
            }
            let (want_index, want_score) = want_row[j];
            assert!(
                (s[j] - want_score).abs() <= tol,
                "{what}: query {qi} hit {j} score {} vs the reference's {want_score}",
                s[j]
            );
            assert!(
                (s[j] - by_index[&index]).abs() <= tol,
                "{what}: query {qi} hit {j}: row {index} scored {} but is {}",
                s[j],
                by_index[&index]
            );
            // Rows whose exact scores lie within rounding of each other (ties)
            // may come in either order; any other row must be the reference's.
            let near_ties = all[qi]
                .iter()
                .filter(|(_, v)| (v - want_score).abs() <= tol)
                .count();
            if exact_indices && near_ties == 1 {
                assert_eq!(index, want_index, "{what}: query {qi} hit {j} ({s:?})");
            }
        }
    }
}

//! CUDA: the optimiser step over all-MiniLM-L6-v2's parameter shapes (about
//! 22.7M elements in 103 tensors): `multi_tensor_adamw` (one launch per
//! dtype, in place) against the same update composed from candle tensor ops
//! per tensor (what `train::AdamW` did on a GPU before: about ten launches and
//! four temporaries per tensor). f32, and bf16 parameters with f32 master
//! weights. A printed line gives the bytes the fused step moves and their time
//! at 4.3 TB/s.

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor};
use criterion::{Criterion, Throughput};
use sentence_mtl::ops::adamw::{state_dtype, AdamWConsts, AdamWTensor};
use sentence_mtl::ops::multi_tensor_adamw;

const HBM_BYTES_PER_S: f64 = 4.3e12;
const CONSTS: AdamWConsts = AdamWConsts {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    grad_scale: 1.0,
};

/// MiniLM-L6's parameter shapes: embeddings, six layers, the pooler.
fn minilm_shapes() -> Vec<Vec<usize>> {
    let (h, ffn) = (384, 1536);
    let mut shapes = vec![vec![30522, h], vec![512, h], vec![2, h], vec![h], vec![h]];
    for _ in 0..6 {
        for (rows, cols) in [(h, h), (h, h), (h, h), (h, h), (ffn, h), (h, ffn)] {
            shapes.push(vec![rows, cols]);
            shapes.push(vec![rows]);
        }
        shapes.extend([vec![h], vec![h], vec![h], vec![h]]);
    }
    shapes.push(vec![h, h]);
    shapes.push(vec![h]);
    shapes
}

struct Param {
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
}

fn params(dtype: DType, dev: &Device) -> Result<Vec<Param>> {
    minilm_shapes()
        .into_iter()
        .map(|dims| {
            let p = Tensor::randn(0f32, 0.05, dims.as_slice(), dev)?.to_dtype(dtype)?;
            let g = Tensor::randn(0f32, 1e-3, dims.as_slice(), dev)?.to_dtype(dtype)?;
            let m = Tensor::zeros(dims.as_slice(), state_dtype(dtype), dev)?;
            let master = (dtype != DType::F32)
                .then(|| p.to_dtype(DType::F32))
                .transpose()?;
            Ok(Param {
                v: m.zeros_like()?,
                m,
                p,
                g,
                master,
            })
        })
        .collect()
}

fn fused_step(params: &[Param], step: u64) -> Result<()> {
    let updates: Vec<AdamWTensor<'_>> = params
        .iter()
        .map(|x| AdamWTensor {
            param: &x.p,
            grad: &x.g,
            m: &x.m,
            v: &x.v,
            master: x.master.as_ref(),
            lr: 5e-5,
            weight_decay: 0.01,
            step,
        })
        .collect();
    multi_tensor_adamw(&updates, &CONSTS)
}

/// The composed update of every tensor (new tensors, as candle ops give them).
fn composed_step(params: &mut [Param], step: u64) -> Result<()> {
    let (lr, wd, t) = (5e-5, 0.01, step as f64);
    let bc1 = 1.0 - CONSTS.beta1.powf(t);
    let bc2_sqrt = (1.0 - CONSTS.beta2.powf(t)).sqrt();
    for x in params {
        let g = x.g.to_dtype(x.m.dtype())?;
        x.m = ((&x.m * CONSTS.beta1)? + (&g * (1.0 - CONSTS.beta1))?)?;
        x.v = ((&x.v * CONSTS.beta2)? + (g.sqr()? * (1.0 - CONSTS.beta2))?)?;
        let denom = ((x.v.sqrt()? / bc2_sqrt)? + CONSTS.eps)?;
        let update = ((&x.m / denom)? * (lr / bc1))?;
        let base = x.master.as_ref().unwrap_or(&x.p).to_dtype(x.m.dtype())?;
        let p = ((base * (1.0 - lr * wd))? - update)?;
        if x.master.is_some() {
            x.master = Some(p.clone());
        }
        x.p = p.to_dtype(x.p.dtype())?;
    }
    Ok(())
}

pub fn benches(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("cuda AdamW benches skipped: no CUDA device ({e})");
            return;
        }
    };
    for dtype in [DType::F32, DType::BF16] {
        let mut sets = params(dtype, &dev).expect("parameters");
        let elems: usize = sets.iter().map(|x| x.p.elem_count()).sum();
        // Read p, g, m, v (+ master), write p, m, v (+ master).
        let per_elem = match dtype {
            DType::F32 => 7 * 4,
            _ => 2 + 2 + 3 * 4 + 2 + 3 * 4,
        };
        let bytes = elems * per_elem;
        println!(
            "cuda/adamw {dtype:?}: {} tensors, {elems} elements, {:.1} MB moved (floor {:.1} us at 4.3 TB/s)",
            sets.len(),
            bytes as f64 / 1e6,
            bytes as f64 / HBM_BYTES_PER_S * 1e6
        );
        let mut group = c.benchmark_group(format!("cuda/adamw MiniLM {dtype:?}"));
        group
            .sample_size(30)
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Bytes(bytes as u64));
        let mut step = 0;
        group.bench_function("multi_tensor_adamw", |b| {
            b.iter(|| {
                step += 1;
                fused_step(&sets, step).expect("fused step");
                dev.synchronize().expect("synchronize")
            })
        });
        group.bench_function("composed per tensor", |b| {
            b.iter(|| {
                step += 1;
                composed_step(&mut sets, step).expect("composed step");
                dev.synchronize().expect("synchronize")
            })
        });
        group.finish();
    }
}

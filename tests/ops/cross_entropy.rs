//! CPU tests of `dual_head_cross_entropy`: against the f64 reference (proptest over
//! shapes, dtypes, label dtypes and layouts), edge cases, gradients (finite
//! differences, through a `Var`, against candle's composed ops) and bad input.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{
    assert_broadcast_views_match_copies, assert_close, assert_close_tol, random_tensor, rng,
    strided_view, values, Strided, FLOAT_DTYPES, STRIDED_KINDS,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;
use sentence_mtl::ops::cross_entropy::dual_head_cross_entropy_composed;
use sentence_mtl::ops::reference::cross_entropy as reference;
use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};

const LABEL_DTYPES: [DType; 5] = [DType::I64, DType::I32, DType::I16, DType::U32, DType::U8];

/// Random labels `[n, 2]` as i64: a class of each head, or IGNORE_INDEX with
/// probability `ignored`.
fn random_labels(rng: &mut StdRng, n: usize, classes: [usize; 2], ignored: f64) -> Vec<i64> {
    (0..n)
        .flat_map(|_| classes)
        .map(|c| {
            if rng.random_bool(ignored) {
                IGNORE_INDEX
            } else {
                rng.random_range(0..c as i64)
            }
        })
        .collect()
}

/// The labels as a `[n, 2]` tensor of `dtype`; IGNORE_INDEX becomes that dtype's
/// ignore value (255 for u8, u32::MAX for u32).
fn label_tensor(labels: &[i64], dtype: DType, device: &Device) -> Result<Tensor> {
    let n = labels.len() / 2;
    let map_unsigned = |ignore: i64| {
        labels
            .iter()
            .map(move |&l| if l == IGNORE_INDEX { ignore } else { l })
    };
    match dtype {
        DType::I64 => Tensor::from_vec(labels.to_vec(), (n, 2), device),
        DType::I32 => Tensor::from_vec(
            labels.iter().map(|&l| l as i32).collect::<Vec<_>>(),
            (n, 2),
            device,
        ),
        DType::I16 => Tensor::from_vec(
            labels.iter().map(|&l| l as i16).collect::<Vec<_>>(),
            (n, 2),
            device,
        ),
        DType::U32 => Tensor::from_vec(
            map_unsigned(u32::MAX as i64)
                .map(|l| l as u32)
                .collect::<Vec<_>>(),
            (n, 2),
            device,
        ),
        DType::U8 => Tensor::from_vec(
            map_unsigned(255).map(|l| l as u8).collect::<Vec<_>>(),
            (n, 2),
            device,
        ),
        other => panic!("no label dtype {other:?}"),
    }
}

/// One random problem: logits of both heads as `Var`s, labels as i64.
struct Case {
    a: Var,
    b: Var,
    labels: Vec<i64>,
    n: usize,
    dtype: DType,
}

impl Case {
    fn new(seed: u64, n: usize, classes: [usize; 2], dtype: DType, ignored: f64) -> Result<Self> {
        let mut rng = rng(seed);
        let a = Var::from_tensor(&random_tensor(
            &mut rng,
            &[n, classes[0]],
            dtype,
            &Device::Cpu,
        )?)?;
        let b = Var::from_tensor(&random_tensor(
            &mut rng,
            &[n, classes[1]],
            dtype,
            &Device::Cpu,
        )?)?;
        let labels = random_labels(&mut rng, n, classes, ignored);
        Ok(Self {
            a,
            b,
            labels,
            n,
            dtype,
        })
    }

    /// The op's losses and both gradients of `g · losses`, with inputs presented
    /// through the given layouts.
    fn run(
        &self,
        layouts: [Strided; 3],
        label_dtype: DType,
        g: [f64; 2],
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let a = strided_view(self.a.as_tensor(), layouts[0])?;
        let b = strided_view(self.b.as_tensor(), layouts[1])?;
        let labels = strided_view(
            &label_tensor(&self.labels, label_dtype, &Device::Cpu)?,
            layouts[2],
        )?;
        let losses = dual_head_cross_entropy(&a, &b, &labels)?;
        assert_eq!(losses.dims(), &[2]);
        assert_eq!(losses.dtype(), self.dtype);
        let weights = Tensor::new(&g, &Device::Cpu)?.to_dtype(self.dtype)?;
        let grads = (&losses * weights)?.sum_all()?.backward()?;
        let grad = |v: &Var| values(grads.get(v).expect("gradient reaches the logits"));
        Ok((values(&losses), grad(&self.a), grad(&self.b)))
    }

    fn check_against_reference(&self, layouts: [Strided; 3], label_dtype: DType) -> Result<()> {
        let g = [0.75, -1.5];
        let (losses, grad_a, grad_b) = self.run(layouts, label_dtype, g)?;
        let (a, b) = (values(self.a.as_tensor()), values(self.b.as_tensor()));
        let want = reference::dual_head_cross_entropy(&a, &b, &self.labels, self.n);
        let (want_a, want_b) =
            reference::dual_head_cross_entropy_backward(&a, &b, &self.labels, self.n, g);
        let what = format!(
            "{:?} labels {label_dtype:?} layouts {layouts:?} n {}",
            self.dtype, self.n
        );
        assert_close(&format!("losses, {what}"), &losses, &want, self.dtype);
        assert_close(&format!("grad_a, {what}"), &grad_a, &want_a, self.dtype);
        assert_close(&format!("grad_b, {what}"), &grad_b, &want_b, self.dtype);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Forward and backward match the f64 reference for every dtype, label dtype
    /// and layout, over small random shapes (some with many classes).
    #[test]
    fn matches_reference(
        seed in any::<u64>(),
        n in prop_oneof![4 => 1usize..24, 1 => 24usize..300],
        ca in prop_oneof![4 => 1usize..9, 1 => 9usize..200],
        cb in 1usize..9,
        dtype in prop::sample::select(FLOAT_DTYPES.to_vec()),
        label_dtype in prop::sample::select(LABEL_DTYPES.to_vec()),
        layouts in prop::array::uniform3(prop::sample::select(STRIDED_KINDS.to_vec())),
        ignored in prop_oneof![Just(0.0), Just(0.3), Just(1.0)],
    ) {
        let case = Case::new(seed, n, [ca, cb], dtype, ignored).unwrap();
        case.check_against_reference(layouts, label_dtype).unwrap();
    }
}

#[test]
fn large_batch_runs_in_parallel_and_matches_reference() -> Result<()> {
    // 40k rows x 7 classes is above the rayon threshold; f32 as in training.
    let case = Case::new(1, 40_000, [4, 3], DType::F32, 0.3)?;
    case.check_against_reference([Strided::Contiguous; 3], DType::I64)?;
    case.check_against_reference(
        [Strided::Transposed, Strided::PaddedRows, Strided::Offset],
        DType::U8,
    )
}

#[test]
fn rows_labelled_for_one_head_only_are_left_out_of_the_other() -> Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::new(
        &[[2.0f64, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 3.0]],
        &dev,
    )?;
    let b = Tensor::new(&[[1.0f64, -1.0], [0.0, 3.0], [-2.0, 2.0]], &dev)?;
    let labels = Tensor::new(&[[0i64, IGNORE_INDEX], [IGNORE_INDEX, 1], [2, 0]], &dev)?;
    let losses = values(&dual_head_cross_entropy(&a, &b, &labels)?);
    let lse = |r: &[f64]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
    let want_a = ((lse(&[2.0, 0.0, -1.0]) - 2.0) + (lse(&[1.0, 2.0, 3.0]) - 3.0)) / 2.0;
    let want_b = ((lse(&[0.0, 3.0]) - 3.0) + (lse(&[-2.0, 2.0]) + 2.0)) / 2.0;
    assert_close("mixed labels", &losses, &[want_a, want_b], DType::F64);
    Ok(())
}

#[test]
fn head_without_labelled_rows_has_zero_loss_and_zero_gradient() -> Result<()> {
    for dtype in FLOAT_DTYPES {
        let mut case = Case::new(2, 9, [4, 3], dtype, 0.0)?;
        case.labels
            .iter_mut()
            .skip(1)
            .step_by(2)
            .for_each(|l| *l = IGNORE_INDEX);
        let (losses, grad_a, grad_b) =
            case.run([Strided::Contiguous; 3], DType::I64, [1.0, 1.0])?;
        assert!(losses[0] > 0.0, "head A is labelled: {losses:?}");
        assert_eq!(losses[1], 0.0, "{dtype:?}: head B has no labelled row");
        assert!(grad_a.iter().any(|&g| g != 0.0));
        assert!(
            grad_b.iter().all(|&g| g == 0.0),
            "{dtype:?}: grad_b {grad_b:?}"
        );
        case.check_against_reference([Strided::Contiguous; 3], DType::U32)?;

        case.labels.fill(IGNORE_INDEX);
        let (losses, grad_a, grad_b) =
            case.run([Strided::Contiguous; 3], DType::I16, [1.0, 1.0])?;
        assert_eq!(losses, [0.0, 0.0]);
        assert!(grad_a.iter().chain(&grad_b).all(|&g| g == 0.0));
    }
    Ok(())
}

#[test]
fn unsigned_labels_use_their_maximum_as_the_ignore_index() -> Result<()> {
    let dev = Device::Cpu;
    let a = random_tensor(&mut rng(3), &[2, 4], DType::F32, &dev)?;
    let b = random_tensor(&mut rng(4), &[2, 3], DType::F32, &dev)?;
    let want = values(&dual_head_cross_entropy(
        &a,
        &b,
        &Tensor::new(&[[1i64, IGNORE_INDEX], [IGNORE_INDEX, 2]], &dev)?,
    )?);
    let u8_labels = Tensor::new(&[[1u8, 255], [255, 2]], &dev)?;
    let u32_labels = Tensor::new(&[[1u32, u32::MAX], [u32::MAX, 2]], &dev)?;
    assert_eq!(values(&dual_head_cross_entropy(&a, &b, &u8_labels)?), want);
    assert_eq!(values(&dual_head_cross_entropy(&a, &b, &u32_labels)?), want);
    // For unsigned labels 156 (= -100 as u8) is an ordinary, out-of-range class.
    let err =
        dual_head_cross_entropy(&a, &b, &Tensor::new(&[[156u8, 0], [0, 0]], &dev)?).unwrap_err();
    assert!(
        err.to_string().contains("156") && err.to_string().contains("ignore index 255"),
        "{err}"
    );
    Ok(())
}

#[test]
fn huge_logits_are_stable() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let a = Tensor::new(
            &[[1000.0f64, -1000.0, 990.0], [-5e3, -5e3 + 1.0, -5e3 - 2.0]],
            &dev,
        )?
        .to_dtype(dtype)?;
        let b = Tensor::new(&[[88.0f64, 90.0], [-200.0, 200.0]], &dev)?.to_dtype(dtype)?;
        let labels = vec![2i64, 0, 1, 0];
        let l = Tensor::from_vec(labels.clone(), (2, 2), &dev)?;
        let got = values(&dual_head_cross_entropy(&a, &b, &l)?);
        let want = reference::dual_head_cross_entropy(&values(&a), &values(&b), &labels, 2);
        assert_close(&format!("{dtype:?} huge logits"), &got, &want, dtype);
    }
    Ok(())
}

/// A row ignored for a head adds nothing to that head, even when its logits
/// are NaN or infinite: the loss equals the clean batch's, its gradient is 0.
#[test]
fn non_finite_logits_of_ignored_rows_stay_out() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in FLOAT_DTYPES {
        let clean_a = [[0.3f64, -1.0, 2.0, 0.5], [1.5, 0.2, -0.7, 0.1]];
        let dirty_a = [
            clean_a[0],
            clean_a[1],
            [f64::NAN, 1.0, f64::INFINITY, 0.0],
            [f64::NEG_INFINITY, f64::INFINITY, 0.0, 0.0],
        ];
        let b = random_tensor(&mut rng(11), &[4, 3], dtype, &dev)?;
        let labels = Tensor::new(
            &[[3i64, 0], [1, 2], [IGNORE_INDEX, 1], [IGNORE_INDEX, 0]],
            &dev,
        )?;
        let a = Var::from_tensor(&Tensor::new(&dirty_a, &dev)?.to_dtype(dtype)?)?;
        let losses = dual_head_cross_entropy(&a, &b, &labels)?;
        let grads = losses.sum_all()?.backward()?;
        let grad_a = values(grads.get(&a).expect("grad of a"));

        let clean = Tensor::new(&clean_a, &dev)?.to_dtype(dtype)?;
        let want = values(&dual_head_cross_entropy(
            &clean,
            &b.narrow(0, 0, 2)?,
            &labels.narrow(0, 0, 2)?,
        )?);
        let got = values(&losses);
        assert_eq!(got[0], want[0], "{dtype:?}: head A's loss");
        assert!(got[1].is_finite(), "{dtype:?}: head B's loss {got:?}");
        assert!(grad_a[..8].iter().all(|g| g.is_finite() && *g != 0.0));
        assert!(
            grad_a[8..].iter().all(|&g| g == 0.0),
            "{dtype:?}: ignored rows' gradient {:?}",
            &grad_a[8..]
        );
    }
    Ok(())
}

#[test]
fn one_row_one_class_and_empty_batch() -> Result<()> {
    for dtype in FLOAT_DTYPES {
        Case::new(5, 1, [1, 2], dtype, 0.0)?
            .check_against_reference([Strided::Offset; 3], DType::I32)?;
        let (losses, _, _) = Case::new(5, 1, [1, 1], dtype, 0.0)?.run(
            [Strided::Contiguous; 3],
            DType::I64,
            [1.0, 1.0],
        )?;
        assert_eq!(
            losses,
            [0.0, 0.0],
            "one class: log-sum-exp equals the logit"
        );
    }
    let dev = Device::Cpu;
    let (a, b) = (
        Var::zeros((0, 4), DType::F32, &dev)?,
        Var::zeros((0, 3), DType::F32, &dev)?,
    );
    let losses = dual_head_cross_entropy(&a, &b, &Tensor::zeros((0, 2), DType::I64, &dev)?)?;
    assert_eq!(values(&losses), [0.0, 0.0]);
    let grads = losses.sum_all()?.backward()?;
    assert_eq!(grads.get(&a).unwrap().dims(), &[0, 4]);
    assert_eq!(grads.get(&b).unwrap().dims(), &[0, 3]);
    Ok(())
}

/// Central differences of `g · losses` in f64 against the backward.
#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let case = Case::new(6, 6, [5, 3], DType::F64, 0.25)?;
    let g = [0.6, -1.3];
    let (_, grad_a, grad_b) = case.run([Strided::Contiguous; 3], DType::I64, g)?;
    let (a, b) = (values(case.a.as_tensor()), values(case.b.as_tensor()));
    let objective = |a: &[f64], b: &[f64]| -> Result<f64> {
        let dev = Device::Cpu;
        let losses = dual_head_cross_entropy(
            &Tensor::from_slice(a, (case.n, 5), &dev)?,
            &Tensor::from_slice(b, (case.n, 3), &dev)?,
            &Tensor::from_slice(&case.labels, (case.n, 2), &dev)?,
        )?;
        let l = values(&losses);
        Ok(g[0] * l[0] + g[1] * l[1])
    };
    let h = 1e-6;
    let numeric = |which: usize| -> Result<Vec<f64>> {
        let base = if which == 0 { &a } else { &b };
        (0..base.len())
            .map(|k| {
                let (mut plus, mut minus) = (base.clone(), base.clone());
                plus[k] += h;
                minus[k] -= h;
                let f = |x: &[f64]| {
                    if which == 0 {
                        objective(x, &b)
                    } else {
                        objective(&a, x)
                    }
                };
                Ok((f(&plus)? - f(&minus)?) / (2.0 * h))
            })
            .collect()
    };
    assert_close_tol(
        "grad_a vs finite differences",
        &grad_a,
        &numeric(0)?,
        1e-6,
        1e-8,
    );
    assert_close_tol(
        "grad_b vs finite differences",
        &grad_b,
        &numeric(1)?,
        1e-6,
        1e-8,
    );
    Ok(())
}

/// The gradient flows through the op into ops upstream of it, down to a `Var`.
#[test]
fn backward_reaches_an_upstream_var() -> Result<()> {
    let case = Case::new(7, 10, [4, 3], DType::F32, 0.2)?;
    let dev = Device::Cpu;
    let w = Var::from_tensor(&random_tensor(&mut rng(8), &[10, 4], DType::F32, &dev)?)?;
    let logits_a = (w.as_tensor() * 3.0)?;
    let labels = label_tensor(&case.labels, DType::I64, &dev)?;
    let losses = dual_head_cross_entropy(&logits_a, case.b.as_tensor(), &labels)?;
    let grads = losses.sum_all()?.backward()?;
    let got = values(grads.get(&w).expect("gradient reaches w"));
    let (want_a, _) = reference::dual_head_cross_entropy_backward(
        &values(&logits_a),
        &values(case.b.as_tensor()),
        &case.labels,
        10,
        [1.0, 1.0],
    );
    let want: Vec<f64> = want_a.iter().map(|g| 3.0 * g).collect();
    assert_close("grad of w", &got, &want, DType::F32);
    Ok(())
}

/// The fused op and candle's composed ops agree, forward and backward.
#[test]
fn matches_candle_composed_ops() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let case = Case::new(9, 37, [4, 3], dtype, 0.3)?;
        let labels = label_tensor(&case.labels, DType::I64, &Device::Cpu)?;
        let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
            let (a, b) = (case.a.as_tensor(), case.b.as_tensor());
            let losses = if fused {
                dual_head_cross_entropy(a, b, &labels)?
            } else {
                dual_head_cross_entropy_composed(a, b, &labels)?
            };
            let grads = losses.sum_all()?.backward()?;
            Ok(vec![
                values(&losses),
                values(grads.get(&case.a).unwrap()),
                values(grads.get(&case.b).unwrap()),
            ])
        };
        let (fused, composed) = (run(true)?, run(false)?);
        for (what, (f, c)) in ["losses", "grad_a", "grad_b"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            assert_close(&format!("{dtype:?} {what}: fused vs composed"), f, c, dtype);
        }
    }
    Ok(())
}

/// Logits broadcast along the classes (class stride 0) or along the rows (row
/// stride 0) give what their contiguous copies give: no panic, no wrong index.
#[test]
fn broadcast_logits_match_their_copies() -> Result<()> {
    let dev = Device::Cpu;
    let n = 300; // past one tile of rows
    let labels = random_labels(&mut rng(11), n, [4, 3], 0.2);
    let labels = label_tensor(&labels, DType::I64, &dev)?;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let column = Var::from_tensor(&random_tensor(&mut rng(12), &[n, 1], DType::F32, &dev)?)?;
        let row = Var::from_tensor(&random_tensor(&mut rng(13), &[1, 3], DType::F32, &dev)?)?;
        let row_a = Var::from_tensor(&random_tensor(&mut rng(14), &[1, 4], DType::F32, &dev)?)?;
        let cases: [(&str, [usize; 2]); 2] =
            [("classes broadcast", [0, 1]), ("rows broadcast", [2, 1])];
        for (what, [a, b]) in cases {
            let sources = [column.clone(), row.clone(), row_a.clone()];
            assert_broadcast_views_match_copies(
                what,
                &[sources[a].clone(), sources[b].clone()],
                |v| {
                    Ok(vec![
                        v[0].to_dtype(dtype)?.broadcast_as((n, 4))?,
                        v[1].to_dtype(dtype)?.broadcast_as((n, 3))?,
                    ])
                },
                |t| dual_head_cross_entropy(&t[0], &t[1], &labels),
                dtype,
            )?;
        }
    }
    Ok(())
}

fn expect_err(result: Result<Tensor>, needles: &[&str]) {
    let err = result.expect_err("bad input must be an Err").to_string();
    for needle in needles {
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}"
        );
    }
}

#[test]
fn bad_input_is_an_error_naming_the_problem() -> Result<()> {
    let dev = Device::Cpu;
    let t = |dims: &[usize], dtype| random_tensor(&mut rng(10), dims, dtype, &dev);
    let (a, b) = (t(&[3, 4], DType::F32)?, t(&[3, 2], DType::F32)?);
    let labels = Tensor::new(&[[0i64, 1], [3, IGNORE_INDEX], [IGNORE_INDEX, 0]], &dev)?;
    dual_head_cross_entropy(&a, &b, &labels)?; // the good input works

    expect_err(
        dual_head_cross_entropy(&t(&[3, 4, 1], DType::F32)?, &b, &labels),
        &["logits_a", "rank 2"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &t(&[3], DType::F32)?, &labels),
        &["logits_b", "rank 2"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &b, &labels.flatten_all()?),
        &["labels", "rank 2"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &t(&[4, 2], DType::F32)?, &labels),
        &["batch size mismatch", "N=4"],
    );
    expect_err(
        dual_head_cross_entropy(&t(&[2, 4], DType::F32)?, &t(&[2, 2], DType::F32)?, &labels),
        &["batch size mismatch", "labels has N=3"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &b, &Tensor::zeros((3, 3), DType::I64, &dev)?),
        &["labels must have shape [N,2]"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &t(&[3, 0], DType::F32)?, &labels),
        &["logits_b has 0 classes"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &b.to_dtype(DType::F64)?, &labels),
        &["logits_a is F32", "logits_b is F64"],
    );
    expect_err(
        dual_head_cross_entropy(&a.to_dtype(DType::U32)?, &b.to_dtype(DType::U32)?, &labels),
        &["unsupported dtype U32", "logits"],
    );
    expect_err(
        dual_head_cross_entropy(&a, &b, &labels.to_dtype(DType::F32)?),
        &["labels must have an integer dtype", "F32"],
    );

    let out_of_range = Tensor::new(&[[0i64, 1], [3, 7], [IGNORE_INDEX, 0]], &dev)?;
    expect_err(
        dual_head_cross_entropy(&a, &b, &out_of_range),
        &["label out of range", "head B", "row 1", ": 7", "[0, 2)"],
    );
    let negative = Tensor::new(&[[0i32, 1], [3, 1], [-1, 0]], &dev)?;
    expect_err(
        dual_head_cross_entropy(&a, &b, &negative),
        &["head A", "row 2", ": -1", "ignore index -100"],
    );
    let class_count = Tensor::new(&[[4i16, 1], [3, 1], [0, 0]], &dev)?;
    expect_err(
        dual_head_cross_entropy(&a, &b, &class_count),
        &["head A", "row 0", ": 4", "[0, 4)"],
    );
    // The first bad label by row is the one reported, also on the parallel path.
    let n = 30_000;
    let (big_a, big_b) = (t(&[n, 4], DType::F32)?, t(&[n, 3], DType::F32)?);
    let mut many = vec![0i64; 2 * n];
    many[2 * 20_000 + 1] = 9;
    many[2 * 25_000] = 9;
    expect_err(
        dual_head_cross_entropy(&big_a, &big_b, &Tensor::from_vec(many, (n, 2), &dev)?),
        &["head B", "row 20000"],
    );
    Ok(())
}

/// The deferred form on the CPU: the same losses and gradients as the checked
/// form, a check that passes, and a bad label still an `Err` at the call.
#[test]
fn deferred_form_matches_the_checked_one_and_rejects_bad_labels_at_once_on_the_cpu(
) -> candle_core::Result<()> {
    use candle_core::{Device, Tensor, Var};
    use sentence_mtl::ops::cross_entropy::dual_head_cross_entropy_deferred;
    use sentence_mtl::ops::{dual_head_cross_entropy, IGNORE_INDEX};
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::randn(0f32, 1., (9, 4), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 1., (9, 3), &dev)?)?;
    let labels: Vec<i64> = (0..9)
        .flat_map(|i| [if i % 3 == 0 { IGNORE_INDEX } else { i % 4 }, i % 3])
        .collect();
    let labels = Tensor::from_vec(labels, (9, 2), &dev)?;
    let run = |deferred: bool| -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let losses = if deferred {
            let (losses, check) =
                dual_head_cross_entropy_deferred(a.as_tensor(), b.as_tensor(), &labels)?;
            check.verify()?;
            losses
        } else {
            dual_head_cross_entropy(a.as_tensor(), b.as_tensor(), &labels)?
        };
        let grads = (&losses * Tensor::new(&[0.7f32, -1.2], &dev)?)?
            .sum_all()?
            .backward()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        Ok((
            losses.to_vec1()?,
            flat(grads.get(a.as_tensor()).unwrap())?,
            flat(grads.get(b.as_tensor()).unwrap())?,
        ))
    };
    assert_eq!(run(true)?, run(false)?);
    let bad = Tensor::new(&[[0i64, 7]], &dev)?;
    let (a1, b1) = (
        a.as_tensor().narrow(0, 0, 1)?,
        b.as_tensor().narrow(0, 0, 1)?,
    );
    let message = dual_head_cross_entropy_deferred(&a1, &b1, &bad)
        .err()
        .expect("a bad label is an Err on the CPU")
        .to_string();
    assert!(
        message.contains("label out of range for head B"),
        "{message}"
    );
    Ok(())
}

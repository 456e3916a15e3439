//! The multi-task model on a tiny random BERT: rows labelled for another head
//! (ignore index) contribute nothing to a head's loss or gradient, and every
//! freezing setting leaves its frozen parameters bit-identical (no gradient is
//! even computed for them) while the trainable ones change.

use crate::train_support;

use std::collections::BTreeSet;

use candle_core::{DType, Device};
use sentence_mtl::data::{collate, tokenize_split, Example, Split, TaskData};
use sentence_mtl::model::multitask::{Freeze, Losses, MultiTaskModel, TaskHead, TaskLoss};
use sentence_mtl::model::resolve_model;
use sentence_mtl::model::text::TextPrep;
use sentence_mtl::model::tokenize::load_tokenizer;
use sentence_mtl::train::{MultiTaskTrainer, TrainConfig};
use train_support::{snapshot, temp_dir, tiny_config, tiny_data, tiny_model};

/// The tiny model, its tokenised training rows of both tasks.
fn model_and_rows(
    name: &str,
    dropout: f64,
) -> (MultiTaskModel, [Vec<Example>; 2], std::path::PathBuf) {
    let root = temp_dir(name);
    let model_dir = tiny_model(&root.join("model"), 7, dropout);
    let data_dir = tiny_data(&root.join("data"), [16, 4, 4], 3);
    let files = resolve_model(model_dir.to_str().unwrap()).unwrap();
    let tasks = [
        TaskHead::classification("emotion", 4),
        TaskHead::classification("sentiment", 3),
    ];
    let model = MultiTaskModel::new(&files, &tasks, 11, DType::F32, &Device::Cpu).unwrap();
    let tok = load_tokenizer(&files, 16).unwrap();
    let rows = [("emotion", 0), ("sentiment", 1)].map(|(task, index)| {
        let split = TaskData::open(data_dir.join(task))
            .unwrap()
            .load(Split::Train)
            .unwrap();
        tokenize_split(&tok, &split, TextPrep::default(), index).unwrap()
    });
    (model, rows, root)
}

/// The two tasks' losses on `rows` (no dropout), weight 1 each.
fn batch_losses(model: &MultiTaskModel, rows: &[&Example]) -> Losses {
    let batch = collate(rows, &model.label_columns(), 0, &Device::Cpu).unwrap();
    let outputs = model
        .forward(
            &batch.inputs.input_ids,
            Some(&batch.inputs.token_type_ids),
            &batch.inputs.attention_mask,
            false,
            &Freeze::None,
        )
        .unwrap();
    model
        .loss(&outputs, &batch.labels, &batch.pairs, &unit_losses(2))
        .unwrap()
}

fn losses(
    model: &MultiTaskModel,
    rows: &[&Example],
) -> (Vec<f32>, candle_core::backprop::GradStore) {
    let losses = batch_losses(model, rows);
    let grads = losses.total.backward().unwrap();
    (losses.per_task.to_vec1().unwrap(), grads)
}

fn unit_losses(tasks: usize) -> Vec<TaskLoss> {
    vec![TaskLoss::weighted(1.0); tasks]
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn ignored_rows_contribute_nothing() {
    let (model, rows, root) = model_and_rows("ignore", 0.0);
    let a: Vec<&Example> = rows[0][..5].iter().collect();
    let b: Vec<&Example> = rows[1][..3].iter().collect();
    let mixed: Vec<&Example> = [a[0], b[0], a[1], a[2], b[1], a[3], b[2], a[4]].to_vec();

    let (mixed_loss, mixed_grads) = losses(&model, &mixed);
    let (a_loss, a_grads) = losses(&model, &a);
    let (b_loss, b_grads) = losses(&model, &b);
    // Each head's loss over the mixed batch is its loss over its own rows only.
    assert_close(&mixed_loss[..1], &a_loss[..1], "loss A");
    assert_close(&mixed_loss[1..], &b_loss[1..], "loss B");
    // A batch without rows of a head gives that head loss 0 and no gradient.
    assert_eq!(a_loss[1], 0.0);
    assert_eq!(b_loss[0], 0.0);
    let params = model.parameters();
    let grad = |grads: &candle_core::backprop::GradStore, name: &str| -> Vec<f32> {
        grads
            .get(params[name].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for part in ["weight", "bias"] {
        let (ga, gb) = (
            format!("heads.emotion.{part}"),
            format!("heads.sentiment.{part}"),
        );
        assert_close(&grad(&mixed_grads, &ga), &grad(&a_grads, &ga), &ga);
        assert_close(&grad(&mixed_grads, &gb), &grad(&b_grads, &gb), &gb);
        // Rows labelled only for head A give head B's parameters a zero gradient.
        assert!(
            grad(&a_grads, &gb).iter().all(|&g| g == 0.0),
            "{gb} from A-only rows"
        );
    }
    // The ignored label's value is never read: relabelling head B's rows in
    // head A's column would change loss A, but the ignore index leaves it alone.
    let batch = collate(&mixed, &model.label_columns(), 0, &Device::Cpu).unwrap();
    let labels = batch.labels.to_vec2::<i64>().unwrap();
    for (row, example) in labels.iter().zip(&mixed) {
        assert_eq!(row[1 - example.task], sentence_mtl::ops::IGNORE_INDEX);
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let (model, rows, root) = model_and_rows("nograd", 0.0);
    let batch_rows: Vec<&Example> = rows[0][..4].iter().chain(&rows[1][..4]).collect();
    let batch = collate(&batch_rows, &model.label_columns(), 0, &Device::Cpu).unwrap();
    for freeze in [
        Freeze::None,
        Freeze::Backbone,
        Freeze::Head("emotion".into()),
        Freeze::Head("b".into()),
        Freeze::Lower(0),
        Freeze::Lower(1),
    ] {
        let outputs = model
            .forward(
                &batch.inputs.input_ids,
                Some(&batch.inputs.token_type_ids),
                &batch.inputs.attention_mask,
                true,
                &freeze,
            )
            .unwrap();
        let grads = model
            .loss(&outputs, &batch.labels, &batch.pairs, &unit_losses(2))
            .unwrap()
            .total
            .backward()
            .unwrap();
        let trainable: BTreeSet<String> = model
            .trainable_parameters(&freeze)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (name, var) in model.parameters() {
            let has_grad = grads.get(var.as_tensor()).is_some();
            assert_eq!(
                has_grad,
                trainable.contains(&name),
                "{freeze}: {name} gradient computed = {has_grad}"
            );
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// Trains three steps under `freeze`; returns (parameters before, after, trainable names).
fn train_three_steps(freeze: &Freeze, root: &std::path::Path) -> Vec<(String, bool, bool)> {
    let config = TrainConfig {
        freeze: freeze.clone(),
        max_steps: Some(3),
        ..tiny_config(&root.join("model"), &root.join("data"))
    };
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    trainer.setup().unwrap();
    let model = trainer.model().unwrap();
    let before = snapshot(&model.parameters());
    let trainable: BTreeSet<String> = model
        .trainable_parameters(freeze)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let report = trainer.train().unwrap();
    assert_eq!(
        report.steps,
        if *freeze == Freeze::All { 0 } else { 3 },
        "{freeze}"
    );
    let after = snapshot(&trainer.model().unwrap().parameters());
    before
        .keys()
        .map(|name| {
            (
                name.clone(),
                trainable.contains(name),
                before[name] != after[name],
            )
        })
        .collect()
}

#[test]
fn freezing_keeps_frozen_parameters_bit_identical() {
    let root = temp_dir("freeze");
    tiny_model(&root.join("model"), 5, 0.1);
    tiny_data(&root.join("data"), [24, 4, 4], 9);
    for freeze in [
        Freeze::None,
        Freeze::All,
        Freeze::Backbone,
        Freeze::Head("sentiment".into()),
        Freeze::Head("a".into()),
        Freeze::Lower(0),
        Freeze::Lower(1),
        Freeze::Lower(2),
    ] {
        let params = train_three_steps(&freeze, &root);
        for (name, trainable, changed) in &params {
            assert_eq!(
                trainable, changed,
                "{freeze}: {name} trainable = {trainable} but changed = {changed}"
            );
        }
        let frozen: Vec<&str> = params
            .iter()
            .filter(|p| !p.1)
            .map(|p| p.0.as_str())
            .collect();
        let expected_frozen = |name: &str| match &freeze {
            Freeze::None => false,
            Freeze::All => true,
            Freeze::Backbone => !name.starts_with("heads."),
            Freeze::Head(h) if h == "a" => name.starts_with("heads.emotion."),
            Freeze::Head(h) => name.starts_with(&format!("heads.{h}.")),
            &Freeze::Lower(n) => {
                name.starts_with("embeddings.")
                    || (0..n).any(|i| name.starts_with(&format!("encoder.layer.{i}.")))
            }
        };
        let expected: Vec<&str> = params
            .iter()
            .map(|p| p.0.as_str())
            .filter(|n| expected_frozen(n))
            .collect();
        assert_eq!(frozen, expected, "{freeze}");
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// A bf16 model computes its losses in f32 (mixed precision): the losses are
/// f32 tensors, close to the f32 model's, and the gradients reach the bf16
/// weights.
#[test]
fn half_precision_losses_are_f32() {
    let (model, rows, root) = model_and_rows("half-loss", 0.0);
    let files = resolve_model(root.join("model").to_str().unwrap()).unwrap();
    let tasks = [
        TaskHead::classification("emotion", 4),
        TaskHead::classification("sentiment", 3),
    ];
    let half = MultiTaskModel::new(&files, &tasks, 11, DType::BF16, &Device::Cpu).unwrap();
    let batch: Vec<&Example> = rows[0][..3].iter().chain(&rows[1][..3]).collect();
    let (want, got) = (batch_losses(&model, &batch), batch_losses(&half, &batch));
    assert_eq!(got.per_task.dtype(), DType::F32);
    assert_eq!(got.total.dtype(), DType::F32);
    let want: Vec<f32> = want.per_task.to_vec1().unwrap();
    let got_values: Vec<f32> = got.per_task.to_vec1().unwrap();
    for (g, w) in got_values.iter().zip(&want) {
        assert!((g - w).abs() <= 2e-2 * w.abs(), "bf16 loss {g} vs f32 {w}");
    }
    let grads = got.total.backward().unwrap();
    let weight = &half.parameters()["encoder.layer.0.attention.self.query.weight"];
    let g = grads
        .get(weight.as_tensor())
        .expect("a gradient for the bf16 weight");
    assert_eq!(g.dtype(), DType::BF16);
}

/// Head dropout drops the heads' input in training passes only: the pooled
/// vector (and the backbone's own dropout masks) stay what they were, the
/// logits change, and evaluation passes are untouched.
#[test]
fn head_dropout_drops_only_the_heads_input_in_training() {
    let (plain, rows, root) = model_and_rows("head-dropout", 0.1);
    let files = resolve_model(root.join("model").to_str().unwrap()).unwrap();
    let tasks = plain.tasks().to_vec();
    let dropped = MultiTaskModel::new(&files, &tasks, 11, DType::F32, &Device::Cpu)
        .unwrap()
        .with_head_dropout(0.5)
        .unwrap();
    assert_eq!((plain.head_dropout(), dropped.head_dropout()), (0.0, 0.5));
    let refs: Vec<&Example> = rows[0].iter().chain(&rows[1]).take(8).collect();
    let batch = collate(&refs, &plain.label_columns(), 0, &Device::Cpu).unwrap();
    let run = |model: &MultiTaskModel, train: bool| {
        model.seed_dropout(5);
        let out = model
            .forward(
                &batch.inputs.input_ids,
                Some(&batch.inputs.token_type_ids),
                &batch.inputs.attention_mask,
                train,
                &Freeze::None,
            )
            .unwrap();
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (values(&out.pooled), values(out.logits.as_ref().unwrap()))
    };
    let (pooled_plain, logits_plain) = run(&plain, true);
    let (pooled_dropped, logits_dropped) = run(&dropped, true);
    assert_eq!(
        pooled_plain, pooled_dropped,
        "the backbone's masks are unchanged"
    );
    assert_ne!(logits_plain, logits_dropped);
    assert_eq!(run(&plain, true), (pooled_plain, logits_plain), "seeded");
    assert_eq!(
        run(&plain, false),
        run(&dropped, false),
        "no dropout in evaluation"
    );
    for bad in [-0.1, 1.0, f32::NAN] {
        let model = MultiTaskModel::new(&files, &tasks, 11, DType::F32, &Device::Cpu).unwrap();
        let err = model.with_head_dropout(bad).unwrap_err().to_string();
        assert!(err.contains("head dropout must be in [0, 1)"), "{err}");
    }
    std::fs::remove_dir_all(root).unwrap();
}

//! Any number of tasks, classification or similarity, on the tiny model: the
//! trainer trains and scores each, the checkpoint records them, a resume or an
//! evaluation with other tasks is a clear error, `head:NAME` freezes one head,
//! and a similarity task's CoSENT loss reaches the backbone but no head.

use crate::train_support;

use std::path::Path;

use candle_core::{DType, Device};
use sentence_mtl::data::{collate, Example, Split, TaskKind, TaskRows, TaskSource};
use sentence_mtl::model::multitask::{cosent_loss, Freeze, MultiTaskModel, TaskHead, TaskLoss};
use sentence_mtl::model::resolve_model;
use sentence_mtl::model::text::TextPrep;
use sentence_mtl::model::tokenize::load_tokenizer;
use sentence_mtl::train::checkpoint::{self, RunInfo};
use sentence_mtl::train::{MultiTaskTrainer, TaskScores, TaskSpec, TrainConfig};
use train_support::{snapshot, temp_dir, tiny_config, tiny_data, tiny_model, tiny_sts};

/// emotion, sentiment, a second head on the emotion folder, and STS.
fn four_tasks(root: &Path) -> Vec<TaskSpec> {
    let data = root.join("data");
    let mut tasks = TrainConfig::tweeteval_tasks(&data, "emotion", "sentiment");
    tasks.push(TaskSpec {
        name: "emotion2".into(),
        ..TaskSpec::classification(data.join("emotion"))
    });
    tasks.push(
        format!("sts={}:sts", root.join("sts").display())
            .parse()
            .unwrap(),
    );
    tasks
}

fn setup(name: &str) -> std::path::PathBuf {
    let root = temp_dir(name);
    tiny_model(&root.join("model"), 3, 0.1);
    tiny_data(&root.join("data"), [24, 8, 8], 5);
    tiny_sts(&root.join("sts"), [24, 12, 12], 6);
    root
}

#[test]
fn four_tasks_train_score_and_checkpoint() {
    let root = setup("four-tasks");
    let out = root.join("run");
    let config = TrainConfig {
        tasks: four_tasks(&root),
        output_dir: Some(out.clone()),
        epochs: 1,
        test_at_end: true,
        ..tiny_config(&root.join("model"), &root.join("data"))
    };
    let mut trainer = MultiTaskTrainer::new(config.clone(), Device::Cpu, DType::F32).unwrap();
    let before = {
        trainer.setup().unwrap();
        snapshot(&trainer.model().unwrap().parameters())
    };
    let report = trainer.train().map_err(|e| format!("{e:?}")).unwrap();
    assert_eq!(report.tasks, ["emotion", "sentiment", "emotion2", "sts"]);
    // 24 + 24 + 24 + 24 examples in batches of 8.
    assert_eq!(report.steps, 12);
    let test = report.test.as_ref().unwrap();
    assert_eq!(test.len(), 4);
    for name in ["emotion", "sentiment", "emotion2"] {
        assert!(
            matches!(test[name], TaskScores::Classification(m) if m.count == 8),
            "{name}"
        );
    }
    let TaskScores::Similarity(sts) = test["sts"] else {
        panic!("sts is scored as similarity: {:?}", test["sts"]);
    };
    assert_eq!(sts.pairs, 12);
    assert!(sts.spearman.is_finite() && sts.spearman.abs() <= 100.0);
    // Every step records one loss per task; the epoch's validation scores all four.
    let state = trainer.state().unwrap();
    assert!(state.steps.iter().all(|s| s.loss.len() == 4));
    assert!(
        state.steps.iter().any(|s| s.loss[3].is_some()),
        "STS rows were trained"
    );
    assert_eq!(state.epochs[0].val.len(), 4);
    assert!(state.epochs[0]
        .val_loss
        .iter()
        .all(|l| l.is_finite() && *l >= 0.0));
    // Each classification head trained; STS has no head.
    let after = snapshot(&trainer.model().unwrap().parameters());
    for name in ["emotion", "sentiment", "emotion2"] {
        let w = format!("heads.{name}.weight");
        assert_ne!(before[&w], after[&w], "{w} trained");
    }
    assert!(!after.keys().any(|k| k.starts_with("heads.sts")));
    // The checkpoint records its tasks, and evaluates alone.
    let dir = checkpoint::locate(&out).unwrap();
    let info: RunInfo = checkpoint::read_json(&dir.join(checkpoint::RUN_FILE)).unwrap();
    assert_eq!(
        info.tasks,
        [
            TaskHead::classification("emotion", 4),
            TaskHead::classification("sentiment", 3),
            TaskHead::classification("emotion2", 4),
            TaskHead::similarity("sts"),
        ]
    );
    let loaded = checkpoint::load(&out, &Device::Cpu, None).unwrap();
    let eval = sentence_mtl::train::evaluate::evaluate_checkpoint(
        &loaded,
        None,
        Split::Test,
        16,
        &Device::Cpu,
    )
    .unwrap();
    let names: Vec<&str> = eval.tasks.iter().map(|t| t.task.as_str()).collect();
    assert_eq!(names, ["emotion", "sentiment", "emotion2", "sts"]);
    assert_eq!(eval.tasks[3].metrics, test["sts"]);
    assert!(out.join("val_metrics.png").is_file() && out.join("loss.png").is_file());

    // Resuming with other tasks is an error naming both task lists.
    let mut other = config.clone();
    other.tasks.truncate(2);
    other.resume = true;
    let err = MultiTaskTrainer::new(other, Device::Cpu, DType::F32)
        .unwrap()
        .setup()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("tasks: checkpoint has") && msg.contains("emotion2"),
        "{msg}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn head_name_freezing_and_its_errors() {
    let root = setup("head-freeze");
    let run = |freeze: &str| {
        let config = TrainConfig {
            tasks: four_tasks(&root),
            freeze: freeze.parse().unwrap(),
            max_steps: Some(2),
            ..tiny_config(&root.join("model"), &root.join("data"))
        };
        let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
        trainer.setup()?;
        let before = snapshot(&trainer.model().unwrap().parameters());
        trainer.train()?;
        let after = snapshot(&trainer.model().unwrap().parameters());
        anyhow::Ok((before, after))
    };
    let (before, after) = run("head:emotion2").unwrap();
    for (name, value) in &before {
        let frozen = name.starts_with("heads.emotion2.");
        assert_eq!(value == &after[name], frozen, "{name}");
    }
    let err = format!("{:#}", run("head:sts").unwrap_err());
    assert!(err.contains("similarity task"), "{err}");
    let err = format!("{:#}", run("head:topic").unwrap_err());
    assert!(err.contains("no task of that name"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

/// The model's loss on a batch of classification rows and STS pairs: CE per
/// classification task, CoSENT of the pairs' cosines for STS; an STS-only
/// batch moves the backbone but gives no head a gradient.
#[test]
fn similarity_loss_is_cosent_and_reaches_only_the_backbone() {
    let root = setup("sts-loss");
    let files = resolve_model(root.join("model").to_str().unwrap()).unwrap();
    let tasks = [
        TaskHead::classification("emotion", 4),
        TaskHead::similarity("sts"),
    ];
    let model = MultiTaskModel::new(&files, &tasks, 3, DType::F32, &Device::Cpu).unwrap();
    let tok = load_tokenizer(&files, 16).unwrap();
    let load = |kind, dir: &Path, task| -> Vec<Example> {
        let source = TaskSource::open(kind, dir).unwrap();
        let rows: TaskRows = source.load(Split::Train).unwrap();
        rows.tokenize(&tok, TextPrep::default(), task).unwrap()
    };
    let emotion = load(TaskKind::Classification, &root.join("data/emotion"), 0);
    let sts = load(TaskKind::Sts, &root.join("sts"), 1);
    let losses_of = |rows: &[&Example]| {
        let batch = collate(rows, &model.label_columns(), 0, &Device::Cpu).unwrap();
        let out = model
            .forward(
                &batch.inputs.input_ids,
                Some(&batch.inputs.token_type_ids),
                &batch.inputs.attention_mask,
                false,
                &Freeze::None,
            )
            .unwrap();
        let weights = [TaskLoss::weighted(1.0), TaskLoss::weighted(0.5)];
        let losses = model
            .loss(&out, &batch.labels, &batch.pairs, &weights)
            .unwrap();
        (batch, out, losses)
    };
    let rows: Vec<&Example> = emotion[..3].iter().chain(&sts[..5]).collect();
    let (batch, out, losses) = losses_of(&rows);
    let per_task: Vec<f32> = losses.per_task.to_vec1().unwrap();
    // The STS loss is CoSENT of the pairs' cosines.
    let pairs = &batch.pairs[0];
    let first = out.pooled.index_select(&pairs.first, 0).unwrap();
    let second = out.pooled.index_select(&pairs.second, 0).unwrap();
    let cos = sentence_mtl::ops::cosine_similarity(&first, &second).unwrap();
    let want = cosent_loss(&cos, &pairs.scores)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (per_task[1] - want).abs() < 1e-5,
        "{} vs {want}",
        per_task[1]
    );
    assert!(per_task[1] > 0.0 && per_task[0] > 0.0);
    let total = losses.total.to_scalar::<f32>().unwrap();
    assert!((total - (per_task[0] + 0.5 * per_task[1])).abs() < 1e-5);

    // STS rows alone: the head gets no gradient, the backbone does.
    let only_sts: Vec<&Example> = sts[..6].iter().collect();
    let (_, _, losses) = losses_of(&only_sts);
    assert_eq!(losses.per_task.to_vec1::<f32>().unwrap()[0], 0.0);
    let grads = losses.total.backward().unwrap();
    let params = model.parameters();
    let norm = |name: &str| -> f32 {
        grads.get(params[name].as_tensor()).map_or(0.0, |g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    assert_eq!(norm("heads.emotion.weight"), 0.0);
    assert!(norm("encoder.layer.0.attention.self.query.weight") > 0.0);
    std::fs::remove_dir_all(root).unwrap();
}

/// `best_epoch` keeps the epoch of the best mean validation score: the report
/// names it, and the `best/` checkpoint scores on validation what that epoch
/// scored.
#[test]
fn best_epoch_keeps_the_best_validation_epoch() {
    let root = setup("best-epoch");
    let out = root.join("run");
    let config = TrainConfig {
        tasks: four_tasks(&root),
        output_dir: Some(out.clone()),
        epochs: 3,
        best_epoch: true,
        ..tiny_config(&root.join("model"), &root.join("data"))
    };
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    let report = trainer.train().unwrap();
    let epochs = &trainer.state().unwrap().epochs;
    assert_eq!(epochs.len(), 3);
    let mean = |e: usize| {
        epochs[e]
            .val
            .iter()
            .map(TaskScores::selection_score)
            .sum::<f64>()
            / 4.0
    };
    // The first epoch of the highest mean (ties keep the earlier one).
    let best = (0..3).fold(0, |b, e| if mean(e) > mean(b) { e } else { b });
    assert_eq!(report.best_epoch, Some(best + 1));
    let val = report.val.as_ref().unwrap();
    assert_eq!(val["emotion"], epochs[best].val[0]);
    let loaded = checkpoint::load(&out.join("best"), &Device::Cpu, None).unwrap();
    let eval = sentence_mtl::train::evaluate::evaluate_checkpoint(
        &loaded,
        None,
        Split::Val,
        16,
        &Device::Cpu,
    )
    .unwrap();
    for (t, task) in eval.tasks.iter().enumerate() {
        assert_eq!(task.metrics, epochs[best].val[t], "{}", task.task);
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// Layer-wise decay: the top layer at the backbone's rate, each lower one at
/// `layer_decay` times it, the embeddings lowest; the heads keep theirs.
#[test]
fn layer_decay_scales_each_layers_learning_rate() {
    let root = setup("layer-decay");
    let config = TrainConfig {
        layer_decay: 0.5,
        ..tiny_config(&root.join("model"), &root.join("data"))
    };
    let (backbone_lr, head_lr) = (config.backbone_lr, config.head_lr);
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    trainer.setup().unwrap();
    let layers = trainer.model().unwrap().num_layers();
    let groups = trainer.optimizer_groups().unwrap();
    let lr_of = |name: &str| groups.iter().find(|g| g.0 == name).map(|g| g.1);
    assert_eq!(lr_of("heads"), Some(head_lr));
    for depth in 0..=layers {
        let want = backbone_lr * 0.5f64.powi(depth as i32);
        assert_eq!(
            lr_of(&format!("backbone_depth{depth}")),
            Some(want),
            "{groups:?}"
        );
    }
    // Every backbone tensor is in one of those groups.
    let counted: usize = groups.iter().map(|g| g.2).sum();
    assert_eq!(counted, trainer.model().unwrap().parameters().len());
    std::fs::remove_dir_all(root).unwrap();
}

/// `passes` reaches the trainer's epochs: emotion's 24 training rows three
/// times and sentiment's 24 once make 96 rows, 12 batches of 8 (6 without).
#[test]
fn task_passes_lengthen_the_epoch() {
    let root = setup("passes");
    let steps = |passes: usize| {
        let mut tasks = TrainConfig::tweeteval_tasks(&root.join("data"), "emotion", "sentiment");
        tasks[0].passes = passes;
        let config = TrainConfig {
            tasks,
            epochs: 1,
            ..tiny_config(&root.join("model"), &root.join("data"))
        };
        let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
        trainer.setup().unwrap();
        trainer.train().unwrap().steps
    };
    assert_eq!(steps(1), 6);
    assert_eq!(steps(3), 12);
    std::fs::remove_dir_all(root).unwrap();
}

//! Checkpoints and determinism on a tiny random BERT with dropout on (its masks
//! are seeded per step): the same seed gives the same losses, a
//! saved checkpoint predicts exactly what the trained model predicts, and a run
//! stopped and resumed ends where an uninterrupted run ends.

use crate::train_support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sentence_mtl::data::Split;
use sentence_mtl::model::tokenize::{tokenize, Tokens};
use sentence_mtl::model::{MultiTaskModel, Pooling};
use sentence_mtl::train::evaluate::predict;
use sentence_mtl::train::evaluate::predict_probabilities;
use sentence_mtl::train::{checkpoint, MultiTaskTrainer, TrainConfig, TrainReport, TrainState};
use train_support::{snapshot, temp_dir, tiny_config, tiny_data, tiny_model};

fn fixtures(name: &str) -> PathBuf {
    let root = temp_dir(name);
    tiny_model(&root.join("model"), 21, 0.1);
    tiny_data(&root.join("data"), [21, 6, 6], 4);
    root
}

fn config(root: &Path, output: &str) -> TrainConfig {
    TrainConfig {
        output_dir: Some(root.join(output)),
        max_grad_norm: Some(1.0),
        ..tiny_config(&root.join("model"), &root.join("data"))
    }
}

fn train(
    config: TrainConfig,
) -> (
    TrainReport,
    TrainState,
    std::collections::BTreeMap<String, Vec<f32>>,
) {
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    trainer.prepare_data().unwrap();
    trainer.setup().unwrap();
    let report = trainer.train().unwrap();
    let weights = snapshot(&trainer.model().unwrap().parameters());
    (report, trainer.state().unwrap().clone(), weights)
}

#[test]
fn the_same_seed_gives_the_same_losses() {
    let root = fixtures("seed");
    let (_, a, _) = train(TrainConfig {
        output_dir: None,
        ..config(&root, "a")
    });
    let (_, b, _) = train(TrainConfig {
        output_dir: None,
        ..config(&root, "b")
    });
    assert_eq!(a.steps.len(), 12, "2 epochs of ceil(42 / 8) steps");
    let totals = |s: &TrainState| s.steps.iter().map(|r| r.total).collect::<Vec<_>>();
    assert_eq!(totals(&a), totals(&b));
    let (_, c, _) = train(TrainConfig {
        output_dir: None,
        seed: 43,
        ..config(&root, "c")
    });
    assert_ne!(totals(&a), totals(&c), "another seed, another run");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_checkpoint_predicts_what_the_trained_model_predicts() {
    let root = fixtures("saveload");
    let cfg = TrainConfig {
        max_steps: Some(4),
        ..config(&root, "run")
    };
    let mut trainer = MultiTaskTrainer::new(cfg, Device::Cpu, DType::F32).unwrap();
    trainer.setup().unwrap();
    let report = trainer.train().unwrap();
    assert!(report.stopped_early);
    let dir = trainer.save_checkpoint().unwrap();
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "tokenizer.json",
        "multitask.json",
        "trainer_state.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} in the checkpoint");
    }

    let loaded = checkpoint::load(&root.join("run"), &Device::Cpu, None).unwrap();
    assert_eq!(
        loaded.info.label_names[0],
        ["anger", "joy", "optimism", "sadness"]
    );
    assert_eq!(
        snapshot(&loaded.model.parameters()),
        snapshot(&trainer.model().unwrap().parameters())
    );
    // Both heads' probabilities, from the trainer's model and from the checkpoint.
    let texts: Vec<String> = [
        "so happy today",
        "the worst game",
        "I miss my day",
        "hope it gets better",
    ]
    .map(String::from)
    .to_vec();
    let tokens = tokenize(&loaded.tokenizer, &texts).unwrap();
    let rows: Vec<&Tokens> = tokens.iter().collect();
    let trained =
        predict_probabilities(trainer.model().unwrap(), &rows, 0, 3, &Device::Cpu).unwrap();
    let restored = predict_probabilities(&loaded.model, &rows, 0, 3, &Device::Cpu).unwrap();
    assert_eq!(trained, restored);
    let predictions = predict(&loaded, &texts, 4, &Device::Cpu).unwrap();
    let json = serde_json::to_value(&predictions[0]).unwrap();
    assert_eq!(json["text"], "so happy today");
    let emotion = json["emotion"]["probabilities"].as_object().unwrap();
    assert_eq!(emotion.len(), 4);
    let total: f64 = emotion.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    assert!(json["sentiment"]["label"].is_string());
    // And the split metrics agree with the trainer's own evaluation.
    let from_trainer = trainer.evaluate(Split::Val).unwrap();
    assert_eq!(
        from_trainer.tasks[0]
            .metrics
            .classification()
            .unwrap()
            .count,
        6
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// A run that pools by `[CLS]` records it: its checkpoint pools the same way
/// (the trained model's very probabilities), not by the default mean.
#[test]
fn a_checkpoint_keeps_its_pooling() {
    let root = fixtures("pooling");
    let cfg = TrainConfig {
        max_steps: Some(3),
        pooling: Pooling::Cls,
        ..config(&root, "run")
    };
    let mut trainer = MultiTaskTrainer::new(cfg, Device::Cpu, DType::F32).unwrap();
    trainer.setup().unwrap();
    trainer.train().unwrap();
    assert_eq!(trainer.model().unwrap().pooling(), Pooling::Cls);
    trainer.save_checkpoint().unwrap();
    let loaded = checkpoint::load(&root.join("run"), &Device::Cpu, None).unwrap();
    assert_eq!(loaded.model.pooling(), Pooling::Cls);
    let texts = ["so happy today", "the worst game of my life"].map(String::from);
    let tokens = tokenize(&loaded.tokenizer, &texts).unwrap();
    let rows: Vec<&Tokens> = tokens.iter().collect();
    let probabilities =
        |model: &MultiTaskModel| predict_probabilities(model, &rows, 0, 2, &Device::Cpu).unwrap();
    let restored = probabilities(&loaded.model);
    assert_eq!(probabilities(trainer.model().unwrap()), restored);
    let by_mean = loaded.model.with_pooling(Pooling::Mean);
    assert_ne!(
        probabilities(&by_mean),
        restored,
        "the pooling changes the outputs"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_run_ends() {
    let root = fixtures("resume");
    let (full_report, full_state, full_weights) = train(config(&root, "full"));
    assert_eq!(full_report.steps, 12);
    assert!(!full_report.stopped_early);

    // Stop mid-way through the first epoch, then resume with the same settings.
    let (stopped, _, _) = train(TrainConfig {
        max_steps: Some(4),
        ..config(&root, "resumed")
    });
    assert!(stopped.stopped_early);
    assert_eq!(stopped.steps, 4);
    let (resumed_report, resumed_state, resumed_weights) = train(TrainConfig {
        resume: true,
        ..config(&root, "resumed")
    });
    assert_eq!(resumed_report.steps, 12);
    assert_eq!(
        resumed_state.steps, full_state.steps,
        "the same losses step for step"
    );
    assert_eq!(resumed_state.epochs.len(), 2);
    for (a, b) in resumed_state.epochs.iter().zip(&full_state.epochs) {
        assert_eq!(
            (a.epoch, a.global_step, &a.val, &a.val_loss),
            (b.epoch, b.global_step, &b.val, &b.val_loss)
        );
    }
    assert!(
        resumed_weights == full_weights,
        "bit-identical weights after resuming"
    );

    // Resuming with other settings is refused, naming the difference.
    let mut other = MultiTaskTrainer::new(
        TrainConfig {
            resume: true,
            head_lr: 0.5,
            ..config(&root, "resumed")
        },
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = format!("{:#}", other.setup().unwrap_err());
    assert!(err.contains("head_lr"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

/// Label smoothing and head dropout reach the trainer's steps (the same seed
/// and batches, other losses from the first step), and a checkpoint's config
/// from before these settings reads as neither.
#[test]
fn label_smoothing_and_head_dropout_change_the_run_and_default_to_none() {
    let root = fixtures("smoothing");
    let run = |label_smoothing, head_dropout| {
        let (_, state, _) = train(TrainConfig {
            output_dir: None,
            epochs: 1,
            label_smoothing,
            head_dropout,
            ..config(&root, "run")
        });
        state.steps.iter().map(|r| r.total).collect::<Vec<_>>()
    };
    let plain = run(0.0, 0.0);
    for other in [run(0.2, 0.0), run(0.0, 0.3)] {
        assert_eq!(plain.len(), other.len());
        for (step, (a, b)) in plain.iter().zip(&other).enumerate() {
            assert!(a.is_finite() && b.is_finite());
            assert_ne!(a, b, "step {step}");
        }
    }
    let mut saved = serde_json::to_value(config(&root, "old")).unwrap();
    let fields = saved.as_object_mut().unwrap();
    fields.remove("label_smoothing").unwrap();
    fields.remove("head_dropout").unwrap();
    let old: TrainConfig = serde_json::from_value(saved).unwrap();
    assert_eq!((old.label_smoothing, old.head_dropout), (0.0, 0.0));
    std::fs::remove_dir_all(root).unwrap();
}

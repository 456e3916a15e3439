//! `ema_decay`: the trainer keeps an exponential moving average of the weights
//! on the tiny model. The kept model is the average the recurrence gives from
//! the weights of every step, validation scores it, the checkpoint keeps the
//! trained weights beside it, and a resumed run ends where an uninterrupted
//! one ends.

use crate::train_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sentence_mtl::data::Split;
use sentence_mtl::train::{checkpoint, MultiTaskTrainer, OverfitConfig, TrainConfig, TrainReport};
use train_support::{snapshot, temp_dir, tiny_config, tiny_data, tiny_model};

type Weights = BTreeMap<String, Vec<f32>>;

const DECAY: f64 = 0.5;

fn fixtures(name: &str) -> PathBuf {
    let root = temp_dir(name);
    tiny_model(&root.join("model"), 31, 0.1);
    tiny_data(&root.join("data"), [21, 6, 6], 8);
    root
}

/// One epoch of six steps (42 rows in batches of 8).
fn config(root: &Path, output: &str) -> TrainConfig {
    TrainConfig {
        output_dir: Some(root.join(output)),
        epochs: 1,
        ..tiny_config(&root.join("model"), &root.join("data"))
    }
}

/// Trains; returns the report, the model's weights at the end, and the
/// trainer (to evaluate).
fn train(config: TrainConfig) -> (TrainReport, Weights, MultiTaskTrainer) {
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    let report = trainer.train().unwrap();
    let weights = snapshot(&trainer.model().unwrap().parameters());
    (report, weights, trainer)
}

fn load(dir: &Path) -> Weights {
    let loaded = checkpoint::load(dir, &Device::Cpu, None).unwrap();
    snapshot(&loaded.model.parameters())
}

#[test]
fn the_kept_model_is_the_moving_average_of_every_step() {
    let root = fixtures("ema-recurrence");
    // The trained weights after 0, 1, ..., 6 steps (the average does not
    // change the steps: a run without it takes the same ones).
    let mut trainer = MultiTaskTrainer::new(config(&root, "w0"), Device::Cpu, DType::F32).unwrap();
    trainer.setup().unwrap();
    let mut steps = vec![snapshot(&trainer.model().unwrap().parameters())];
    for k in 1..=6 {
        let (_, w, _) = train(TrainConfig {
            max_steps: (k < 6).then_some(k),
            test_at_end: false,
            ..config(&root, &format!("w{k}"))
        });
        steps.push(w);
    }
    let (report, kept, trainer) = train(TrainConfig {
        ema_decay: Some(DECAY),
        ..config(&root, "ema")
    });
    assert_eq!(report.steps, 6);
    let mut differs = 0usize;
    for (name, got) in &kept {
        // avg_k = d·avg_{k−1} + (1 − d)·w_k, avg_0 = w_0.
        let mut want: Vec<f64> = steps[0][name].iter().map(|&v| f64::from(v)).collect();
        for w in &steps[1..] {
            for (a, &v) in want.iter_mut().zip(&w[name]) {
                *a = DECAY * *a + (1.0 - DECAY) * f64::from(v);
            }
        }
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-6 * scale,
                "{name}[{i}]: kept {g}, the average is {w}"
            );
        }
        differs += usize::from(got != &steps[6][name]);
    }
    assert!(
        differs > kept.len() / 2,
        "the kept weights are the trained ones"
    );
    // Validation scored the average; `ema/` holds it; the checkpoint holds
    // the trained weights and the average, to resume from.
    let val = trainer.evaluate(Split::Val).unwrap();
    let epoch = &trainer.state().unwrap().epochs[0];
    for (t, task) in val.tasks.iter().enumerate() {
        assert_eq!(task.metrics, epoch.val[t], "{}", task.task);
    }
    assert_eq!(load(&root.join("ema/ema")), kept);
    assert_eq!(load(&root.join("ema/checkpoint")), steps[6]);
    let average = checkpoint::read_safetensors(
        &root.join("ema/checkpoint").join(checkpoint::EMA_FILE),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(average.len(), kept.len());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_resumed_run_keeps_the_same_average() {
    let root = fixtures("ema-resume");
    let with_average = |output: &str| TrainConfig {
        ema_decay: Some(DECAY),
        test_at_end: false,
        ..config(&root, output)
    };
    let (_, full, _) = train(with_average("full"));
    let (stopped, _, _) = train(TrainConfig {
        max_steps: Some(4),
        ..with_average("resumed")
    });
    assert!(stopped.stopped_early);
    let (_, resumed, _) = train(TrainConfig {
        resume: true,
        ..with_average("resumed")
    });
    assert!(resumed == full, "bit-identical average after resuming");
    // The average is part of the run: resuming without it is refused.
    let mut other = MultiTaskTrainer::new(
        TrainConfig {
            resume: true,
            ..config(&root, "resumed")
        },
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = format!("{:#}", other.setup().unwrap_err());
    assert!(err.contains("ema_decay"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

/// With `best_epoch` too, the epochs compete with their averages: `best/`
/// holds the average at the end of the best epoch (the one a run stopped
/// there saves beside its checkpoint), which scores what that epoch scored.
#[test]
fn the_best_epoch_is_chosen_among_averages() {
    let root = fixtures("ema-best");
    let run = |output: &str, max_steps: Option<usize>| TrainConfig {
        ema_decay: Some(DECAY),
        best_epoch: true,
        epochs: 2,
        max_steps,
        test_at_end: false,
        ..config(&root, output)
    };
    let (report, _, trainer) = train(run("run", None));
    let (stopped, _, _) = train(run("epoch1", Some(6)));
    assert!(stopped.stopped_early);
    let average = |dir: &str| -> Weights {
        let path = root.join(dir).join("checkpoint").join(checkpoint::EMA_FILE);
        let tensors = checkpoint::read_safetensors(&path, &Device::Cpu).unwrap();
        tensors
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    };
    let best = report.best_epoch.expect("a best epoch");
    let want = if best == 1 {
        average("epoch1")
    } else {
        average("run")
    };
    assert!(
        load(&root.join("run/best")) == want,
        "best/ is not epoch {best}'s average"
    );
    let epochs = &trainer.state().unwrap().epochs;
    let loaded = checkpoint::load(&root.join("run/best"), &Device::Cpu, None).unwrap();
    let eval = sentence_mtl::train::evaluate::evaluate_checkpoint(
        &loaded,
        None,
        Split::Val,
        16,
        &Device::Cpu,
    )
    .unwrap();
    for (t, task) in eval.tasks.iter().enumerate() {
        assert_eq!(task.metrics, epochs[best - 1].val[t], "{}", task.task);
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn bad_decays_are_refused() {
    let root = Path::new("unused");
    for decay in [0.0, 1.0, -0.5, f64::NAN] {
        let config = TrainConfig {
            ema_decay: Some(decay),
            ..tiny_config(&root.join("model"), &root.join("data"))
        };
        let err = MultiTaskTrainer::new(config, Device::Cpu, DType::F32)
            .err()
            .expect("a bad decay accepted")
            .to_string();
        assert!(err.contains("ema_decay must be in (0, 1)"), "{err}");
    }
    let config = TrainConfig {
        ema_decay: Some(0.9),
        overfit: Some(OverfitConfig {
            batch_size: 4,
            max_steps: 3,
        }),
        ..tiny_config(&root.join("model"), &root.join("data"))
    };
    let err = MultiTaskTrainer::new(config, Device::Cpu, DType::F32)
        .err()
        .expect("ema_decay in overfit mode accepted")
        .to_string();
    assert!(err.contains("overfit"), "{err}");
}

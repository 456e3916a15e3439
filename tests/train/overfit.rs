//! Overfit mode on the real all-MiniLM-L6-v2 (scripts/fetch-model.sh puts it in
//! the cache): one mixed batch of 8 tweets, 4 emotion and 4 sentiment, is
//! memorised (100% on both heads) within a fixed number of steps. PyTorch needed
//! 2 steps of 30 at lr 1e-4 on such a batch; we allow 15.

use crate::train_support;

use candle_core::{DType, Device};
use sentence_mtl::train::{MultiTaskTrainer, OverfitConfig, TrainConfig};
use train_support::shared_dir;

const MAX_STEPS: usize = 15;

#[test]
fn overfit_memorises_a_mixed_batch_of_8_on_minilm() {
    let config = TrainConfig {
        data_dir: shared_dir().join("data/tweeteval"),
        overfit: Some(OverfitConfig {
            batch_size: 8,
            max_steps: MAX_STEPS,
        }),
        backbone_lr: 1e-4,
        head_lr: 1e-3,
        max_len: 32,
        verbose: false,
        ..TrainConfig::default()
    };
    let mut trainer = MultiTaskTrainer::new(config, Device::Cpu, DType::F32).unwrap();
    trainer.prepare_data().unwrap();
    trainer.setup().unwrap();
    let report = trainer.train().unwrap();
    let overfit = report.overfit.expect("overfit mode reports");
    assert_eq!(overfit.batch_size, 8);
    let memorised = overfit.memorised_at.unwrap_or_else(|| {
        panic!(
            "not memorised in {MAX_STEPS} steps; accuracy per step: {:?}",
            overfit.accuracy
        )
    });
    assert!(memorised <= MAX_STEPS);
    assert_eq!(overfit.accuracy.last(), Some(&[1.0, 1.0]));
    assert_ne!(
        overfit.initial_accuracy,
        [1.0, 1.0],
        "the fresh heads did not know the batch already"
    );
    // Both heads had rows in every step.
    assert!(overfit
        .loss
        .iter()
        .all(|l| l[0].is_some() && l[1].is_some()));
}

//! Multi-task training: [`MultiTaskTrainer`] and what it is built from: the
//! configuration (and settings files), AdamW with parameter groups, the learning-rate schedule,
//! metrics, evaluation, atomic checkpoints, and the run's records and plots; and
//! the STS benchmark's evaluation of an encoder ([`sts`]).

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod metrics;
pub mod optim;
pub mod records;
pub mod schedule;
pub mod settings;
pub mod sts;
pub mod trainer;

pub use config::{ClassWeighting, OverfitConfig, TaskSpec, TrainConfig};
pub use evaluate::{EvalReport, TaskEval};
pub use metrics::{pearson, spearman, ConfusionMatrix, TaskMetrics, TaskScores};
pub use optim::{AdamW, AdamWParams, ParamGroup};
pub use records::{
    EpochRecord, OverfitReport, StepRecord, TrainReport, TrainState, MEMORISED_LOSS,
};
pub use schedule::LrSchedule;
pub use settings::Settings;
pub use sts::{evaluate_sts, sts_report, StsReport};
pub use trainer::MultiTaskTrainer;

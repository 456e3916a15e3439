//! Multi-task training: [`MultiTaskTrainer`] and what it is built from: the
//! configuration, AdamW with parameter groups, the learning-rate schedule,
//! metrics, evaluation, atomic checkpoints, and the run's records and plots.

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod metrics;
pub mod optim;
pub mod records;
pub mod schedule;
pub mod trainer;

pub use config::{OverfitConfig, TrainConfig};
pub use evaluate::{EvalReport, TaskEval};
pub use metrics::{ConfusionMatrix, TaskMetrics};
pub use optim::{AdamW, AdamWParams, ParamGroup};
pub use records::{EpochRecord, OverfitReport, StepRecord, TrainReport, TrainState};
pub use schedule::LrSchedule;
pub use trainer::MultiTaskTrainer;

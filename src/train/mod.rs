//! Multi-task training: the optimiser, the learning-rate schedule, metrics,
//! atomic checkpoints and the trainer that ties them together.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod schedule;

pub use metrics::{ConfusionMatrix, TaskMetrics};
pub use optim::{AdamW, AdamWParams, ParamGroup};
pub use schedule::LrSchedule;

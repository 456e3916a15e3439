//! The data: TweetEval-layout classification tasks (the benchmark's folder
//! loader), the STS benchmark's sentence pairs ([`stsb`]), the two samplers
//! that turn any number of tasks into one stream of batches, and the collation
//! of tokenised examples into padded tensors.
//!
//! The tasks are trained on different texts, so a batch mixes rows of several
//! tasks: each classification row carries its label in its own task's column
//! of the `[S, Hc]` label tensor and [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX)
//! in the others'; a similarity row adds its pair's second sentence to the
//! batch and its score to its task's pairs.

pub mod batch;
pub mod sampler;
pub mod stsb;
pub mod task;
pub mod tweeteval;

pub use batch::{collate, tokenize_pairs, tokenize_split, Example, LabelledBatch, Target};
pub use sampler::{epoch_batches, ExampleRef, SamplerKind};
pub use stsb::{load_stsb, read_stsb_csv, stsb_split_path, StsPair};
pub use task::{TaskKind, TaskRows, TaskSource};
pub use tweeteval::{DataError, Split, TaskData, TaskSplit};

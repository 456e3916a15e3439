//! The data: TweetEval for multi-task training (the benchmark's folder loader, the
//! two samplers that turn two tasks into one stream of batches, and the collation
//! of tokenised examples into padded tensors), and the STS benchmark's sentence
//! pairs ([`stsb`]) for evaluating embeddings.
//!
//! Head A and head B are trained on different tweets, so a batch mixes rows of both
//! tasks: each row carries its label in its own head's column of the `[B, 2]` label
//! tensor and [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX) in the other's.

pub mod batch;
pub mod sampler;
pub mod stsb;
pub mod tweeteval;

pub use batch::{collate, tokenize_split, Example, LabelledBatch};
pub use sampler::{epoch_batches, ExampleRef, SamplerKind};
pub use stsb::{load_stsb, read_stsb_csv, stsb_split_path, StsPair};
pub use tweeteval::{DataError, Split, TaskData, TaskSplit};

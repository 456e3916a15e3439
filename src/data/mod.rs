//! TweetEval data for multi-task training: the benchmark's folder loader, the two
//! samplers that turn two tasks into one stream of batches, and the collation of
//! tokenised examples into padded tensors.
//!
//! Head A and head B are trained on different tweets, so a batch mixes rows of both
//! tasks: each row carries its label in its own head's column of the `[B, 2]` label
//! tensor and [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX) in the other's.

pub mod batch;
pub mod sampler;
pub mod tweeteval;

pub use batch::{collate, tokenize_split, Batch, Example};
pub use sampler::{epoch_batches, ExampleRef, SamplerKind};
pub use tweeteval::{DataError, Split, TaskData, TaskSplit};

use serde::{Deserialize, Serialize};

/// One of the model's two classification heads (and the task it is trained on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Head {
    /// Head A: emotion by default.
    A,
    /// Head B: sentiment by default.
    B,
}

impl Head {
    pub const BOTH: [Head; 2] = [Head::A, Head::B];

    /// The head's column in the `[B, 2]` label tensor (0 for A, 1 for B).
    pub fn index(self) -> usize {
        match self {
            Head::A => 0,
            Head::B => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Head::A => "a",
            Head::B => "b",
        }
    }
}

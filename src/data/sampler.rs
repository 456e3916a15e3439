//! The order in which one epoch visits the examples of both tasks.
//!
//! Both samplers visit every example of both tasks exactly once per epoch and are
//! a pure function of `(seed, epoch)`: the same arguments give the same batches on
//! every run, which is what makes `--resume` land on the batch it stopped at.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::Head;

/// How batches are drawn from the two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Shuffle the union of both training sets and cut it into batches: each batch
    /// mixes the tasks in proportion to their sizes.
    Proportional,
    /// Shuffle each task on its own, cut each into single-task batches and
    /// alternate A, B, A, B, ...; once the smaller task is used up the rest of the
    /// larger one follows.
    RoundRobin,
}

/// One example: its task (head) and its row in that task's split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExampleRef {
    /// The task the example belongs to: head A's or head B's.
    pub head: Head,
    /// The 0-based row in that task's split, in file order.
    pub index: usize,
}

/// The batches of epoch `epoch` (0-based) over tasks of `sizes[A]` and `sizes[B]`
/// examples. Every batch has `batch_size` rows except possibly the last of each
/// task stream (no example is dropped).
pub fn epoch_batches(
    kind: SamplerKind,
    sizes: [usize; 2],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<ExampleRef>> {
    assert!(batch_size > 0, "batch_size must be positive");
    let mut rng = epoch_rng(seed, epoch);
    let task = |head: Head| (0..sizes[head.index()]).map(move |index| ExampleRef { head, index });
    match kind {
        SamplerKind::Proportional => {
            let mut all: Vec<ExampleRef> = task(Head::A).chain(task(Head::B)).collect();
            all.shuffle(&mut rng);
            all.chunks(batch_size).map(<[_]>::to_vec).collect()
        }
        SamplerKind::RoundRobin => {
            let mut streams = Head::BOTH.map(|head| {
                let mut rows: Vec<ExampleRef> = task(head).collect();
                rows.shuffle(&mut rng);
                rows.chunks(batch_size)
                    .map(<[_]>::to_vec)
                    .collect::<Vec<_>>()
                    .into_iter()
            });
            let mut batches = Vec::new();
            loop {
                let a = streams[0].next();
                let b = streams[1].next();
                if a.is_none() && b.is_none() {
                    return batches;
                }
                batches.extend(a);
                batches.extend(b);
            }
        }
    }
}

/// An RNG for one epoch, derived from the run's seed so that epochs differ but
/// each can be recomputed on its own (SplitMix64's increment spreads the epochs).
pub fn epoch_rng(seed: u64, epoch: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

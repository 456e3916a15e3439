//! The order in which one epoch visits the examples of every task.
//!
//! Both samplers visit every example of every task exactly once per epoch (or
//! `passes[t]` times, to oversample a small task) and are a pure function of
//! `(seed, epoch)`: the same arguments give the same
//! batches on every run, which is what makes `--resume` land on the batch it
//! stopped at.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// How batches are drawn from the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Shuffle the union of all training sets and cut it into batches: each batch
    /// mixes the tasks in proportion to their sizes.
    Proportional,
    /// Shuffle each task on its own, cut each into single-task batches and take
    /// one batch of each task in turn; a task that is used up drops out of the
    /// turn.
    RoundRobin,
}

/// One example: its task and its row in that task's split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExampleRef {
    /// The index of the task the example belongs to.
    pub task: usize,
    /// The 0-based row in that task's split, in file order.
    pub index: usize,
}

/// The batches of epoch `epoch` (0-based) over tasks of `sizes[t]` examples,
/// each visited `passes[t]` times (each pass a fresh shuffle; 1 for every task
/// is the plain epoch). Every batch has `batch_size` rows except possibly the
/// last of each task stream (no example is dropped).
pub fn epoch_batches(
    kind: SamplerKind,
    sizes: &[usize],
    passes: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<ExampleRef>> {
    assert!(batch_size > 0, "batch_size must be positive");
    assert_eq!(sizes.len(), passes.len(), "one pass count per task");
    let mut rng = epoch_rng(seed, epoch);
    let task = |task: usize| (0..sizes[task]).map(move |index| ExampleRef { task, index });
    match kind {
        SamplerKind::Proportional => {
            // All passes of all tasks in one shuffle: with one pass each, the
            // plain union (so the default recipe's batches do not move).
            let mut all: Vec<ExampleRef> = (0..sizes.len())
                .flat_map(|t| (0..passes[t]).flat_map(move |_| task(t)))
                .collect();
            all.shuffle(&mut rng);
            all.chunks(batch_size).map(<[_]>::to_vec).collect()
        }
        SamplerKind::RoundRobin => {
            let mut streams: Vec<_> = (0..sizes.len())
                .map(|t| {
                    // Pass after pass, each shuffled on its own: no example
                    // comes twice before every other has come once.
                    let rows: Vec<ExampleRef> = (0..passes[t])
                        .flat_map(|_| {
                            let mut pass: Vec<ExampleRef> = task(t).collect();
                            pass.shuffle(&mut rng);
                            pass
                        })
                        .collect();
                    rows.chunks(batch_size)
                        .map(<[_]>::to_vec)
                        .collect::<Vec<_>>()
                        .into_iter()
                })
                .collect();
            let mut batches = Vec::new();
            loop {
                let before = batches.len();
                batches.extend(streams.iter_mut().filter_map(Iterator::next));
                if batches.len() == before {
                    return batches;
                }
            }
        }
    }
}

/// An RNG for one epoch, derived from the run's seed so that epochs differ but
/// each can be recomputed on its own (SplitMix64's increment spreads the epochs).
pub fn epoch_rng(seed: u64, epoch: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

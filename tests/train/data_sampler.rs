//! Both samplers visit every example of every task exactly once per epoch,
//! deterministically for a seed; collation pads to the longest sentence, marks
//! the other tasks' columns ignored and lays out similarity pairs.

use std::collections::BTreeSet;

use candle_core::Device;
use sentence_mtl::data::{collate, epoch_batches, Example, ExampleRef, SamplerKind, Target};
use sentence_mtl::model::tokenize::Tokens;
use sentence_mtl::ops::IGNORE_INDEX;

const KINDS: [SamplerKind; 2] = [SamplerKind::Proportional, SamplerKind::RoundRobin];

fn every_example(sizes: &[usize]) -> BTreeSet<ExampleRef> {
    (0..sizes.len())
        .flat_map(|task| (0..sizes[task]).map(move |index| ExampleRef { task, index }))
        .collect()
}

#[test]
fn every_example_once_per_epoch() {
    for kind in KINDS {
        for (sizes, batch) in [
            (&[3257, 10000][..], 32),
            (&[5, 17], 4),
            (&[1, 0], 3),
            (&[9, 9], 1),
            (&[0, 0], 8),
            (&[7], 3),
            (&[3, 0, 11, 5], 4),
        ] {
            for epoch in 0..3 {
                let batches = epoch_batches(kind, sizes, &vec![1; sizes.len()], batch, 42, epoch);
                let seen: Vec<ExampleRef> = batches.iter().flatten().copied().collect();
                let unique: BTreeSet<ExampleRef> = seen.iter().copied().collect();
                assert_eq!(
                    seen.len(),
                    sizes.iter().sum::<usize>(),
                    "{kind:?} {sizes:?}: each example once"
                );
                assert_eq!(unique, every_example(sizes), "{kind:?} {sizes:?}");
                assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= batch));
            }
        }
    }
}

#[test]
fn proportional_gives_the_pytorch_step_count_and_mixed_batches() {
    let batches = epoch_batches(
        SamplerKind::Proportional,
        &[3257, 10000],
        &[1, 1],
        32,
        42,
        0,
    );
    assert_eq!(
        batches.len(),
        415,
        "ceil(13257 / 32), the last batch partial"
    );
    assert!(batches[..414].iter().all(|b| b.len() == 32));
    let mixed = batches
        .iter()
        .filter(|b| b.iter().any(|r| r.task == 0) && b.iter().any(|r| r.task == 1));
    assert!(mixed.count() > 300, "most batches hold rows of both tasks");
}

#[test]
fn round_robin_alternates_single_task_batches() {
    let task_of = |batches: Vec<Vec<ExampleRef>>| -> Vec<usize> {
        batches
            .iter()
            .map(|b| {
                assert!(b.iter().all(|r| r.task == b[0].task), "single-task batch");
                b[0].task
            })
            .collect()
    };
    let batches = epoch_batches(SamplerKind::RoundRobin, &[10, 30], &[1, 1], 4, 7, 0);
    // 3 batches of A (4+4+2), 8 of B: A B A B A B, then the rest of B.
    let expected: Vec<usize> = [0, 1, 0, 1, 0, 1]
        .into_iter()
        .chain(std::iter::repeat_n(1, 5))
        .collect();
    assert_eq!(task_of(batches), expected);
    // Three tasks: one batch of each in turn, the used-up ones dropping out.
    let batches = epoch_batches(SamplerKind::RoundRobin, &[4, 12, 8], &[1, 1, 1], 4, 7, 0);
    assert_eq!(task_of(batches), [0, 1, 2, 1, 2, 1]);
}

/// `passes[t]` visits of task `t` per epoch, each a full pass before the next
/// begins in the round-robin stream; every other task still comes once.
#[test]
fn passes_oversample_a_task() {
    for kind in KINDS {
        let batches = epoch_batches(kind, &[10, 30], &[3, 1], 5, 42, 0);
        let seen: Vec<ExampleRef> = batches.iter().flatten().copied().collect();
        let count = |r: &ExampleRef| seen.iter().filter(|s| *s == r).count();
        for index in 0..10 {
            assert_eq!(count(&ExampleRef { task: 0, index }), 3, "{kind:?}");
        }
        for index in 0..30 {
            assert_eq!(count(&ExampleRef { task: 1, index }), 1, "{kind:?}");
        }
        assert_eq!(batches.len(), 12, "{kind:?}: 60 rows in full batches of 5");
    }
    let a_rows: Vec<ExampleRef> =
        epoch_batches(SamplerKind::RoundRobin, &[10, 30], &[3, 1], 4, 42, 0)
            .into_iter()
            .flatten()
            .filter(|r| r.task == 0)
            .collect();
    for pass in a_rows.chunks(10) {
        let unique: BTreeSet<ExampleRef> = pass.iter().copied().collect();
        assert_eq!(unique.len(), 10, "each pass visits every example once");
    }
}

#[test]
fn shuffling_is_seeded_and_differs_by_epoch() {
    for kind in KINDS {
        let a = epoch_batches(kind, &[50, 70], &[1, 1], 8, 42, 1);
        assert_eq!(
            a,
            epoch_batches(kind, &[50, 70], &[1, 1], 8, 42, 1),
            "{kind:?}: same seed, same order"
        );
        assert_ne!(
            a,
            epoch_batches(kind, &[50, 70], &[1, 1], 8, 42, 2),
            "{kind:?}: epochs differ"
        );
        assert_ne!(
            a,
            epoch_batches(kind, &[50, 70], &[1, 1], 8, 43, 1),
            "{kind:?}: seeds differ"
        );
    }
}

#[test]
fn collate_pads_to_the_longest_and_ignores_the_other_head() {
    let rows = [
        Example {
            tokens: Tokens {
                input_ids: vec![101, 7, 102],
                type_ids: vec![0; 3],
            },
            task: 0,
            target: Target::Class(3),
        },
        Example {
            tokens: Tokens {
                input_ids: vec![101, 8, 9, 10, 102],
                type_ids: vec![0; 5],
            },
            task: 1,
            target: Target::Class(2),
        },
        Example {
            tokens: Tokens {
                input_ids: vec![101, 102],
                type_ids: vec![0; 2],
            },
            task: 1,
            target: Target::Class(0),
        },
    ];
    let refs: Vec<&Example> = rows.iter().collect();
    let columns = [Some(0), Some(1)];
    let batch = collate(&refs, &columns, 0, &Device::Cpu).unwrap();
    assert!(batch.pairs.is_empty());
    assert_eq!(batch.inputs.input_ids.dims(), &[3, 5]);
    assert_eq!(
        batch.inputs.input_ids.to_vec2::<u32>().unwrap(),
        vec![
            vec![101, 7, 102, 0, 0],
            vec![101, 8, 9, 10, 102],
            vec![101, 102, 0, 0, 0]
        ]
    );
    assert_eq!(
        batch.inputs.attention_mask.to_vec2::<u32>().unwrap(),
        vec![
            vec![1, 1, 1, 0, 0],
            vec![1, 1, 1, 1, 1],
            vec![1, 1, 0, 0, 0]
        ]
    );
    assert_eq!(
        batch.labels.to_vec2::<i64>().unwrap(),
        vec![
            vec![3, IGNORE_INDEX],
            vec![IGNORE_INDEX, 2],
            vec![IGNORE_INDEX, 0]
        ]
    );
    assert!(collate(&[], &columns, 0, &Device::Cpu).is_err());
}

fn tokens(ids: &[u32]) -> Tokens {
    Tokens {
        input_ids: ids.to_vec(),
        type_ids: vec![0; ids.len()],
    }
}

/// A similarity row adds its second sentence after every row's first one;
/// its task's pairs point at both; pair sentences are labelled for no head.
#[test]
fn collate_lays_out_sentence_pairs_after_the_rows() {
    let rows = [
        Example {
            tokens: tokens(&[101, 5, 102]),
            task: 1,
            target: Target::Pair {
                second: tokens(&[101, 6, 7, 102]),
                score: 4.5,
            },
        },
        Example {
            tokens: tokens(&[101, 8, 102]),
            task: 0,
            target: Target::Class(2),
        },
        Example {
            tokens: tokens(&[101, 9, 102]),
            task: 1,
            target: Target::Pair {
                second: tokens(&[101, 102]),
                score: 0.5,
            },
        },
    ];
    let refs: Vec<&Example> = rows.iter().collect();
    // Task 0 classification (column 0), task 1 similarity.
    let columns = [Some(0), None];
    let batch = collate(&refs, &columns, 0, &Device::Cpu).unwrap();
    assert_eq!(batch.inputs.input_ids.dims(), &[5, 4]);
    assert_eq!(
        batch.inputs.input_ids.to_vec2::<u32>().unwrap()[3],
        vec![101, 6, 7, 102]
    );
    assert_eq!(
        batch.labels.to_vec2::<i64>().unwrap(),
        vec![
            vec![IGNORE_INDEX],
            vec![2],
            vec![IGNORE_INDEX],
            vec![IGNORE_INDEX],
            vec![IGNORE_INDEX]
        ]
    );
    assert_eq!(batch.pairs.len(), 1);
    let pairs = &batch.pairs[0];
    assert_eq!(pairs.task, 1);
    assert_eq!(pairs.first.to_vec1::<u32>().unwrap(), [0, 2]);
    assert_eq!(pairs.second.to_vec1::<u32>().unwrap(), [3, 4]);
    assert_eq!(pairs.scores.to_vec1::<f32>().unwrap(), [4.5, 0.5]);
    // A row whose target does not fit its task's kind is an error.
    let wrong = [Some(0), Some(1)];
    let err = collate(&refs, &wrong, 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}

//! Both samplers visit every example exactly once per epoch, deterministically
//! for a seed; collation pads to the longest row and marks the other head ignored.

use std::collections::BTreeSet;

use candle_core::Device;
use sentence_mtl::data::{collate, epoch_batches, Example, ExampleRef, SamplerKind};
use sentence_mtl::model::tokenize::Tokens;
use sentence_mtl::model::Head;
use sentence_mtl::ops::IGNORE_INDEX;

const KINDS: [SamplerKind; 2] = [SamplerKind::Proportional, SamplerKind::RoundRobin];

fn every_example(sizes: [usize; 2]) -> BTreeSet<ExampleRef> {
    Head::BOTH
        .into_iter()
        .flat_map(|head| (0..sizes[head.index()]).map(move |index| ExampleRef { head, index }))
        .collect()
}

#[test]
fn every_example_once_per_epoch() {
    for kind in KINDS {
        for (sizes, batch) in [
            ([3257, 10000], 32),
            ([5, 17], 4),
            ([1, 0], 3),
            ([9, 9], 1),
            ([0, 0], 8),
        ] {
            for epoch in 0..3 {
                let batches = epoch_batches(kind, sizes, batch, 42, epoch);
                let seen: Vec<ExampleRef> = batches.iter().flatten().copied().collect();
                let unique: BTreeSet<ExampleRef> = seen.iter().copied().collect();
                assert_eq!(
                    seen.len(),
                    sizes[0] + sizes[1],
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
    let batches = epoch_batches(SamplerKind::Proportional, [3257, 10000], 32, 42, 0);
    assert_eq!(
        batches.len(),
        415,
        "ceil(13257 / 32), the last batch partial"
    );
    assert!(batches[..414].iter().all(|b| b.len() == 32));
    let mixed = batches
        .iter()
        .filter(|b| b.iter().any(|r| r.head == Head::A) && b.iter().any(|r| r.head == Head::B));
    assert!(mixed.count() > 300, "most batches hold rows of both tasks");
}

#[test]
fn round_robin_alternates_single_task_batches() {
    let batches = epoch_batches(SamplerKind::RoundRobin, [10, 30], 4, 7, 0);
    let heads: Vec<Head> = batches
        .iter()
        .map(|b| {
            assert!(b.iter().all(|r| r.head == b[0].head), "single-task batch");
            b[0].head
        })
        .collect();
    // 3 batches of A (4+4+2), 8 of B: A B A B A B, then the rest of B.
    let expected: Vec<Head> = [Head::A, Head::B, Head::A, Head::B, Head::A, Head::B]
        .into_iter()
        .chain(std::iter::repeat_n(Head::B, 5))
        .collect();
    assert_eq!(heads, expected);
}

#[test]
fn shuffling_is_seeded_and_differs_by_epoch() {
    for kind in KINDS {
        let a = epoch_batches(kind, [50, 70], 8, 42, 1);
        assert_eq!(
            a,
            epoch_batches(kind, [50, 70], 8, 42, 1),
            "{kind:?}: same seed, same order"
        );
        assert_ne!(
            a,
            epoch_batches(kind, [50, 70], 8, 42, 2),
            "{kind:?}: epochs differ"
        );
        assert_ne!(
            a,
            epoch_batches(kind, [50, 70], 8, 43, 1),
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
            head: Head::A,
            label: 3,
        },
        Example {
            tokens: Tokens {
                input_ids: vec![101, 8, 9, 10, 102],
                type_ids: vec![0; 5],
            },
            head: Head::B,
            label: 2,
        },
        Example {
            tokens: Tokens {
                input_ids: vec![101, 102],
                type_ids: vec![0; 2],
            },
            head: Head::B,
            label: 0,
        },
    ];
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = collate(&refs, 0, &Device::Cpu).unwrap();
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
    assert!(collate(&[], 0, &Device::Cpu).is_err());
}

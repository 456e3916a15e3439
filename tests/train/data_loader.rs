//! The TweetEval loader: the real data loads with the README's counts, and every
//! kind of malformed file gives an error naming the file (and the line).

use std::path::PathBuf;

use sentence_mtl::data::{DataError, Split, TaskData};

use crate::train_support::shared_dir;

/// A task folder in a fresh temp dir, with the given files.
fn fixture(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root =
        std::env::temp_dir().join(format!("sentence-mtl-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("emotion");
    std::fs::create_dir_all(&dir).unwrap();
    for (file, content) in files {
        std::fs::write(dir.join(file), content).unwrap();
    }
    dir
}

const MAPPING: &str = "0\tanger\n1\tjoy\n2\toptimism\n3\tsadness\n";

fn load_err(name: &str, files: &[(&str, &str)]) -> (PathBuf, String) {
    let dir = fixture(name, files);
    let err = TaskData::open(&dir)
        .and_then(|t| t.load(Split::Train))
        .unwrap_err();
    let msg = err.to_string();
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    (dir, msg)
}

#[test]
fn real_data_loads_with_the_readme_counts() {
    let root = shared_dir().join("data/tweeteval");
    for (task, names, counts) in [
        (
            "emotion",
            vec!["anger", "joy", "optimism", "sadness"],
            [3257, 374, 1421],
        ),
        (
            "sentiment",
            vec!["negative", "neutral", "positive"],
            [10000, 2000, 2284],
        ),
    ] {
        let data = TaskData::open(root.join(task)).unwrap();
        assert_eq!(data.label_names, names);
        for (split, count) in [Split::Train, Split::Val, Split::Test]
            .into_iter()
            .zip(counts)
        {
            let s = data.load(split).unwrap();
            assert_eq!(
                (s.texts.len(), s.labels.len()),
                (count, count),
                "{task} {split}"
            );
            assert!(s.labels.iter().all(|&l| l < names.len()));
            assert!(s
                .texts
                .iter()
                .all(|t| !t.ends_with('\r') && !t.contains('\n')));
        }
    }
}

#[test]
fn crlf_and_no_final_newline_are_accepted() {
    let dir = fixture(
        "crlf",
        &[
            ("mapping.txt", "0\tanger\r\n1\tjoy"),
            ("train_text.txt", "first tweet\r\nsecond tweet\r\n"),
            ("train_labels.txt", "1\r\n0"),
        ],
    );
    let data = TaskData::open(&dir).unwrap();
    assert_eq!(data.label_names, ["anger", "joy"]);
    let s = data.load(Split::Train).unwrap();
    assert_eq!(s.texts, ["first tweet", "second tweet"]);
    assert_eq!(s.labels, [1, 0]);
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn counts_that_disagree_name_both_files() {
    let (dir, msg) = load_err(
        "count",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", "a\nb\nc\n"),
            ("train_labels.txt", "0\n1\n"),
        ],
    );
    assert!(
        msg.contains(&dir.join("train_text.txt").display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains(&dir.join("train_labels.txt").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("3 lines") && msg.contains("2 lines"), "{msg}");
}

#[test]
fn a_label_outside_the_mapping_names_file_and_line() {
    let (dir, msg) = load_err(
        "range",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", "a\nb\nc"),
            ("train_labels.txt", "0\n3\n4\n"),
        ],
    );
    let expected = format!(
        "{}:3: label 4 is outside the mapping",
        dir.join("train_labels.txt").display()
    );
    assert!(msg.contains(&expected), "{msg}");
    let (_, msg) = load_err(
        "negative",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", "a"),
            ("train_labels.txt", "-1"),
        ],
    );
    assert!(
        msg.contains("train_labels.txt:1: label -1 is outside the mapping"),
        "{msg}"
    );
}

#[test]
fn a_label_that_is_not_an_integer_names_file_and_line() {
    let (_, msg) = load_err(
        "nonint",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", "a\nb"),
            ("train_labels.txt", "1\njoy\n"),
        ],
    );
    assert!(
        msg.contains("train_labels.txt:2: label \"joy\" is not an integer"),
        "{msg}"
    );
}

#[test]
fn empty_files_are_errors() {
    let (dir, msg) = load_err(
        "empty",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", ""),
            ("train_labels.txt", ""),
        ],
    );
    assert_eq!(
        msg,
        format!(
            "{}: the file is empty",
            dir.join("train_text.txt").display()
        )
    );
    let (dir, msg) = load_err("emptymap", &[("mapping.txt", "")]);
    assert_eq!(
        msg,
        format!("{}: the file is empty", dir.join("mapping.txt").display())
    );
}

#[test]
fn a_missing_split_or_mapping_names_the_file() {
    let dir = fixture(
        "missing",
        &[
            ("mapping.txt", MAPPING),
            ("train_text.txt", "a"),
            ("train_labels.txt", "0"),
        ],
    );
    let data = TaskData::open(&dir).unwrap();
    assert!(data.load(Split::Train).is_ok());
    let err = data.load(Split::Val).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&dir.join("val_text.txt").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("the val split of task 'emotion'"), "{msg}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();

    let (dir, msg) = load_err("nomap", &[("train_text.txt", "a")]);
    assert!(
        msg.starts_with(&dir.join("mapping.txt").display().to_string()),
        "{msg}"
    );
    let err = TaskData::open("/nonexistent/tweeteval/emotion")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/tweeteval/emotion: missing"),
        "{err}"
    );
}

#[test]
fn a_malformed_mapping_names_the_line() {
    for (content, line, needle) in [
        ("0\tanger\n2\tjoy\n", 2, "out of order"),
        ("0\tanger\nx\tjoy\n", 2, "not an integer"),
        ("0\tanger\n1\t\n", 2, "has no name"),
        ("anger\n", 1, "expected `id<TAB>name`"),
    ] {
        let (dir, msg) = load_err("mapping", &[("mapping.txt", content)]);
        let prefix = format!("{}:{line}: ", dir.join("mapping.txt").display());
        assert!(
            msg.starts_with(&prefix) && msg.contains(needle),
            "{content:?}: {msg}"
        );
    }
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = fixture(
        "utf8",
        &[("mapping.txt", MAPPING), ("train_labels.txt", "0\n0\n")],
    );
    std::fs::write(dir.join("train_text.txt"), b"fine\nbad \xff byte\n").unwrap();
    let msg = TaskData::open(&dir)
        .unwrap()
        .load(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("train_text.txt:2: not valid UTF-8"), "{msg}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

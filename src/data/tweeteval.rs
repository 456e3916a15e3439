//! The TweetEval benchmark's folder layout, one folder per task:
//!
//! ```text
//! emotion/mapping.txt        0<TAB>anger, 1<TAB>joy, ...   (ids 0.. in order)
//! emotion/train_text.txt     one tweet per line
//! emotion/train_labels.txt   one integer label per line, same line count
//! emotion/val_*.txt, emotion/test_*.txt
//! ```
//!
//! Files may use CRLF line ends and may end without a final newline. Anything
//! else that is off (a missing file, an empty file, line counts that disagree, a
//! label that is not an integer or not in the mapping) is a [`DataError`] naming
//! the file and, where it applies, the 1-based line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A split of a TweetEval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split (`train_*.txt`).
    Train,
    /// The validation split (`val_*.txt`; STS-B's `dev`), scored after every epoch.
    #[value(alias = "dev")]
    Val,
    /// The test split (`test_*.txt`), scored at the end of training (`test_at_end`).
    Test,
}

impl Split {
    /// The file-name prefix: `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a TweetEval task folder or one of its files could not be loaded; every
/// variant names the file and, where it applies, the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The task folder or a file it needs does not exist.
    #[error("{}: missing: {what}", path.display())]
    Missing {
        /// The folder or file that is not there.
        path: PathBuf,
        /// What needed it, e.g. "the val split of task 'emotion' needs this file".
        what: String,
    },
    /// Reading the file failed for a reason other than its absence (e.g. permissions).
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file has no content (a lone UTF-8 byte-order mark counts as empty).
    #[error("{}: the file is empty", path.display())]
    Empty {
        /// The empty file.
        path: PathBuf,
    },
    /// The file is not valid UTF-8.
    #[error("{}:{line}: not valid UTF-8", path.display())]
    NotUtf8 {
        /// The file with the invalid bytes.
        path: PathBuf,
        /// The 1-based line holding the first invalid byte.
        line: usize,
    },
    /// A line of `mapping.txt` is not `id<TAB>name`, its id is not an integer or
    /// not the next in 0, 1, 2, ..., or its name is empty.
    #[error("{}:{line}: {reason}", path.display())]
    BadMapping {
        /// The `mapping.txt` file.
        path: PathBuf,
        /// The 1-based line at fault.
        line: usize,
        /// What is wrong with that line.
        reason: String,
    },
    /// A line of a `*_labels.txt` file does not parse as an integer (after trimming).
    #[error("{}:{line}: label {value:?} is not an integer", path.display())]
    BadLabel {
        /// The labels file.
        path: PathBuf,
        /// The 1-based line at fault.
        line: usize,
        /// The line's trimmed text.
        value: String,
    },
    /// A label is an integer but negative or not below the task's class count.
    #[error(
        "{}:{line}: label {label} is outside the mapping ({num_classes} classes, ids 0..{num_classes}) of {}",
        path.display(),
        mapping.display()
    )]
    LabelOutOfRange {
        /// The labels file.
        path: PathBuf,
        /// The 1-based line at fault.
        line: usize,
        /// The label read from that line.
        label: i64,
        /// How many classes the task's `mapping.txt` defines (valid ids are below it).
        num_classes: usize,
        /// The task's `mapping.txt`.
        mapping: PathBuf,
    },
    /// A line of a CSV file (STS-B) is not the record it should be.
    #[error("{}:{line}: {reason}", path.display())]
    BadRecord {
        /// The CSV file.
        path: PathBuf,
        /// The 1-based line at fault.
        line: usize,
        /// What is wrong with that line.
        reason: String,
    },
    /// A split's text and labels files have different line counts.
    #[error(
        "{}: {text_lines} lines but {}: {label_lines} lines; they must be equal (first unmatched line: {})",
        text_path.display(),
        labels_path.display(),
        text_lines.min(label_lines) + 1
    )]
    CountMismatch {
        /// The split's `*_text.txt` file.
        text_path: PathBuf,
        /// How many lines the text file has.
        text_lines: usize,
        /// The split's `*_labels.txt` file.
        labels_path: PathBuf,
        /// How many lines the labels file has.
        label_lines: usize,
    },
}

/// The texts and labels of one split of one task, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSplit {
    /// One tweet per example, line ends removed.
    pub texts: Vec<String>,
    /// Each example's label id, below the task's class count; as long as `texts`.
    pub labels: Vec<usize>,
}

impl TaskSplit {
    /// The number of examples.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether the split has no examples.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

/// One TweetEval task folder with its label names read from `mapping.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskData {
    /// The folder's name, e.g. `emotion`.
    pub name: String,
    /// The task folder, as given to [`TaskData::open`].
    pub dir: PathBuf,
    /// Label names indexed by label id.
    pub label_names: Vec<String>,
}

impl TaskData {
    /// Opens a task folder and reads its `mapping.txt`: [`DataError::Missing`] if
    /// the folder does not exist, or an error from reading the mapping. The splits
    /// are read later, by [`load`](Self::load).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(DataError::Missing {
                path: dir,
                what: "the task folder does not exist".into(),
            });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let label_names = read_mapping(&dir.join("mapping.txt"))?;
        Ok(Self {
            name,
            dir,
            label_names,
        })
    }

    /// The number of classes, i.e. of lines in `mapping.txt`.
    pub fn num_classes(&self) -> usize {
        self.label_names.len()
    }

    /// The split's tweets file, `<dir>/<split>_text.txt`.
    pub fn text_path(&self, split: Split) -> PathBuf {
        self.dir.join(format!("{split}_text.txt"))
    }

    /// The split's labels file, `<dir>/<split>_labels.txt`.
    pub fn labels_path(&self, split: Split) -> PathBuf {
        self.dir.join(format!("{split}_labels.txt"))
    }

    /// Reads and validates one split: both files must exist and be non-empty
    /// UTF-8 with equal line counts ([`DataError::CountMismatch`]), and every label
    /// must be an integer ([`DataError::BadLabel`]) in `0..num_classes`
    /// ([`DataError::LabelOutOfRange`]).
    pub fn load(&self, split: Split) -> Result<TaskSplit, DataError> {
        let text_path = self.text_path(split);
        let labels_path = self.labels_path(split);
        let what = format!("the {split} split of task '{}' needs this file", self.name);
        let texts = read_lines(&text_path, &what)?;
        let label_lines = read_lines(&labels_path, &what)?;
        if texts.len() != label_lines.len() {
            return Err(DataError::CountMismatch {
                text_path,
                text_lines: texts.len(),
                labels_path,
                label_lines: label_lines.len(),
            });
        }
        let num_classes = self.num_classes();
        let labels = label_lines
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let value = raw.trim();
                let label: i64 = value.parse().map_err(|_| DataError::BadLabel {
                    path: labels_path.clone(),
                    line: i + 1,
                    value: value.to_string(),
                })?;
                if label < 0 || label as u64 >= num_classes as u64 {
                    return Err(DataError::LabelOutOfRange {
                        path: labels_path.clone(),
                        line: i + 1,
                        label,
                        num_classes,
                        mapping: self.dir.join("mapping.txt"),
                    });
                }
                Ok(label as usize)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TaskSplit { texts, labels })
    }
}

/// The lines of a text file: CRLF or LF, with or without a final newline; a UTF-8
/// byte-order mark is dropped. An empty file is an error.
fn read_lines(path: &Path, what: &str) -> Result<Vec<String>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing {
            path: path.to_path_buf(),
            what: what.to_string(),
        },
        _ => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let content = String::from_utf8(bytes).map_err(|e| {
        let bad_at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..bad_at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
        }
    })?;
    let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
    if content.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let body = content.strip_suffix('\n').unwrap_or(content);
    Ok(body
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line).to_string())
        .collect())
}

/// `mapping.txt`: one `id<TAB>name` line per class, ids 0, 1, 2, ... in order.
fn read_mapping(path: &Path) -> Result<Vec<String>, DataError> {
    let lines = read_lines(
        path,
        "every task folder needs a mapping.txt of `id<TAB>name` lines",
    )?;
    let bad = |line: usize, reason: String| DataError::BadMapping {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut names = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let (id, name) = line
            .split_once('\t')
            .or_else(|| line.trim().split_once(char::is_whitespace))
            .ok_or_else(|| bad(i + 1, format!("expected `id<TAB>name`, got {line:?}")))?;
        let id: usize = id
            .trim()
            .parse()
            .map_err(|_| bad(i + 1, format!("label id {:?} is not an integer", id.trim())))?;
        if id != i {
            return Err(bad(
                i + 1,
                format!("label id {id} out of order: ids must be 0, 1, 2, ... (expected {i})"),
            ));
        }
        let name = name.trim();
        if name.is_empty() {
            return Err(bad(i + 1, format!("label id {id} has no name")));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_handle_crlf_and_missing_final_newline() {
        let dir = std::env::temp_dir().join(format!("sentence-mtl-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (content, expected) in [
            ("a\nb\n", vec!["a", "b"]),
            ("a\nb", vec!["a", "b"]),
            ("a\r\nb\r\n", vec!["a", "b"]),
            ("a\r\nb", vec!["a", "b"]),
            ("\u{feff}a\n\nb", vec!["a", "", "b"]),
        ] {
            let path = dir.join("f.txt");
            std::fs::write(&path, content).unwrap();
            assert_eq!(read_lines(&path, "").unwrap(), expected, "{content:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

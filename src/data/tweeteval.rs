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
    Train,
    Val,
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

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: missing: {what}", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the file is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}:{line}: not valid UTF-8", path.display())]
    NotUtf8 { path: PathBuf, line: usize },
    #[error("{}:{line}: {reason}", path.display())]
    BadMapping {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}:{line}: label {value:?} is not an integer", path.display())]
    BadLabel {
        path: PathBuf,
        line: usize,
        value: String,
    },
    #[error(
        "{}:{line}: label {label} is outside the mapping ({num_classes} classes, ids 0..{num_classes}) of {}",
        path.display(),
        mapping.display()
    )]
    LabelOutOfRange {
        path: PathBuf,
        line: usize,
        label: i64,
        num_classes: usize,
        mapping: PathBuf,
    },
    #[error(
        "{}: {text_lines} lines but {}: {label_lines} lines; they must be equal (first unmatched line: {})",
        text_path.display(),
        labels_path.display(),
        text_lines.min(label_lines) + 1
    )]
    CountMismatch {
        text_path: PathBuf,
        text_lines: usize,
        labels_path: PathBuf,
        label_lines: usize,
    },
}

/// The texts and labels of one split of one task, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSplit {
    pub texts: Vec<String>,
    pub labels: Vec<usize>,
}

impl TaskSplit {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

/// One TweetEval task folder with its label names read from `mapping.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskData {
    /// The folder's name, e.g. `emotion`.
    pub name: String,
    pub dir: PathBuf,
    /// Label names indexed by label id.
    pub label_names: Vec<String>,
}

impl TaskData {
    /// Opens a task folder and reads its `mapping.txt`.
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

    pub fn num_classes(&self) -> usize {
        self.label_names.len()
    }

    pub fn text_path(&self, split: Split) -> PathBuf {
        self.dir.join(format!("{split}_text.txt"))
    }

    pub fn labels_path(&self, split: Split) -> PathBuf {
        self.dir.join(format!("{split}_labels.txt"))
    }

    /// Reads and validates one split.
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

//! A task's data whatever its kind: a TweetEval-layout classification folder
//! or an STS-B-layout folder of rated sentence pairs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::model::text::TextPrep;

use super::batch::{tokenize_pairs, tokenize_split, Example};
use super::stsb::{load_stsb, StsPair};
use super::tweeteval::{DataError, Split, TaskData, TaskSplit};

/// The kind of a task's folder, and so of the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// TweetEval layout (`{split}_text.txt`, `{split}_labels.txt`,
    /// `mapping.txt`): a classification head with cross-entropy.
    Classification,
    /// STS-B layout (`stsb-en-{train,dev,test}.csv`): sentence pairs with a
    /// 0-5 score, trained with CoSENT on the embeddings' cosine, scored by
    /// Spearman.
    Sts,
}

impl TaskKind {
    /// The kind's name on the command line: `classification` or `sts`.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Sts => "sts",
        }
    }
}

/// An opened task folder.
#[derive(Debug, Clone)]
pub enum TaskSource {
    /// A classification folder, its mapping read.
    Classification(TaskData),
    /// An STS-B folder.
    Sts(PathBuf),
}

/// One split of a task.
#[derive(Debug, Clone)]
pub enum TaskRows {
    /// Texts and class labels.
    Classes(TaskSplit),
    /// Rated sentence pairs.
    Pairs(Vec<StsPair>),
}

impl TaskSource {
    /// Opens `dir` as a task of `kind` (a classification folder's mapping is
    /// read and checked here).
    pub fn open(kind: TaskKind, dir: &Path) -> Result<Self, DataError> {
        match kind {
            TaskKind::Classification => TaskData::open(dir).map(TaskSource::Classification),
            TaskKind::Sts => {
                if !dir.is_dir() {
                    return Err(DataError::Missing {
                        path: dir.to_path_buf(),
                        what: "the STS-B folder".into(),
                    });
                }
                Ok(TaskSource::Sts(dir.to_path_buf()))
            }
        }
    }

    /// The task's label names (empty for a similarity task).
    pub fn label_names(&self) -> &[String] {
        match self {
            TaskSource::Classification(data) => &data.label_names,
            TaskSource::Sts(_) => &[],
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        match self {
            TaskSource::Classification(data) => &data.dir,
            TaskSource::Sts(dir) => dir,
        }
    }

    /// Reads one split.
    pub fn load(&self, split: Split) -> Result<TaskRows, DataError> {
        Ok(match self {
            TaskSource::Classification(data) => TaskRows::Classes(data.load(split)?),
            TaskSource::Sts(dir) => TaskRows::Pairs(load_stsb(dir, split)?),
        })
    }
}

impl TaskRows {
    /// The number of examples (texts, or pairs).
    pub fn len(&self) -> usize {
        match self {
            TaskRows::Classes(split) => split.len(),
            TaskRows::Pairs(pairs) => pairs.len(),
        }
    }

    /// Whether the split has no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokenised examples of task number `task`, prepared as `text` says.
    pub fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        text: TextPrep,
        task: usize,
    ) -> anyhow::Result<Vec<Example>> {
        match self {
            TaskRows::Classes(split) => tokenize_split(tokenizer, split, text, task),
            TaskRows::Pairs(pairs) => tokenize_pairs(tokenizer, pairs, text, task),
        }
    }
}

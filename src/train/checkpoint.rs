//! Checkpoint folders, written atomically, and what a run's checkpoint holds.
//!
//! A run's checkpoint is a model folder that [`load`] (and `eval`, `predict`)
//! can use on its own:
//!
//! | file | content |
//! | --- | --- |
//! | `model.safetensors` | backbone and every head |
//! | `config.json`, `tokenizer.json` | copied from the base model |
//! | `multitask.json` | [`RunInfo`]: tasks, label names, max length, the training config |
//! | `trainer_state.json` | the step reached, loss history, per-epoch metrics |
//! | `optimizer.safetensors` | AdamW's moments and step counts (when anything trains) |
//!
//! It is written in
//! full to a hidden sibling folder, every file synced, and then swapped in with
//! two renames: `dir` -> `.dir.prev`, temp -> `dir`. A run killed at any point
//! leaves either the old checkpoint or the new one whole: between the two renames
//! only `.dir.prev` exists, and [`find`] falls back to it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::config::TrainConfig;
use crate::model::multitask::{MultiTaskModel, TaskHead};
use crate::model::tokenize::load_tokenizer;
use crate::model::ModelFiles;

/// The model weights (BERT and every head), safetensors.
pub const MODEL_FILE: &str = "model.safetensors";
/// AdamW's moments, safetensors (what a resumed run continues from).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The moving average of the weights (`ema_decay`), f32, by parameter name.
pub const EMA_FILE: &str = "ema.safetensors";
/// The [`RunInfo`], JSON.
pub const RUN_FILE: &str = "multitask.json";
/// The trainer's progress ([`TrainState`](super::records::TrainState)), JSON.
pub const STATE_FILE: &str = "trainer_state.json";
/// The backbone's BERT `config.json`, copied from the base model.
pub const BERT_CONFIG_FILE: &str = "config.json";
/// The base model's `tokenizer.json`, copied so the checkpoint stands alone.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The checkpoint's folder name inside a run's output folder.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// What a multi-task checkpoint is: its tasks and how it was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The model's tasks, in order: names, kinds, class counts.
    pub tasks: Vec<TaskHead>,
    /// Each task's label names, indexed by class (empty for a similarity task).
    pub label_names: Vec<Vec<String>>,
    /// Truncation length in tokens the run trained with (special tokens included).
    pub max_len: usize,
    /// The weights' dtype (`f32`, `bf16`, ...).
    pub dtype: String,
    /// The base model's folder the run started from.
    pub base_model: PathBuf,
    /// The run's full settings.
    pub config: TrainConfig,
}

impl RunInfo {
    /// The weights' dtype, parsed; an error for a name candle does not know.
    pub fn dtype(&self) -> anyhow::Result<DType> {
        self.dtype
            .parse()
            .map_err(|e| anyhow::anyhow!("unknown dtype {:?}: {e:?}", self.dtype))
    }
}

/// The model files of a checkpoint folder.
pub fn model_files(dir: &Path) -> ModelFiles {
    ModelFiles {
        dir: dir.to_path_buf(),
        config: dir.join(BERT_CONFIG_FILE),
        weights: dir.join(MODEL_FILE),
        tokenizer: dir.join(TOKENIZER_FILE),
    }
}

/// A checkpoint loaded for inference.
pub struct LoadedCheckpoint {
    /// The checkpoint folder it was read from.
    pub dir: PathBuf,
    /// The trained model, frozen for inference.
    pub model: MultiTaskModel,
    /// The checkpoint's tokenizer, truncating at `info.max_len`.
    pub tokenizer: Tokenizer,
    /// What the checkpoint is: tasks, labels, settings.
    pub info: RunInfo,
}

/// The checkpoint folder at `path`: the folder itself if it holds a checkpoint,
/// else the checkpoint of the run whose output folder it is.
pub fn locate(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join(RUN_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    find(&path.join(CHECKPOINT_DIR)).with_context(|| {
        format!(
            "{}: no multi-task checkpoint here (neither {RUN_FILE} nor a {CHECKPOINT_DIR}/ folder)",
            path.display()
        )
    })
}

/// Loads the model, tokenizer and run information of a checkpoint (see
/// [`locate`]), in `dtype` when given, else in the dtype it was trained in.
pub fn load(
    path: &Path,
    device: &Device,
    dtype: Option<DType>,
) -> anyhow::Result<LoadedCheckpoint> {
    let dir = locate(path)?;
    let info: RunInfo = read_json(&dir.join(RUN_FILE))?;
    let files = model_files(&dir);
    let dtype = match dtype {
        Some(dtype) => dtype,
        None => info.dtype()?,
    };
    let model = MultiTaskModel::load(&files, &info.tasks, dtype, device)?
        .with_pooling(info.config.pooling)
        .with_head_dropout(info.config.head_dropout as f32)?;
    let tokenizer = load_tokenizer(&files, info.max_len)?;
    Ok(LoadedCheckpoint {
        dir,
        model,
        tokenizer,
        info,
    })
}

/// The checkpoint folder to read: `dir` if it exists, else the previous
/// checkpoint left by a swap that was interrupted, else `None`.
pub fn find(dir: &Path) -> Option<PathBuf> {
    if dir.is_dir() {
        return Some(dir.to_path_buf());
    }
    let prev = sibling(dir, "prev");
    prev.is_dir().then_some(prev)
}

/// Writes the folder `dir` atomically: `fill` writes the files into the folder it
/// is given (use [`write_json`] and [`write_safetensors`], which sync what they
/// write), then that folder replaces `dir`.
pub fn write_atomically(
    dir: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = sibling(dir, "tmp");
    let prev = sibling(dir, "prev");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing a stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fill(&tmp).with_context(|| format!("writing the checkpoint into {}", tmp.display()))?;
    sync_dir(&tmp)?;
    if dir.exists() {
        if prev.exists() {
            std::fs::remove_dir_all(&prev)
                .with_context(|| format!("removing {}", prev.display()))?;
        }
        std::fs::rename(dir, &prev).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(&parent)?;
    if prev.exists() {
        std::fs::remove_dir_all(&prev).with_context(|| format!("removing {}", prev.display()))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` and syncs it.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer_pretty(&file, value)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Reads and parses a JSON file; the error names the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("parsing {}", path.display()))
}

/// Writes named tensors to `path` in safetensors format and syncs the file.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, path)
        .with_context(|| format!("writing {}", path.display()))?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Reads all tensors of a safetensors file onto `device`; the error names the file.
pub fn read_safetensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))
}

/// Copies `from` into the folder being written, synced.
pub fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    File::open(to)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", to.display()))
}

/// `parent/.name.suffix` for `parent/name`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    parent_of(dir).join(format!(".{name}.{suffix}"))
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a folder's entries (new files, renames) durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sentence-mtl-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_the_old_checkpoint_whole() {
        let root = temp("replace");
        let dir = root.join("checkpoint");
        write_atomically(&dir, |d| write_json(&d.join("state.json"), &1)).unwrap();
        write_atomically(&dir, |d| write_json(&d.join("state.json"), &2)).unwrap();
        assert_eq!(
            read_json::<i32>(&find(&dir).unwrap().join("state.json")).unwrap(),
            2
        );
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("checkpoint")],
            "no temp or prev folder left"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_checkpoint() {
        let root = temp("fail");
        let dir = root.join("checkpoint");
        write_atomically(&dir, |d| write_json(&d.join("state.json"), &1)).unwrap();
        let err = write_atomically(&dir, |d| {
            write_json(&d.join("state.json"), &2)?;
            anyhow::bail!("killed while saving")
        });
        assert!(err.is_err());
        assert_eq!(
            read_json::<i32>(&find(&dir).unwrap().join("state.json")).unwrap(),
            1
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_interrupted_swap_falls_back_to_the_previous_checkpoint() {
        let root = temp("swap");
        let dir = root.join("checkpoint");
        write_atomically(&dir, |d| write_json(&d.join("state.json"), &1)).unwrap();
        // Killed after moving the old folder aside, before the new one was renamed in.
        std::fs::rename(&dir, sibling(&dir, "prev")).unwrap();
        assert_eq!(
            read_json::<i32>(&find(&dir).unwrap().join("state.json")).unwrap(),
            1
        );
        write_atomically(&dir, |d| write_json(&d.join("state.json"), &3)).unwrap();
        assert_eq!(
            read_json::<i32>(&find(&dir).unwrap().join("state.json")).unwrap(),
            3
        );
        assert!(find(&root.join("nothing")).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

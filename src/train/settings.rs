//! Training settings read from a file (`sentence-mtl train --config FILE`): a
//! TOML or JSON table of any of [`TrainConfig`]'s fields, or the configuration
//! a checkpoint recorded, so a setting can be shared, versioned and rerun.
//!
//! ```toml
//! # as in configs/tweeteval-tuned.toml
//! emoji = "text"
//! unescape = true
//! freeze = "lower:1"
//! label_smoothing = 0.4
//! ```
//!
//! Fields keep their [`TrainConfig`] names and serialised forms (`freeze =
//! "lower:1"`, `[[tasks]]` tables with `name`, `dir`, `kind`, `weight`); a field
//! the file leaves out keeps the value it is written over. Paths are taken as
//! written, relative to the working directory, as on the command line.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

use super::TrainConfig;

/// The fields a settings file sets, by name, in the file's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Where they were read from (named in errors).
    pub source: PathBuf,
    /// Field name → value, as [`TrainConfig`] serialises it.
    pub fields: Map<String, Value>,
}

/// A checkpoint keeps its run's configuration in this file.
const CHECKPOINT_FILE: &str = "multitask.json";

/// What a checkpoint's configuration records about where and how the run was
/// written rather than how it trained: not carried into a new run, so that a
/// rerun from a checkpoint never writes over (or resumes) the run it came from.
const RUN_RECORD_FIELDS: [&str; 2] = ["output_dir", "resume"];

impl Settings {
    /// Reads `path`: a `.toml` file, a JSON file (a table of fields, or a
    /// checkpoint's `multitask.json`), or a checkpoint folder. Every key must
    /// be a [`TrainConfig`] field; a checkpoint's `output_dir` and `resume`
    /// are dropped.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let file = if path.is_dir() {
            path.join(CHECKPOINT_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the settings file {}", file.display()))?;
        let is_toml = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let value: Value = if is_toml {
            toml::from_str(&text).map_err(anyhow::Error::from)
        } else {
            serde_json::from_str(&text).map_err(anyhow::Error::from)
        }
        .with_context(|| format!("parsing the settings file {}", file.display()))?;
        Self::from_value(value, file)
    }

    fn from_value(value: Value, source: PathBuf) -> anyhow::Result<Self> {
        let Value::Object(mut fields) = value else {
            anyhow::bail!("{}: expected a table of settings", source.display());
        };
        // A checkpoint's multitask.json: the run's configuration is under `config`.
        if let Some(Value::Object(config)) = fields.remove("config") {
            fields = config;
            for field in RUN_RECORD_FIELDS {
                fields.remove(field);
            }
        }
        let known = config_fields();
        if let Some(unknown) = fields.keys().find(|k| !known.contains(k)) {
            anyhow::bail!(
                "{}: unknown setting `{unknown}` (the settings: {})",
                source.display(),
                known.join(", ")
            );
        }
        Ok(Self { source, fields })
    }

    /// Removes a field (one the command line sets instead).
    pub fn remove(&mut self, field: &str) -> Option<Value> {
        self.fields.remove(field)
    }

    /// `base` with these settings written over it; an error names the field
    /// whose value does not fit.
    pub fn apply(&self, base: &TrainConfig) -> anyhow::Result<TrainConfig> {
        let Value::Object(mut merged) = serde_json::to_value(base)? else {
            unreachable!("TrainConfig serialises to a table")
        };
        let mut config = base.clone();
        // One field at a time, so that a value that does not fit is named.
        for (field, value) in &self.fields {
            merged.insert(field.clone(), value.clone());
            config = serde_json::from_value(Value::Object(merged.clone())).with_context(|| {
                format!("{}: setting `{field}` = {value}", self.source.display())
            })?;
        }
        Ok(config)
    }
}

/// The names of [`TrainConfig`]'s fields.
fn config_fields() -> Vec<String> {
    match serde_json::to_value(TrainConfig::default()) {
        Ok(Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => unreachable!("TrainConfig serialises to a table"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::multitask::Freeze;
    use crate::model::text::EmojiMode;

    fn toml_settings(text: &str) -> anyhow::Result<Settings> {
        let value: Value = toml::from_str(text)?;
        Settings::from_value(value, "test.toml".into())
    }

    #[test]
    fn a_toml_table_sets_its_fields_and_keeps_the_rest() {
        let settings = toml_settings(
            "emoji = \"text\"\nfreeze = \"lower:1\"\nlabel_smoothing = 0.3\nepochs = 4\n\
             weight_decay = 0\n[[tasks]]\nname = \"emo\"\ndir = \"d/emotion\"\n\
             kind = \"classification\"\nweight = 2\n",
        )
        .unwrap();
        let config = settings.apply(&TrainConfig::default()).unwrap();
        let expected = TrainConfig {
            emoji: EmojiMode::Text,
            freeze: Freeze::Lower(1),
            label_smoothing: 0.3,
            epochs: 4,
            weight_decay: 0.0,
            tasks: vec![crate::train::TaskSpec {
                name: "emo".into(),
                weight: 2.0,
                ..crate::train::TaskSpec::classification("d/emotion")
            }],
            ..TrainConfig::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn an_unknown_field_or_a_value_that_does_not_fit_is_named() {
        let err = toml_settings("epoch = 4").unwrap_err().to_string();
        assert!(err.contains("unknown setting `epoch`"), "{err}");
        assert!(
            err.contains("epochs"),
            "the known settings are listed: {err}"
        );
        for (text, field) in [
            ("epochs = 2.5", "epochs"),
            ("freeze = \"some\"", "freeze"),
            ("emoji = \"names\"", "emoji"),
        ] {
            let err = toml_settings(text)
                .unwrap()
                .apply(&TrainConfig::default())
                .unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("setting `{field}`")),
                "{text}: {err:#}"
            );
        }
        let err = toml_settings("[epochs]\nx = 1")
            .unwrap()
            .apply(&TrainConfig::default());
        assert!(err.is_err());
        assert!(Settings::from_value(Value::from(3), "x.json".into()).is_err());
    }

    /// A checkpoint's configuration reruns the run, but writes elsewhere.
    #[test]
    fn a_checkpoint_configuration_drops_where_the_run_was_written() {
        let run = TrainConfig {
            epochs: 2,
            label_smoothing: 0.2,
            output_dir: Some("runs/a".into()),
            resume: true,
            ..TrainConfig::default()
        };
        let multitask = serde_json::json!({ "tasks": [], "max_len": 64, "config": run });
        let settings = Settings::from_value(multitask, "multitask.json".into()).unwrap();
        assert!(!settings.fields.contains_key("output_dir"));
        let base = TrainConfig {
            output_dir: Some("runs/b".into()),
            ..TrainConfig::default()
        };
        let config = settings.apply(&base).unwrap();
        assert_eq!(
            config,
            TrainConfig {
                output_dir: Some("runs/b".into()),
                resume: false,
                ..run
            }
        );
    }
}

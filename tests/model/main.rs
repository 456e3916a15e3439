//! The model layer (`sentence_mtl::model`): the BERT encoder against
//! candle-transformers and sentence-transformers, its fine-tuning path, bad
//! model files and inputs, the multi-task model's losses and freezing, semantic
//! search and paraphrase mining, and the STS benchmark end to end.

// Both support modules include `common/shared.rs` (the shared data's path).
#![allow(clippy::duplicate_mod)]

#[path = "../bert_support/mod.rs"]
mod bert_support;
#[path = "../train_support/mod.rs"]
mod train_support;

mod bert_candle_parity;
mod bert_finetune;
mod encoder_bad_input;
mod encoder_options;
mod encoder_parity;
mod multitask_model;
mod pooling;
mod search;
mod sts;

//! The data and training layers (`sentence_mtl::data`, `sentence_mtl::train`):
//! the TweetEval loader, the samplers and collation, checkpoints and resumed
//! runs, the weights' moving average, and overfit mode on the real model.

#[path = "../train_support/mod.rs"]
mod train_support;

mod checkpoint;
mod data_loader;
mod data_sampler;
mod n_tasks;
mod overfit;
mod text_prep;
mod weight_average;

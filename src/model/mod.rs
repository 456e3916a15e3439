//! Models: a BERT encoder that fine-tunes, the files it loads from, the
//! tokenizer, and the sentence encoder built on them.
//!
//! - [`resolve`]: finds a model's folder (local path, Hugging Face cache, our
//!   own cache filled by `scripts/fetch-model.sh`, or a download).
//! - [`config`]: reads `config.json` ([`BertConfig`]), `sentence_bert_config.json`,
//!   and a sentence-transformers folder's modules (pooling, Dense, Normalize)
//!   and prompts.
//! - [`checkpoint`]: loads safetensors weights with or without the `bert.`
//!   prefix, as plain tensors or as trainable `Var`s.
//! - [`layers`]: the differentiable building blocks (LayerNorm, softmax,
//!   attention mask bias, dropout) and their no-gradient fast twins.
//! - [`bert`]: [`BertEncoder`], the transformer itself.
//! - [`tokenize`]: tokenizer loading and batch encoding to tensors.
//! - [`text`]: how a tweet is prepared before tokenisation ([`TextPrep`](text::TextPrep):
//!   emoji as their names, escapes undone).
//! - [`pooling`]: every sentence-transformers pooling mode ([`pool`]).
//! - [`dense`]: a sentence-transformers `Dense` module ([`Dense`]).
//! - [`encoder`]: [`SentenceEncoder`], sentences in, embeddings out.
//! - [`search`]: semantic search and paraphrase mining, chunked, on float or
//!   quantised embeddings.
//! - [`npy`]: `.npy` matrices read a block of rows at a time.
//! - [`quantize`]: embeddings as int8, uint8 or packed bits
//!   (sentence-transformers' `quantize_embeddings`).
//! - [`multitask`]: [`MultiTaskModel`], the encoder
//!   with two classification heads, and the freezing settings.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod dense;
pub mod encoder;
pub mod layers;
pub mod multitask;
pub mod npy;
pub mod pooling;
pub mod quantize;
pub mod resolve;
pub mod search;
pub mod text;
pub mod tokenize;

pub use bert::BertEncoder;
pub use checkpoint::{load_frozen, load_trainable};
pub use config::{
    load_bert_config, max_seq_length, BertConfig, DenseActivation, DenseConfig, HiddenAct, Pooling,
    SentenceConfig,
};
pub use dense::Dense;
pub use encoder::SentenceEncoder;
pub use multitask::{Freeze, HeadKind, MultiTaskModel, TaskHead};
pub use npy::NpyMatrix;
pub use pooling::pool;
pub use quantize::{quantize_embeddings, Precision, QuantizedEmbeddings, QuantizedValues, Ranges};
pub use resolve::{resolve_cached, resolve_model, ModelFiles, DEFAULT_MODEL};
pub use search::{paraphrase_mine, search_embeddings, search_npy, search_quantized, Hit, Pair};

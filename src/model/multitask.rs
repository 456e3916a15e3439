//! The dual-head multi-task model: our BERT encoder, masked mean pooling (the
//! fused op) and two linear heads, head A (emotion) and head B (sentiment), whose
//! class counts come from the data's mapping files.
//!
//! The loss is the fused dual-head cross-entropy: one op gives both heads' mean
//! losses over the rows labelled for them, and the total is `w_a·loss_a +
//! w_b·loss_b`.
//!
//! [`Freeze`] decides what trains. Frozen parameters are never handed to the
//! optimiser, and the graph is cut where it enters the trainable part, so no
//! gradient is computed for them at all: the encoder detaches the hidden state
//! leaving its frozen lower part, and a frozen head is applied with detached
//! weights (the loss still reaches the backbone through it).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Linear, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::bert::BertEncoder;
use super::{load_trainable, ModelFiles};
use crate::ops::cross_entropy::{dual_head_cross_entropy_deferred, LabelCheck};
use crate::ops::masked_mean_pool;

/// One of the model's two classification heads (and the task it is trained on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Head {
    /// Head A: emotion by default.
    A,
    /// Head B: sentiment by default.
    B,
}

impl Head {
    /// Both heads, A first (the order of the label columns and the losses).
    pub const BOTH: [Head; 2] = [Head::A, Head::B];

    /// The head's column in the `[B, 2]` label tensor (0 for A, 1 for B).
    pub fn index(self) -> usize {
        match self {
            Head::A => 0,
            Head::B => 1,
        }
    }

    /// The head's short name, `a` or `b`.
    pub fn name(self) -> &'static str {
        match self {
            Head::A => "a",
            Head::B => "b",
        }
    }
}

/// What to freeze during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Freeze {
    /// Everything trains.
    None,
    /// Nothing trains: the model is a fixed feature extractor with its heads as
    /// initialised (or loaded). `train` then takes no step; it evaluates the model
    /// as it is.
    All,
    /// The whole backbone (embeddings and every layer): only the heads train.
    Backbone,
    /// Head A: the backbone and head B train.
    HeadA,
    /// Head B: the backbone and head A train.
    HeadB,
    /// The embeddings and the lowest `n` encoder layers (`lower:0` = the
    /// embeddings only).
    Lower(usize),
}

impl Freeze {
    /// What the encoder's `forward_partly_frozen` takes, for an encoder of
    /// `num_layers` layers.
    pub fn frozen_layers(self, num_layers: usize) -> Option<usize> {
        match self {
            Freeze::None | Freeze::HeadA | Freeze::HeadB => None,
            Freeze::All | Freeze::Backbone => Some(num_layers),
            Freeze::Lower(n) => Some(n),
        }
    }

    /// Whether this setting freezes `head`'s weights.
    pub fn freezes_head(self, head: Head) -> bool {
        matches!(
            (self, head),
            (Freeze::All, _) | (Freeze::HeadA, Head::A) | (Freeze::HeadB, Head::B)
        )
    }

    /// Whether the parameter `name` (as [`MultiTaskModel::parameters`] names it)
    /// is frozen.
    pub fn freezes_param(self, name: &str, num_layers: usize) -> bool {
        match head_of(name) {
            Some(head) => self.freezes_head(head),
            None => match self.frozen_layers(num_layers) {
                None => false,
                Some(n) => {
                    name.starts_with("embeddings.")
                        || layer_of(name).is_some_and(|layer| layer < n)
                        // What lies beside the encoder layers (a checkpoint's
                        // unused pooler) freezes with the whole backbone.
                        || (n >= num_layers && layer_of(name).is_none())
                }
            },
        }
    }
}

impl fmt::Display for Freeze {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Freeze::None => f.write_str("none"),
            Freeze::All => f.write_str("all"),
            Freeze::Backbone => f.write_str("backbone"),
            Freeze::HeadA => f.write_str("head-a"),
            Freeze::HeadB => f.write_str("head-b"),
            Freeze::Lower(n) => write!(f, "lower:{n}"),
        }
    }
}

impl FromStr for Freeze {
    type Err = String;

    /// `none`, `all`, `backbone`, `head-a`, `head-b`, `embeddings` (= `lower:0`)
    /// or `lower:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "none" => Freeze::None,
            "all" => Freeze::All,
            "backbone" => Freeze::Backbone,
            "head-a" => Freeze::HeadA,
            "head-b" => Freeze::HeadB,
            "embeddings" => Freeze::Lower(0),
            _ => match s.strip_prefix("lower:").map(str::parse) {
                Some(Ok(n)) => Freeze::Lower(n),
                _ => {
                    return Err(format!(
                        "unknown freezing {s:?}: expected none, all, backbone, head-a, head-b, embeddings or lower:N"
                    ))
                }
            },
        })
    }
}

impl From<Freeze> for String {
    fn from(f: Freeze) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for Freeze {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

/// The parameter-name prefix of each head: `head_a.weight`, `head_a.bias`, ...
pub fn head_prefix(head: Head) -> &'static str {
    match head {
        Head::A => "head_a",
        Head::B => "head_b",
    }
}

fn head_of(name: &str) -> Option<Head> {
    Head::BOTH.into_iter().find(|&h| {
        name.strip_prefix(head_prefix(h))
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// `Some(i)` for a parameter of `encoder.layer.{i}.`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Both heads' logits: `a` is `[B, classes_a]`, `b` is `[B, classes_b]`.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Head A's logits, `[B, classes_a]`.
    pub a: Tensor,
    /// Head B's logits, `[B, classes_b]`.
    pub b: Tensor,
}

impl Logits {
    /// The logits of one head.
    pub fn head(&self, head: Head) -> &Tensor {
        match head {
            Head::A => &self.a,
            Head::B => &self.b,
        }
    }
}

/// The losses of one batch.
#[derive(Debug, Clone)]
pub struct Losses {
    /// `[2]`: head A's and head B's mean cross-entropy over their labelled rows
    /// (0 for a head with none).
    pub per_head: Tensor,
    /// The scalar `w_a·loss_a + w_b·loss_b` that is back-propagated.
    pub total: Tensor,
}

#[derive(Debug, Clone)]
struct LinearHead {
    weight: Tensor,
    bias: Tensor,
}

impl LinearHead {
    fn forward(&self, x: &Tensor, frozen: bool) -> Result<Tensor> {
        let linear = if frozen {
            Linear::new(self.weight.detach(), Some(self.bias.detach()))
        } else {
            Linear::new(self.weight.clone(), Some(self.bias.clone()))
        };
        linear.forward(x)
    }
}

/// The encoder, the pooling and the two heads; every parameter is a [`Var`] in
/// one [`VarMap`], named as in the checkpoint (`embeddings.…`, `encoder.layer.{i}.…`,
/// `head_a.weight`, `head_b.bias`, ...).
pub struct MultiTaskModel {
    encoder: BertEncoder,
    heads: [LinearHead; 2],
    vars: VarMap,
    num_classes: [usize; 2],
}

impl fmt::Debug for MultiTaskModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiTaskModel")
            .field("num_layers", &self.num_layers())
            .field("hidden_size", &self.hidden_size())
            .field("num_classes", &self.num_classes)
            .finish()
    }
}

impl MultiTaskModel {
    /// The backbone of `files` with two new heads of `num_classes[A]` and
    /// `num_classes[B]` outputs, initialised from `seed` as PyTorch initialises
    /// `nn.Linear`: weight and bias uniform in ±1/sqrt(hidden).
    pub fn new(
        files: &ModelFiles,
        num_classes: [usize; 2],
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let (encoder, vars, _) = load_trainable(files, dtype, device)?;
        let hidden = encoder.hidden_size();
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut uniform = |dims: &[usize]| -> Result<Var> {
            let n = dims.iter().product();
            let values: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Var::from_tensor(&Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?)
        };
        {
            let mut data = vars.data().lock().expect("VarMap lock");
            for head in Head::BOTH {
                let classes = num_classes[head.index()];
                anyhow::ensure!(
                    classes >= 1,
                    "head {} needs at least one class",
                    head.name()
                );
                data.insert(
                    format!("{}.weight", head_prefix(head)),
                    uniform(&[classes, hidden])?,
                );
                data.insert(format!("{}.bias", head_prefix(head)), uniform(&[classes])?);
            }
        }
        Self::assemble(encoder, vars, num_classes)
    }

    /// A model saved with [`weights`](Self::weights): the backbone and both heads
    /// from `files.weights`.
    pub fn load(
        files: &ModelFiles,
        num_classes: [usize; 2],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let model = Self::new(files, num_classes, 0, dtype, device)?;
        // SAFETY: mmap's contract: the file must not change while it is mapped.
        // It is a checkpoint's own weights file, mapped read-only for the few
        // reads below and unmapped before this function returns.
        let saved = unsafe { candle_core::safetensors::MmapedSafetensors::new(&files.weights) }
            .with_context(|| format!("opening {}", files.weights.display()))?;
        for head in Head::BOTH {
            for part in ["weight", "bias"] {
                let name = format!("{}.{part}", head_prefix(head));
                let saved = saved.load(&name, device).with_context(|| {
                    format!(
                        "{}: no {name}: not a multi-task checkpoint",
                        files.weights.display()
                    )
                })?;
                let var = model.var(&name).expect("head parameter");
                anyhow::ensure!(
                    saved.shape() == var.shape(),
                    "{}: {name} has shape {:?}, the data's mapping needs {:?}",
                    files.weights.display(),
                    saved.dims(),
                    var.dims()
                );
                var.set(&saved.to_dtype(dtype)?)?;
            }
        }
        Ok(model)
    }

    fn assemble(
        encoder: BertEncoder,
        vars: VarMap,
        num_classes: [usize; 2],
    ) -> anyhow::Result<Self> {
        let head = |h: Head| -> anyhow::Result<LinearHead> {
            let data = vars.data().lock().expect("VarMap lock");
            let get = |part: &str| {
                let name = format!("{}.{part}", head_prefix(h));
                data.get(&name)
                    .map(|v| v.as_tensor().clone())
                    .with_context(|| format!("missing {name}"))
            };
            Ok(LinearHead {
                weight: get("weight")?,
                bias: get("bias")?,
            })
        };
        let heads = [head(Head::A)?, head(Head::B)?];
        Ok(Self {
            encoder,
            heads,
            vars,
            num_classes,
        })
    }

    /// The shared BERT backbone.
    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    /// The number of transformer layers of the backbone.
    pub fn num_layers(&self) -> usize {
        self.encoder.num_layers()
    }

    /// The width of the backbone's hidden states (the heads' input).
    pub fn hidden_size(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// Each head's number of classes, A then B.
    pub fn num_classes(&self) -> [usize; 2] {
        self.num_classes
    }

    /// Both heads' logits for a batch. `train` turns dropout on; `freeze` cuts
    /// the graph below the trainable part (pass [`Freeze::All`] when no gradient
    /// is wanted).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
        freeze: Freeze,
    ) -> Result<Logits> {
        let frozen_layers = freeze.frozen_layers(self.num_layers());
        let hidden = self.encoder.forward_partly_frozen(
            input_ids,
            token_type_ids,
            attention_mask,
            train,
            frozen_layers,
        )?;
        let pooled = masked_mean_pool(&hidden, attention_mask)?;
        Ok(Logits {
            a: self.heads[0].forward(&pooled, freeze.freezes_head(Head::A))?,
            b: self.heads[1].forward(&pooled, freeze.freezes_head(Head::B))?,
        })
    }

    /// The fused dual-head cross-entropy of `logits` against `labels` `[B, 2]`
    /// (i64, [`IGNORE_INDEX`](crate::ops::IGNORE_INDEX) where a row is not
    /// labelled for a head), weighted into a total.
    pub fn loss(logits: &Logits, labels: &Tensor, weights: [f64; 2]) -> Result<Losses> {
        let (losses, labels_checked) = Self::loss_deferred(logits, labels, weights)?;
        labels_checked.verify()?;
        Ok(losses)
    }

    /// [`Self::loss`] without waiting on a GPU for the label check: verify the
    /// returned [`LabelCheck`] once the step reads its losses back anyway (until
    /// then a bad label shows only as NaN losses), so that a training step
    /// synchronises once.
    pub fn loss_deferred(
        logits: &Logits,
        labels: &Tensor,
        weights: [f64; 2],
    ) -> Result<(Losses, LabelCheck)> {
        let (per_head, labels_checked) =
            dual_head_cross_entropy_deferred(&logits.a, &logits.b, labels)?;
        let weights = Tensor::new(&weights, per_head.device())?.to_dtype(per_head.dtype())?;
        let total = per_head.mul(&weights)?.sum_all()?;
        Ok((Losses { per_head, total }, labels_checked))
    }

    /// Every parameter, sorted by name.
    pub fn parameters(&self) -> BTreeMap<String, Var> {
        self.vars
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The parameters that train under `freeze`, sorted by name.
    pub fn trainable_parameters(&self, freeze: Freeze) -> Vec<(String, Var)> {
        let layers = self.num_layers();
        self.parameters()
            .into_iter()
            .filter(|(name, _)| !freeze.freezes_param(name, layers))
            .collect()
    }

    /// The parameter `name`, if the model has one.
    pub fn var(&self, name: &str) -> Option<Var> {
        self.vars
            .data()
            .lock()
            .expect("VarMap lock")
            .get(name)
            .cloned()
    }

    /// Every parameter's current value, by name, for saving.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.parameters()
            .into_iter()
            .map(|(k, v)| (k, v.as_detached_tensor()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_parses_and_prints() {
        for s in [
            "none", "all", "backbone", "head-a", "head-b", "lower:0", "lower:3",
        ] {
            assert_eq!(s.parse::<Freeze>().unwrap().to_string(), s);
        }
        assert_eq!("embeddings".parse::<Freeze>().unwrap(), Freeze::Lower(0));
        let err = "lower:x".parse::<Freeze>().unwrap_err();
        assert!(err.contains("lower:N"), "{err}");
    }

    #[test]
    fn freeze_selects_parameters_by_name() {
        let names = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.output.LayerNorm.bias",
            "encoder.layer.10.output.dense.weight",
            "pooler.dense.weight",
            "head_a.weight",
            "head_b.bias",
        ];
        let frozen = |f: Freeze| -> Vec<&str> {
            names
                .iter()
                .copied()
                .filter(|n| f.freezes_param(n, 12))
                .collect()
        };
        assert!(frozen(Freeze::None).is_empty());
        assert_eq!(frozen(Freeze::All), names);
        assert_eq!(frozen(Freeze::Backbone), names[..5]);
        assert_eq!(frozen(Freeze::HeadA), ["head_a.weight"]);
        assert_eq!(frozen(Freeze::HeadB), ["head_b.bias"]);
        assert_eq!(
            frozen(Freeze::Lower(0)),
            ["embeddings.word_embeddings.weight"]
        );
        assert_eq!(frozen(Freeze::Lower(2)), names[..3]);
        assert_eq!(frozen(Freeze::Lower(12)), names[..5]);
    }
}

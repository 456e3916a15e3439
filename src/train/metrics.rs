//! Classification metrics: accuracy, macro-F1 and macro-recall (TweetEval's
//! official metrics are emotion macro-F1 and sentiment macro-recall), computed
//! from a confusion matrix.
//!
//! Macro averages follow scikit-learn's defaults: the mean over the classes that
//! occur in the labels or the predictions, a per-class score with a zero
//! denominator counting as 0.
//!
//! For similarity scores: [`pearson`] and [`spearman`] correlation, as SciPy's
//! `pearsonr` and `spearmanr` (ties get their average rank).

use serde::{Deserialize, Serialize};

/// Counts of (true class, predicted class) pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// `counts[true][predicted]`.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// Builds the matrix; every label and prediction must be `< num_classes`.
    pub fn new(
        num_classes: usize,
        labels: &[usize],
        predictions: &[usize],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            labels.len() == predictions.len(),
            "{} labels but {} predictions",
            labels.len(),
            predictions.len()
        );
        let mut counts = vec![vec![0u64; num_classes]; num_classes];
        for (&t, &p) in labels.iter().zip(predictions) {
            anyhow::ensure!(
                t < num_classes && p < num_classes,
                "class {} out of range 0..{num_classes}",
                t.max(p)
            );
            counts[t][p] += 1;
        }
        Ok(Self { counts })
    }

    /// The number of classes: the matrix is `num_classes × num_classes`.
    pub fn num_classes(&self) -> usize {
        self.counts.len()
    }

    /// The number of (label, prediction) pairs counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    fn true_count(&self, class: usize) -> u64 {
        self.counts[class].iter().sum()
    }

    fn predicted_count(&self, class: usize) -> u64 {
        self.counts.iter().map(|row| row[class]).sum()
    }

    /// The classes scikit-learn averages over: present in labels or predictions.
    fn present_classes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_classes()).filter(|&c| self.true_count(c) + self.predicted_count(c) > 0)
    }

    /// The fraction of pairs on the diagonal (predicted = true); 0 for an empty matrix.
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.num_classes()).map(|c| self.counts[c][c]).sum();
        ratio(correct, self.total())
    }

    /// Recall of `class`: tp / (tp + fn), 0 when the class never occurs in the labels.
    /// Panics if `class >= num_classes`.
    pub fn recall(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.true_count(class))
    }

    /// Precision of `class`: tp / (tp + fp), 0 when the class is never predicted.
    /// Panics if `class >= num_classes`.
    pub fn precision(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.predicted_count(class))
    }

    /// F1 = 2·tp / (2·tp + fp + fn), 0 when the class is neither true nor predicted.
    pub fn f1(&self, class: usize) -> f64 {
        let tp = self.counts[class][class];
        ratio(2 * tp, self.true_count(class) + self.predicted_count(class))
    }

    /// The mean [`recall`](Self::recall) over the classes present in the labels or
    /// the predictions (TweetEval's sentiment metric); 0 for an empty matrix.
    pub fn macro_recall(&self) -> f64 {
        mean(self.present_classes().map(|c| self.recall(c)))
    }

    /// The mean [`f1`](Self::f1) over the classes present in the labels or the
    /// predictions (TweetEval's emotion metric); 0 for an empty matrix.
    pub fn macro_f1(&self) -> f64 {
        mean(self.present_classes().map(|c| self.f1(c)))
    }

    /// Accuracy, macro-F1, macro-recall and the example count together.
    pub fn metrics(&self) -> TaskMetrics {
        TaskMetrics {
            accuracy: self.accuracy(),
            macro_f1: self.macro_f1(),
            macro_recall: self.macro_recall(),
            count: self.total() as usize,
        }
    }
}

/// A task's scores on one split: a classification task's [`TaskMetrics`] or a
/// similarity task's [`StsReport`](super::sts::StsReport) (serialised as the one or the other).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TaskScores {
    /// Accuracy, macro-F1, macro-recall.
    Classification(TaskMetrics),
    /// Spearman and Pearson, x100.
    Similarity(super::sts::StsReport),
}

impl TaskScores {
    /// Each score by name, as plotted (fractions in [0, 1]).
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        match self {
            TaskScores::Classification(m) => vec![
                ("accuracy", m.accuracy),
                ("macro-F1", m.macro_f1),
                ("macro-recall", m.macro_recall),
            ],
            TaskScores::Similarity(r) => vec![
                ("Spearman", r.spearman / 100.0),
                ("Pearson", r.pearson / 100.0),
            ],
        }
    }

    /// The score an epoch is chosen by: macro-F1, or Spearman/100.
    pub fn selection_score(&self) -> f64 {
        match self {
            TaskScores::Classification(m) => m.macro_f1,
            TaskScores::Similarity(r) => r.spearman / 100.0,
        }
    }

    /// The classification metrics, `None` for a similarity task.
    pub fn classification(&self) -> Option<&TaskMetrics> {
        match self {
            TaskScores::Classification(m) => Some(m),
            TaskScores::Similarity(_) => None,
        }
    }

    /// One line: `acc 0.8149 macro-F1 0.7725 macro-recall 0.7601` or
    /// `Spearman 82.03 Pearson 82.74`.
    pub fn describe(&self) -> String {
        match self {
            TaskScores::Classification(m) => format!(
                "acc {:.4} macro-F1 {:.4} macro-recall {:.4}",
                m.accuracy, m.macro_f1, m.macro_recall
            ),
            TaskScores::Similarity(r) => {
                format!("Spearman {:.2} Pearson {:.2}", r.spearman, r.pearson)
            }
        }
    }
}

/// A classification task's scores on one split, as fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// The fraction of examples predicted right.
    pub accuracy: f64,
    /// F1 averaged over the classes present (TweetEval's emotion metric).
    pub macro_f1: f64,
    /// Recall averaged over the classes present (TweetEval's sentiment metric).
    pub macro_recall: f64,
    /// How many examples were scored.
    pub count: usize,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Pearson's correlation of `x` and `y`, in f64 (SciPy's `pearsonr`). An error
/// if the lengths differ, there are fewer than 2 values, a value is not finite,
/// or either side is constant (the correlation is undefined).
pub fn pearson(x: &[f64], y: &[f64]) -> anyhow::Result<f64> {
    anyhow::ensure!(
        x.len() == y.len(),
        "{} values against {}: a correlation needs pairs",
        x.len(),
        y.len()
    );
    anyhow::ensure!(
        x.len() >= 2,
        "a correlation needs at least 2 pairs, got {}",
        x.len()
    );
    anyhow::ensure!(
        x.iter().chain(y).all(|v| v.is_finite()),
        "a correlation of non-finite values"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    anyhow::ensure!(
        sxx > 0.0 && syy > 0.0,
        "a correlation with a constant side is undefined"
    );
    // Rounding can carry |r| a hair past 1, which SciPy clips too.
    Ok((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// Spearman's rank correlation of `x` and `y` (SciPy's `spearmanr`): Pearson's
/// correlation of the ranks, tied values sharing their average rank. Errors as
/// [`pearson`].
pub fn spearman(x: &[f64], y: &[f64]) -> anyhow::Result<f64> {
    anyhow::ensure!(
        x.iter().chain(y).all(|v| v.is_finite()),
        "a correlation of non-finite values"
    );
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks, ties given the mean of the ranks they span.
fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1 ..= end.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // Worked out by hand from the counts, as scikit-learn's f1_score and
    // recall_score with average="macro" define them.
    #[test]
    fn matches_the_scikit_learn_definitions() {
        let y = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1];
        let p = [0, 2, 2, 2, 1, 1, 0, 0, 1, 1];
        let cm = ConfusionMatrix::new(3, &y, &p).unwrap();
        assert_eq!(cm.counts, vec![vec![2, 1, 0], vec![0, 3, 1], vec![1, 0, 2]]);
        assert!(close(cm.accuracy(), 0.7));
        // recalls 2/3, 3/4, 2/3
        assert!(close(
            cm.macro_recall(),
            (2.0 / 3.0 + 0.75 + 2.0 / 3.0) / 3.0
        ));
        // f1: c0 4/(3+3)=2/3, c1 6/(4+4)=3/4, c2 4/(3+3)=2/3
        assert!(close(cm.macro_f1(), (2.0 / 3.0 + 0.75 + 2.0 / 3.0) / 3.0));
    }

    #[test]
    fn absent_classes_are_left_out_and_unpredicted_ones_score_zero() {
        // Class 3 never occurs; class 2 is true but never predicted.
        let y = [0, 0, 1, 2];
        let p = [0, 0, 1, 1];
        let cm = ConfusionMatrix::new(4, &y, &p).unwrap();
        assert!(close(cm.f1(2), 0.0));
        assert!(close(cm.macro_recall(), (1.0 + 1.0 + 0.0) / 3.0));
        // f1: c0 1, c1 2/(1+2)=2/3, c2 0
        assert!(close(cm.macro_f1(), (1.0 + 2.0 / 3.0) / 3.0));
    }

    // SciPy 1.x: pearsonr([1,2,3,4,5],[2,1,4,3,5]) = 0.8 and
    // spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138 (ties averaged: 3/√10).
    #[test]
    fn correlations_match_scipy() {
        let r = pearson(&[1., 2., 3., 4., 5.], &[2., 1., 4., 3., 5.]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        let rho = spearman(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
        assert!((rho - 3.0 / 10f64.sqrt()).abs() < 1e-12, "{rho}");
        assert_eq!(average_ranks(&[10., 30., 20., 30.]), vec![1., 3.5, 2., 3.5]);
        // A monotone but non-linear relation: rank correlation 1, Pearson below.
        let x = [1., 2., 3., 4.];
        let y = [1., 8., 27., 64.];
        assert!((spearman(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &y).unwrap() < 0.99);
    }

    #[test]
    fn undefined_correlations_are_errors() {
        assert!(pearson(&[1., 2.], &[3.]).is_err());
        assert!(pearson(&[1.], &[3.]).is_err());
        assert!(pearson(&[1., 1., 1.], &[1., 2., 3.]).is_err());
        assert!(spearman(&[1., f64::NAN], &[1., 2.]).is_err());
    }

    #[test]
    fn rejects_out_of_range_and_mismatched_lengths() {
        assert!(ConfusionMatrix::new(2, &[0, 2], &[0, 1]).is_err());
        assert!(ConfusionMatrix::new(2, &[0], &[0, 1]).is_err());
        let empty = ConfusionMatrix::new(2, &[], &[]).unwrap();
        assert_eq!(empty.accuracy(), 0.0);
        assert_eq!(empty.macro_f1(), 0.0);
    }
}

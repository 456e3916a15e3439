//! Classification metrics: accuracy, macro-F1 and macro-recall (TweetEval's
//! official metrics are emotion macro-F1 and sentiment macro-recall), computed
//! from a confusion matrix.
//!
//! Macro averages follow scikit-learn's defaults: the mean over the classes that
//! occur in the labels or the predictions, a per-class score with a zero
//! denominator counting as 0.

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

    pub fn num_classes(&self) -> usize {
        self.counts.len()
    }

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

    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.num_classes()).map(|c| self.counts[c][c]).sum();
        ratio(correct, self.total())
    }

    pub fn recall(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.true_count(class))
    }

    pub fn precision(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.predicted_count(class))
    }

    /// F1 = 2·tp / (2·tp + fp + fn), 0 when the class is neither true nor predicted.
    pub fn f1(&self, class: usize) -> f64 {
        let tp = self.counts[class][class];
        ratio(2 * tp, self.true_count(class) + self.predicted_count(class))
    }

    pub fn macro_recall(&self) -> f64 {
        mean(self.present_classes().map(|c| self.recall(c)))
    }

    pub fn macro_f1(&self) -> f64 {
        mean(self.present_classes().map(|c| self.f1(c)))
    }

    pub fn metrics(&self) -> TaskMetrics {
        TaskMetrics {
            accuracy: self.accuracy(),
            macro_f1: self.macro_f1(),
            macro_recall: self.macro_recall(),
            count: self.total() as usize,
        }
    }
}

/// A task's scores on one split, as fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
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

    #[test]
    fn rejects_out_of_range_and_mismatched_lengths() {
        assert!(ConfusionMatrix::new(2, &[0, 2], &[0, 1]).is_err());
        assert!(ConfusionMatrix::new(2, &[0], &[0, 1]).is_err());
        let empty = ConfusionMatrix::new(2, &[], &[]).unwrap();
        assert_eq!(empty.accuracy(), 0.0);
        assert_eq!(empty.macro_f1(), 0.0);
    }
}

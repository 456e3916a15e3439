//! Learning-rate schedules: linear warmup then linear decay to zero (the schedule
//! of Hugging Face's `get_linear_schedule_with_warmup`), or constant (overfit mode).

use serde::{Deserialize, Serialize};

/// How the learning-rate factor changes over a run's optimiser steps; see
/// [`factor`](Self::factor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Factor 1 at every step (overfit mode).
    Constant,
    /// Linear warmup from 0 to 1, then linear decay to 0; build it with
    /// [`linear`](LrSchedule::linear).
    LinearWarmupDecay {
        /// Optimiser steps of warmup ([`linear`](LrSchedule::linear) caps it at `total_steps`).
        warmup_steps: usize,
        /// Optimiser steps of the whole run (all epochs); the factor is 0 from here on.
        total_steps: usize,
    },
}

impl LrSchedule {
    /// Linear warmup over `ceil(warmup_ratio * total_steps)` steps (as
    /// `TrainingArguments` rounds it), then linear decay to 0 at `total_steps`.
    pub fn linear(warmup_ratio: f64, total_steps: usize) -> Self {
        let warmup_steps = (warmup_ratio.max(0.0) * total_steps as f64).ceil() as usize;
        Self::LinearWarmupDecay {
            warmup_steps: warmup_steps.min(total_steps),
            total_steps,
        }
    }

    /// The factor on the base learning rates for optimiser step `step` (0-based).
    /// During warmup it is `step / warmup`, so the very first step has factor 0,
    /// as in PyTorch, where the scheduler advances after `optimizer.step()`; then
    /// `(total - step) / (total - warmup)`, never below 0.
    pub fn factor(&self, step: usize) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::LinearWarmupDecay {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return step as f64 / warmup_steps as f64;
                }
                let remaining = total_steps.saturating_sub(step) as f64;
                remaining / (total_steps - warmup_steps).max(1) as f64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = LrSchedule::linear(0.06, 1245);
        assert_eq!(
            s,
            LrSchedule::LinearWarmupDecay {
                warmup_steps: 75,
                total_steps: 1245
            }
        );
        assert_eq!(s.factor(0), 0.0);
        assert!((s.factor(15) - 0.2).abs() < 1e-12);
        assert_eq!(s.factor(75), 1.0);
        assert!((s.factor(75 + 585) - 0.5).abs() < 1e-12);
        assert_eq!(s.factor(1245), 0.0);
        assert_eq!(s.factor(2000), 0.0);
        let factors: Vec<f64> = (75..1245).map(|i| s.factor(i)).collect();
        assert!(factors.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn no_warmup_and_constant() {
        let s = LrSchedule::linear(0.0, 10);
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.factor(123_456), 1.0);
    }
}

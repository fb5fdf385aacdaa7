//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay to
//! `min_lr` at the last step.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half a cosine from `lr` to `min_lr`.
    #[default]
    Cosine,
    /// A straight line from `lr` to `min_lr`.
    Linear,
    /// Stay at `lr`.
    Constant,
}

/// A complete schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate (cosine and linear).
    pub min_lr: f64,
    /// Steps of linear warmup from `lr / warmup` to `lr`.
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
    /// Decay shape.
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr + (self.min_lr - self.lr) * progress,
            Decay::Cosine => {
                self.min_lr
                    + 0.5
                        * (self.lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_min_lr() {
        let schedule = Schedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup: 4,
            total: 14,
            decay: Decay::Cosine,
        };
        assert_eq!(schedule.lr_at(0), 0.25);
        assert_eq!(schedule.lr_at(3), 1.0);
        assert!((schedule.lr_at(4) - 1.0).abs() < 1e-12);
        assert!(
            (schedule.lr_at(9) - 0.55).abs() < 1e-12,
            "half way down the cosine"
        );
        assert!((schedule.lr_at(14) - 0.1).abs() < 1e-12);
        let linear = Schedule {
            decay: Decay::Linear,
            ..schedule
        };
        assert!((linear.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((linear.lr_at(6) - (1.0 - 0.9 * 0.2)).abs() < 1e-12);
        let constant = Schedule {
            decay: Decay::Constant,
            ..schedule
        };
        assert_eq!(constant.lr_at(13), 1.0);
    }
}

//! The losses, on sums of completion-token log-probabilities.
//!
//! Each loss is written as a function of per-sequence `logp = Σ log p(completion token)`
//! values, and returns, besides its value, `∂loss/∂logp` for each sequence. The
//! gradient with respect to a sequence's logits is then that coefficient times
//! `onehot − softmax` on each completion row ([`seq_dlogits`]), so every method shares
//! one backward.
//!
//! - SFT: the mean cross-entropy over every completion token of the batch (TRL's
//!   completion-only loss).
//! - DPO (sigmoid): `−log σ(β · ((π_c − ref_c) − (π_r − ref_r)))`, averaged over pairs;
//!   the reference is the base model without the adapter.
//! - KTO: with the reference point `z = max(0, KL)` (detached), a desirable answer costs
//!   `w_d · (1 − σ(β · (π − ref − z)))` and an undesirable one
//!   `w_u · (1 − σ(β · (z − (π − ref))))`, averaged over the batch.

use brise_kernels::ops;

/// Sum of the log-probabilities of `targets` given logits rows (one per target).
pub fn seq_logp(logits: &[f32], targets: &[u32], n_vocab: usize) -> f64 {
    targets
        .iter()
        .enumerate()
        .map(|(j, &t)| ops::log_prob(&logits[j * n_vocab..(j + 1) * n_vocab], t as usize))
        .sum()
}

/// Writes `coef · ∂logp/∂logits = coef · (onehot − softmax)` for each row.
pub fn seq_dlogits(logits: &[f32], targets: &[u32], n_vocab: usize, coef: f64, out: &mut [f32]) {
    for (j, &t) in targets.iter().enumerate() {
        let r = j * n_vocab..(j + 1) * n_vocab;
        ops::cross_entropy(&logits[r.clone()], t as usize, -coef as f32, &mut out[r]);
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// SFT: given each sequence's logp and completion length, the mean token NLL and each
/// sequence's coefficient (−1/N for all, N the batch's completion tokens).
pub fn sft(logps: &[f64], lens: &[usize]) -> (f64, Vec<f64>) {
    let n: usize = lens.iter().sum();
    let n = n.max(1) as f64;
    let loss = -logps.iter().sum::<f64>() / n;
    (loss, vec![-1.0 / n; logps.len()])
}

/// One DPO pair's log-probabilities.
#[derive(Clone, Copy, Debug)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// DPO (sigmoid) over the batch: the mean loss, and per pair (∂/∂π_c, ∂/∂π_r). Also
/// returns how many pairs the policy ranks right (chosen reward above rejected).
pub fn dpo(pairs: &[PairLogps], beta: f64) -> (f64, Vec<(f64, f64)>, usize) {
    let n = pairs.len().max(1) as f64;
    let mut loss = 0.0;
    let mut right = 0;
    let coefs = pairs
        .iter()
        .map(|p| {
            let z = beta * ((p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected));
            loss -= log_sigmoid(z);
            if z > 0.0 {
                right += 1;
            }
            // d(−log σ(z))/dz = −σ(−z)
            let g = -sigmoid(-z) * beta / n;
            (g, -g)
        })
        .collect();
    (loss / n, coefs, right)
}

/// KTO's hyperparameters (TRL's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KtoConfig {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// The KL reference point from mismatched pairs' (policy, reference) logps: their mean
/// log ratio, clamped at 0. It is a constant of the loss (no gradient flows into it).
pub fn kto_kl(kl_logps: &[(f64, f64)]) -> f64 {
    if kl_logps.is_empty() {
        return 0.0;
    }
    let m = kl_logps.iter().map(|(p, r)| p - r).sum::<f64>() / kl_logps.len() as f64;
    m.max(0.0)
}

/// KTO over the batch: items are (policy logp, reference logp, desirable). Returns the
/// mean loss and each item's ∂loss/∂π.
pub fn kto(items: &[(f64, f64, bool)], kl: f64, cfg: &KtoConfig) -> (f64, Vec<f64>) {
    let n = items.len().max(1) as f64;
    let mut loss = 0.0;
    let coefs = items
        .iter()
        .map(|&(p, r, good)| {
            let lr = p - r;
            if good {
                let s = sigmoid(cfg.beta * (lr - kl));
                loss += cfg.desirable_weight * (1.0 - s);
                -cfg.desirable_weight * cfg.beta * s * (1.0 - s) / n
            } else {
                let s = sigmoid(cfg.beta * (kl - lr));
                loss += cfg.undesirable_weight * (1.0 - s);
                cfg.undesirable_weight * cfg.beta * s * (1.0 - s) / n
            }
        })
        .collect();
    (loss / n, coefs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-6;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn dpo_coefficients_are_its_derivatives() {
        let base = [
            PairLogps {
                chosen: -12.0,
                rejected: -9.5,
                ref_chosen: -11.0,
                ref_rejected: -10.0,
            },
            PairLogps {
                chosen: -3.0,
                rejected: -30.0,
                ref_chosen: -4.0,
                ref_rejected: -20.0,
            },
        ];
        let (_, coefs, right) = dpo(&base, 0.1);
        assert_eq!(right, 1);
        for (i, (gc, gr)) in coefs.iter().enumerate() {
            let lc = |x: f64| {
                let mut p = base;
                p[i].chosen = x;
                dpo(&p, 0.1).0
            };
            let lr = |x: f64| {
                let mut p = base;
                p[i].rejected = x;
                dpo(&p, 0.1).0
            };
            assert!((gc - fd(lc, base[i].chosen)).abs() < 1e-8);
            assert!((gr - fd(lr, base[i].rejected)).abs() < 1e-8);
        }
        // −log σ(0) = ln 2 when policy equals reference.
        let eq = [PairLogps {
            chosen: -5.0,
            rejected: -6.0,
            ref_chosen: -5.0,
            ref_rejected: -6.0,
        }];
        assert!((dpo(&eq, 0.1).0 - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn kto_coefficients_are_its_derivatives() {
        let items = [
            (-10.0, -11.0, true),
            (-7.0, -6.5, false),
            (-20.0, -19.0, true),
        ];
        let cfg = KtoConfig {
            beta: 0.3,
            desirable_weight: 1.0,
            undesirable_weight: 1.33,
        };
        let (_, coefs) = kto(&items, 0.2, &cfg);
        for (i, g) in coefs.iter().enumerate() {
            let l = |x: f64| {
                let mut it = items;
                it[i].0 = x;
                kto(&it, 0.2, &cfg).0
            };
            assert!((g - fd(l, items[i].0)).abs() < 1e-8, "item {i}");
        }
        assert_eq!(kto_kl(&[(-1.0, -0.5), (-2.0, -2.2)]), 0.0);
        assert!((kto_kl(&[(-1.0, -1.5), (-2.0, -2.1)]) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn sft_is_the_mean_token_nll() {
        let (l, c) = sft(&[-6.0, -2.0], &[3, 1]);
        assert_eq!(l, 2.0);
        assert_eq!(c, vec![-0.25, -0.25]);
    }

    #[test]
    fn dlogits_are_the_logp_gradient() {
        let v = 5;
        let z = vec![0.1f32, -0.3, 2.0, 0.7, -1.2, 0.0, 0.4, 0.4, -0.2, 1.1];
        let t = [2u32, 4];
        let mut d = vec![0f32; z.len()];
        seq_dlogits(&z, &t, v, 0.5, &mut d);
        for i in 0..z.len() {
            let h = 1e-3f32;
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h;
            zm[i] -= h;
            let want = 0.5 * (seq_logp(&zp, &t, v) - seq_logp(&zm, &t, v)) / (2.0 * h as f64);
            assert!((d[i] as f64 - want).abs() < 1e-3, "{i}: {} vs {want}", d[i]);
        }
    }
}

//! Token sampling, in llama.cpp's default order: penalties, logit bias, top-k, top-p,
//! min-p, temperature, then a draw. Temperature 0 is greedy (the first highest logit).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables. Applied to tokens among the last `penalty_last_n`.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub penalty_last_n: usize,
    /// Added to the logits of the given tokens before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// The same seed gives the same tokens; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |name: &str, v: f32, why: &str| Err(format!("{name} = {v} {why}"));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature, "must be ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "must be in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", self.repeat_penalty, "must be > 0");
        }
        for (n, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return bad(n, v, "must be finite");
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    cand: Vec<(u32, f32)>,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            cand: Vec::new(),
            counts: Default::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (for penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalize =
            p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let needs_copy = penalize || !p.logit_bias.is_empty();
        if p.temperature <= 0.0 && !needs_copy {
            return argmax_slice(logits);
        }
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &v)| (i as u32, v)));
        for &(t, b) in &p.logit_bias {
            if let Some(c) = self.cand.get_mut(t as usize) {
                c.1 += b;
            }
        }
        if penalize {
            self.counts.clear();
            let start = history.len().saturating_sub(p.penalty_last_n);
            for &t in &history[start..] {
                *self.counts.entry(t).or_default() += 1;
            }
            for (&t, &n) in &self.counts {
                if let Some(c) = self.cand.get_mut(t as usize) {
                    if c.1 <= 0.0 {
                        c.1 *= p.repeat_penalty;
                    } else {
                        c.1 /= p.repeat_penalty;
                    }
                    c.1 -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(self.cand.iter().copied());
        }
        // Highest first; ties keep the lower id first.
        let k = if p.top_k > 0 {
            p.top_k.min(self.cand.len())
        } else {
            self.cand.len()
        };
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_logit);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(by_logit);
        // Probabilities before temperature, for top-p and min-p (llama.cpp's order).
        let probs = softmax(&self.cand, 1.0);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let pmax = probs[0];
            let keep = probs
                .iter()
                .take(self.cand.len())
                .take_while(|q| **q >= p.min_p as f64 * pmax)
                .count();
            self.cand.truncate(keep.max(1));
        }
        let probs = softmax(&self.cand, p.temperature);
        let r: f64 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut cum = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if r < cum {
                return self.cand[i].0;
            }
        }
        self.cand.last().map(|c| c.0).unwrap_or(0)
    }
}

fn argmax(it: impl Iterator<Item = (u32, f32)>) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, v) in it {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// [`argmax`] of a slice (the first of the largest values; NaN never wins; 0 when
/// nothing beats −∞), in two passes the compiler vectorizes: the maximum, then its
/// first position. Greedy decoding calls it once per token over the whole vocabulary.
fn argmax_slice(x: &[f32]) -> u32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in m.iter().chain(tail) {
        if v > best {
            best = v;
        }
    }
    if best == f32::NEG_INFINITY {
        return 0;
    }
    x.iter().position(|&v| v == best).unwrap_or(0) as u32
}

fn softmax(c: &[(u32, f32)], temp: f32) -> Vec<f64> {
    let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1)) as f64;
    let e: Vec<f64> = c
        .iter()
        .map(|x| ((x.1 as f64 - max) / temp as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37 % 100) as f32) * 0.05).collect()
    }

    #[test]
    fn slice_argmax_equals_the_scalar_one() {
        let scalar = |x: &[f32]| argmax(x.iter().copied().enumerate().map(|(i, v)| (i as u32, v)));
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as u32
        };
        for n in [0usize, 1, 15, 16, 17, 100, 49152, 151936] {
            for case in 0..6 {
                let mut x: Vec<f32> = (0..n)
                    .map(|_| (next() % 2000) as f32 / 100.0 - 10.0)
                    .collect();
                match case {
                    // Ties: the first of several maxima wins.
                    1 if n > 3 => {
                        let (a, b) = (next() as usize % n, next() as usize % n);
                        x[a] = 50.0;
                        x[b] = 50.0;
                    }
                    // NaN never wins; −∞ everywhere gives 0.
                    2 if n > 0 => x[next() as usize % n] = f32::NAN,
                    3 => x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    4 if n > 1 => {
                        x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                        x[n - 1] = f32::NAN;
                    }
                    // Signed zeros compare equal: the first one wins.
                    5 if n > 2 => {
                        x.iter_mut().for_each(|v| *v = -1.0);
                        x[1] = -0.0;
                        x[2] = 0.0;
                    }
                    _ => {}
                }
                assert_eq!(argmax_slice(&x), scalar(&x), "n={n} case {case}");
            }
        }
    }

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
        let l = logits();
        let best = (0..100)
            .max_by(|a, b| l[*a].total_cmp(&l[*b]).then(b.cmp(a)))
            .unwrap() as u32;
        assert_eq!(s.sample(&l, &[]), best);
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = logits();
        let p = SamplingParams {
            seed: Some(42),
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.5,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        let other = run(&SamplingParams {
            seed: Some(43),
            ..p.clone()
        });
        assert_ne!(run(&p), other);
        // Many distinct tokens at high temperature: it is really sampling.
        let distinct: std::collections::HashSet<_> = run(&p).into_iter().collect();
        assert!(distinct.len() > 5);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let l = logits();
        let mut g = Sampler::new(SamplingParams::greedy());
        let want = g.sample(&l, &[]);
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            temperature: 2.0,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), want);
        }
    }

    #[test]
    fn top_p_and_min_p_restrict() {
        let mut l = vec![0f32; 10];
        l[3] = 10.0;
        l[7] = 9.0;
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 3);
        }
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.2,
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        });
        let got: std::collections::HashSet<_> = (0..200).map(|_| s.sample(&l, &[])).collect();
        assert_eq!(got, [3u32, 7].into_iter().collect());
    }

    #[test]
    fn penalties_change_the_choice() {
        let l = vec![5.0f32, 4.9, 1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.05,
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[0]), 0);
        assert_eq!(s.sample(&l, &[0, 0, 0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(2, 10.0)],
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[]), 2);
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_p"));
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("temperature"));
    }
}

//! The backward pass of the taped forward, checked against finite differences of the
//! inference forward's own loss (tiny Mistral, f16 weights, a PEFT adapter).
//!
//! The loss is the SFT loss: the mean cross-entropy of the completion tokens. Its
//! directional derivative along a random direction in one projection's A (or B) of
//! every layer, (L(θ + εv) − L(θ − εv)) / 2ε, must match the analytic gradient's dot
//! product with v. Each of the 14 matrices is its own direction, so a wrong path
//! through any projection fails on its own. The forward rounds on the way (f16
//! activations and K/V), which bounds how closely the two can agree; ε is set so the
//! change in the loss is far above that noise.

mod common;

use brise_kernels::ops;
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{BackwardState, ForwardState, LogitsWanted, LoraGrads, SeqBatch, Tape};
use brise_model::kv::KvCache;
use brise_model::lora::{LoraAdapter, Proj};
use common::*;

const PROMPT: usize = 5;
/// Relative error allowed between |g| and the measured slope (the forward's roundings
/// make the loss a slightly rough function of the weights).
const TOL: f64 = 0.05;

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![
            1, 1183, 2339, 1073, 16958, 2052, 1713, 8696, 17838, 1040, 13765, 1780,
        ],
        vec![1, 6233, 29493, 9198, 29493, 15102, 29493, 11595, 29493],
    ]
}

/// SFT loss of the batch (mean over every completion token of every sequence), and
/// `dlogits` for it when `want_grad`, from one forward of all sequences together.
fn loss(
    model: &Model,
    pool: &ThreadPool,
    ad: &LoraAdapter,
    tape: Option<&mut Tape>,
    seqs: &[Vec<u32>],
) -> (f64, Vec<f32>) {
    let cfg = &model.cfg;
    let mut caches: Vec<KvCache> = seqs.iter().map(|_| KvCache::new(cfg, 64)).collect();
    let mut batch: Vec<SeqBatch> = caches
        .iter_mut()
        .zip(seqs)
        .map(|(c, s)| SeqBatch {
            cache: c,
            tokens: &s[..s.len() - 1],
            logits: LogitsWanted::From(PROMPT - 1),
            lora: Some(ad),
        })
        .collect();
    let mut st = ForwardState::default();
    model.forward().run_taped(pool, &mut st, &mut batch, tape);
    let targets: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s[PROMPT..].iter().copied())
        .collect();
    let n = targets.len();
    let v = cfg.n_vocab;
    assert_eq!(st.logits.len(), n * v);
    let mut dl = vec![0f32; n * v];
    let mut total = 0f64;
    for (j, &t) in targets.iter().enumerate() {
        total += ops::cross_entropy(
            &st.logits[j * v..(j + 1) * v],
            t as usize,
            1.0 / n as f32,
            &mut dl[j * v..(j + 1) * v],
        ) as f64;
    }
    (total / n as f64, dl)
}

/// The adapter moved by `eps · dir[layer]` on projection `p`'s A (or Bᵀ when `b`).
fn moved(ad: &LoraAdapter, p: Proj, b: bool, dir: &[Vec<f32>], eps: f64) -> LoraAdapter {
    let mut out = ad.duplicate();
    for (l, q, m) in out.matrices_mut() {
        if q != p {
            continue;
        }
        let x = if b { &mut m.bt } else { &mut m.a };
        for (x, d) in x.iter_mut().zip(&dir[l]) {
            *x += (eps * *d as f64) as f32;
        }
    }
    out
}

#[test]
fn lora_gradients_match_finite_differences() {
    check_gradients(Kernels::best(), &seqs());
}

/// The same with the fast f32 forward training runs (`Kernels::with_fast`), on
/// sequences long enough for its products to take the f32 path.
#[test]
fn lora_gradients_match_finite_differences_with_the_fast_forward() {
    let long: Vec<Vec<u32>> = seqs()
        .iter()
        .map(|s| s.iter().chain(&s[1..]).copied().collect())
        .collect();
    assert!(
        long.iter()
            .all(|s| s.len() > brise_kernels::matmul::FAST_MIN_STEP)
    );
    check_gradients(Kernels::best().with_fast(true), &long);
}

fn check_gradients(kern: Kernels, seqs: &[Vec<u32>]) {
    let model = Model::load(&fixture("tiny-mistral/tiny-mistral-f16.gguf"), kern).unwrap();
    let cfg = &model.cfg;
    let ad = LoraAdapter::load(&fixture("lora/tiny-mistral-r4"), cfg).unwrap();
    let pool = ThreadPool::new(2);
    let mut tape = Tape::new();
    let (l0, dl) = loss(&model, &pool, &ad, Some(&mut tape), seqs);
    let mut grads = LoraGrads::zeros_like(&ad, cfg.n_layer);
    let mut bs = BackwardState::default();
    model
        .forward()
        .backward(&pool, &tape, &dl, &ad, &mut grads, &mut bs);

    // The taped forward computes the same loss as the plain one.
    let (l_plain, _) = loss(&model, &pool, &ad, None, seqs);
    assert_eq!(l0, l_plain);

    for p in ad.targets().to_vec() {
        for b in [false, true] {
            let name = format!("{p:?} {}", if b { "B" } else { "A" });
            // Along this matrix's own gradient (all layers), normalised: the slope there
            // is |g|. A gradient pointing the wrong way in any layer makes the measured
            // slope smaller than its norm.
            let dir: Vec<Vec<f32>> = grads
                .layers
                .iter()
                .map(|ms| {
                    let (da, dbt) = ms[p as usize].as_ref().unwrap();
                    if b { dbt.clone() } else { da.clone() }
                })
                .collect();
            let norm = dir
                .iter()
                .flatten()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(norm > 1e-4, "{name}: zero gradient");
            // Large enough that the change in the loss is far above the roundings' noise,
            // small enough that curvature stays under the tolerance (measured: ≤ 3.5%).
            let eps = 1e-1;
            let (lp, _) = loss(
                &model,
                &pool,
                &moved(&ad, p, b, &dir, eps / norm),
                None,
                seqs,
            );
            let (lm, _) = loss(
                &model,
                &pool,
                &moved(&ad, p, b, &dir, -eps / norm),
                None,
                seqs,
            );
            let fd = (lp - lm) / (2.0 * eps);
            let err = (fd - norm).abs() / norm;
            eprintln!(
                "{name}: |g| {norm:.6}, finite difference along g {fd:.6}, rel err {err:.2e}"
            );
            assert!(
                err < TOL,
                "{name}: |g| = {norm} but the loss changes at {fd} along g"
            );
        }
    }
}

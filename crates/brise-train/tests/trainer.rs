//! The training loop on the tiny Mistral model: each method lowers its own loss, a
//! resumed run takes exactly the steps an uninterrupted one takes, and the adapter
//! starts as the identity (B = 0), so the step-0 SFT loss is the base model's NLL.

use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::lora::LoraAdapter;
use brise_train::data::{Item, Seq};
use brise_train::trainer::{Method, TrainConfig, Trainer, init_adapter};
use std::path::PathBuf;

fn model() -> Model {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-mistral/tiny-mistral-f16.gguf");
    Model::load(&p, Kernels::best()).unwrap()
}

fn seq(prompt: &[u32], completion: &[u32]) -> Seq {
    Seq {
        prompt: prompt.to_vec(),
        completion: completion.to_vec(),
    }
}

fn cfg(method: Method) -> TrainConfig {
    TrainConfig {
        method,
        rank: 4,
        alpha: 8.0,
        learning_rate: 1e-2,
        batch_size: 2,
        warmup_ratio: 0.0,
        max_steps: Some(12),
        ..TrainConfig::default()
    }
}

fn sft_items() -> Vec<Item> {
    vec![
        Item::Sft(seq(&[1, 1183, 2339, 1073], &[16958, 2052, 1713, 8696, 2])),
        Item::Sft(seq(&[1, 6233, 29493], &[9198, 29493, 15102, 2])),
    ]
}

#[test]
fn sft_lowers_the_loss_from_the_base_models() {
    let m = model();
    let c = cfg(Method::Sft);
    let ad = init_adapter(&m, &c).unwrap();
    let mut tr = Trainer::new(&m, c, ad, 2).unwrap();
    let items = sft_items();
    let refs: Vec<&Item> = items.iter().collect();
    let (l0, _, _) = tr.loss_and_grads(&refs).unwrap();
    let mut losses = Vec::new();
    let sum = tr
        .train(&items, &mut |r| {
            losses.push(r.loss);
            true
        })
        .unwrap();
    assert_eq!(sum.steps, 12);
    assert_eq!(losses[0], l0, "step 0 is the base model's loss (B = 0)");
    let (l1, _, _) = tr.loss_and_grads(&refs).unwrap();
    eprintln!("SFT loss {l0:.4} -> {l1:.4}: {losses:?}");
    assert!(l1 < 0.6 * l0, "SFT loss {l0} -> {l1}");
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "not descending: {losses:?}"
    );
}

#[test]
fn dpo_and_kto_move_their_preferences() {
    let m = model();
    let chosen = seq(&[1, 1183, 2339], &[16958, 2052, 2]);
    let rejected = seq(&[1, 1183, 2339], &[13765, 1780, 2]);
    for method in [Method::Dpo, Method::Kto] {
        let items = match method {
            Method::Dpo => vec![Item::Pref {
                chosen: chosen.clone(),
                rejected: rejected.clone(),
            }],
            _ => vec![
                Item::Kto {
                    seq: chosen.clone(),
                    desirable: true,
                },
                Item::Kto {
                    seq: rejected.clone(),
                    desirable: false,
                },
            ],
        };
        let c = cfg(method);
        let ad = init_adapter(&m, &c).unwrap();
        let mut tr = Trainer::new(&m, c, ad, 2).unwrap();
        let refs: Vec<&Item> = items.iter().collect();
        let (l0, _, _) = tr.loss_and_grads(&refs).unwrap();
        tr.train(&items, &mut |_| true).unwrap();
        let (l1, _, right) = tr.loss_and_grads(&refs).unwrap();
        eprintln!("{method:?} loss {l0:.4} -> {l1:.4}, right {right}");
        assert!(l1 < l0 - 0.05, "{method:?}: {l0} -> {l1}");
        assert_eq!(right, items.len(), "{method:?}");
    }
}

#[test]
fn a_resumed_run_takes_the_same_steps() {
    let m = model();
    let mut c = cfg(Method::Sft);
    c.max_steps = Some(6);
    let items = sft_items();
    let full = {
        let mut tr = Trainer::new(&m, c.clone(), init_adapter(&m, &c).unwrap(), 2).unwrap();
        tr.train(&items, &mut |_| true).unwrap();
        tr.adapter.to_peft()
    };
    let dir = std::env::temp_dir().join(format!("brise-resume-{}", std::process::id()));
    let mut tr = Trainer::new(&m, c.clone(), init_adapter(&m, &c).unwrap(), 2).unwrap();
    tr.train(&items, &mut |r| r.step < 3).unwrap();
    assert_eq!(tr.step, 3);
    tr.save_checkpoint(&dir).unwrap();
    drop(tr);
    let mut tr = Trainer::resume(&m, &dir, 2).unwrap();
    assert_eq!(tr.step, 3);
    tr.train(&items, &mut |_| true).unwrap();
    assert_eq!(tr.step, 6);
    assert_eq!(tr.adapter.to_peft(), full, "resumed adapter differs");
    // And the saved adapter loads as a PEFT adapter.
    LoraAdapter::load(&dir.join("adapter"), &m.cfg).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Every gradient value, layer by layer (A then Bᵀ of each adapted projection).
fn flat_grads(tr: &Trainer) -> Vec<f32> {
    let mut out = Vec::new();
    for layer in &tr.grads.layers {
        for (da, dbt) in layer.iter().flatten() {
            out.extend_from_slice(da);
            out.extend_from_slice(dbt);
        }
    }
    out
}

/// RPO (TRL's `rpo_alpha`): DPO plus α times the chosen answers' mean token NLL. Its loss
/// and gradient must be DPO's plus α times SFT's on the chosen answers, on an adapter
/// moved off its start (so both of LoRA's matrices get gradients).
#[test]
fn rpo_is_dpo_plus_the_chosen_answers_nll() {
    let m = model();
    let c = cfg(Method::Sft);
    let mut warm = Trainer::new(&m, c.clone(), init_adapter(&m, &c).unwrap(), 2).unwrap();
    warm.train(&sft_items(), &mut |_| true).unwrap();
    let ad = warm.adapter.duplicate();
    let pairs = [
        (
            seq(&[1, 1183, 2339], &[16958, 2052, 2]),
            seq(&[1, 1183, 2339], &[13765, 1780, 2]),
        ),
        (
            seq(&[1, 6233, 29493], &[9198, 29493, 15102, 2]),
            seq(&[1, 6233, 29493], &[8696, 2]),
        ),
    ];
    let pref: Vec<Item> = pairs
        .iter()
        .map(|(c, r)| Item::Pref {
            chosen: c.clone(),
            rejected: r.clone(),
        })
        .collect();
    let sft: Vec<Item> = pairs.iter().map(|(c, _)| Item::Sft(c.clone())).collect();
    let run = |method: Method, rpo: f64, items: &[Item]| {
        let c = TrainConfig {
            rpo_alpha: rpo,
            ..cfg(method)
        };
        let mut tr = Trainer::new(&m, c, ad.duplicate(), 2).unwrap();
        let refs: Vec<&Item> = items.iter().collect();
        let (l, _, _) = tr.loss_and_grads(&refs).unwrap();
        (l, flat_grads(&tr))
    };
    let alpha = 0.7;
    let (l_dpo, g_dpo) = run(Method::Dpo, 0.0, &pref);
    let (l_sft, g_sft) = run(Method::Sft, 0.0, &sft);
    let (l_rpo, g_rpo) = run(Method::Dpo, alpha, &pref);
    assert!(
        (l_rpo - (l_dpo + alpha * l_sft)).abs() < 1e-9,
        "loss {l_rpo} vs {l_dpo} + {alpha}·{l_sft}"
    );
    let scale = g_rpo.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(scale > 0.0);
    let mut worst = 0f32;
    for ((r, d), s) in g_rpo.iter().zip(&g_dpo).zip(&g_sft) {
        worst = worst.max((r - (d + alpha as f32 * s)).abs());
    }
    assert!(
        worst <= 1e-4 * scale,
        "gradient off by {worst} (largest {scale})"
    );
    // And the NLL term is not nothing: it moves the gradient.
    let moved = g_rpo
        .iter()
        .zip(&g_dpo)
        .fold(0f32, |a, (r, d)| a.max((r - d).abs()));
    assert!(moved > 1e-2 * scale, "{moved}");
}

fn example(item: Item, key: &str) -> brise_train::data::Example {
    brise_train::data::Example {
        item,
        prompt_key: key.into(),
        subject: None,
        tenant: None,
        record_ids: vec![],
        feedback_ids: vec![],
        origin: key.into(),
        prompt_text: String::new(),
        replaced: None,
    }
}

fn dataset(items: Vec<Item>) -> brise_train::data::Dataset {
    brise_train::data::Dataset {
        examples: items
            .into_iter()
            .enumerate()
            .map(|(i, it)| example(it, &format!("p{i}")))
            .collect(),
        snapshot_sha256: String::new(),
        source: "test".into(),
        method: Method::Sft,
        rows: 0,
        skipped: vec![],
        export: None,
        available: None,
    }
}

/// Runs the whole pipeline for 8 epochs of 2 steps, validated on `held`.
fn run_with_held(held: Vec<Item>, patience: usize) -> brise_train::pipeline::RunOutcome {
    run_pipeline(sft_items(), held, patience, 0.05, 8)
}

/// [`run_with_held`] trained on `items` for `epochs`, with the gate's perplexity bound
/// `ppl_max_increase`.
fn run_pipeline(
    items: Vec<Item>,
    held: Vec<Item>,
    patience: usize,
    ppl_max_increase: f64,
    epochs: usize,
) -> brise_train::pipeline::RunOutcome {
    run_pipeline_with(items, held, patience, ppl_max_increase, epochs, &[])
}

/// [`run_pipeline`] with the fields `auto` fitted to the data.
fn run_pipeline_with(
    items: Vec<Item>,
    held: Vec<Item>,
    patience: usize,
    ppl_max_increase: f64,
    epochs: usize,
    auto: &[&str],
) -> brise_train::pipeline::RunOutcome {
    let m = model();
    let data = dataset(items);
    let val = dataset(held);
    let out_dir = std::env::temp_dir().join(format!(
        "brise-early-stop-{}-{patience}-{}-{ppl_max_increase}-{}-{epochs}-{}",
        std::process::id(),
        val.examples.len(),
        data.examples.len(),
        auto.join("+")
    ));
    let train = TrainConfig {
        batch_size: 1,
        epochs,
        max_steps: None,
        early_stopping_patience: patience,
        auto: auto.iter().map(|a| a.to_string()).collect(),
        ..cfg(Method::Sft)
    };
    let out = brise_train::pipeline::run(
        brise_train::pipeline::RunSpec {
            model: &m,
            data: &data,
            train,
            gate: brise_train::eval::GateConfig {
                behaviour: false,
                ppl_max_increase,
                ..Default::default()
            },
            held_out_fraction: 0.2,
            current: None,
            out_dir: out_dir.clone(),
            threads: 2,
            cancel: None,
            checkpoint: None,
            validation: Some(&val),
        },
        &mut |_| {},
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    out
}

#[test]
fn early_stopping_keeps_the_best_epoch_when_the_held_out_loss_rises() {
    // Held out: answers of tokens never trained on, which training makes less likely
    // as it moves the mass to the trained answers' tokens.
    let held = vec![
        Item::Sft(seq(&[1, 1183, 2339, 1073], &[500, 700, 900, 1100])),
        Item::Sft(seq(&[1, 6233, 29493], &[600, 800, 1000])),
    ];
    let out = run_with_held(held, 2);
    let es = out.early_stopping.expect("early stopping was on");
    assert!(out.summary.stopped_early, "{:?}", es.epoch_losses);
    assert!(out.summary.steps < 16, "{} steps", out.summary.steps);
    let kept = es.kept_epoch.expect("a kept epoch");
    let best = es
        .epoch_losses
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(kept, best.0);
    assert_eq!(es.epoch_losses.last().unwrap().0, kept + 2, "patience 2");
    // The adapter written is the kept epoch's: the gate's held-out loss is its loss.
    let nll = out.report.candidate.metrics.nll.unwrap();
    assert_eq!(nll, best.1, "{:?}", es.epoch_losses);
}

#[test]
fn early_stopping_runs_every_epoch_while_the_held_out_loss_falls() {
    let out = run_with_held(sft_items(), 2);
    let es = out.early_stopping.expect("early stopping was on");
    assert!(!out.summary.stopped_early, "{:?}", es.epoch_losses);
    assert_eq!(out.summary.steps, 16);
    assert_eq!(es.kept_epoch, None);
    assert_eq!(es.epoch_losses.len(), 7, "every epoch but the last");
    // Off: no hook, no record.
    let off = run_with_held(sft_items(), 0);
    assert!(off.early_stopping.is_none());
    assert_eq!(off.summary.steps, 16);
}

/// Answers of one repeated token: training on them makes the general text less likely
/// (on the tiny model its perplexity rises from the second epoch).
fn monotone_items() -> Vec<Item> {
    vec![
        Item::Sft(seq(&[1, 1183, 2339, 1073], &[29000; 8])),
        Item::Sft(seq(&[1, 6233, 29493], &[29000; 8])),
        Item::Sft(seq(&[1, 6233, 1073], &[29000; 8])),
    ]
}

/// The kept epoch's perplexity is the one the gate measured on the written adapter, and
/// it is within the gate's bound.
fn assert_kept_within_bound(out: &brise_train::pipeline::RunOutcome) {
    let es = out.early_stopping.as_ref().unwrap();
    let kept = es
        .kept_epoch
        .unwrap_or_else(|| panic!("no earlier epoch kept: {es:?}"));
    let (limit, ppl) = (es.ppl_limit.unwrap(), &es.epoch_ppl);
    let kept_ppl = ppl.iter().find(|(e, _)| *e == kept).unwrap().1;
    assert!(kept_ppl <= limit, "{ppl:?} above {limit}");
    assert!(
        ppl.last().unwrap().1 > limit,
        "{ppl:?} stayed within {limit}"
    );
    assert_eq!(out.report.candidate.metrics.ppl, Some(kept_ppl), "{ppl:?}");
    assert!(
        out.report
            .checks
            .iter()
            .any(|c| c.metric == "ppl" && c.outcome == brise_train::eval::Outcome::Pass)
    );
    assert!(
        es.reason.as_deref().unwrap().contains("perplexity"),
        "{:?}",
        es.reason
    );
}

#[test]
fn early_stopping_stops_when_the_general_perplexity_leaves_the_gates_bound() {
    // Patience 8: only the perplexity bound can stop this run. Bound 0: no rise at all.
    let out = run_pipeline(monotone_items(), sft_items(), 8, 0.0, 8);
    assert!(out.summary.stopped_early);
    assert!(out.summary.steps < 24, "{} steps", out.summary.steps);
    assert_kept_within_bound(&out);
    // With room to rise, the same data trains on.
    let wide = run_pipeline(monotone_items(), sft_items(), 8, 0.5, 8);
    assert_eq!(wide.summary.steps, 24);
    assert!(wide.early_stopping.unwrap().reason.is_none());
}

/// Sequences long enough for the fast f32 forward (`Trainer::fast_forward`, on by
/// default): its losses and gradients are the exact forward's up to rounding, and SFT
/// still lowers the loss.
#[test]
fn the_fast_forward_trains_like_the_exact_one() {
    let m = model();
    let long = |p: &[u32], c: &[u32]| {
        let c: Vec<u32> = c.iter().chain(c).chain(c).chain(c).copied().collect();
        seq(p, &c)
    };
    let items = vec![
        Item::Sft(long(&[1, 1183, 2339, 1073], &[16958, 2052, 1713, 8696, 2])),
        Item::Sft(long(&[1, 6233, 29493], &[9198, 29493, 15102, 2])),
    ];
    let refs: Vec<&Item> = items.iter().collect();
    let c = cfg(Method::Sft);
    let run = |fast: bool| {
        let mut tr = Trainer::new(&m, c.clone(), init_adapter(&m, &c).unwrap(), 2).unwrap();
        assert!(tr.fast_forward, "on by default");
        tr.fast_forward = fast;
        // One step so B is not zero, then the loss and gradients there.
        tr.step(&refs, 12).unwrap();
        let (l, _, _) = tr.loss_and_grads(&refs).unwrap();
        (l, flat_grads(&tr), tr)
    };
    let (lf, gf, mut tr) = run(true);
    let (le, ge, _) = run(false);
    assert!(lf != le, "the fast path was not taken: equal bits");
    assert!((lf - le).abs() < 1e-3 * le.abs(), "loss {lf} vs {le}");
    let norm = ge.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = gf
        .iter()
        .zip(&ge)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(diff < 1e-2 * norm, "gradients differ by {diff} of {norm}");
    tr.train(&items, &mut |_| true).unwrap();
    let (l1, _, _) = tr.loss_and_grads(&refs).unwrap();
    assert!(l1 < 0.6 * lf, "SFT loss {lf} -> {l1}");
}

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

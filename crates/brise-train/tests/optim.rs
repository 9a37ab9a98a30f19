//! brise's AdamW, clipping and schedule against PyTorch's and transformers' (fixture
//! from scripts/ref/gen_optim.py).

use brise_train::optim::{AdamWConfig, AdamWState, adamw_step, clip_factor, cosine_with_warmup};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/train/optim.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

#[test]
fn adamw_takes_pytorchs_steps() {
    let f = fixture();
    let a = &f["adamw"];
    let cfg = AdamWConfig {
        beta1: a["beta1"].as_f64().unwrap() as f32,
        beta2: a["beta2"].as_f64().unwrap() as f32,
        eps: a["eps"].as_f64().unwrap() as f32,
        weight_decay: a["weight_decay"].as_f64().unwrap() as f32,
    };
    let mut p = f32s(&a["param0"]);
    let mut st = AdamWState::default();
    let mut worst = 0f32;
    for (t, s) in a["steps"].as_array().unwrap().iter().enumerate() {
        let lr = s["lr"].as_f64().unwrap() as f32;
        adamw_step(&cfg, &mut st, t as u64 + 1, lr, &mut p, &f32s(&s["grad"]));
        for (x, y) in p.iter().zip(f32s(&s["param_after"])) {
            worst = worst.max((x - y).abs() / y.abs().max(1e-3));
        }
    }
    // Same formula, same f32 operations up to their order: a few ulps.
    assert!(
        worst < 1e-6,
        "largest relative difference from PyTorch: {worst}"
    );
}

#[test]
fn clipping_matches_clip_grad_norm() {
    for c in fixture()["clip"].as_array().unwrap() {
        let (a, b) = (f32s(&c["a"]), f32s(&c["b"]));
        let (norm, coef) = clip_factor(&[&a, &b], c["max_norm"].as_f64().unwrap() as f32);
        let want = c["norm"].as_f64().unwrap() as f32;
        assert!((norm - want).abs() <= 1e-6 * want, "{norm} vs {want}");
        for (x, y) in a
            .iter()
            .chain(&b)
            .zip(f32s(&c["a_after"]).iter().chain(&f32s(&c["b_after"])))
        {
            assert!(
                (x * coef - y).abs() <= 1e-6 * y.abs().max(1e-6),
                "{} vs {y}",
                x * coef
            );
        }
    }
}

#[test]
fn schedule_matches_transformers() {
    for s in fixture()["schedule"].as_array().unwrap() {
        let (w, t) = (s["warmup"].as_u64().unwrap(), s["total"].as_u64().unwrap());
        for (step, m) in s["multipliers"].as_array().unwrap().iter().enumerate() {
            let got = cosine_with_warmup(step as u64, w, t);
            let want = m.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-12,
                "warmup {w} total {t} step {step}: {got} vs {want}"
            );
        }
    }
}

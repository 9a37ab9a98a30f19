//! The adapters that brise saves into `tests/fixtures/lora/brise-saved/` (by
//! `cargo run --release -p brise-model --example save_lora`), which
//! scripts/ref/gen_lora.py then loads with PEFT. The test `lora.rs` rebuilds them here
//! and checks the saver still writes the same bytes.

use brise_model::config::ModelConfig;
use brise_model::lora::{LoraAdapter, LoraConfig, PeftMatrix, Proj};

/// A subset of the projections (Q and K exercise the GGUF row permutation), rsLoRA.
pub const TARGETS: [Proj; 4] = [Proj::Q, Proj::K, Proj::O, Proj::Up];

/// splitmix64 → uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Rank 2, alpha 3, rsLoRA; A ~ U(±√(3/in)), B ~ U(±b_amp).
pub fn adapter(cfg: &ModelConfig, base: &str, b_amp: f32, seed: u64) -> LoraAdapter {
    let r = 2;
    let mut rng = Rng(seed);
    let mut mats = Vec::new();
    for layer in 0..cfg.n_layer {
        for p in TARGETS {
            let (k, n) = p.dims(cfg);
            let a_amp = (3.0 / k as f32).sqrt();
            let a = (0..r * k).map(|_| a_amp * rng.next()).collect();
            let b = (0..n * r).map(|_| b_amp * rng.next()).collect();
            mats.push(PeftMatrix {
                layer,
                proj: p,
                a,
                b,
            });
        }
    }
    let config = LoraConfig {
        r,
        lora_alpha: 3.0,
        use_rslora: true,
        lora_dropout: 0.0,
        base_model_name_or_path: Some(base.to_string()),
    };
    LoraAdapter::from_peft(config, mats, cfg).expect("a well-formed adapter")
}

/// (fixture directory under lora/brise-saved, model, B amplitude, seed).
pub const SAVED: [(&str, &str, f32, u64); 2] = [
    ("tiny-mistral", "tiny-mistral/hf", 0.035, 7),
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 0.5, 8),
];

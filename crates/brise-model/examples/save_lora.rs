//! Writes the adapters of `tests/fixtures/lora/brise-saved/` with brise's PEFT saver,
//! for scripts/ref/gen_lora.py to load with `PeftModel.from_pretrained`.
//!
//! cargo run --release -p brise-model --example save_lora [-- OUT_DIR]

#[path = "../tests/common/brise_saved.rs"]
mod brise_saved;

use brise_kernels::quant::Kernels;
use brise_model::Model;
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/lora/brise-saved"));
    let home = std::env::var_os("BRISE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".brise"));
    for (dir, model, b_amp, seed) in brise_saved::SAVED {
        let path = if model.ends_with(".gguf") {
            home.join("models").join(model)
        } else {
            root.join("tests/fixtures").join(model)
        };
        let m = Model::load(&path, Kernels::best()).expect("load the model");
        let ad = brise_saved::adapter(&m.cfg, model, b_amp, seed);
        let d = out.join(dir);
        ad.save(&d).expect("save");
        println!("wrote {}", d.display());
    }
}

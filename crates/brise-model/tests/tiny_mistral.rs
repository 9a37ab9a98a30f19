//! A tiny random Mistral with a 16-token sliding window, in GGUF and safetensors form
//! (fixtures from scripts/ref/gen_tiny_mistral.py): both loaders give the same logits,
//! and both agree with llama.cpp (sliding window emulated there by removing old cells).

mod common;
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use common::*;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Feeds the prompt one token at a time (as the reference does), then `n` greedy steps.
/// Returns (generated, first-step logits, last-step logits).
fn run(model: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let pool = ThreadPool::new(2);
    let fwd = model.forward();
    let mut st = ForwardState::default();
    let mut cache = KvCache::new(&model.cfg, 512);
    for t in prompt {
        fwd.run(
            &pool,
            &mut st,
            &mut [SeqBatch {
                cache: &mut cache,
                tokens: &[*t],
                logits: LogitsWanted::Last,
                lora: None,
            }],
        );
    }
    let first = st.logits.clone();
    let mut out = Vec::new();
    let mut last = Vec::new();
    for _ in 0..n {
        last = st.logits.clone();
        let t = argmax(&st.logits);
        out.push(t);
        fwd.run(
            &pool,
            &mut st,
            &mut [SeqBatch {
                cache: &mut cache,
                tokens: &[t],
                logits: LogitsWanted::Last,
                lora: None,
            }],
        );
    }
    (out, first, last)
}

fn load(rel: &str) -> Model {
    Model::load(&fixture(rel), Kernels::best()).unwrap()
}

#[test]
fn both_loaders_read_the_same_model() {
    let g = load("tiny-mistral/tiny-mistral-f16.gguf");
    let h = load("tiny-mistral/hf");
    assert_eq!(g.cfg.sliding_window, Some(16));
    assert_eq!(h.cfg.sliding_window, Some(16));
    assert_eq!(
        (g.cfg.n_layer, g.cfg.n_head, g.cfg.n_head_kv, g.cfg.head_dim),
        (2, 4, 2, 8)
    );
    assert_eq!(
        (h.cfg.n_layer, h.cfg.n_head, h.cfg.n_head_kv, h.cfg.head_dim),
        (2, 4, 2, 8)
    );
    let fx = read_json("tiny-mistral/reference.json");
    for r in fx["results"].as_array().unwrap() {
        let prompt = ids(&r["prompt_ids"]);
        let a = run(&g, &prompt, 20);
        let b = run(&h, &prompt, 20);
        assert_eq!(
            a.0, b.0,
            "greedy tokens differ between GGUF and safetensors"
        );
        // zip stops at the shorter list: equal lengths first, or an empty one passes.
        assert_eq!(
            a.2.len(),
            b.2.len(),
            "logits lengths differ between loaders"
        );
        assert!(
            a.2.iter()
                .zip(&b.2)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "logits differ between loaders"
        );
        // Both tokenizers (GGUF vocabulary, tokenizer.model) read the prompt alike.
        let text = r["prompt"].as_str().unwrap();
        assert_eq!(g.tokenizer.encode(text, true, false).unwrap(), prompt);
        assert_eq!(h.tokenizer.encode(text, true, false).unwrap(), prompt);
    }
}

fn check_against_llama_cpp(rel: &str) {
    let m = load(rel);
    let fx = read_json("tiny-mistral/reference.json");
    let results = fx["results"].as_array().unwrap();
    assert!(!results.is_empty(), "{rel}: the fixture has no prompts");
    for (i, r) in results.iter().enumerate() {
        let prompt = ids(&r["prompt_ids"]);
        let want = ids(&r["generated"]);
        let (got, first, last) = run(&m, &prompt, want.len());
        assert_eq!(
            got, want,
            "{rel} prompt {i}: greedy tokens differ from llama.cpp"
        );
        let rf = read_f32(&format!(
            "tiny-mistral/{}",
            r["logits_first_file"].as_str().unwrap()
        ));
        let rl = read_f32(&format!(
            "tiny-mistral/{}",
            r["logits_last_file"].as_str().unwrap()
        ));
        // zip stops at the shorter list: equal lengths first, or an empty one passes.
        assert_eq!(
            (first.len(), last.len()),
            (rf.len(), rl.len()),
            "{rel} prompt {i}: logits lengths differ from llama.cpp's"
        );
        assert!(!rf.is_empty(), "{rel} prompt {i}: empty reference logits");
        assert!(
            first
                .iter()
                .zip(&rf)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rel} prompt {i}: first logits"
        );
        assert!(
            last.iter()
                .zip(&rl)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rel} prompt {i}: last logits"
        );
    }
}

#[test]
fn gguf_matches_llama_cpp_with_sliding_window() {
    check_against_llama_cpp("tiny-mistral/tiny-mistral-f16.gguf");
}

#[test]
fn safetensors_matches_llama_cpp_with_sliding_window() {
    check_against_llama_cpp("tiny-mistral/hf");
}

#[test]
fn the_window_matters() {
    // Without the sliding window brise must reproduce llama.cpp's plain causal run, which
    // differs from the windowed one: the window is really applied.
    let mut m = load("tiny-mistral/tiny-mistral-f16.gguf");
    m.cfg.sliding_window = None;
    let fx = read_json("tiny-mistral/reference.json");
    let mut differing = 0;
    for r in fx["results"].as_array().unwrap() {
        let prompt = ids(&r["prompt_ids"]);
        let want = ids(&r["generated_without_swa"]);
        let (got, _, _) = run(&m, &prompt, want.len());
        assert_eq!(got, want, "plain causal run differs from llama.cpp's");
        differing += usize::from(want != ids(&r["generated"]));
    }
    assert!(differing > 0);
}

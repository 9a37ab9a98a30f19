//! Greedy generation and first-step logits against llama.cpp (fixtures from
//! scripts/ref/gen_greedy.py): every prompt's 64 greedy tokens must equal llama.cpp's,
//! and the first-step logits must be bit-identical.

mod common;
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use common::*;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A fixture's list of token ids.
fn fixture_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(key: &str, file: &str) {
    let fx = read_json(&format!("greedy/{key}.json"));
    let model = Model::load(&model(file), Kernels::best()).unwrap();
    let pool = ThreadPool::new(2);
    let fwd = model.forward();
    let mut st = ForwardState::default();
    let mut report = Vec::new();
    let mut exact = 0;
    let results = fx["results"].as_array().unwrap();
    assert!(!results.is_empty(), "{key}: the fixture has no prompts");
    for (pi, r) in results.iter().enumerate() {
        let prompt = r["prompt"].as_str().unwrap();
        let want_prompt = fixture_ids(&r["prompt_ids"]);
        let ids = model.tokenizer.encode(prompt, true, false).unwrap();
        assert_eq!(ids, want_prompt, "{key} prompt {pi} tokenization");
        let want = fixture_ids(&r["generated"]);
        let margins: Vec<f64> = r["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut cache = KvCache::new(&model.cfg, 1024);
        fwd.run(
            &pool,
            &mut st,
            &mut [SeqBatch {
                cache: &mut cache,
                tokens: &ids,
                logits: LogitsWanted::Last,
                lora: None,
            }],
        );
        if let Some(f) = fx["logits_files"].get(pi.to_string()) {
            let ref_logits = read_f32(&format!("greedy/{}", f.as_str().unwrap()));
            // zip stops at the shorter list: equal lengths first, or an empty one passes.
            assert_eq!(
                st.logits.len(),
                ref_logits.len(),
                "{key} prompt {pi}: logits lengths differ from llama.cpp's"
            );
            assert!(
                !ref_logits.is_empty(),
                "{key} prompt {pi}: empty reference logits"
            );
            let max_diff = st
                .logits
                .iter()
                .zip(&ref_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = ref_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
            report.push(format!(
                "prompt {pi}: max |logit diff| {max_diff:.5} (max |logit| {scale:.2})"
            ));
            // The stated tolerance is zero: brise reproduces llama.cpp's arithmetic
            // (kernel choice, lanes, FMA order, reductions), so the logits are bit-identical.
            assert!(
                st.logits
                    .iter()
                    .zip(&ref_logits)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{key} prompt {pi}: logits differ from llama.cpp's by up to {max_diff}"
            );
        }
        // An empty continuation would make the comparison below vacuous.
        assert!(!want.is_empty(), "{key} prompt {pi}: no reference tokens");
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let t = argmax(&st.logits);
            got.push(t);
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
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => exact += 1,
            Some(d) => report.push(format!(
                "prompt {pi}: diverges at step {d} (brise {} vs llama.cpp {}, llama.cpp top-2 margin {:.4})",
                got[d], want[d], margins[d]
            )),
        }
    }
    eprintln!(
        "{key}: {exact}/{} prompts identical for {} tokens\n{}",
        results.len(),
        64,
        report.join("\n")
    );
    assert_eq!(
        exact,
        results.len(),
        "{key}: greedy outputs differ:\n{}",
        report.join("\n")
    );
    check_batched(key, &model, &pool, results);
}

/// The first 8 prompts decoded together, one row per sequence per step (the server's
/// batched decoding, where RoPE, the biases and the cache writes run inside the attention's
/// section): each sequence's greedy tokens are still llama.cpp's.
fn check_batched(key: &str, model: &Model, pool: &ThreadPool, results: &[serde_json::Value]) {
    let fwd = model.forward();
    let mut st = ForwardState::default();
    let rs = &results[..8.min(results.len())];
    let mut caches: Vec<KvCache> = rs.iter().map(|_| KvCache::new(&model.cfg, 1024)).collect();
    let mut next = Vec::new();
    for (r, cache) in rs.iter().zip(&mut caches) {
        let prompt = fixture_ids(&r["prompt_ids"]);
        fwd.run(
            pool,
            &mut st,
            &mut [SeqBatch {
                cache,
                tokens: &prompt,
                logits: LogitsWanted::Last,
                lora: None,
            }],
        );
        next.push(argmax(&st.logits));
    }
    let want: Vec<Vec<u32>> = rs.iter().map(|r| fixture_ids(&r["generated"])).collect();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); rs.len()];
    for _ in 0..want[0].len() {
        for (g, t) in got.iter_mut().zip(&next) {
            g.push(*t);
        }
        let toks: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let mut batch: Vec<SeqBatch> = caches
            .iter_mut()
            .zip(&toks)
            .map(|(cache, t)| SeqBatch {
                cache,
                tokens: t,
                logits: LogitsWanted::Last,
                lora: None,
            })
            .collect();
        fwd.run(pool, &mut st, &mut batch);
        let nv = model.cfg.n_vocab;
        next = (0..rs.len())
            .map(|i| argmax(&st.logits[i * nv..(i + 1) * nv]))
            .collect();
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{key} prompt {i}, decoded in a batch of {}", rs.len());
    }
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    check("smollm2", SMOLLM2);
}

#[test]
fn qwen_greedy_matches_llama_cpp() {
    check("qwen2.5-coder", QWEN);
}

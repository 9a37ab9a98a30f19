// Debug aid: compares first-step logits with a llama.cpp fixture, batched and token by token.
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = Model::load(a[1].as_ref(), Kernels::best()).unwrap();
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(&a[2]).unwrap()).unwrap();
    let pool = ThreadPool::new(2);
    let fwd = model.forward();
    let mut st = ForwardState::default();
    for (pi, r) in fx["results"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
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
        let t = &r["top5"];
        let mut md = 0f32;
        for (id, v) in t["ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(t["logits"].as_array().unwrap())
        {
            md = md
                .max((st.logits[id.as_u64().unwrap() as usize] - v.as_f64().unwrap() as f32).abs());
        }
        println!("prompt {pi} ({} tokens): top5 max diff {md:.5}", ids.len());
    }
    let pi: usize = a[3].parse().unwrap();
    let logits_file = std::path::Path::new(&a[2])
        .with_file_name(fx["logits_files"][pi.to_string()].as_str().unwrap());
    let b = std::fs::read(logits_file).unwrap();
    let rl: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ids: Vec<u32> = fx["results"][pi]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    println!("prompt {} tokens", ids.len());
    let pool = ThreadPool::new(2);
    let fwd = model.forward();
    let mut st = ForwardState::default();
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
    let batched = st.logits.clone();
    let mut cache = KvCache::new(&model.cfg, 1024);
    for t in &ids {
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
    let single = st.logits.clone();
    let d = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    println!(
        "batched vs llama.cpp {:.5}, single vs llama.cpp {:.5}, batched vs single {:.5}",
        d(&batched, &rl),
        d(&single, &rl),
        d(&batched, &single)
    );
}

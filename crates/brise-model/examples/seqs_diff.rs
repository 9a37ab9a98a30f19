// Debug aid: brise logits for token sequences vs a raw f32 dump from llama.cpp.
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = Model::load(a[1].as_ref(), Kernels::best()).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_slice(&std::fs::read(&a[2]).unwrap()).unwrap();
    let b = std::fs::read(&a[3]).unwrap();
    let rl: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let nv = model.cfg.n_vocab;
    let pool = ThreadPool::new(2);
    let fwd = model.forward();
    let mut st = ForwardState::default();
    for (i, s) in seqs.iter().enumerate() {
        let mut cache = KvCache::new(&model.cfg, 1024);
        fwd.run(
            &pool,
            &mut st,
            &mut [SeqBatch {
                cache: &mut cache,
                tokens: s,
                logits: LogitsWanted::Last,
                lora: None,
            }],
        );
        let r = &rl[i * nv..(i + 1) * nv];
        let d = st
            .logits
            .iter()
            .zip(r)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{:?}: max diff {d:.6}", s);
    }
}

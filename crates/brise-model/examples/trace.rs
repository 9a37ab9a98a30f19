// Debug aid: writes brise's intermediate tensors for one token sequence as raw f32 files.
// trace MODEL '[ids]' OUT_DIR [LORA_DIR]
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = Model::load(a[1].as_ref(), Kernels::best()).unwrap();
    let seq: Vec<u32> = serde_json::from_str(&a[2]).unwrap();
    let dir = std::path::PathBuf::from(&a[3]);
    std::fs::create_dir_all(&dir).unwrap();
    let pool = ThreadPool::new(2);
    let mut st = ForwardState::default();
    let d2 = dir.clone();
    st.trace = Some(Box::new(move |name, layer, v| {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(d2.join(format!("{name}-{layer}.f32")), b).unwrap();
    }));
    let lora = a
        .get(4)
        .map(|d| brise_model::LoraAdapter::load(d.as_ref(), &model.cfg).unwrap());
    let mut cache = KvCache::new(&model.cfg, 1024);
    model.forward().run(
        &pool,
        &mut st,
        &mut [SeqBatch {
            cache: &mut cache,
            tokens: &seq,
            logits: LogitsWanted::Last,
            lora: lora.as_ref(),
        }],
    );
}

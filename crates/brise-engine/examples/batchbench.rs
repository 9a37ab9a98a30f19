//! Aggregate generation throughput of the batching scheduler, without HTTP:
//! `cargo run --release -p brise-engine --example batchbench -- MODEL.gguf 1,2,4,8 [TOKENS]`
use brise_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use brise_engine::{GenerateOptions, SamplingParams};
use brise_kernels::quant::Kernels;
use brise_model::Model;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Arc::new(Model::load(args[1].as_ref(), Kernels::best()).expect("load"));
    let concs: Vec<usize> = args[2]
        .split(',')
        .map(|s| s.parse().expect("int"))
        .collect();
    let n_gen: usize = args.get(3).map(|s| s.parse().expect("int")).unwrap_or(128);
    let max_c = *concs.iter().max().expect("a concurrency");
    let sched = Scheduler::start(
        model.clone(),
        SchedulerConfig {
            n_threads: 2,
            n_slots: max_c,
            n_ctx_slot: 1024,
            n_batch: 512,
            queue_capacity: 64,
            tenant_slots: 0,
        },
    );
    for &c in &concs {
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = Instant::now();
        for i in 0..c {
            let prompt = model
                .tokenizer
                .encode(&format!("Story {i}: Once upon a time"), true, false)
                .expect("encode");
            let tx = tx.clone();
            sched
                .submit(Request {
                    prompt,
                    opts: GenerateOptions {
                        sampling: SamplingParams::greedy(),
                        max_tokens: Some(n_gen),
                        ..Default::default()
                    },
                    cancel: Arc::new(AtomicBool::new(false)),
                    deadline: None,
                    sink: Box::new(move |ev| {
                        if let Event::Done(o) = ev {
                            let _ = tx.send(o.n_gen);
                        }
                        true
                    }),
                })
                .expect("submit");
        }
        let toks: usize = (0..c).map(|_| rx.recv().expect("done")).sum();
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "conc {c}: {toks} tokens in {dt:.2} s = {:.1} t/s",
            toks as f64 / dt
        );
    }
}

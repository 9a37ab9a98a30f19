//! LoRA adapters per request: sequences with different adapters (or none) batched
//! together give the tokens each gives alone, and no cache shares KV between adapters.

use brise_engine::scheduler::{Event, Outcome, Request, Scheduler, SchedulerConfig};
use brise_engine::{GenerateOptions, Generator, SamplingParams, Session};
use brise_kernels::quant::Kernels;
use brise_model::{LoraAdapter, Model};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, channel};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load() -> Arc<Model> {
    let home = std::env::var_os("BRISE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".brise"));
    let p = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `brise pull smollm2`",
        p.display()
    );
    Arc::new(Model::load(&p, Kernels::best()).unwrap())
}

fn adapter(model: &Model, rel: &str) -> Arc<LoraAdapter> {
    let dir = repo().join("tests/fixtures/lora").join(rel);
    Arc::new(LoraAdapter::load(&dir, &model.cfg).unwrap())
}

fn greedy(n: usize, lora: Option<&Arc<LoraAdapter>>) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(n),
        lora: lora.cloned(),
        ..Default::default()
    }
}

fn submit(s: &Scheduler, prompt: Vec<u32>, opts: GenerateOptions) -> Receiver<Event> {
    let (tx, rx) = channel();
    s.submit(Request {
        prompt,
        opts,
        cancel: Arc::new(AtomicBool::new(false)),
        deadline: None,
        sink: Box::new(move |ev| tx.send(ev).is_ok()),
    })
    .unwrap();
    rx
}

fn wait(rx: Receiver<Event>) -> (Vec<u32>, Outcome) {
    let mut tokens = Vec::new();
    loop {
        match rx.recv().expect("the engine answers") {
            Event::Token { token, .. } => tokens.push(token),
            Event::Done(o) => return (tokens, o),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn cfg(slots: usize) -> SchedulerConfig {
    SchedulerConfig {
        n_threads: 2,
        n_slots: slots,
        n_ctx_slot: 2048,
        n_batch: 512,
        queue_capacity: 16,
        tenant_slots: 0,
    }
}

#[test]
fn batched_adapters_match_each_alone() {
    let model = load();
    let a = adapter(&model, "smollm2-r8");
    let b = adapter(&model, "brise-saved/smollm2");
    let tk = &model.tokenizer;
    let prompts: Vec<Vec<u32>> = [
        "Once upon a time, in a small village,",
        "The capital of France is",
        "def fibonacci(n):",
    ]
    .iter()
    .map(|p| tk.encode(p, true, false).unwrap())
    .collect();
    let loras = [Some(&a), None, Some(&b)];
    // Every prompt under every adapter, alone through the one-sequence Generator.
    let mut gen_ = Generator::new(&model, 2);
    let mut alone = Vec::new();
    for p in &prompts {
        let mut row = Vec::new();
        for l in loras {
            let mut s = Session::new(&model, 2048);
            let r = gen_.generate(&mut s, p, &greedy(24, l), &mut |_| true);
            row.push(r.unwrap().tokens);
        }
        // The adapters change the output, so the comparisons below can fail.
        assert!(row[0] != row[1] && row[2] != row[1], "{row:?}");
        alone.push(row);
    }
    // All nine at once: mixed adapters in every forward pass.
    let sched = Scheduler::start(model.clone(), cfg(9));
    let rxs: Vec<_> = prompts
        .iter()
        .flat_map(|p| loras.map(|l| submit(&sched, p.clone(), greedy(24, l))))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (tokens, _) = wait(rx);
        assert_eq!(
            tokens,
            alone[i / 3][i % 3],
            "prompt {} adapter {}",
            i / 3,
            i % 3
        );
    }
}

#[test]
fn prefix_cache_is_keyed_by_adapter() {
    let model = load();
    let a = adapter(&model, "smollm2-r8");
    let tk = &model.tokenizer;
    // Over 512 tokens (reuse is by whole chunks), and not repetitive (the model would only copy): the
    // greedy fixture prompts and part of the tokenizer corpus, then a question (a
    // story start would make it copy the corpus's story, adapter or not).
    let texts = |file: &str, key: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures").join(file)).unwrap(),
        )
        .unwrap();
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    let corpus = texts("tokenize/corpus.json", "texts");
    let text = format!(
        "{}\n\n{}\n\nQ: What is the best way to learn a new language?\nA:",
        texts("greedy/prompts.json", "prompts").join("\n"),
        corpus[..40].join("\n")
    );
    let prompt = tk.encode(&text, true, false).unwrap();
    assert!(prompt.len() > 600, "{}", prompt.len());
    let cold = |l: Option<&Arc<LoraAdapter>>| {
        let mut g = Generator::new(&model, 2);
        let mut s = Session::new(&model, 2048);
        g.generate(&mut s, &prompt, &greedy(16, l), &mut |_| true)
            .unwrap()
            .tokens
    };
    let (cold_none, cold_a) = (cold(None), cold(Some(&a)));
    assert_ne!(cold_none, cold_a);

    // One slot: the same prompt under no adapter, then adapter A, then A again.
    let sched = Scheduler::start(model.clone(), cfg(1));
    let (t, o) = wait(submit(&sched, prompt.clone(), greedy(16, None)));
    assert_eq!((t, o.n_cached), (cold_none.clone(), 0));
    let (t, o) = wait(submit(&sched, prompt.clone(), greedy(16, Some(&a))));
    assert_eq!(
        (t, o.n_cached),
        (cold_a.clone(), 0),
        "KV of the base reused under A"
    );
    let (t, o) = wait(submit(&sched, prompt.clone(), greedy(16, Some(&a))));
    assert_eq!(
        (t, o.n_cached),
        (cold_a.clone(), (prompt.len() - 1) / 512 * 512),
        "same adapter reuses its prefix"
    );
    // A new version of the same files is another adapter: no reuse.
    let a2 = adapter(&model, "smollm2-r8");
    let (t, o) = wait(submit(&sched, prompt.clone(), greedy(16, Some(&a2))));
    assert_eq!((t, o.n_cached), (cold_a.clone(), 0));

    // The Generator's session likewise.
    let mut g = Generator::new(&model, 2);
    let mut s = Session::new(&model, 2048);
    let r = g
        .generate(&mut s, &prompt, &greedy(16, None), &mut |_| true)
        .unwrap();
    assert_eq!(r.tokens, cold_none);
    let r = g
        .generate(&mut s, &prompt, &greedy(16, Some(&a)), &mut |_| true)
        .unwrap();
    assert_eq!((r.tokens, r.n_cached), (cold_a.clone(), 0));
    let r = g
        .generate(&mut s, &prompt, &greedy(16, Some(&a)), &mut |_| true)
        .unwrap();
    assert_eq!((r.tokens, r.n_cached), (cold_a, prompt.len() - 1));
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let model = load();
    let tiny = Model::load(
        &repo().join("tests/fixtures/tiny-mistral/hf"),
        Kernels::best(),
    )
    .unwrap();
    let wrong = adapter(&tiny, "tiny-mistral-r4");
    let sched = Scheduler::start(model.clone(), cfg(1));
    let prompt = model.tokenizer.encode("Hello", true, false).unwrap();
    match submit(&sched, prompt.clone(), greedy(4, Some(&wrong)))
        .recv()
        .unwrap()
    {
        Event::Error(e) => assert!(e.to_string().contains("does not fit"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let mut g = Generator::new(&model, 2);
    let mut s = Session::new(&model, 64);
    let e = g
        .generate(&mut s, &prompt, &greedy(4, Some(&wrong)), &mut |_| true)
        .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

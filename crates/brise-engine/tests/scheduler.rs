//! The batching scheduler against llama.cpp and against brise's own one-sequence path:
//! every sequence of a batch gives the tokens it gives alone (batch invariance), long
//! prompts are processed in chunks between other sequences' steps, and the prefix cache
//! changes nothing but the work done.

use brise_engine::scheduler::{Event, Outcome, Request, Scheduler, SchedulerConfig, SubmitError};
use brise_engine::{FinishReason, GenerateOptions, Generator, SamplingParams, Session};
use brise_kernels::quant::Kernels;
use brise_model::Model;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, channel};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(file: &str) -> PathBuf {
    let home = std::env::var_os("BRISE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".brise"));
    let p = home.join("models").join(file);
    assert!(
        p.exists(),
        "{} is missing: run `brise pull smollm2`",
        p.display()
    );
    p
}

fn load() -> Arc<Model> {
    Arc::new(
        Model::load(
            &model_path("SmolLM2-135M-Instruct.Q4_1.gguf"),
            Kernels::best(),
        )
        .unwrap(),
    )
}

fn cfg(slots: usize) -> SchedulerConfig {
    SchedulerConfig {
        n_threads: 2,
        n_slots: slots,
        n_ctx_slot: 2048,
        n_batch: 512,
        queue_capacity: 64,
        tenant_slots: 0,
    }
}

struct Result {
    tokens: Vec<u32>,
    text: String,
    outcome: Outcome,
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

fn wait(rx: Receiver<Event>) -> Result {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match rx.recv().expect("the engine answers") {
            Event::Token { token, text: t, .. } => {
                tokens.push(token);
                text.push_str(&t);
            }
            Event::Done(o) => {
                text.push_str(&o.tail);
                return Result {
                    tokens,
                    text,
                    outcome: o,
                };
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(n),
        ..Default::default()
    }
}

/// All of llama.cpp's greedy fixture prompts at once, 4 slots: each sequence's tokens
/// equal llama.cpp's (up to an end-of-generation token, where the engine stops).
#[test]
fn batched_greedy_matches_llama_cpp() {
    let model = load();
    let fx: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/greedy/smollm2.json")).unwrap(),
    )
    .unwrap();
    let sched = Scheduler::start(model.clone(), cfg(4));
    let results = fx["results"].as_array().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let rxs: Vec<_> = results
        .iter()
        .map(|r| submit(&sched, ids(&r["prompt_ids"]), greedy(64)))
        .collect();
    let mut max_batch = 0;
    for (i, (rx, r)) in rxs.into_iter().zip(results).enumerate() {
        let got = wait(rx);
        max_batch = max_batch.max(
            sched
                .stats()
                .batch_seqs
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let want = ids(&r["generated"]);
        assert_eq!(got.tokens[..], want[..got.tokens.len()], "prompt {i}");
        if got.tokens.len() < want.len() {
            assert!(
                model.tokenizer.is_eog(want[got.tokens.len()]),
                "prompt {i} stopped early without an end-of-generation token"
            );
            assert_eq!(got.outcome.finish, FinishReason::Stop);
        } else {
            assert_eq!(got.outcome.finish, FinishReason::Length);
        }
    }
}

/// A long prompt (several 512-token chunks) runs while short sequences generate; all give
/// what `Generator` (the `brise run` path) gives alone. Then a prompt sharing the long
/// prefix reuses whole chunks of the cache, and still gives the cold result.
#[test]
fn long_prompts_interleave_and_prefix_cache_is_exact() {
    let model = load();
    let tk = &model.tokenizer;
    let story = "The lighthouse keeper wrote in his log every evening, noting the wind, the \
                 ships that passed, and the color of the sea. ";
    let long_a = tk
        .encode(
            &format!("{}Question: what did he note?", story.repeat(45)),
            true,
            false,
        )
        .unwrap();
    let long_b = tk
        .encode(
            &format!("{}Question: who was he?", story.repeat(45)),
            true,
            false,
        )
        .unwrap();
    assert!(long_a.len() > 1100, "{} tokens", long_a.len());
    let shorts: Vec<Vec<u32>> = ["Once upon a time", "def fib(n):", "Les fleurs du jardin"]
        .iter()
        .map(|p| tk.encode(p, true, false).unwrap())
        .collect();

    let alone = |prompt: &[u32], n: usize| -> Vec<u32> {
        let mut g = Generator::new(&model, 2);
        let mut s = Session::new(&model, 2048);
        g.generate(&mut s, prompt, &greedy(n), &mut |_| true)
            .unwrap()
            .tokens
    };

    let sched = Scheduler::start(model.clone(), cfg(4));
    // Shorts first, so they are generating while the long prompt is processed.
    let short_rx: Vec<_> = shorts
        .iter()
        .map(|p| submit(&sched, p.clone(), greedy(48)))
        .collect();
    let long_rx = submit(&sched, long_a.clone(), greedy(24));
    let mut short_out: Vec<Result> = short_rx.into_iter().map(wait).collect();
    let long_out = wait(long_rx);
    assert_eq!(
        long_out.tokens,
        alone(&long_a, 24),
        "long prompt batched vs alone"
    );
    for (p, r) in shorts.iter().zip(&short_out) {
        assert_eq!(r.tokens, alone(p, 48), "short prompt batched vs alone");
    }
    assert_eq!(long_out.outcome.n_cached, 0);

    // Same prefix, other ending: whole 512-token chunks of the shared prefix are reused.
    let common = long_a
        .iter()
        .zip(&long_b)
        .take_while(|(a, b)| a == b)
        .count();
    let b = wait(submit(&sched, long_b.clone(), greedy(24)));
    assert_eq!(b.outcome.n_cached, common / 512 * 512);
    assert!(b.outcome.n_cached >= 1024);
    assert_eq!(b.tokens, alone(&long_b, 24), "prefix-cached vs cold");
    short_out.clear();
}

#[test]
fn stop_strings_seeds_and_errors() {
    let model = load();
    let tk = &model.tokenizer;
    let sched = Scheduler::start(model.clone(), cfg(2));
    let prompt = tk.encode("Once upon a time", true, false).unwrap();

    // Seeded sampling is reproducible, and differs between seeds.
    let seeded = |seed| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        max_tokens: Some(32),
        ..Default::default()
    };
    let a = wait(submit(&sched, prompt.clone(), seeded(7)));
    let b = wait(submit(&sched, prompt.clone(), seeded(7)));
    let c = wait(submit(&sched, prompt.clone(), seeded(8)));
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);

    // A stop string cuts the text before it, whatever tokens it spans.
    let full = wait(submit(&sched, prompt.clone(), greedy(40)));
    let words: Vec<&str> = full.text.split(' ').collect();
    assert!(words.len() > 6, "{:?}", full.text);
    let stop = format!("{} {}", words[4], words[5]);
    let cut = full.text.find(&stop).unwrap();
    let stopped = wait(submit(
        &sched,
        prompt.clone(),
        GenerateOptions {
            stop: vec![stop.clone()],
            ..greedy(40)
        },
    ));
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(stopped.outcome.finish, FinishReason::Stop);

    // Over the slot's context: an error event, nothing generated.
    let rx = submit(&sched, prompt.clone(), greedy(5000));
    match rx.recv().unwrap() {
        Event::Error(e) => assert!(e.to_string().contains("2048"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // Cancellation frees the slot: a cancelled request ends, and others still run.
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let c2 = cancel.clone();
    let mut n = 0;
    sched
        .submit(Request {
            prompt: prompt.clone(),
            opts: greedy(1000),
            cancel: cancel.clone(),
            deadline: None,
            sink: Box::new(move |ev| {
                if matches!(ev, Event::Token { .. }) {
                    n += 1;
                    if n == 3 {
                        c2.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tx.send(ev).is_ok()
            }),
        })
        .unwrap();
    let r = wait(rx);
    assert_eq!(r.outcome.finish, FinishReason::Cancelled);
    assert!(r.tokens.len() < 10);
    assert_eq!(
        wait(submit(&sched, prompt.clone(), greedy(8))).tokens.len(),
        8
    );
}

#[test]
fn queue_is_bounded() {
    let model = load();
    let sched = Scheduler::start(
        model.clone(),
        SchedulerConfig {
            queue_capacity: 2,
            ..cfg(1)
        },
    );
    let prompt = model.tokenizer.encode("Hello", true, false).unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let (tx, rx) = channel();
        match sched.submit(Request {
            prompt: prompt.clone(),
            opts: greedy(64),
            cancel: Arc::new(AtomicBool::new(false)),
            deadline: None,
            sink: Box::new(move |ev| tx.send(ev).is_ok()),
        }) {
            Ok(()) => accepted.push(rx),
            Err(SubmitError::QueueFull(2)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 4, "{refused} refused");
    for rx in accepted {
        assert_eq!(wait(rx).outcome.finish, FinishReason::Length);
    }
}

/// Issue 21: a request constrained to an enum of 19,000 strings beside a plain one.
/// Masking checked every vocabulary token against every literal (minutes per step); now
/// both finish in seconds, and the constrained answer is one of the values. A request
/// whose deadline passed while queued never takes a slot, and one whose deadline passes
/// while it runs gives up its slot at the next step.
#[test]
fn big_enums_do_not_stall_the_engine_and_deadlines_hold() {
    use brise_engine::EngineError;
    use brise_engine::json::Schema;
    use std::time::{Duration, Instant};
    let model = load();
    let sched = Scheduler::start(model.clone(), cfg(2));
    let values: Vec<serde_json::Value> = (0..19_000)
        .map(|i| serde_json::json!(format!("opt{i}")))
        .collect();
    let schema = Arc::new(Schema::compile(&serde_json::json!({"enum": values})).unwrap());
    let prompt = model.tokenizer.encode("Pick one:", true, false).unwrap();
    let t = Instant::now();
    let constrained = submit(
        &sched,
        prompt.clone(),
        GenerateOptions {
            json: Some(schema.clone()),
            ..greedy(16)
        },
    );
    let plain = submit(&sched, prompt.clone(), greedy(4));
    let p = wait(plain);
    assert_eq!(p.tokens.len(), 4);
    let c = wait(constrained);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let v: serde_json::Value = serde_json::from_str(&c.text).expect("a complete enum value");
    assert!(values.contains(&v), "{v}");

    let run = |deadline: Instant, n: usize| {
        let (tx, rx) = channel();
        sched
            .submit(Request {
                prompt: prompt.clone(),
                opts: GenerateOptions {
                    min_tokens: n,
                    ..greedy(n)
                },
                cancel: Arc::new(AtomicBool::new(false)),
                deadline: Some(deadline),
                sink: Box::new(move |ev| tx.send(ev).is_ok()),
            })
            .unwrap();
        let mut n_tokens = 0;
        loop {
            match rx.recv_timeout(Duration::from_secs(20)).expect("an answer") {
                Event::Token { .. } => n_tokens += 1,
                Event::Done(o) => return (n_tokens, Ok(o.finish)),
                Event::Error(e) => return (n_tokens, Err(e)),
            }
        }
    };
    let (n, r) = run(Instant::now() - Duration::from_millis(1), 8);
    assert!(
        n == 0 && matches!(r, Err(EngineError::Timeout)),
        "{n} {r:?}"
    );
    let t = Instant::now();
    let (_, r) = run(Instant::now() + Duration::from_millis(300), 1500);
    assert!(matches!(r, Err(EngineError::Timeout)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Issue 21: one tenant's many requests made another's short one wait for all of them.
/// A freed slot now goes to the tenant holding the fewest slots, and `tenant_slots`
/// caps what one tenant holds.
#[test]
fn slots_are_shared_fairly_between_tenants() {
    let model = load();
    let prompt = model
        .tokenizer
        .encode("Once upon a time", true, false)
        .unwrap();
    for (cap, most_a_before_b) in [(0, 2), (1, 1)] {
        let sched = Scheduler::start(
            model.clone(),
            SchedulerConfig {
                tenant_slots: cap,
                ..cfg(2)
            },
        );
        let (tx, rx) = channel::<String>();
        let send = |who: &str, n: usize| {
            let tx = tx.clone();
            let label = who.to_string();
            sched
                .submit(Request {
                    prompt: prompt.clone(),
                    opts: GenerateOptions {
                        min_tokens: n,
                        tenant: who[..1].to_string(),
                        ..greedy(n)
                    },
                    cancel: Arc::new(AtomicBool::new(false)),
                    deadline: None,
                    sink: Box::new(move |ev| match ev {
                        Event::Done(_) | Event::Error(_) => tx.send(label.clone()).is_ok(),
                        _ => true,
                    }),
                })
                .unwrap();
        };
        for i in 0..6 {
            send(&format!("a{i}"), 24);
        }
        send("b", 4);
        let order: Vec<String> = (0..7).map(|_| rx.recv().unwrap()).collect();
        let b = order.iter().position(|l| l == "b").unwrap();
        assert!(
            b <= most_a_before_b,
            "tenant_slots {cap}: b finished after {b} of a's requests: {order:?}"
        );
        let q = sched.stats().queued_by_tenant.lock().unwrap().clone();
        assert!(q.is_empty(), "{q:?}");
        // Every request's wait is counted for its tenant; a's later requests waited
        // for slots, so a's longest wait is positive.
        let w = sched.stats().waits_by_tenant.lock().unwrap().clone();
        assert_eq!((w["a"].count, w["b"].count), (6, 1), "{w:?}");
        assert!(
            w["a"].seconds_max > 0.0 && w["a"].seconds_sum >= w["a"].seconds_max,
            "{w:?}"
        );
        assert!(w["b"].seconds_sum <= w["b"].seconds_max + 1e-12, "{w:?}");
    }
}

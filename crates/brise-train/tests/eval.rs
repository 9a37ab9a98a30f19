//! The gate's scoring on a real model (the tiny Mistral fixture, with its PEFT adapter):
//! it is the sum of per-token log-probabilities of a plain forward pass, the adapter
//! moves it, and a whole evaluation reports every version and check.

use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use brise_ledger::export::Format;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use brise_model::{LoraAdapter, Model};
use brise_train::data::{Dataset, Example, Item, LoadOptions, Seq};
use brise_train::eval::{
    GENERAL_TEXT, GateConfig, GateReport, Outcome, Scorer, Version, evaluate, text_windows,
};
use serde_json::json;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> Model {
    Model::load(
        &repo().join("tests/fixtures/tiny-mistral/tiny-mistral-f16.gguf"),
        Kernels::best(),
    )
    .unwrap()
}

fn adapter(m: &Model) -> LoraAdapter {
    LoraAdapter::load(&repo().join("tests/fixtures/lora/tiny-mistral-r4"), &m.cfg).unwrap()
}

fn dataset(m: &Model) -> Dataset {
    let rows = [
        json!({"messages": [{"role": "user", "content": "Tell me about the sea and the wind over it, and about the boats that sail there."}, {"role": "assistant", "content": "The sea is wide and the wind is strong; the boats lean and run before it, and come home at dusk."}]}),
        json!({"prompt": [{"role": "user", "content": "Pick one."}], "chosen": [{"role": "assistant", "content": "The first."}], "rejected": [{"role": "assistant", "content": "None of them, ever."}]}),
        json!({"prompt": [{"role": "user", "content": "Rate this."}], "completion": [{"role": "assistant", "content": "Good."}], "label": true}),
        json!({"prompt": [{"role": "user", "content": "Rate that."}], "completion": [{"role": "assistant", "content": "Bad bad bad."}], "label": false}),
    ];
    let fmts = [
        Format::TrlSft,
        Format::TrlDpo,
        Format::TrlKto,
        Format::TrlKto,
    ];
    let mut examples = Vec::new();
    for (r, f) in rows.iter().zip(fmts) {
        let d = Dataset::from_reader(
            format!("{r}\n").as_bytes(),
            "x",
            f,
            m,
            &LoadOptions::default(),
        )
        .unwrap();
        examples.extend(d.examples);
    }
    Dataset {
        examples,
        snapshot_sha256: "0".repeat(64),
        source: "test rows".into(),
        method: brise_train::data::Method::Sft,
        rows: 4,
        skipped: vec![],
        export: None,
        available: None,
    }
}

/// log softmax from a plain forward's logits, computed here independently.
fn plain_logprobs(m: &Model, lora: Option<&LoraAdapter>, seq: &Seq) -> Vec<f64> {
    let pool = ThreadPool::new(2);
    let mut st = ForwardState::default();
    let toks = seq.tokens();
    // A served slot's size (the engine's default is 2048 or more).
    let mut cache = KvCache::new(&m.cfg, 2048);
    m.forward().run(
        &pool,
        &mut st,
        &mut [SeqBatch {
            cache: &mut cache,
            tokens: &toks,
            logits: LogitsWanted::All,
            lora,
        }],
    );
    let nv = m.cfg.n_vocab;
    assert_eq!(st.logits.len(), toks.len() * nv);
    (seq.prompt.len()..toks.len())
        .map(|pos| {
            let row = &st.logits[(pos - 1) * nv..pos * nv];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&z| (z as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[toks[pos] as usize] as f64 - lse
        })
        .collect()
}

fn seqs(d: &Dataset) -> Vec<&Seq> {
    d.examples
        .iter()
        .flat_map(|e| match &e.item {
            Item::Sft(s) => vec![s],
            Item::Pref { chosen, rejected } => vec![chosen, rejected],
            Item::Kto { seq, .. } => vec![seq],
        })
        .collect()
}

#[test]
fn score_is_the_sum_of_a_plain_forwards_token_logprobs() {
    let m = model();
    let ad = adapter(&m);
    let d = dataset(&m);
    let mut s = Scorer::new(&m, 2);
    // One is long enough to cross the tiny model's sliding window (16).
    assert!(seqs(&d).iter().any(|s| s.len() > 24));
    for seq in seqs(&d) {
        for lora in [None, Some(&ad)] {
            let want = plain_logprobs(&m, lora, seq);
            let got = s.token_logprobs(lora, seq).unwrap();
            assert_eq!(got.len(), seq.completion.len());
            // ops::log_prob subtracts the max in f32, this file in f64: ~1e-9 apart. An
            // off-by-one position or a wrong token would be off by whole units.
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{g} vs {w}");
                assert!(*g < 0.0);
            }
            let sum: f64 = want.iter().sum();
            assert!((s.score(lora, seq).unwrap() - sum).abs() < 1e-6);
        }
        // The adapter moves every sequence's score.
        let (b, a) = (
            s.score(None, seq).unwrap(),
            s.score(Some(&ad), seq).unwrap(),
        );
        assert!((a - b).abs() > 1e-3, "base {b}, adapted {a}");
    }
    // A fresh cache each time: scoring again gives the same number.
    let one = seqs(&d)[0];
    assert_eq!(
        s.score(Some(&ad), one).unwrap(),
        s.score(Some(&ad), one).unwrap()
    );
    // An empty prompt has nothing to predict the first token from.
    let bad = Seq {
        prompt: vec![],
        completion: one.completion.clone(),
    };
    assert!(s.score(None, &bad).is_err());
    let oov = Seq {
        prompt: vec![1],
        completion: vec![m.cfg.n_vocab as u32],
    };
    assert!(s.score(None, &oov).is_err());
}

#[test]
fn general_text_windows_cover_the_text() {
    let m = model();
    let all = m.tokenizer.encode(GENERAL_TEXT, false, false).unwrap();
    assert!(all.len() > 500, "{} tokens", all.len());
    let w = text_windows(&m, GENERAL_TEXT, 64).unwrap();
    let bos = m.tokenizer.bos.unwrap();
    assert!(w.iter().all(|s| s.prompt == [bos] && s.len() <= 64));
    let joined: Vec<u32> = w.iter().flat_map(|s| s.completion.clone()).collect();
    assert_eq!(joined, all);
    assert!(text_windows(&m, GENERAL_TEXT, 1).is_err());
}

#[test]
fn evaluation_reports_every_version_and_check() {
    let m = model();
    let ad = adapter(&m);
    let d = dataset(&m);
    let held: Vec<&Example> = d.examples.iter().collect();
    let mut s = Scorer::new(&m, 2);
    let cfg = GateConfig::default();
    let base = Version {
        name: "base",
        adapter: None,
    };
    let cand = Version {
        name: "tiny-mistral-r4",
        adapter: Some(&ad),
    };
    let r = evaluate(&mut s, cand, base, &held, &cfg).unwrap();
    let (c, b) = (&r.candidate.metrics, &r.current.metrics);
    assert_eq!(
        (r.held_out.sft, r.held_out.pairs, r.held_out.kto),
        (1, 1, 2)
    );
    // SFT answer, chosen answer, desirable KTO answer.
    assert_eq!((c.nll_answers, c.pref_pairs, c.kto_examples), (3, 1, 2));
    assert!(c.nll.unwrap() > 0.0 && b.nll.unwrap() > 0.0 && c.nll != b.nll);
    assert_eq!(b.kto_accuracy, Some(0.0), "the base moves nothing");
    assert!(c.ppl.unwrap() > 1.0 && c.ppl != b.ppl);
    assert!(r.base.is_none(), "the current version is the base");
    let metrics: Vec<&str> = r.checks.iter().map(|c| c.metric.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "nll",
            "pref_accuracy",
            "kto_accuracy",
            "ppl",
            "chrf",
            "pair_wins",
            "repeats"
        ]
    );
    // Both versions answered the held-out prompts (greedy), scored against the answers
    // users gave.
    let beh = r.behaviour.as_ref().unwrap();
    assert_eq!(beh.samples.len(), beh.references + beh.rejected);
    assert_eq!((beh.pairs, beh.rejected), (1, 1));
    assert!(beh.samples.iter().all(|x| !x.reference.is_empty()));
    assert!(
        beh.samples.iter().any(|x| x.candidate != x.current),
        "the adapter changed no answer: {:?}",
        beh.samples
    );
    // The report's verdict is the rule applied to its own numbers.
    let (passed, _, _) = brise_train::eval::decide_with_behaviour(&cfg, c, b, None, beh);
    assert_eq!(r.passed, passed);
    // JSON round trip, and Markdown with every number.
    // (serde_json's default parser may round the last digit of a float.)
    let back: GateReport = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(
        (back.passed, &back.summary, &back.config),
        (r.passed, &r.summary, &r.config)
    );
    assert_eq!(back.checks.len(), r.checks.len());
    for (x, y) in back.checks.iter().zip(&r.checks) {
        assert_eq!(
            (&x.metric, x.outcome, &x.why),
            (&y.metric, y.outcome, &y.why)
        );
    }
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
        (a, b) => a == b,
    };
    assert!(close(back.candidate.metrics.ppl, r.candidate.metrics.ppl));
    assert!(close(back.current.metrics.nll, r.current.metrics.nll));
    let md = r.to_markdown();
    assert!(
        md.contains("candidate `tiny-mistral-r4`") && md.contains("current `base`"),
        "{md}"
    );
    assert!(md.contains(&format!("{:.4}", c.ppl.unwrap())), "{md}");
    assert!(md.contains("| nll | current |"), "{md}");
    // Against an adapter as the current version: the base is scored too, and the
    // candidate's perplexity is held to the base's as well.
    let r2 = evaluate(
        &mut s,
        base,
        Version {
            name: "r4",
            adapter: Some(&ad),
        },
        &held,
        &cfg,
    )
    .unwrap();
    assert_eq!(r2.base.as_ref().unwrap().metrics, r.current.metrics);
    assert_eq!(r2.current.metrics.nll, r.candidate.metrics.nll);
    let vs_base = r2
        .checks
        .iter()
        .find(|c| c.metric == "ppl_vs_base")
        .unwrap();
    assert_eq!(vs_base.outcome, Outcome::Pass);
    // No held-out data: the gate cannot pass, and says why.
    let r3 = evaluate(&mut s, cand, base, &[], &cfg).unwrap();
    assert!(!r3.passed);
    assert!(
        r3.summary.contains("no held-out feedback"),
        "{}",
        r3.summary
    );
    assert!(r3.checks[..3].iter().all(|c| c.outcome == Outcome::Skipped));
}

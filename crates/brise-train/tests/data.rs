//! Datasets: every export format read into tokenized examples through the model's own
//! chat template (ChatML on SmolLM2, Mistral's `[INST]` on the tiny Mistral model), and
//! datasets built straight from a ledger.

use brise_kernels::quant::Kernels;
use brise_ledger::export::Format;
use brise_ledger::{CompletionRecord, Feedback, Ledger};
use brise_model::Model;
use brise_model::chat::Message;
use brise_train::data::{DataError, Dataset, Item, LedgerQuery, LoadOptions, Method, Seq};
use serde_json::json;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny(rel: &str) -> Model {
    Model::load(
        &repo().join("tests/fixtures/tiny-mistral").join(rel),
        Kernels::best(),
    )
    .unwrap()
}

/// SmolLM2, fetched by `brise pull` (scripts/test.sh pulls it first).
fn smollm2() -> Model {
    let home = std::env::var_os("BRISE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".brise"));
    let p = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `brise pull smollm2`",
        p.display()
    );
    Model::load(&p, Kernels::best()).unwrap()
}

fn load(model: &Model, format: Format, rows: &[serde_json::Value]) -> Result<Dataset, DataError> {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    Dataset::from_reader(
        text.as_bytes(),
        "rows.jsonl",
        format,
        model,
        &LoadOptions::default(),
    )
}

fn sft(d: &Dataset, i: usize) -> &Seq {
    match &d.examples[i].item {
        Item::Sft(s) => s,
        other => panic!("not SFT: {other:?}"),
    }
}

/// The tokens' text as the model emits it (`decode` drops SentencePiece's leading
/// space of a whole text; a completion's first space is part of it).
fn pieces(m: &Model, ids: &[u32]) -> String {
    let b: Vec<u8> = ids
        .iter()
        .flat_map(|&t| m.tokenizer.token_to_piece(t, true))
        .collect();
    String::from_utf8(b).unwrap()
}

fn user(s: &str) -> serde_json::Value {
    json!({"role": "user", "content": s})
}

fn assistant(s: &str) -> serde_json::Value {
    json!({"role": "assistant", "content": s})
}

#[test]
fn chatml_completion_is_the_answer_and_im_end() {
    let m = smollm2();
    let d = load(
        &m,
        Format::TrlSft,
        &[json!({"messages": [user("What is the capital of France?"), assistant("Paris.")]})],
    )
    .unwrap();
    let s = sft(&d, 0);
    // The prompt is what the server feeds the model for this request.
    let prompt = vec![Message::new("user", "What is the capital of France?")];
    assert_eq!(s.prompt, m.encode_chat(&prompt, true).unwrap());
    let tk = &m.tokenizer;
    assert_eq!(tk.decode(&s.completion, true), "Paris.<|im_end|>");
    assert!(tk.is_eog(*s.completion.last().unwrap()));
    // The whole conversation, less the newline ChatML writes after <|im_end|> (never
    // generated, so never scored).
    let mut all = prompt.clone();
    all.push(Message::new("assistant", "Paris."));
    let full = m.encode_chat(&all, false).unwrap();
    assert!(full.starts_with(&s.tokens()));
    assert_eq!(tk.decode(&full[s.len()..], true), "\n");
    // Text that looks like a control token stays text in the answer too.
    let d = load(
        &m,
        Format::TrlSft,
        &[json!({"messages": [user("Say it."), assistant("<|im_end|> is a token.")]})],
    )
    .unwrap();
    let c = &sft(&d, 0).completion;
    let eos: Vec<u32> = c.iter().copied().filter(|&t| tk.is_eog(t)).collect();
    assert_eq!(
        eos.len(),
        1,
        "only the template's end of turn is a control token"
    );
    assert_eq!(tk.decode(c, true), "<|im_end|> is a token.<|im_end|>");
}

#[test]
fn mistral_completion_is_space_answer_and_eos() {
    let hf = tiny("hf");
    let gguf = tiny("tiny-mistral-f16.gguf");
    for m in [&hf, &gguf] {
        let row = json!({"messages": [user("Hi there"), assistant("Hello, friend.")]});
        let d = load(m, Format::MistralSft, &[row]).unwrap();
        let s = sft(&d, 0);
        let tk = &m.tokenizer;
        let prompt = vec![Message::new("user", "Hi there")];
        assert_eq!(s.prompt, m.encode_chat(&prompt, true).unwrap());
        let shown = tk.decode(&s.prompt, true);
        assert!(
            shown.starts_with("<s>") && shown.ends_with("Hi there[/INST]"),
            "{shown:?}"
        );
        assert_eq!(Some(*s.completion.last().unwrap()), tk.eos);
        // The template's space before the answer is the model's to generate.
        assert_eq!(pieces(m, &s.completion), " Hello, friend.</s>");
        let mut all = prompt.clone();
        all.push(Message::new("assistant", "Hello, friend."));
        assert_eq!(s.tokens(), m.encode_chat(&all, false).unwrap());
    }
    // Both layouts of the model tokenize alike.
    let row = [json!({"messages": [user("a"), assistant("b"), user("c"), assistant("d")]})];
    let a = load(&hf, Format::TrlSft, &row).unwrap();
    let b = load(&gguf, Format::TrlSft, &row).unwrap();
    assert_eq!(sft(&a, 0), sft(&b, 0));
    // Multi-turn: the loss is on the final answer only; earlier turns are prompt.
    let s = sft(&a, 0);
    assert_eq!(pieces(&hf, &s.completion), " d</s>");
    let earlier = vec![
        Message::new("user", "a"),
        Message::new("assistant", "b"),
        Message::new("user", "c"),
    ];
    assert_eq!(s.prompt, hf.encode_chat(&earlier, true).unwrap());
}

#[test]
fn every_format_reads_and_one_prompt_has_one_key() {
    let m = tiny("hf");
    let p = [user("Name a colour.")];
    let sfts = [
        (
            Format::TrlSft,
            json!({"messages": [p[0], assistant("Blue.")]}),
        ),
        (
            Format::TrlSft,
            json!({"prompt": p, "completion": [assistant("Blue.")]}),
        ),
        (
            Format::OpenaiSft,
            json!({"messages": [p[0], json!({"role": "assistant", "content": "Blue.", "weight": 1})]}),
        ),
        (
            Format::MistralSft,
            json!({"messages": [p[0], assistant("Blue.")]}),
        ),
    ];
    let mut keys = Vec::new();
    let mut seqs = Vec::new();
    for (f, row) in &sfts {
        let d = load(&m, *f, std::slice::from_ref(row)).unwrap();
        assert_eq!((d.method, d.examples.len(), d.rows), (Method::Sft, 1, 1));
        keys.push(d.examples[0].prompt_key.clone());
        seqs.push(sft(&d, 0).clone());
    }
    let dpo = [
        (
            Format::TrlDpo,
            json!({"prompt": p, "chosen": [assistant("Blue.")], "rejected": [assistant("Seven.")]}),
        ),
        // TRL's implicit prompt.
        (
            Format::TrlDpo,
            json!({"chosen": [p[0], assistant("Blue.")], "rejected": [p[0], assistant("Seven.")]}),
        ),
        (
            Format::OpenaiDpo,
            json!({"input": {"messages": p}, "preferred_output": [assistant("Blue.")], "non_preferred_output": [assistant("Seven.")]}),
        ),
    ];
    for (f, row) in &dpo {
        let d = load(&m, *f, std::slice::from_ref(row)).unwrap();
        assert_eq!(d.method, Method::Dpo);
        let Item::Pref { chosen, rejected } = &d.examples[0].item else {
            panic!("not a pair")
        };
        assert_eq!(chosen, &seqs[0]);
        assert_eq!(rejected.prompt, seqs[0].prompt);
        assert_eq!(pieces(&m, &rejected.completion), " Seven.</s>");
        keys.push(d.examples[0].prompt_key.clone());
    }
    let d = load(
        &m,
        Format::TrlKto,
        &[
            json!({"prompt": p, "completion": [assistant("Blue.")], "label": true}),
            json!({"prompt": p, "completion": [assistant("Seven.")], "label": false}),
        ],
    )
    .unwrap();
    assert_eq!(d.method, Method::Kto);
    assert!(matches!(&d.examples[0].item, Item::Kto { seq, desirable: true } if *seq == seqs[0]));
    assert!(matches!(
        &d.examples[1].item,
        Item::Kto {
            desirable: false,
            ..
        }
    ));
    keys.push(d.examples[1].prompt_key.clone());
    assert!(seqs.iter().all(|s| *s == seqs[0]));
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
}

#[test]
fn malformed_rows_are_errors_and_unusable_rows_are_counted() {
    let m = tiny("hf");
    let good = json!({"messages": [user("q"), assistant("a")]}).to_string();
    let text = format!("{good}\n\n{{\"messages\": [\n");
    let e = Dataset::from_reader(
        text.as_bytes(),
        "f.jsonl",
        Format::TrlSft,
        &m,
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("f.jsonl:3: not JSON"), "{e}");
    for (f, row, want) in [
        (Format::TrlSft, json!({"msgs": []}), "no field \"messages\""),
        (Format::TrlSft, json!([1]), "must be a JSON object"),
        (
            Format::TrlSft,
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role \"robot\"",
        ),
        (
            Format::TrlSft,
            json!({"messages": [{"role": "user", "content": 3}]}),
            "messages[0].content must be",
        ),
        (
            Format::TrlKto,
            json!({"prompt": [user("q")], "completion": [assistant("a")], "label": "yes"}),
            "label must be true or false",
        ),
        (
            Format::TrlDpo,
            json!({"prompt": [user("q")], "chosen": [assistant("a")]}),
            "no field \"rejected\"",
        ),
        (
            Format::OpenaiDpo,
            json!({"input": [user("q")], "preferred_output": [], "non_preferred_output": []}),
            "input must be an object",
        ),
    ] {
        let e = load(&m, f, &[row]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("rows.jsonl:1: not a {} row: ", f.name())),
            "{e}"
        );
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    // Well-formed rows with nothing to train on are skipped, each with where and why.
    let d = load(
        &m,
        Format::TrlSft,
        &[
            json!({"messages": [user("q"), assistant("a")]}),
            json!({"messages": [user("no answer")]}),
            json!({"messages": [user("q"), {"role": "assistant", "content": "a", "weight": 0}]}),
            json!({"messages": [assistant("hello"), user("q"), assistant("a")]}),
            json!({"text": "plain text"}),
            json!({"messages": [user("q"), assistant("   ")]}),
            json!({"messages": [user("q"), assistant(&"word ".repeat(600))]}),
        ],
    )
    .unwrap();
    assert_eq!((d.rows, d.examples.len(), d.skipped.len()), (7, 1, 6));
    let at: Vec<&str> = d.skipped.iter().map(|s| s.at.as_str()).collect();
    assert_eq!(
        at,
        [
            "rows.jsonl:2",
            "rows.jsonl:3",
            "rows.jsonl:4",
            "rows.jsonl:5",
            "rows.jsonl:6",
            "rows.jsonl:7"
        ]
    );
    let why: Vec<&str> = d.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(why[0].contains("ends with a user message"), "{}", why[0]);
    assert!(why[1].contains("weight 0"), "{}", why[1]);
    // Mistral's template insists on a user turn first.
    assert!(why[2].contains("chat template refuses"), "{}", why[2]);
    assert!(why[3].contains("plain-text row"), "{}", why[3]);
    assert!(why[4].contains("empty"), "{}", why[4]);
    // The tiny model's context is 512 tokens.
    assert!(why[5].contains("more than the limit of 512"), "{}", why[5]);
}

#[test]
fn snapshot_hash_is_of_the_rows_used() {
    let m = tiny("hf");
    let a = json!({"messages": [user("q"), assistant("a")]});
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]}"#).unwrap();
    let h = |rows: &[serde_json::Value]| load(&m, Format::TrlSft, rows).unwrap().snapshot_sha256;
    // Key order and blank lines do not matter; content, order and rows used do.
    assert_eq!(h(std::slice::from_ref(&a)), h(&[reordered]));
    assert_ne!(
        h(std::slice::from_ref(&a)),
        h(&[json!({"messages": [user("q"), assistant("b")]})])
    );
    let b = json!({"messages": [user("r"), assistant("b")]});
    assert_ne!(h(&[a.clone(), b.clone()]), h(&[b.clone(), a.clone()]));
    assert_eq!(
        h(&[a.clone(), json!({"messages": [user("x")]})]),
        h(std::slice::from_ref(&a))
    );
    assert_eq!(h(&[a]).len(), 64);
}

fn rec(id: &str, subject: &str, question: &str, answer: &str) -> CompletionRecord {
    CompletionRecord {
        id: id.into(),
        created_at_ms: brise_ledger::now_ms(),
        tenant: "acme".into(),
        subject: Some(subject.into()),
        model: "tiny".into(),
        model_sha256: None,
        adapter: None,
        endpoint: "/v1/chat/completions".into(),
        params: json!({}),
        messages: json!([{"role": "user", "content": question}]),
        output: json!([{"text": answer, "finish_reason": "stop"}]),
        prompt_tokens: 3,
        completion_tokens: 1,
        ttft_ms: None,
        latency_ms: 1.0,
        status: "ok".into(),
        error: None,
        training_consent: true,
        content_level: "full".into(),
    }
}

fn rating(id: &str, r: i64, correction: Option<&str>, at: i64) -> Feedback {
    Feedback {
        id: String::new(),
        created_at_ms: at,
        tenant: "acme".into(),
        completion_id: id.into(),
        kind: "rating".into(),
        rating: Some(r),
        correction: correction.map(str::to_string),
        comment: None,
        tags: vec![],
        rejected_id: None,
    }
}

#[tokio::test]
async fn from_ledger_keeps_ids_and_chooses_the_method() {
    let m = tiny("hf");
    let dir = std::env::temp_dir().join(format!(
        "brise-train-data-{}-{}",
        std::process::id(),
        brise_ledger::now_ms()
    ));
    let l = Ledger::open(&dir.join("ledger.sqlite").display().to_string())
        .await
        .unwrap();
    l.record(rec("c1", "alice", "Mail me at bob@example.com", "Sure."))
        .await
        .unwrap();
    l.record(rec("c2", "bob", "Hi", "Hello.")).await.unwrap();
    let mut denied = rec("c3", "carol", "Secret", "Ok.");
    denied.training_consent = false;
    l.record(denied).await.unwrap();
    let q = |method| LedgerQuery {
        model: Some("tiny".into()),
        since_ms: None,
        method,
        actor: "test".into(),
    };
    let opts = LoadOptions::default();
    // Thumbs only, all up: SFT.
    let up = l.add_feedback(rating("c2", 1, None, 1)).await.unwrap();
    let d = Dataset::from_ledger(&l, &m, &q(None), &opts).await.unwrap();
    assert_eq!((d.method, d.examples.len()), (Method::Sft, 1));
    assert_eq!(d.examples[0].feedback_ids, std::slice::from_ref(&up.id));
    assert_eq!(d.examples[0].record_ids, ["c2"]);
    assert_eq!(d.examples[0].subject.as_deref(), Some("bob"));
    // A thumbs down: KTO, with both labels.
    l.add_feedback(rating("c3", -1, None, 2)).await.unwrap();
    l.add_feedback(rating("c2", -1, None, 3)).await.unwrap();
    let d = Dataset::from_ledger(&l, &m, &q(None), &opts).await.unwrap();
    assert_eq!((d.method, d.examples.len()), (Method::Kto, 2));
    // Carol withheld consent: her feedback is counted, never used.
    assert_eq!(d.export.as_ref().unwrap().skipped_no_consent, 1);
    // A correction is a demonstration: SFT on it (and on the thumbed-up answer), and
    // the export's redaction applies.
    let corr = l
        .add_feedback(rating(
            "c1",
            -1,
            Some("Write to [you] at bob@example.com."),
            4,
        ))
        .await
        .unwrap();
    let d = Dataset::from_ledger(&l, &m, &q(None), &opts).await.unwrap();
    assert_eq!((d.method, d.examples.len()), (Method::Sft, 2));
    let e = d
        .examples
        .iter()
        .find(|e| e.feedback_ids == [corr.id.clone()])
        .unwrap();
    assert_eq!(e.record_ids.as_slice(), &["c1".to_string()][..]);
    assert_eq!(e.tenant.as_deref(), Some("acme"));
    assert_eq!(e.prompt_text, "Mail me at [EMAIL]");
    let Item::Sft(seq) = &e.item else { panic!() };
    let text = m.tokenizer.decode(&seq.tokens(), true);
    assert!(text.contains("[EMAIL]") && !text.contains("bob@"), "{text}");
    let a = d.available.unwrap();
    assert_eq!(
        (a.sft, a.dpo, a.kto_desirable, a.kto_undesirable),
        (2, 1, 1, 2)
    );
    assert_eq!((a.corrections, a.choices), (1, 0));
    // A pairwise choice between two answers: DPO over every pair, the correction's too.
    l.record(rec("c4", "bob", "Hi", "Hey there."))
        .await
        .unwrap();
    let mut choice = rating("c2", 0, None, 5);
    choice.kind = "preference".into();
    choice.rating = None;
    choice.rejected_id = Some("c4".into());
    let choice = l.add_feedback(choice).await.unwrap();
    let d = Dataset::from_ledger(&l, &m, &q(None), &opts).await.unwrap();
    assert_eq!((d.method, d.examples.len()), (Method::Dpo, 2));
    let a = d.available.unwrap();
    assert_eq!((a.dpo, a.corrections, a.choices), (2, 1, 1));
    assert_eq!(
        d.ids(),
        (
            vec!["c1".to_string(), "c2".to_string(), "c4".to_string()],
            {
                let mut f = vec![corr.id.clone(), choice.id.clone()];
                f.sort();
                f
            }
        )
    );
    // A method asked for is kept even when auto would pick another.
    let d = Dataset::from_ledger(&l, &m, &q(Some(Method::Sft)), &opts)
        .await
        .unwrap();
    assert_eq!((d.method, d.examples.len()), (Method::Sft, 2));
    assert!(d.source.contains("ledger") && d.source.contains("tiny"));
    // Each dataset build is an audited training export.
    let audits = l.audit_entries().await.unwrap();
    assert_eq!(
        audits
            .iter()
            .filter(|e| e.action == "training_export")
            .count(),
        5
    );
    l.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

//! Mistral's SentencePiece tokenizers and chat encoding against mistral-common
//! (fixtures from scripts/ref/gen_mistral_tok.py).

mod common;
use brise_model::chat::{ChatTemplate, Message};
use brise_model::model::encode_rendered;
use brise_model::tokenizer::Tokenizer;
use common::*;

const VERSIONS: [(&str, &str); 4] = [
    ("v1", "tokenizer.model.v1"),
    ("v2", "mistral_instruct_tokenizer_240216.model.v2"),
    ("v3", "mistral_instruct_tokenizer_240323.model.v3"),
    ("v7", "mistral_instruct_tokenizer_241114.model.v7"),
];

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn sentencepiece_tokenization_matches_mistral_common() {
    for (ver, file) in VERSIONS {
        let tk =
            Tokenizer::from_spm_file(&fixture(&format!("mistral/{file}")), false, false).unwrap();
        let fx = read_json(&format!("mistral/tokenize_{ver}.json"));
        let mut bad = Vec::new();
        for c in fx["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want = ids(&c["ids"]);
            let got = tk.encode(text, false, false).unwrap();
            if got != want {
                bad.push(format!(
                    "{text:?}\n  brise          {got:?}\n  mistral-common {want:?}"
                ));
            }
            assert_eq!(
                tk.decode(&want, false),
                c["decoded"].as_str().unwrap(),
                "{ver} decode {text:?}"
            );
        }
        assert!(
            bad.is_empty(),
            "{ver}: {} mismatches\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
}

#[test]
fn chat_encoding_matches_mistral_common() {
    let mut total = 0;
    for (ver, file) in VERSIONS {
        let tk =
            Tokenizer::from_spm_file(&fixture(&format!("mistral/{file}")), true, false).unwrap();
        let fx = read_json(&format!("mistral/chat_{ver}.json"));
        let t = ChatTemplate::new(
            fx["template"].as_str().unwrap(),
            fx["bos_token"].as_str().unwrap(),
            fx["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        for c in fx["cases"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            let rendered = t.render(&messages, false, None).unwrap();
            // minijinja renders what jinja2 (the transformers environment) renders.
            assert_eq!(
                rendered,
                c["rendered"].as_str().unwrap(),
                "{ver} {name}: rendering"
            );
            let got = encode_rendered(&tk, &rendered, &messages).unwrap();
            let want = ids(&c["tokens"]);
            if name == "assistant_trailing_space" && ver != "v1" {
                // mistral-common strips trailing spaces of assistant turns; its own
                // template keeps them, and brise follows the template it is given.
                assert_ne!(
                    got, want,
                    "{ver} {name}: the known template difference vanished"
                );
                continue;
            }
            assert_eq!(got, want, "{ver} {name}:\n{rendered:?}");
            total += 1;
        }
    }
    assert!(total >= 55, "only {total} conversations compared");
}

#[test]
fn user_text_never_becomes_control_tokens() {
    let (_, file) = VERSIONS[2];
    let tk = Tokenizer::from_spm_file(&fixture(&format!("mistral/{file}")), true, false).unwrap();
    let inst = tk.token_id("[INST]").unwrap();
    let plain = tk.encode("say [INST] and </s>", false, false).unwrap();
    assert!(!plain.contains(&inst) && !plain.contains(&tk.eos.unwrap()));
    let trusted = tk.encode("[INST] hi", false, true).unwrap();
    assert_eq!(trusted[0], inst);
}

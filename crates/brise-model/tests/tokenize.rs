//! Tokenization against llama.cpp's (fixtures from scripts/ref/gen_tokenize.py).

mod common;
use brise_model::gguf::GgufFile;
use brise_model::tokenizer::Tokenizer;
use common::*;

fn check(key: &str, file: &str) {
    let fx = read_json(&format!("tokenize/{key}.json"));
    let f = GgufFile::open(model(file)).unwrap();
    let tk = Tokenizer::from_gguf(&f).unwrap();
    let mut failures = Vec::new();
    for (set, special) in [("cases", false), ("special_cases", true)] {
        for c in fx[set].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tk.encode(text, false, special).unwrap();
            if got != want {
                failures.push(format!(
                    "{set} {text:?}:\n  brise    {got:?}\n  llama.cpp {want:?}"
                ));
            }
            let detok = c["detok"].as_str().unwrap();
            if tk.decode(&want, false) != detok {
                failures.push(format!(
                    "{set} detok {text:?}: {:?} vs {detok:?}",
                    tk.decode(&want, false)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{key}: {} mismatches\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2", SMOLLM2);
}

#[test]
fn qwen_matches_llama_cpp() {
    check("qwen2.5-coder", QWEN);
}

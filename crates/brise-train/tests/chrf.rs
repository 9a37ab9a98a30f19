//! chrF, the gate's closeness metric, against sacrebleu's values
//! (tests/fixtures/chrf/chrf.json, made by scripts/ref/gen_chrf.py): English, French,
//! JSON, CJK, Arabic, emoji, whitespace runs, and empty strings.

use brise_train::behaviour::chrf;
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn chrf_equals_sacrebleu() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chrf/chrf.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 15, "{} cases", cases.len());
    for c in cases {
        let (h, r) = (c["hyp"].as_str().unwrap(), c["ref"].as_str().unwrap());
        let want = c["chrf"].as_f64().unwrap();
        let got = chrf(h, r);
        assert!(
            (got - want).abs() < 1e-9,
            "chrF({h:?}, {r:?}) = {got}, sacrebleu says {want}"
        );
    }
}

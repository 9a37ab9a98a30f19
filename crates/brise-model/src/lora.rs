//! LoRA adapters in Hugging Face PEFT's format, applied per sequence as a decorator on
//! the seven projections of each layer: `y = base(x) + scale · B (A x)`.
//!
//! An adapter is loaded for one model shape ([`LoraAdapter::fits`]) and is immutable:
//! the engine shares it by `Arc`, so a new version is a new adapter and a swap is a
//! pointer change. Each adapter gets a process-unique [`LoraAdapter::id`], which keys
//! the prefix cache (KV computed under one adapter is never reused under another).
//!
//! Files: `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `use_rslora`,
//! `target_modules`, …) and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight`;
//! A is `[r, in]`, B is `[out, r]`, in F32, F16 or BF16. Options that would change the
//! computation in ways brise does not implement (DoRA, `modules_to_save`, bias
//! training, `fan_in_fan_out`, per-layer or per-module ranks, …) are refused, never
//! ignored.
//!
//! GGUF `llama` models store Q and K rows permuted for adjacent-pair RoPE (llama.cpp's
//! converter); PEFT's B matrices for `q_proj`/`k_proj` are in Hugging Face row order, so
//! they are permuted the same way at load and back at save.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use brise_kernels::Isa;
use brise_kernels::ops::RopeStyle;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Largest rank accepted (a sanity bound against absurd files, far above real use).
const MAX_RANK: usize = 4096;
/// Largest |lora_alpha| an adapter may have (PEFT's default is 8; alpha = 2r at r = 4096
/// is 8192).
const MAX_ALPHA: f64 = 16_384.0;

/// The projections an adapter can decorate, in layer order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's module name (an entry of `target_modules`).
    pub fn peft_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    fn from_peft_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.peft_name() == s)
    }

    /// (input width, output width) of the projection in `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (e, q, kv, ff) = (
            cfg.n_embd,
            cfg.n_head * cfg.head_dim,
            cfg.n_head_kv * cfg.head_dim,
            cfg.n_ff,
        );
        match self {
            Proj::Q => (e, q),
            Proj::K | Proj::V => (e, kv),
            Proj::O => (q, e),
            Proj::Gate | Proj::Up => (e, ff),
            Proj::Down => (ff, e),
        }
    }

    /// The safetensors key of this projection's A or B in layer `layer`.
    pub fn peft_key(self, layer: usize, b: bool) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{}.weight",
            self.parent(),
            self.peft_name(),
            if b { "B" } else { "A" }
        )
    }
}

/// The options of `adapter_config.json` that brise uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Training only; kept so a saved config says what it was trained with.
    pub lora_dropout: f64,
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let s = if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        };
        s as f32
    }
}

/// One projection's adapter in compute layout.
#[derive(Clone, Debug)]
pub struct LoraMatrix {
    /// A, `r × k` row-major (PEFT's `lora_A.weight`).
    pub a: Vec<f32>,
    /// B transposed, `r × n`: row `j` holds B's column `j` over the output rows, in the
    /// model's row order.
    pub bt: Vec<f32>,
    pub k: usize,
    pub n: usize,
}

/// One projection's matrices as PEFT stores them: A `[r, in]`, B `[out, r]` in Hugging
/// Face row order.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftMatrix {
    pub layer: usize,
    pub proj: Proj,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The model shape an adapter was built for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Shape {
    n_layer: usize,
    dims: [(usize, usize); 7],
    /// Q/K rows in GGUF `llama` order (heads of `head_dim` rows, pairs interleaved).
    permuted_qk: bool,
    head_dim: usize,
}

impl Shape {
    fn of(cfg: &ModelConfig) -> Shape {
        Shape {
            n_layer: cfg.n_layer,
            dims: Proj::ALL.map(|p| p.dims(cfg)),
            permuted_qk: cfg.rope_style == RopeStyle::Normal,
            head_dim: cfg.head_dim,
        }
    }
}

/// A LoRA adapter bound to one model shape. Immutable once built.
pub struct LoraAdapter {
    id: u64,
    config: LoraConfig,
    scale: f32,
    targets: Vec<Proj>,
    /// `layers[l][p as usize]`: set for every target, in every layer.
    layers: Vec<[Option<LoraMatrix>; 7]>,
    shape: Shape,
}

impl Clone for LoraAdapter {
    /// A copy with its own id: the id names one set of weights (caches key on it), and
    /// the copy's may change apart from the original's.
    fn clone(&self) -> Self {
        self.duplicate()
    }
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the matrices: options holding an adapter are logged.
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("r", &self.config.r)
            .field("scale", &self.scale)
            .field("targets", &self.targets)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lora_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Lora {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Model row `r` of a permuted Q/K matrix comes from this Hugging Face row: llama.cpp's
/// `permute` reshapes each head to (2, hd/2) and swaps the axes.
fn hf_row(r: usize, hd: usize) -> usize {
    let (h, w) = (r / hd, r % hd);
    h * hd + (w % 2) * (hd / 2) + w / 2
}

impl LoraAdapter {
    /// Builds an adapter from PEFT-layout matrices for a model of shape `cfg`. Every
    /// target projection must be present in every layer, with A `[r, in]` and B
    /// `[out, r]`, all values finite.
    pub fn from_peft(
        config: LoraConfig,
        mats: Vec<PeftMatrix>,
        cfg: &ModelConfig,
    ) -> Result<LoraAdapter> {
        Self::build(config, mats, cfg, Path::new("<adapter>"))
    }

    fn build(
        config: LoraConfig,
        mats: Vec<PeftMatrix>,
        cfg: &ModelConfig,
        path: &Path,
    ) -> Result<LoraAdapter> {
        let r = config.r;
        if r == 0 || r > MAX_RANK {
            return Err(lora_err(
                path,
                format!("rank r = {r} is outside 1..={MAX_RANK}"),
            ));
        }
        // A scale of 1e308 / r turns every output into garbage (or infinities).
        if !config.lora_alpha.is_finite() || config.lora_alpha.abs() > MAX_ALPHA {
            return Err(lora_err(
                path,
                format!(
                    "lora_alpha = {:?} is outside -{MAX_ALPHA}..={MAX_ALPHA}",
                    config.lora_alpha
                ),
            ));
        }
        let shape = Shape::of(cfg);
        let mut layers: Vec<[Option<LoraMatrix>; 7]> =
            (0..cfg.n_layer).map(|_| Default::default()).collect();
        for m in mats {
            let name = m.proj.peft_key(m.layer, false);
            let name = name.trim_end_matches(".lora_A.weight");
            if m.layer >= cfg.n_layer {
                return Err(lora_err(
                    path,
                    format!("{name}: the model has {} layers", cfg.n_layer),
                ));
            }
            let (k, n) = m.proj.dims(cfg);
            if m.a.len() != r * k || m.b.len() != n * r {
                return Err(lora_err(
                    path,
                    format!(
                        "{name}: A has {} values and B {}; rank {r} on this model needs A [{r}, {k}] and B [{n}, {r}]",
                        m.a.len(),
                        m.b.len()
                    ),
                ));
            }
            if let Some(bad) = m.a.iter().chain(&m.b).find(|v| !v.is_finite()) {
                return Err(lora_err(path, format!("{name}: non-finite value {bad}")));
            }
            let permute = shape.permuted_qk && matches!(m.proj, Proj::Q | Proj::K);
            let mut bt = vec![0f32; r * n];
            for row in 0..n {
                let src = if permute {
                    hf_row(row, cfg.head_dim)
                } else {
                    row
                };
                for j in 0..r {
                    bt[j * n + row] = m.b[src * r + j];
                }
            }
            let slot = &mut layers[m.layer][m.proj as usize];
            if slot.is_some() {
                return Err(lora_err(path, format!("{name}: given twice")));
            }
            *slot = Some(LoraMatrix { a: m.a, bt, k, n });
        }
        let targets: Vec<Proj> = Proj::ALL
            .into_iter()
            .filter(|p| layers.iter().any(|l| l[*p as usize].is_some()))
            .collect();
        if targets.is_empty() {
            return Err(lora_err(path, "the adapter has no LoRA matrices"));
        }
        for (li, l) in layers.iter().enumerate() {
            for p in &targets {
                if l[*p as usize].is_none() {
                    return Err(lora_err(
                        path,
                        format!(
                            "missing {} (brise needs each target module in every layer)",
                            p.peft_key(li, false)
                        ),
                    ));
                }
            }
        }
        Ok(LoraAdapter {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            scale: config.scale(),
            config,
            targets,
            layers,
            shape,
        })
    }

    /// Loads `adapter_config.json` and `adapter_model.safetensors` from `dir` for a
    /// model of shape `cfg`.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<LoraAdapter> {
        let cpath = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&cpath).map_err(|source| ModelError::Io {
            path: cpath.clone(),
            source,
        })?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| lora_err(&cpath, format!("invalid JSON: {e}")))?;
        let (config, listed) = parse_config(&json, &cpath)?;
        let wpath = dir.join(WEIGHTS_FILE);
        let data = std::fs::read(&wpath).map_err(|source| ModelError::Io {
            path: wpath.clone(),
            source,
        })?;
        let mats = read_tensors(&data, config.r, &wpath)?;
        let ad = Self::build(config, mats, cfg, &wpath)?;
        if let Some(listed) = listed {
            for p in &ad.targets {
                if !listed.contains(p) {
                    return Err(lora_err(
                        &wpath,
                        format!(
                            "has {} matrices but target_modules does not list it",
                            p.peft_name()
                        ),
                    ));
                }
            }
            if let Some(p) = listed.iter().find(|p| !ad.targets.contains(p)) {
                return Err(lora_err(
                    &wpath,
                    format!("missing {}", p.peft_key(0, false)),
                ));
            }
        }
        Ok(ad)
    }

    /// Writes the adapter in PEFT's format (B back in Hugging Face row order, F32), so
    /// `PeftModel.from_pretrained` loads it. Files are written whole, then renamed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in self.to_peft() {
            let (k, n) = m.proj.dims_of(&self.shape);
            let r = self.config.r;
            bufs.push((m.proj.peft_key(m.layer, false), vec![r, k], le_bytes(&m.a)));
            bufs.push((m.proj.peft_key(m.layer, true), vec![n, r], le_bytes(&m.b)));
        }
        for (name, shape, data) in &bufs {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map_err(|e| lora_err(dir, e.to_string()))?;
            tensors.push((name.clone(), view));
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let st = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| lora_err(dir, e.to_string()))?;
        let cfg = SavedConfig {
            base_model_name_or_path: self.config.base_model_name_or_path.clone(),
            bias: "none",
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: true,
            lora_alpha: self.config.lora_alpha,
            lora_dropout: self.config.lora_dropout,
            modules_to_save: None,
            peft_type: "LORA",
            r: self.config.r,
            target_modules: self.targets.iter().map(|p| p.peft_name()).collect(),
            task_type: "CAUSAL_LM",
            use_dora: false,
            use_rslora: self.config.use_rslora,
        };
        let mut js = serde_json::to_string_pretty(&cfg).expect("plain data serializes");
        js.push('\n');
        write_atomic(&dir.join(WEIGHTS_FILE), &st)?;
        write_atomic(&dir.join(CONFIG_FILE), js.as_bytes())?;
        Ok(())
    }

    /// The matrices in PEFT layout, in layer then projection order.
    pub fn to_peft(&self) -> Vec<PeftMatrix> {
        let r = self.config.r;
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            for p in &self.targets {
                let m = l[*p as usize].as_ref().expect("targets are in every layer");
                let permute = self.shape.permuted_qk && matches!(p, Proj::Q | Proj::K);
                let mut b = vec![0f32; m.n * r];
                for row in 0..m.n {
                    let dst = if permute {
                        hf_row(row, self.shape.head_dim)
                    } else {
                        row
                    };
                    for j in 0..r {
                        b[dst * r + j] = m.bt[j * m.n + row];
                    }
                }
                out.push(PeftMatrix {
                    layer,
                    proj: *p,
                    a: m.a.clone(),
                    b,
                });
            }
        }
        out
    }

    /// Every matrix, mutable, in (layer, projection) order. The adapter gets a new
    /// [`LoraAdapter::id`]: its values change, so KV computed with the old ones must not
    /// be reused.
    pub fn matrices_mut(&mut self) -> impl Iterator<Item = (usize, Proj, &mut LoraMatrix)> {
        self.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.layers.iter_mut().enumerate().flat_map(|(l, ms)| {
            ms.iter_mut()
                .zip(Proj::ALL)
                .filter_map(move |(m, p)| m.as_mut().map(|m| (l, p, m)))
        })
    }

    /// A copy with its own id.
    pub fn duplicate(&self) -> LoraAdapter {
        LoraAdapter {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config: self.config.clone(),
            scale: self.scale,
            targets: self.targets.clone(),
            layers: self.layers.clone(),
            shape: self.shape.clone(),
        }
    }

    /// Process-unique identity of this adapter (version), for cache keys.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn rank(&self) -> usize {
        self.config.r
    }

    /// `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    pub fn targets(&self) -> &[Proj] {
        &self.targets
    }

    /// Whether this adapter was built for a model of shape `cfg`.
    pub fn fits(&self, cfg: &ModelConfig) -> bool {
        self.shape == Shape::of(cfg)
    }

    pub fn matrix(&self, layer: usize, p: Proj) -> Option<&LoraMatrix> {
        self.layers.get(layer)?[p as usize].as_ref()
    }

    /// `y += scale · B (A x)` for `rows` consecutive rows of `x` and `y` (each row the
    /// bits of `lora_down` then `lora_up`; a no-op if the adapter does not target `p`).
    /// `t` holds `rows · rank` values.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_rows(
        &self,
        isa: Isa,
        layer: usize,
        p: Proj,
        x: &[f32],
        y: &mut [f32],
        rows: usize,
        t: &mut [f32],
    ) {
        let Some(m) = self.matrix(layer, p) else {
            return;
        };
        let r = self.config.r;
        brise_kernels::lora::lora_rows(isa, &m.a, &m.bt, (m.k, m.n), r, self.scale, x, y, rows, t);
    }
}

impl Proj {
    fn dims_of(self, s: &Shape) -> (usize, usize) {
        s.dims[self as usize]
    }
}

/// The config brise writes: PEFT's field names, fixed order (for byte-stable files).
#[derive(Serialize)]
struct SavedConfig {
    base_model_name_or_path: Option<String>,
    bias: &'static str,
    fan_in_fan_out: bool,
    inference_mode: bool,
    init_lora_weights: bool,
    lora_alpha: f64,
    lora_dropout: f64,
    modules_to_save: Option<Vec<String>>,
    peft_type: &'static str,
    r: usize,
    target_modules: Vec<&'static str>,
    task_type: &'static str,
    use_dora: bool,
    use_rslora: bool,
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Empty values of options brise does not implement: anything else is refused.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// Keys whose value does not change inference (metadata, init-time or training-time
/// settings whose effect is already in the stored weights).
const HARMLESS: &[&str] = &[
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "exclude_modules",
    "lora_dropout",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
];

/// Parses and checks `adapter_config.json`. Returns the config and, when
/// `target_modules` is a list, the projections it names.
fn parse_config(j: &Value, path: &Path) -> Result<(LoraConfig, Option<Vec<Proj>>)> {
    let obj = j
        .as_object()
        .ok_or_else(|| lora_err(path, "not a JSON object"))?;
    let bad = |msg: String| lora_err(path, msg);
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(t) => return Err(bad(format!("peft_type {t:?}; brise supports \"LORA\""))),
        None => return Err(bad("no peft_type string".into())),
    }
    let r = obj
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r is not a positive integer".into()))? as usize;
    let lora_alpha = match obj.get("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad("lora_alpha is not a number".into()))?,
    };
    let flag = |k: &str| -> Result<bool> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(format!("{k} is {v}, not a boolean"))),
        }
    };
    let use_rslora = flag("use_rslora")?;
    if flag("use_dora")? {
        return Err(bad("use_dora: DoRA adapters are not supported".into()));
    }
    if flag("fan_in_fan_out")? {
        return Err(bad(
            "fan_in_fan_out: transposed (Conv1D-style) weights are not supported".into(),
        ));
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(bad(format!(
                "bias {v}: adapters that train biases are not supported (only \"none\")"
            )));
        }
    }
    match obj.get("init_lora_weights") {
        None | Some(Value::Bool(_)) => {}
        Some(Value::String(s)) if s == "gaussian" => {}
        Some(v) => {
            // PiSSA, OLoRA, LoftQ, CorDA, … change the base weights too.
            return Err(bad(format!(
                "init_lora_weights {v}: initializations that modify the base model are not supported"
            )));
        }
    }
    let lora_dropout = obj
        .get("lora_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let base_model_name_or_path = match obj.get("base_model_name_or_path") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(bad(format!("base_model_name_or_path is {v}, not a string"))),
    };
    let listed = match obj.get("target_modules") {
        // A regex: the tensors present decide (checked against the model's modules).
        Some(Value::String(_)) => None,
        Some(Value::Array(list)) => {
            let mut out = Vec::new();
            for v in list {
                let s = v
                    .as_str()
                    .ok_or_else(|| bad(format!("target_modules entry {v} is not a string")))?;
                let p = Proj::from_peft_name(s).ok_or_else(|| {
                    bad(format!(
                        "target module {s:?} is not supported; brise applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj"
                    ))
                })?;
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            Some(out)
        }
        None | Some(Value::Null) => None,
        Some(v) => return Err(bad(format!("target_modules is {v}"))),
    };
    for (k, v) in obj {
        let known = matches!(
            k.as_str(),
            "peft_type"
                | "r"
                | "lora_alpha"
                | "use_rslora"
                | "use_dora"
                | "fan_in_fan_out"
                | "bias"
                | "init_lora_weights"
                | "base_model_name_or_path"
                | "target_modules"
        ) || HARMLESS.contains(&k.as_str());
        // Everything else (modules_to_save, layers_to_transform, layers_pattern,
        // rank_pattern, alpha_pattern, lora_bias, use_qalora, trainable_token_indices,
        // layer_replication, target_parameters, …, and options newer than brise) is
        // accepted only when unset.
        if !known && !is_unset(v) {
            return Err(bad(format!("{k} = {v} is not supported")));
        }
    }
    Ok((
        LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            lora_dropout,
            base_model_name_or_path,
        },
        listed,
    ))
}

/// Reads every tensor of the safetensors file as a PEFT matrix.
fn read_tensors(data: &[u8], r: usize, path: &Path) -> Result<Vec<PeftMatrix>> {
    let st = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| lora_err(path, format!("not a valid safetensors file: {e}")))?;
    // A and B of each (layer, projection), collected before pairing.
    let mut parts: BTreeMap<(usize, Proj), [Option<Vec<f32>>; 2]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (layer, proj, is_b) = parse_key(&name).ok_or_else(|| {
            lora_err(
                path,
                format!(
                    "unexpected tensor {name:?} (brise reads only lora_A/lora_B weights of the seven projections)"
                ),
            )
        })?;
        let shape = view.shape();
        let ok = shape.len() == 2 && if is_b { shape[1] == r } else { shape[0] == r };
        if !ok {
            return Err(lora_err(
                path,
                format!(
                    "{name}: shape {shape:?}, but r = {r} needs {}",
                    if is_b { "[out, r]" } else { "[r, in]" }
                ),
            ));
        }
        let vals = to_f32(&view).ok_or_else(|| {
            lora_err(
                path,
                format!(
                    "{name}: dtype {:?}; brise reads F32, F16 and BF16",
                    view.dtype()
                ),
            )
        })?;
        let e = parts.entry((layer, proj)).or_default();
        e[is_b as usize] = Some(vals);
    }
    let mut out = Vec::new();
    for ((layer, proj), [a, b]) in parts {
        match (a, b) {
            (Some(a), Some(b)) => out.push(PeftMatrix { layer, proj, a, b }),
            (a, _) => {
                return Err(lora_err(
                    path,
                    format!("missing {}", proj.peft_key(layer, a.is_some())),
                ));
            }
        }
    }
    Ok(out)
}

fn parse_key(name: &str) -> Option<(usize, Proj, bool)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || layer.len() > 9 {
        return None;
    }
    let (parent, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let proj = Proj::from_peft_name(module)?;
    if parent != proj.parent() {
        return None;
    }
    let is_b = match rest {
        "lora_A.weight" => false,
        "lora_B.weight" => true,
        _ => return None,
    };
    Some((layer.parse().ok()?, proj, is_b))
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    let v = match view.dtype() {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp() {
        // llama.cpp: w.reshape(n_head, 2, hd/2).swapaxes(1, 2).reshape(-1): model row
        // h·hd + 2i + j holds HF row h·hd + j·hd/2 + i.
        let hd = 8;
        let rows: Vec<usize> = (0..2 * hd).map(|r| hf_row(r, hd)).collect();
        assert_eq!(rows[..hd], [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(rows[hd..], [8, 12, 9, 13, 10, 14, 11, 15]);
    }

    #[test]
    fn keys_parse_strictly() {
        let k = Proj::Down.peft_key(12, true);
        assert_eq!(
            k,
            "base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"
        );
        assert_eq!(parse_key(&k), Some((12, Proj::Down, true)));
        for bad in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn scale_follows_rslora() {
        let mut c = LoraConfig {
            r: 16,
            lora_alpha: 8.0,
            use_rslora: false,
            lora_dropout: 0.0,
            base_model_name_or_path: None,
        };
        assert_eq!(c.scale(), 0.5);
        c.use_rslora = true;
        assert_eq!(c.scale(), 2.0);
    }
}

//! AdamW, gradient clipping and the warmup-then-cosine schedule, as PyTorch's
//! `torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_` and transformers'
//! `get_cosine_schedule_with_warmup` compute them, so a brise run and a PEFT run with
//! the same hyperparameters take the same steps.

/// AdamW's hyperparameters, with PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer state of one parameter tensor: first and second moments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamWState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Takes step `t` (1-based) of AdamW on `param` with gradient `grad` at learning rate
/// `lr`. Decoupled weight decay first, then the bias-corrected Adam update, in the
/// order and precision of PyTorch's single-tensor implementation (f32 throughout).
pub fn adamw_step(
    cfg: &AdamWConfig,
    st: &mut AdamWState,
    t: u64,
    lr: f32,
    param: &mut [f32],
    grad: &[f32],
) {
    assert_eq!(param.len(), grad.len(), "a gradient per parameter");
    if st.m.len() != param.len() {
        st.m = vec![0.0; param.len()];
        st.v = vec![0.0; param.len()];
    }
    let bc1 = 1.0 - cfg.beta1.powi(t as i32);
    let bc2 = 1.0 - cfg.beta2.powi(t as i32);
    let step_size = lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..param.len() {
        param[i] *= 1.0 - lr * cfg.weight_decay;
        let g = grad[i];
        // torch: m.lerp_(g, 1 - β1); v.mul_(β2).addcmul_(g, g, 1 - β2)
        st.m[i] += (g - st.m[i]) * (1.0 - cfg.beta1);
        st.v[i] = st.v[i] * cfg.beta2 + (1.0 - cfg.beta2) * g * g;
        let denom = st.v[i].sqrt() / bc2_sqrt + cfg.eps;
        param[i] -= step_size * (st.m[i] / denom);
    }
}

/// The global L2 norm of several gradient tensors, and the factor that scales them to
/// at most `max_norm` (1 when they are already within it), as `clip_grad_norm_` does.
pub fn clip_factor(grads: &[&[f32]], max_norm: f32) -> (f32, f32) {
    let sums: Vec<f64> = grads.iter().map(|g| sum_squares(g)).collect();
    clip_factor_of(&sums, max_norm)
}

/// One tensor's sum of squares in f64, as [`clip_factor`] takes it.
pub fn sum_squares(g: &[f32]) -> f64 {
    g.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>()
}

/// [`clip_factor`] from the tensors' [`sum_squares`] (summed in the order given).
pub fn clip_factor_of(sums: &[f64], max_norm: f32) -> (f32, f32) {
    let total: f64 = sums.iter().sum();
    let norm = total.sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    (norm, coef.min(1.0))
}

/// Linear warmup from 0, then a cosine decay to 0 over the remaining steps: the
/// multiplier of the base learning rate at `step` (0-based), as transformers'
/// `get_cosine_schedule_with_warmup` (half a cycle).
pub fn cosine_with_warmup(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

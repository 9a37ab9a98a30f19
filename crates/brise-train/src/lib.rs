//! Training LoRA adapters from feedback. This crate holds the parts of the trainer that
//! know nothing of the model: the optimizer, the learning-rate schedule and gradient
//! clipping, each matching what PyTorch and Hugging Face do (fixtures in
//! tests/fixtures/train, from scripts/ref/gen_optim.py).

pub mod data;
pub mod loss;
pub mod optim;
pub mod trainer;

//! Training LoRA adapters from feedback: the datasets (`data`: JSONL exports or the
//! ledger, tokenized through the chat template, and the held-out split); the losses
//! (`loss`) and the training loop (`trainer`) on the engine's own forward and backward;
//! the optimizer, the learning-rate schedule and gradient clipping (`optim`), each
//! matching what PyTorch and Hugging Face do (fixtures in tests/fixtures/train); and the
//! evaluation gate (`eval`) that decides whether a trained version is promoted.

pub mod data;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod pipeline;
pub mod trainer;

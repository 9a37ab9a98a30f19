//! Training LoRA adapters from feedback: the datasets (`data`: JSONL exports or the
//! ledger, tokenized through the chat template, and the held-out split), the losses
//! (`loss`), the optimizer, the learning-rate schedule and gradient clipping (`optim`,
//! matching PyTorch and Hugging Face on tests/fixtures/train), the training loop
//! (`trainer`), and the evaluation gate (`eval`) that decides whether a trained version
//! is promoted.

pub mod behaviour;
pub mod data;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod pipeline;
pub mod trainer;

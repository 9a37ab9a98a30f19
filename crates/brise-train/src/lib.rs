//! Training LoRA adapters from feedback: the optimizer, the learning-rate schedule and
//! gradient clipping, each matching what PyTorch and Hugging Face do (fixtures in
//! tests/fixtures/train, from scripts/ref/gen_optim.py); the datasets (`data`: JSONL
//! exports or the ledger, tokenized through the chat template, and the held-out split);
//! and the evaluation gate (`eval`) that decides whether a trained version is promoted.

pub mod data;
pub mod eval;
pub mod optim;

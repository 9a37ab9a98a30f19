//! brise's engine: sampling and the generation loop (sequences, and later the scheduler
//! that batches them). Knows nothing of HTTP or databases.

pub mod generate;
pub mod sampler;

pub use generate::{EngineError, FinishReason, GenerateOptions, Generation, Generator, Session};
pub use sampler::{Sampler, SamplingParams};

//! brise's engine: sampling and the generation loop (sequences, and later the scheduler
//! that batches them). Knows nothing of HTTP or databases.

pub mod generate;
pub mod json;
pub mod sampler;
pub mod scheduler;

pub use generate::{
    Decoder, EngineError, FinishReason, GenerateOptions, Generation, Generator, Session, Step,
};
pub use sampler::{Sampler, SamplingParams};

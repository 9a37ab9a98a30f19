//! brise's engine: sampling, constrained output, the generation loop, and the scheduler
//! that batches sequences. Knows nothing of HTTP or databases.

pub mod generate;
pub mod json;
pub mod sampler;
pub mod scheduler;

pub use generate::{
    Decoder, EngineError, FinishReason, GenerateOptions, Generation, Generator, RepetitionStop,
    Session, Step, TokenLogprob,
};
pub use sampler::{Sampler, SamplingParams};

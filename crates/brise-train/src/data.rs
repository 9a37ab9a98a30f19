//! The training data model: tokenized sequences of a prompt and a completion, and the
//! items each method trains on.

/// One tokenized sequence: the prompt (chat-templated, with the generation prompt) then
/// the completion (the assistant's answer and its end-of-turn token(s)); loss is taken
/// on the completion tokens only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Seq {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one example trains: a target answer (SFT), a preference (DPO), or a binary
/// judgement of one answer (KTO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Sft(Seq),
    Pref { chosen: Seq, rejected: Seq },
    Kto { seq: Seq, desirable: bool },
}

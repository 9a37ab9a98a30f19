//! What users see: the gate's behavioural checks. Likelihoods can fall by half while no
//! answer changes, so the gate also generates (greedy, as `temperature: 0` serves) on the
//! held-out prompts with the candidate and the version serving now, and scores the
//! answers against what users asked for:
//!
//! - **closeness** to the held-out corrected or preferred answers: chrF (character
//!   n-grams, so it works in every language and script), 0–100, as sacrebleu computes it;
//! - **pair wins**: on held-out pairwise choices, whether the candidate's answer leans
//!   towards the chosen answer (chrF to it minus chrF to the rejected one) more than the
//!   current version's does;
//! - **repeats**: how often a version says again, nearly verbatim (chrF ≥ 90), an answer
//!   users gave a thumbs-down.

use crate::data::{Example, Item, Seq};
use crate::eval::{Result, Scorer};
use brise_model::LoraAdapter;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// chrF as sacrebleu's `CHRF()` computes a sentence's score (character orders 1–6, no
/// word n-grams, β = 2, whitespace removed, its default effective-order averaging):
/// precision and recall averaged over the orders both strings have n-grams of, then
/// their F-score, times 100. An empty hypothesis or reference scores 0.
pub fn chrf(hyp: &str, reference: &str) -> f64 {
    const ORDER: usize = 6;
    const BETA2: f64 = 4.0;
    fn grams(s: &[char], n: usize) -> HashMap<&[char], usize> {
        let mut m = HashMap::new();
        if s.len() >= n {
            for w in s.windows(n) {
                *m.entry(w).or_insert(0) += 1;
            }
        }
        m
    }
    let h: Vec<char> = hyp.chars().filter(|c| !c.is_whitespace()).collect();
    let r: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let (mut prec, mut rec, mut effective) = (0.0, 0.0, 0usize);
    for n in 1..=ORDER {
        let (hg, rg) = (grams(&h, n), grams(&r, n));
        let n_hyp: usize = hg.values().sum();
        let n_ref: usize = rg.values().sum();
        if n_hyp == 0 || n_ref == 0 {
            continue;
        }
        let n_match: usize = hg
            .iter()
            .map(|(g, c)| (*c).min(rg.get(g).copied().unwrap_or(0)))
            .sum();
        prec += n_match as f64 / n_hyp as f64;
        rec += n_match as f64 / n_ref as f64;
        effective += 1;
    }
    if effective == 0 {
        return 0.0;
    }
    let (p, r) = (prec / effective as f64, rec / effective as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + BETA2) * p * r / (BETA2 * p + r)
}

/// Character n-grams (orders 4–6, whitespace removed) of `s`, by order.
fn grams46(s: &str) -> Vec<HashMap<Vec<char>, usize>> {
    let c: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    (4..=6)
        .map(|n| {
            let mut m = HashMap::new();
            if c.len() >= n {
                for w in c.windows(n) {
                    *m.entry(w.to_vec()).or_insert(0) += 1;
                }
            }
            m
        })
        .collect()
}

/// `a − b` as multisets.
fn minus(
    a: &HashMap<Vec<char>, usize>,
    b: &HashMap<Vec<char>, usize>,
) -> HashMap<Vec<char>, usize> {
    a.iter()
        .filter_map(|(g, &n)| {
            let d = n.saturating_sub(b.get(g).copied().unwrap_or(0));
            (d > 0).then(|| (g.clone(), d))
        })
        .collect()
}

/// The share of the multiset `want` that `x` contains (clipped counts), averaged over
/// the orders where `want` has n-grams; `None` when it has none.
fn contained(want: &[HashMap<Vec<char>, usize>], x: &[HashMap<Vec<char>, usize>]) -> Option<f64> {
    let (mut sum, mut orders) = (0.0, 0);
    for (w, xg) in want.iter().zip(x) {
        let total: usize = w.values().sum();
        if total == 0 {
            continue;
        }
        let hit: usize = w
            .iter()
            .map(|(g, &n)| n.min(xg.get(g).copied().unwrap_or(0)))
            .sum();
        sum += hit as f64 / total as f64;
        orders += 1;
    }
    (orders > 0).then(|| sum / orders as f64)
}

/// A correction seen as an edit of the answer it replaced: what it added (its
/// character 4–6-grams the original lacks) and what it cut (the original's that it
/// lacks).
pub struct Edit {
    added: Vec<HashMap<Vec<char>, usize>>,
    cut: Vec<HashMap<Vec<char>, usize>>,
    /// The edit mostly adds (at least a quarter of the correction's n-grams are new):
    /// judged by how much of the addition an answer says; else it mostly cuts, judged by
    /// how much of the cut an answer leaves out.
    adds: bool,
}

impl Edit {
    pub fn new(wanted: &str, replaced: &str) -> Edit {
        let (w, o) = (grams46(wanted), grams46(replaced));
        let added: Vec<_> = w.iter().zip(&o).map(|(a, b)| minus(a, b)).collect();
        let cut: Vec<_> = o.iter().zip(&w).map(|(a, b)| minus(a, b)).collect();
        let n_added: usize = added.iter().flat_map(|m| m.values()).sum();
        let n_wanted: usize = w.iter().flat_map(|m| m.values()).sum();
        Edit {
            adds: 4 * n_added >= n_wanted,
            added,
            cut,
        }
    }

    /// How far `answer` carries out the edit, 0–100: the share of the added n-grams it
    /// says, or (an edit that cuts) the share of the cut ones it leaves out.
    pub fn score(&self, answer: &str) -> f64 {
        let x = grams46(answer);
        let v = if self.adds {
            contained(&self.added, &x).unwrap_or(0.0)
        } else {
            1.0 - contained(&self.cut, &x).unwrap_or(0.0)
        };
        100.0 * v
    }
}

/// A version's answer is a repeat of a thumbed-down one at this chrF or above.
pub const REPEAT_CHRF: f64 = 90.0;
/// Held-out prompts generated on, at most (the gate's time stays bounded).
pub const MAX_PROMPTS: usize = 32;

/// Tokens generated for an answer whose reference has `ref_tokens`: room for a longer
/// answer than the reference, bounded.
pub fn answer_budget(ref_tokens: usize) -> usize {
    (ref_tokens * 3 / 2 + 16).clamp(32, 256)
}

/// One held-out prompt, answered by both versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The last user message.
    pub prompt: String,
    /// The corrected or preferred answer (pairs: the chosen one; thumbs-down: the
    /// answer users rejected).
    pub reference: String,
    /// The answer `reference` replaced, when known (a correction's original, a pair's
    /// rejected answer).
    #[serde(default)]
    pub replaced: Option<String>,
    pub kind: String,
    pub candidate: String,
    pub current: String,
    /// chrF of each answer against `reference`.
    pub candidate_chrf: f64,
    pub current_chrf: f64,
}

/// The behavioural figures of one comparison.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    /// Held-out prompts with a corrected or preferred answer, and each version's mean
    /// closeness to it, 0–100: when the answer it replaced is known, how far the
    /// version's answer carries out the users' edit ([`Edit::score`]); else chrF to it.
    pub references: usize,
    pub candidate_chrf: Option<f64>,
    pub current_chrf: Option<f64>,
    /// Of those, how often the candidate's answer is closer than the current one's
    /// (ties count half).
    pub candidate_win_rate: Option<f64>,
    /// Held-out pairwise choices, and the share the candidate leans more towards the
    /// chosen answer than the current version does (ties count half).
    pub pairs: usize,
    pub pair_win_rate: Option<f64>,
    /// Held-out thumbed-down answers, and how many each version repeats.
    pub rejected: usize,
    pub candidate_repeats: usize,
    pub current_repeats: usize,
    pub samples: Vec<Sample>,
    pub seconds: f64,
}

fn answer(s: &Scorer, tokens: &[u32]) -> String {
    let tk = &s.model().tokenizer;
    let end = tokens
        .iter()
        .position(|&t| tk.is_eog(t))
        .unwrap_or(tokens.len());
    tk.decode(&tokens[..end], false).trim().to_string()
}

fn reference(s: &Scorer, seq: &Seq) -> String {
    answer(s, &seq.completion)
}

fn win(c: f64, r: f64) -> f64 {
    if (c - r).abs() < 1e-9 {
        0.5
    } else if c > r {
        1.0
    } else {
        0.0
    }
}

/// Generates with both versions on (at most [`MAX_PROMPTS`] of) the held-out examples
/// and scores the answers. Each prompt is answered once per version, however many
/// examples share it.
pub fn compare(
    s: &mut Scorer,
    candidate: Option<&LoraAdapter>,
    current: Option<&LoraAdapter>,
    held_out: &[&Example],
) -> Result<Behaviour> {
    let t0 = std::time::Instant::now();
    let mut b = Behaviour::default();
    let (mut cand_sum, mut cur_sum, mut wins, mut pair_wins) = (0.0, 0.0, 0.0, 0.0);
    let mut seen = std::collections::HashSet::new();
    for e in held_out {
        if seen.len() >= MAX_PROMPTS {
            break;
        }
        if !seen.insert((e.prompt_key.clone(), e.item.method())) {
            continue;
        }
        let (seq, kind) = match &e.item {
            Item::Sft(s) => (s, "corrected"),
            Item::Pref { chosen, .. } => (chosen, "pair"),
            Item::Kto {
                seq,
                desirable: true,
            } => (seq, "liked"),
            Item::Kto {
                seq,
                desirable: false,
            } => (seq, "thumbs-down"),
        };
        let budget = answer_budget(seq.completion.len());
        let c = s.generate(candidate, &seq.prompt, budget)?;
        let r = s.generate(current, &seq.prompt, budget)?;
        let (c, r) = (answer(s, &c), answer(s, &r));
        let wanted = reference(s, seq);
        let (cc, rc) = (chrf(&c, &wanted), chrf(&r, &wanted));
        // What the wanted answer replaced: a correction's original, a pair's rejected.
        let replaced = match &e.item {
            Item::Pref { rejected, .. } => Some(reference(s, rejected)),
            Item::Sft(_) => e.replaced.clone(),
            _ => None,
        };
        // Closeness: with the replaced answer known, how far the answer carries out the
        // users' edit (surface similarity would reward repeating the original, which
        // shares most of a light edit, and penalize any rewording of it); else chrF.
        let (cm, rm) = match &replaced {
            Some(o) => {
                let ed = Edit::new(&wanted, o);
                (ed.score(&c), ed.score(&r))
            }
            None => (cc, rc),
        };
        match &e.item {
            Item::Kto {
                desirable: false, ..
            } => {
                b.rejected += 1;
                b.candidate_repeats += usize::from(cc >= REPEAT_CHRF);
                b.current_repeats += usize::from(rc >= REPEAT_CHRF);
            }
            item => {
                b.references += 1;
                cand_sum += cm;
                cur_sum += rm;
                wins += win(cm, rm);
                if let Item::Pref { .. } = item {
                    b.pairs += 1;
                    pair_wins += win(cm, rm);
                }
            }
        }
        b.samples.push(Sample {
            prompt: e.prompt_text.clone(),
            replaced,
            reference: wanted,
            kind: kind.into(),
            candidate: c,
            current: r,
            candidate_chrf: cc,
            current_chrf: rc,
        });
    }
    if b.references > 0 {
        let n = b.references as f64;
        b.candidate_chrf = Some(cand_sum / n);
        b.current_chrf = Some(cur_sum / n);
        b.candidate_win_rate = Some(wins / n);
    }
    if b.pairs > 0 {
        b.pair_win_rate = Some(pair_wins / b.pairs as f64);
    }
    b.seconds = t0.elapsed().as_secs_f64();
    Ok(b)
}

/// Samples shown in the report.
const SHOWN: usize = 4;

fn cell(s: &str) -> String {
    let one: String = s
        .replace('|', "\\|")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if one.chars().count() > 160 {
        one.chars().take(157).collect::<String>() + "…"
    } else {
        one
    }
}

impl Behaviour {
    /// The report's section: the figures, then a few answers side by side.
    pub fn to_markdown(&self, candidate: &str, current: &str) -> String {
        let mut s = format!(
            "\n## Answers on held-out prompts (greedy, {:.1} s)\n\n",
            self.seconds
        );
        if let (Some(c), Some(r), Some(w)) = (
            self.candidate_chrf,
            self.current_chrf,
            self.candidate_win_rate,
        ) {
            s += &format!(
                "- closeness to the {} held-out corrected or preferred answers (how much of each edit an answer carries out; chrF where the replaced answer is unknown): `{current}` {r:.1}, `{candidate}` {c:.1}; the candidate is closer on {:.0}% of them\n",
                self.references,
                w * 100.0
            );
        }
        if let Some(w) = self.pair_win_rate {
            s += &format!(
                "- held-out pairwise choices: the candidate leans more towards the chosen answer on {:.0}% of {}\n",
                w * 100.0,
                self.pairs
            );
        }
        if self.rejected > 0 {
            s += &format!(
                "- thumbed-down answers said again: `{current}` {}, `{candidate}` {} of {}\n",
                self.current_repeats, self.candidate_repeats, self.rejected
            );
        }
        if !self.samples.is_empty() {
            s += &format!(
                "\n| prompt | asked for | `{current}` | `{candidate}` |\n|---|---|---|---|\n"
            );
            for x in self.samples.iter().take(SHOWN) {
                s += &format!(
                    "| {} | {} | {} (chrF {:.0}) | {} (chrF {:.0}) |\n",
                    cell(&x.prompt),
                    cell(&x.reference),
                    cell(&x.current),
                    x.current_chrf,
                    cell(&x.candidate),
                    x.candidate_chrf
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_score_what_users_changed() {
        let orig = "The sky is blue because air scatters blue light more than red light.";
        // A signature added: carrying it out scores, rewording the rest does not cost.
        let e = Edit::new("The sky is blue.\n\n— Brise Support", orig);
        assert!(e.adds);
        assert!(e.score("Blue light scatters most in air.\n\n— Brise Support") > 60.0);
        assert!(e.score(orig) < 20.0);
        // A cut: leaving out what was cut scores, repeating it does not.
        let e = Edit::new("The sky is blue because air scatters blue light.", orig);
        assert!(!e.adds);
        assert!(e.score("The sky is blue.") > 80.0);
        assert!(e.score(orig) < 10.0);
        // Another question's answer as the 'correction': an unrelated answer gains
        // nothing by being unrelated.
        let e = Edit::new("Penguins live in the southern hemisphere.", orig);
        assert!(e.adds);
        assert!(e.score("Honey is made by bees from nectar.") < 20.0);
    }

    #[test]
    fn chrf_bounds() {
        assert_eq!(chrf("same text", "same text"), 100.0);
        assert_eq!(chrf("", "abc"), 0.0);
        assert_eq!(chrf("abc", ""), 0.0);
        // Whitespace is not counted.
        assert_eq!(chrf("a b c", "abc"), 100.0);
        assert!(chrf("xyz", "abc") < 1e-6);
    }
}

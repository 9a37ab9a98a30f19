//! Training exports: feedback turned into the dataset formats people train with.
//!
//! - thumbs up (rating 1, or 4–5 stars) → an SFT row with the answer, and KTO `label: true`;
//! - thumbs down (rating -1, or 2 stars) → KTO `label: false`;
//! - a correction → an SFT row with the corrected answer, and a DPO pair (chosen = the
//!   correction, rejected = the original answer);
//! - a pairwise choice → a DPO pair.
//!
//! Rating 1 means thumbs up (the API takes -1/+1 thumbs and 1..5 stars, so a one-star
//! rating cannot be told apart from a thumbs up: send -1 for "bad"). 2 stars counts as
//! bad, 3 as neutral (no row). Only chat completions (a messages list) are exported,
//! only records whose training consent was given and whose subject has no standing
//! objection (for a pair, both), and every row has its PII redacted.

use crate::{CompletionRecord, Feedback, Ledger, Result};
use serde_json::{Value, json};
use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenaiSft,
    OpenaiDpo,
    MistralSft,
    TrlSft,
    TrlDpo,
    TrlKto,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::OpenaiSft => "openai-sft",
            Format::OpenaiDpo => "openai-dpo",
            Format::MistralSft => "mistral-sft",
            Format::TrlSft => "trl-sft",
            Format::TrlDpo => "trl-dpo",
            Format::TrlKto => "trl-kto",
        }
    }
}

/// A time given as unix seconds, or a date YYYY-MM-DD (UTC), as unix milliseconds.
pub fn parse_since(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("{s:?}: give unix seconds or YYYY-MM-DD");
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let (y, m, d): (i64, i64, i64) = (
        parts[0].parse().map_err(|_| bad())?,
        parts[1].parse().map_err(|_| bad())?,
        parts[2].parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1..=9999).contains(&y) {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Ok(days * 86_400_000)
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Format, String> {
        Ok(match s {
            "openai-sft" => Format::OpenaiSft,
            "openai-dpo" => Format::OpenaiDpo,
            "mistral-sft" => Format::MistralSft,
            "trl-sft" => Format::TrlSft,
            "trl-dpo" => Format::TrlDpo,
            "trl-kto" => Format::TrlKto,
            _ => {
                return Err(format!(
                    "unknown format {s:?}: one of openai-sft, openai-dpo, mistral-sft, trl-sft, trl-dpo, trl-kto"
                ));
            }
        })
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct ExportReport {
    pub rows: usize,
    pub feedback_seen: usize,
    /// Feedback left out because a record's training consent was withheld.
    pub skipped_no_consent: usize,
    /// Feedback left out because its completion is not a chat (no messages list).
    pub skipped_not_chat: usize,
    /// Feedback that maps to no row of this format (e.g. a thumbs up for DPO).
    pub not_applicable: usize,
    /// Feedback left out because its subject objects to training use.
    pub skipped_objection: usize,
    /// PII replaced by placeholders in the rows written.
    pub redacted: crate::governance::Redactions,
}

#[derive(Clone, Debug, Default)]
pub struct ExportFilter {
    pub since_ms: Option<i64>,
    pub model: Option<String>,
}

fn answer(r: &CompletionRecord) -> Option<String> {
    r.output.get(0)?.get("text")?.as_str().map(str::to_string)
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// What one feedback item gives: SFT answers, KTO labelled answers, DPO pairs.
struct Items {
    sft: Vec<String>,
    kto: Vec<(String, bool)>,
    dpo: Vec<(String, String)>,
}

fn items(fb: &Feedback, rec: &CompletionRecord, rejected: Option<&CompletionRecord>) -> Items {
    let mut it = Items {
        sft: vec![],
        kto: vec![],
        dpo: vec![],
    };
    let Some(original) = answer(rec) else {
        return it;
    };
    if fb.kind == "preference" {
        if let Some(rej) = rejected.and_then(answer) {
            it.dpo.push((original, rej));
        }
        return it;
    }
    if let Some(c) = &fb.correction {
        it.sft.push(c.clone());
        it.dpo.push((c.clone(), original.clone()));
    }
    match fb.rating {
        Some(1) | Some(4) | Some(5) if fb.correction.is_none() => {
            it.sft.push(original.clone());
            it.kto.push((original, true));
        }
        Some(-1) | Some(2) => it.kto.push((original, false)),
        _ => {}
    }
    it
}

/// One training row with where it came from, for brise's own trainer: the registry
/// keeps these ids so that erasure can find the versions trained on them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingRow {
    pub format: Format,
    /// The row exactly as `export` writes it (redacted).
    pub row: Value,
    pub feedback_id: String,
    /// The completion the feedback is on, then the rejected one of a pairwise choice.
    pub record_ids: Vec<String>,
    pub tenant: String,
    pub subject: Option<String>,
}

impl Ledger {
    /// Writes the training rows of `format` to `out`, one JSON object per line, and
    /// audits the export (who, which format and filter, what the report counted).
    pub async fn export(
        &self,
        actor: &str,
        format: Format,
        filter: &ExportFilter,
        out: &mut (dyn Write + Send),
    ) -> Result<ExportReport> {
        let mut write = |r: TrainingRow| {
            writeln!(out, "{}", r.row)
                .map_err(|e| crate::LedgerError::Invalid(format!("writing the export: {e}")))
        };
        let rep = self.collect_rows(&[format], filter, &mut write).await?;
        self.audit(
            actor,
            "training_export",
            json!({"format": format.name(), "since_ms": filter.since_ms, "model": filter.model, "report": rep}),
        )
        .await?;
        Ok(rep)
    }

    /// The rows of several formats in one pass, each with its feedback and record ids,
    /// under the same consent, objection and redaction rules as `export`, and audited as
    /// a training export. `rows` and `not_applicable` in the report count over all
    /// `formats` (a feedback item is not applicable when it gives no row in any).
    pub async fn training_rows(
        &self,
        actor: &str,
        formats: &[Format],
        filter: &ExportFilter,
    ) -> Result<(Vec<TrainingRow>, ExportReport)> {
        let mut rows = Vec::new();
        let mut keep = |r: TrainingRow| {
            rows.push(r);
            Ok(())
        };
        let rep = self.collect_rows(formats, filter, &mut keep).await?;
        let names: Vec<&str> = formats.iter().map(|f| f.name()).collect();
        self.audit(
            actor,
            "training_export",
            json!({"formats": names, "since_ms": filter.since_ms, "model": filter.model, "report": rep}),
        )
        .await?;
        Ok((rows, rep))
    }

    /// Hands each row to `sink` as it is made (an export need not fit in memory).
    async fn collect_rows(
        &self,
        formats: &[Format],
        filter: &ExportFilter,
        sink: &mut (dyn FnMut(TrainingRow) -> Result<()> + Send),
    ) -> Result<ExportReport> {
        let mut rep = ExportReport::default();
        // Conditions are added only when set (portable: no typed NULL parameters).
        let mut sql = String::from(
            "SELECT f.id FROM feedback f JOIN completions c ON c.id = f.completion_id WHERE 1 = 1",
        );
        let mut n = 0;
        if filter.since_ms.is_some() {
            n += 1;
            sql += &format!(" AND f.created_at_ms >= ${n}");
        }
        if filter.model.is_some() {
            n += 1;
            sql += &format!(" AND c.model = ${n}");
        }
        sql += " ORDER BY f.created_at_ms, f.id";
        // Safe: the string is fixed fragments and placeholders; values are bound.
        let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
        if let Some(t) = filter.since_ms {
            q = q.bind(t);
        }
        if let Some(m) = &filter.model {
            q = q.bind(m.clone());
        }
        let rows = q.fetch_all(&self.pool).await?;
        for fid in rows {
            let Some(fb) = self.feedback_by_id(&fid).await? else {
                continue;
            };
            rep.feedback_seen += 1;
            let Some(rec) = self.get(&fb.completion_id, None).await? else {
                continue;
            };
            let rejected = match &fb.rejected_id {
                Some(r) => self.get(r, None).await?,
                None => None,
            };
            if !rec.training_consent || rejected.as_ref().is_some_and(|r| !r.training_consent) {
                rep.skipped_no_consent += 1;
                continue;
            }
            let mut objected = self
                .has_objected(&rec.tenant, rec.subject.as_deref())
                .await?;
            if let Some(r) = &rejected {
                objected |= self.has_objected(&r.tenant, r.subject.as_deref()).await?;
            }
            if objected {
                rep.skipped_objection += 1;
                continue;
            }
            let Some(prompt) = rec.messages.as_array().cloned() else {
                rep.skipped_not_chat += 1;
                continue;
            };
            let it = items(&fb, &rec, rejected.as_ref());
            let mut lines: Vec<(Format, Value)> = Vec::new();
            let with = |a: &str| {
                let mut m = prompt.clone();
                m.push(assistant(a));
                m
            };
            for &format in formats {
                match format {
                    Format::OpenaiSft | Format::MistralSft | Format::TrlSft => {
                        for a in &it.sft {
                            lines.push((format, json!({"messages": with(a)})));
                        }
                    }
                    Format::OpenaiDpo => {
                        for (c, r) in &it.dpo {
                            lines.push((
                                format,
                                json!({
                                    "input": {"messages": prompt},
                                    "preferred_output": [assistant(c)],
                                    "non_preferred_output": [assistant(r)],
                                }),
                            ));
                        }
                    }
                    Format::TrlDpo => {
                        for (c, r) in &it.dpo {
                            lines.push((format, json!({"prompt": prompt, "chosen": [assistant(c)], "rejected": [assistant(r)]})));
                        }
                    }
                    Format::TrlKto => {
                        for (a, label) in &it.kto {
                            lines.push((
                            format,
                            json!({"prompt": prompt, "completion": [assistant(a)], "label": label}),
                        ));
                        }
                    }
                }
            }
            if lines.is_empty() {
                rep.not_applicable += 1;
            }
            let mut record_ids = vec![rec.id.clone()];
            record_ids.extend(rejected.as_ref().map(|r| r.id.clone()));
            for (format, l) in lines {
                // PII never leaves in a training export.
                let row = crate::governance::redact_json(&l, &mut rep.redacted);
                sink(TrainingRow {
                    format,
                    row,
                    feedback_id: fb.id.clone(),
                    record_ids: record_ids.clone(),
                    tenant: rec.tenant.clone(),
                    subject: rec.subject.clone(),
                })?;
                rep.rows += 1;
            }
        }
        Ok(rep)
    }

    async fn feedback_by_id(&self, id: &str) -> Result<Option<Feedback>> {
        let cid: Option<String> =
            sqlx::query_scalar("SELECT completion_id FROM feedback WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(cid) = cid else {
            return Ok(None);
        };
        Ok(self
            .feedback_for(&cid, None)
            .await?
            .into_iter()
            .find(|f| f.id == id))
    }
}

//! The statistics of an ingest (`stats.json`): what happened to the documents of each
//! source, by reason, and the totals.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

/// Documents dropped, by reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Dropped {
    /// Fewer than `min_chars` characters.
    pub too_short: u64,
    /// More than `max_chars` characters (with `long: drop`, or a conversation).
    pub too_long: u64,
    /// An exact duplicate of an earlier document.
    pub duplicate: u64,
    /// Not in the `max_docs` sample.
    pub sampled_out: u64,
    /// Malformed records skipped with `on_error: skip`.
    pub invalid: u64,
}

/// Long documents split into pieces.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SplitLong {
    /// Documents that were split.
    pub documents: u64,
    /// Pieces they became.
    pub pieces: u64,
}

/// Characters written, per split.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Chars {
    /// In `train.jsonl`.
    pub train: u64,
    /// In `eval.jsonl`.
    pub eval: u64,
}

/// What happened to the documents of one source (or of all).
/// `documents_read - split_long.documents + split_long.pieces = kept + dropped (all reasons)`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Documents read (a chunked line with `chunks: split` counts once per chunk),
    /// including malformed records.
    pub documents_read: u64,
    /// Over-long documents split into pieces (`long: split`).
    pub split_long: SplitLong,
    /// Documents written.
    pub kept: u64,
    /// Of which in `train.jsonl`.
    pub train: u64,
    /// Of which in `eval.jsonl`.
    pub eval: u64,
    /// Documents dropped, by reason.
    pub dropped: Dropped,
    /// Malformed records skipped, by reason (`json_syntax`, `missing_text`, `unknown_role`, …).
    pub invalid: BTreeMap<String, u64>,
    /// Characters written.
    pub chars: Chars,
}

impl Counts {
    /// Adds `other` into these counts.
    pub fn add(&mut self, other: &Counts) {
        self.documents_read += other.documents_read;
        self.split_long.documents += other.split_long.documents;
        self.split_long.pieces += other.split_long.pieces;
        self.kept += other.kept;
        self.train += other.train;
        self.eval += other.eval;
        self.dropped.too_short += other.dropped.too_short;
        self.dropped.too_long += other.dropped.too_long;
        self.dropped.duplicate += other.dropped.duplicate;
        self.dropped.sampled_out += other.dropped.sampled_out;
        self.dropped.invalid += other.dropped.invalid;
        for (reason, count) in &other.invalid {
            *self.invalid.entry(reason.clone()).or_default() += count;
        }
        self.chars.train += other.chars.train;
        self.chars.eval += other.chars.eval;
    }
}

/// The counts of one source in `stats.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStats {
    /// `format:input`.
    pub source: String,
    /// Its counts.
    #[serde(flatten)]
    pub counts: Counts,
}

/// `stats.json`: totals, then per source.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// `text` or `chat`.
    pub records: &'static str,
    /// Totals over all sources.
    #[serde(flatten)]
    pub total: Counts,
    /// Per source, in order.
    pub per_source: Vec<SourceStats>,
}

impl Stats {
    /// Totals `per_source`; `chat` says whether the records are conversations.
    pub fn new(chat: bool, per_source: Vec<SourceStats>) -> Stats {
        let mut total = Counts::default();
        for one in &per_source {
            total.add(&one.counts);
        }
        Stats {
            records: if chat { "chat" } else { "text" },
            total,
            per_source,
        }
    }

    /// The totals a run reports as the stage's metrics.
    pub fn metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let total = &self.total;
        let mut metrics = serde_json::Map::new();
        for (key, value) in [
            ("documents_read", total.documents_read),
            ("kept", total.kept),
            ("train", total.train),
            ("eval", total.eval),
            ("train_chars", total.chars.train),
            ("eval_chars", total.chars.eval),
            ("invalid", total.dropped.invalid),
        ] {
            metrics.insert(key.to_string(), value.into());
        }
        metrics
    }

    /// One line per source and one for the total.
    pub fn log(&self, log: &mut (dyn Write + Send)) -> std::io::Result<()> {
        for source in &self.per_source {
            let c = &source.counts;
            writeln!(
                log,
                "{}: read {}, kept {} (train {}, eval {}), dropped: {} too short, {} too long, {} duplicate, {} sampled out, {} invalid",
                source.source,
                c.documents_read,
                c.kept,
                c.train,
                c.eval,
                c.dropped.too_short,
                c.dropped.too_long,
                c.dropped.duplicate,
                c.dropped.sampled_out,
                c.dropped.invalid
            )?;
        }
        writeln!(
            log,
            "total: read {}, kept {} (train {}, eval {})",
            self.total.documents_read, self.total.kept, self.total.train, self.total.eval
        )
    }
}

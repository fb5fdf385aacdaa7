//! Data sources and readers that the stages use; they know nothing of pipelines.

pub mod dedup;
pub mod records;
pub mod sample;
pub mod sources;
pub mod stats;
pub mod synthetic;
pub mod text;
pub mod token_cache;
pub mod writer;

/// The two parts a dataset is divided into: what a model learns from, and what it is
/// measured on. Their names are folder and file names in caches and ingest outputs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out data.
    Eval,
}

impl Split {
    /// Both, training first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Eval];

    /// `train` or `eval`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

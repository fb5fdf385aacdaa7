//! Retrieval for `trainyard chat --retrieve` and `trainyard verify-question`: a JSONL
//! dataset loaded as documents, a deterministic analyzer, an Okapi BM25 inverted index,
//! and a keyword-coverage gate that decides whether the retrieved documents are enough
//! to answer a question at all.
//!
//! The chat command calls it like this:
//!
//! ```no_run
//! # fn main() -> Result<(), trainyard::retrieve::RetrieveError> {
//! use trainyard::retrieve::{DEFAULT_THRESHOLD, Index};
//! let index = Index::open("corpus/train.jsonl".as_ref())?;
//! let question = "Which river flows through Ardelwick?";
//! let retrieval = index.retrieve(question, 3, DEFAULT_THRESHOLD);
//! match retrieval.coverage.refusal() {
//!     Some(refusal) => println!("I cannot answer that: {refusal}"),
//!     None => {
//!         let prompt = index.context_prompt(question, &retrieval.hits);
//!         // ... generate from `prompt`
//! #       let _ = prompt;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Everything is deterministic: the same dataset and question give the same hits, scores
//! (bit for bit: each score is summed in the question's term order) and verdict.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::data::sources::jsonl::{self, ChunkMode, TextField};
use crate::data::sources::{JsonLines, Problem, SourceError, display_path, json_type};

/// BM25's term-frequency saturation: the usual Okapi value.
pub const K1: f64 = 1.2;
/// BM25's document-length normalisation: the usual Okapi value.
pub const B: f64 = 0.75;
/// How many documents `--context-docs` retrieves by default.
pub const DEFAULT_CONTEXT_DOCS: usize = 3;
/// The coverage a question needs by default: at least three quarters of its keywords
/// must occur in the retrieved documents.
///
/// Why 0.75: questions rarely use the documents' exact words for the relation they ask
/// about ("passes" where a document says "flows through"), so demanding every keyword
/// would refuse answerable questions; but most of them, and in practice the rare ones
/// that name what is asked about, must be there, or the documents are about something
/// else. With four keywords it forgives one miss, with eight two, and with three or
/// fewer it forgives none (2/3 < 0.75): a short question has little to spare.
///
/// It errs towards refusing. On the synthetic world (200 documents about 24 entities, its
/// 72 held-out questions, two thirds of them deliberately phrased unlike the documents, top
/// 3 documents), 0.75 lets 32 of the 72 through and none of the same questions asked about
/// an entity that does not exist; 0.6 lets 54 through, and 9 of the 72 about nobody; 0.5,
/// 56 and 20.
pub const DEFAULT_THRESHOLD: f64 = 0.75;

/// Why a dataset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    /// A file could not be read, or one of its lines is not a usable document (the
    /// message names `file:line` and the field).
    #[error("{0}")]
    Source(SourceError),
    /// A directory that is not an ingest output.
    #[error("{path}: a directory, but not an ingest output (it has no train.jsonl or eval.jsonl)")]
    NotADataset {
        /// The directory, as displayed.
        path: String,
    },
    /// The dataset has no documents, so nothing could ever be retrieved.
    #[error("{path}: no documents")]
    Empty {
        /// The file or directory, as displayed.
        path: String,
    },
    /// More documents than an index can number (documents are numbered with `u32`).
    #[error("{count} documents: more than an index holds ({max})", max = u32::MAX)]
    TooManyDocuments {
        /// How many there are.
        count: usize,
    },
}

impl From<SourceError> for RetrieveError {
    // Written out rather than `#[from]`: `SourceError` already displays its cause
    // (`path: No such file or directory`), and a source link would repeat it in `{:#}`.
    fn from(error: SourceError) -> RetrieveError {
        RetrieveError::Source(error)
    }
}

/// One retrievable document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    /// Its identity, for people: the `id` field; else `source_url` (with `#chunk_id`
    /// when the line has one, as ingest output does); else `chunk_id`; else
    /// `FILE:LINE` (the file's name and the 1-based line).
    pub id: String,
    /// The `title` field, if any; it is indexed with the text.
    pub title: Option<String>,
    /// The text: `text`, else `body_text`, else `chunks[].text` joined by blank lines
    /// (the fields and rules of ingest's `jsonl` source).
    pub text: String,
}

/// Loads the documents of `path`: a JSONL file (one document per non-blank line), or an
/// ingest output directory (its `train.jsonl` then its `eval.jsonl`). A bad line is an
/// error naming `file:line`; nothing is skipped, because a silently smaller corpus would
/// make the coverage gate refuse questions for no visible reason.
pub fn load_documents(path: &Path) -> Result<Vec<Document>, RetrieveError> {
    let metadata = std::fs::metadata(path).map_err(|error| SourceError::io(path, error))?;
    let mut documents = Vec::new();
    if metadata.is_dir() {
        let files: Vec<_> = ["train.jsonl", "eval.jsonl"]
            .into_iter()
            .map(|name| path.join(name))
            .filter(|file| file.is_file())
            .collect();
        if files.is_empty() {
            return Err(RetrieveError::NotADataset {
                path: display_path(path),
            });
        }
        for file in files {
            read_jsonl(&file, &mut documents)?;
        }
    } else {
        read_jsonl(path, &mut documents)?;
    }
    if documents.is_empty() {
        return Err(RetrieveError::Empty {
            path: display_path(path),
        });
    }
    Ok(documents)
}

/// Appends the documents of one JSONL file to `out`.
fn read_jsonl(path: &Path, out: &mut Vec<Document>) -> Result<(), RetrieveError> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| display_path(path));
    let mut lines = JsonLines::open(path)?;
    while let Some(next) = lines.next_object() {
        let (line, object) = next?;
        let document = document(&object, &name, line)
            .map_err(|problem| SourceError::record(lines.location(line), problem))?;
        out.push(document);
    }
    Ok(())
}

/// The document of one JSONL object, line `line` of the file named `file`.
fn document(object: &Map<String, Value>, file: &str, line: u64) -> Result<Document, Problem> {
    // Join mode always gives exactly one record: the line is one document.
    let record = jsonl::documents(object, &TextField::Auto, ChunkMode::Join)?
        .into_iter()
        .next()
        .ok_or_else(|| Problem::MissingText {
            expected: "expected one document".to_string(),
        })?;
    let id = match object.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(Value::Number(id)) => Some(id.to_string()),
        Some(other) => return Err(bad_metadata("id", "a string or a number", other)),
    };
    let title = match object.get("title") {
        None | Some(Value::Null) => None,
        Some(Value::String(title)) => Some(title.clone()),
        Some(other) => return Err(bad_metadata("title", "a string", other)),
    };
    let id = id.unwrap_or_else(|| match (record.source_url, record.chunk_id) {
        (Some(url), Some(chunk)) => format!("{url}#{chunk}"),
        (Some(url), None) => url,
        (None, Some(chunk)) => chunk,
        (None, None) => format!("{file}:{line}"),
    });
    Ok(Document {
        id,
        title,
        text: record.text,
    })
}

fn bad_metadata(key: &str, expected: &'static str, found: &Value) -> Problem {
    Problem::BadMetadata {
        key: key.to_string(),
        expected,
        found: json_type(found),
    }
}

/// Common English function words: they occur in nearly every document, so they neither
/// rank documents nor say what a question is about. Includes the interrogatives (a
/// question's "which" is never in the answer) and the pieces that splitting contractions
/// at the apostrophe leaves (`s`, `t`, `ll`, ...). Sorted, for the binary search.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "d",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "ll",
    "m",
    "me",
    "more",
    "most",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "o",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "re",
    "s",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "t",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "ve",
    "very",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "whose",
    "why",
    "will",
    "with",
    "would",
    "y",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

/// Whether `word` (lower case) is a stopword.
pub fn is_stopword(word: &str) -> bool {
    STOPWORDS.binary_search(&word).is_ok()
}

/// Light plural stemming: Harman's S-stemmer (`ies` → `y` but not after `a` or `e`;
/// `s` → `` but not after `u` or `s`; its `es` → `e` rule is the `s` rule again) plus
/// Porter's `sses` → `ss`, on words longer than three characters (so `gas`, `bus`,
/// `yes` stay whole). It only has to map a plural and its singular to the same term;
/// it does not have to produce words.
pub fn stem(word: &mut String) {
    if word.chars().count() <= 3 {
        return;
    }
    let ends = |suffix: &str| word.ends_with(suffix);
    if ends("sses") {
        word.truncate(word.len() - 2);
    } else if ends("ies") && !ends("eies") && !ends("aies") {
        word.truncate(word.len() - 3);
        word.push('y');
    } else if ends("s") && !ends("us") && !ends("ss") {
        word.truncate(word.len() - 1);
    }
}

/// Turns text into index terms: Unicode lower case, split on anything that is not
/// alphanumeric (so `don't` is `don` + `t`, `e-mail` is `e` + `mail`), stopwords
/// dropped, then optionally [`stem`]med. Combining diacritical marks (U+0300..U+036F)
/// count as part of a word, so decomposed `é` does not split one; text is not
/// otherwise Unicode-normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Analyzer {
    /// Apply [`stem`] to every term.
    pub stem: bool,
}

impl Default for Analyzer {
    /// Stemming on: "rivers" in a question should find "river" in a document.
    fn default() -> Analyzer {
        Analyzer { stem: true }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || ('\u{300}'..='\u{36f}').contains(&c)
}

impl Analyzer {
    /// Calls `each` with every term of `text`, in order, repeats included. One buffer is
    /// reused for all of them: indexing allocates only for new vocabulary.
    pub fn for_each_term(&self, text: &str, mut each: impl FnMut(&str)) {
        self.for_each_word(text, |term, _| each(term));
    }

    /// [`Analyzer::for_each_term`], with each term's word as written in `text`.
    fn for_each_word(&self, text: &str, mut each: impl FnMut(&str, &str)) {
        let mut word = String::new();
        for piece in text.split(|c: char| !is_word_char(c)) {
            if piece.is_empty() {
                continue;
            }
            word.clear();
            if piece.is_ascii() {
                word.extend(piece.chars().map(|c| c.to_ascii_lowercase()));
            } else {
                // `str::to_lowercase` knows context-dependent cases such as final sigma.
                word.push_str(&piece.to_lowercase());
            }
            if is_stopword(&word) {
                continue;
            }
            if self.stem {
                stem(&mut word);
            }
            each(&word, piece);
        }
    }

    /// Every term of `text`, in order, repeats included.
    pub fn terms(&self, text: &str) -> Vec<String> {
        let mut terms = Vec::new();
        self.for_each_term(text, |term| terms.push(term.to_string()));
        terms
    }

    /// The distinct terms of `text`, in order of first occurrence: a question's keywords.
    pub fn keywords(&self, text: &str) -> Vec<String> {
        self.keywords_with_words(text)
            .into_iter()
            .map(|(term, _)| term)
            .collect()
    }

    /// [`Analyzer::keywords`], each with the word it was first written as (`Rivers` for
    /// `river`): analyzed terms are for matching, the words are for people.
    pub fn keywords_with_words(&self, text: &str) -> Vec<(String, String)> {
        let mut keywords: Vec<(String, String)> = Vec::new();
        self.for_each_word(text, |term, word| {
            if !keywords.iter().any(|(seen, _)| seen == term) {
                keywords.push((term.to_string(), word.to_string()));
            }
        });
        keywords
    }
}

/// One retrieved document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hit {
    /// Its position in the dataset (0-based, in file order).
    pub doc: usize,
    /// Its BM25 score for the query (always > 0: a hit matches at least one term).
    pub score: f64,
}

/// An occurrence count of one term in one document.
#[derive(Debug, Clone, Copy)]
struct Posting {
    doc: u32,
    tf: u32,
}

type Vocabulary = HashMap<String, usize, foldhash::fast::FixedState>;

/// An Okapi BM25 inverted index over a dataset's documents.
///
/// `score(q, d) = Σ_{t ∈ q} idf(t) · tf·(k1 + 1) / (tf + k1·(1 − b + b·|d|/avgdl))` with
/// `idf(t) = ln(1 + (N − df + 0.5)/(df + 0.5))` (never negative, unlike the original
/// Robertson–Spärck Jones weight), `k1` = [`K1`], `b` = [`B`], `|d|` the number of
/// terms of the document (title and text, after analysis), `N` the number of documents.
/// The query's terms are de-duplicated: asking "river river" is asking "river".
#[derive(Debug, Clone)]
pub struct Index {
    analyzer: Analyzer,
    documents: Vec<Document>,
    vocabulary: Vocabulary,
    /// By term id; each list in ascending document order (documents are added in order).
    postings: Vec<Vec<Posting>>,
    /// Per document, `k1·(1 − b + b·|d|/avgdl)`: the length part of the denominator.
    length_norm: Vec<f64>,
}

impl Index {
    /// Loads `path` (see [`load_documents`]) and indexes it with the default analyzer.
    pub fn open(path: &Path) -> Result<Index, RetrieveError> {
        let start = std::time::Instant::now();
        let documents = load_documents(path)?;
        let loaded = start.elapsed();
        let index = Index::build(documents, Analyzer::default())?;
        tracing::info!(
            "{}: {} documents, {} terms; loaded in {loaded:.2?}, indexed in {:.2?}",
            display_path(path),
            index.len(),
            index.vocabulary.len(),
            start.elapsed() - loaded
        );
        Ok(index)
    }

    /// Indexes `documents`, in time linear in their total length.
    pub fn build(documents: Vec<Document>, analyzer: Analyzer) -> Result<Index, RetrieveError> {
        if u32::try_from(documents.len()).is_err() {
            return Err(RetrieveError::TooManyDocuments {
                count: documents.len(),
            });
        }
        let mut vocabulary = Vocabulary::default();
        let mut postings: Vec<Vec<Posting>> = Vec::new();
        let mut lengths = Vec::with_capacity(documents.len());
        for (doc, document) in (0u32..).zip(&documents) {
            let mut length = 0u64;
            let mut add = |term: &str| {
                length += 1;
                let id = match vocabulary.get(term) {
                    Some(&id) => id,
                    None => {
                        vocabulary.insert(term.to_string(), postings.len());
                        postings.push(Vec::new());
                        postings.len() - 1
                    }
                };
                let list = &mut postings[id];
                // Documents come in order, so this document's posting, if any, is last.
                match list.last_mut() {
                    Some(last) if last.doc == doc => last.tf += 1,
                    _ => list.push(Posting { doc, tf: 1 }),
                }
            };
            if let Some(title) = &document.title {
                analyzer.for_each_term(title, &mut add);
            }
            analyzer.for_each_term(&document.text, &mut add);
            lengths.push(length);
        }
        let total: u64 = lengths.iter().sum();
        let average = total as f64 / documents.len().max(1) as f64;
        let length_norm = lengths
            .iter()
            .map(|&length| {
                // With no terms anywhere nothing is ever scored; avoid 0/0 all the same.
                let relative = if average > 0.0 {
                    length as f64 / average
                } else {
                    0.0
                };
                K1 * (1.0 - B + B * relative)
            })
            .collect();
        Ok(Index {
            analyzer,
            documents,
            vocabulary,
            postings,
            length_norm,
        })
    }

    /// The analyzer used for documents and queries alike.
    pub fn analyzer(&self) -> Analyzer {
        self.analyzer
    }

    /// The documents, in dataset order (a [`Hit::doc`] indexes this).
    pub fn documents(&self) -> &[Document] {
        &self.documents
    }

    /// The document a hit refers to.
    pub fn document(&self, hit: &Hit) -> &Document {
        &self.documents[hit.doc]
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.documents.len()
    }

    /// True when there are no documents.
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// Number of documents that contain `term` (an analyzed term).
    pub fn document_frequency(&self, term: &str) -> usize {
        self.postings_of(term).len()
    }

    /// `idf(t) = ln(1 + (N − df + 0.5)/(df + 0.5))` for an analyzed term.
    pub fn idf(&self, term: &str) -> f64 {
        let n = self.documents.len() as f64;
        let df = self.document_frequency(term) as f64;
        (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
    }

    fn postings_of(&self, term: &str) -> &[Posting] {
        self.vocabulary
            .get(term)
            .map(|&id| self.postings[id].as_slice())
            .unwrap_or(&[])
    }

    /// Whether document `doc` contains the analyzed term `term`.
    pub fn contains(&self, doc: usize, term: &str) -> bool {
        self.postings_of(term)
            .binary_search_by_key(&doc, |posting| posting.doc as usize)
            .is_ok()
    }

    /// The `k` best documents for `query` (analyzed like the documents): highest score
    /// first, equal scores in dataset order. Only documents that share a term with the
    /// query are hits, so there may be fewer than `k`.
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        self.search_terms(&self.analyzer.keywords(query), k)
    }

    /// [`Index::search`] for terms already analyzed (and de-duplicated).
    pub fn search_terms(&self, terms: &[String], k: usize) -> Vec<Hit> {
        if k == 0 {
            return Vec::new();
        }
        let mut scores = vec![0.0f64; self.documents.len()];
        let mut touched: Vec<u32> = Vec::new();
        for term in terms {
            let postings = self.postings_of(term);
            if postings.is_empty() {
                continue;
            }
            let idf = self.idf(term);
            for posting in postings {
                let score = &mut scores[posting.doc as usize];
                // Every contribution is positive (idf > 0 as df <= N, tf >= 1), so a zero
                // score means the document has not been seen yet.
                if *score == 0.0 {
                    touched.push(posting.doc);
                }
                let tf = f64::from(posting.tf);
                *score += idf * tf * (K1 + 1.0) / (tf + self.length_norm[posting.doc as usize]);
            }
        }
        let mut hits: Vec<Hit> = touched
            .into_iter()
            .map(|doc| Hit {
                doc: doc as usize,
                score: scores[doc as usize],
            })
            .collect();
        let order = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc));
        // Partial selection first: a query term such as "town" may match most of the
        // corpus, and only the best `k` need sorting.
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, order);
            hits.truncate(k);
        }
        hits.sort_by(order);
        hits
    }

    /// How many of `question`'s keywords occur in the `hits` documents; see [`Coverage`].
    pub fn coverage(&self, question: &str, hits: &[Hit], threshold: f64) -> Coverage {
        let (keywords, words): (Vec<String>, Vec<String>) = self
            .analyzer
            .keywords_with_words(question)
            .into_iter()
            .unzip();
        let (covered, missing): (Vec<String>, Vec<String>) = keywords
            .iter()
            .cloned()
            .partition(|term| hits.iter().any(|hit| self.contains(hit.doc, term)));
        let ratio = if keywords.is_empty() {
            0.0
        } else {
            covered.len() as f64 / keywords.len() as f64
        };
        Coverage {
            keywords,
            words,
            covered,
            missing,
            ratio,
            threshold,
            retrieved: hits.len(),
        }
    }

    /// Searches for the best `k` documents for `question` and checks their coverage of
    /// it against `threshold`: what `chat --retrieve` and `verify-question` do.
    pub fn retrieve(&self, question: &str, k: usize, threshold: f64) -> Retrieval {
        let hits = self.search(question, k);
        let coverage = self.coverage(question, &hits, threshold);
        Retrieval { hits, coverage }
    }

    /// The prompt for `question` with the `hits` documents before it; see
    /// [`context_prompt`].
    pub fn context_prompt(&self, question: &str, hits: &[Hit]) -> String {
        let documents: Vec<&Document> = hits.iter().map(|hit| self.document(hit)).collect();
        context_prompt(question, &documents)
    }
}

/// The result of [`Index::retrieve`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retrieval {
    /// The best documents, best first.
    pub hits: Vec<Hit>,
    /// How well they cover the question, and the verdict.
    pub coverage: Coverage,
}

/// How well the retrieved documents cover a question's keywords (its distinct analyzed
/// terms, stopwords removed). A keyword is covered when at least one retrieved document
/// contains it. The gate passes when at least one document was retrieved and `ratio >=
/// threshold`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    /// The question's keywords (analyzed: lower case, stemmed), in question order.
    pub keywords: Vec<String>,
    /// Each keyword as the question first wrote it (`Rivers` for `river`).
    pub words: Vec<String>,
    /// The keywords some retrieved document contains.
    pub covered: Vec<String>,
    /// The keywords no retrieved document contains.
    pub missing: Vec<String>,
    /// `covered / keywords`; 0 when there are no keywords.
    pub ratio: f64,
    /// The ratio needed to pass.
    pub threshold: f64,
    /// How many documents were retrieved.
    pub retrieved: usize,
}

impl Coverage {
    /// True when the gate lets the question through.
    pub fn passed(&self) -> bool {
        self.refusal().is_none()
    }

    /// Why the gate refuses the question, or `None` when it passes.
    pub fn refusal(&self) -> Option<Refusal> {
        if self.keywords.is_empty() {
            Some(Refusal::NoKeywords)
        } else if self.retrieved == 0 {
            Some(Refusal::NothingRetrieved {
                keywords: self.keywords.clone(),
            })
        } else if self.ratio < self.threshold {
            Some(Refusal::NotCovered {
                missing: self.missing.clone(),
                covered: self.covered.len(),
                keywords: self.keywords.len(),
                ratio: self.ratio,
                threshold: self.threshold,
            })
        } else {
            None
        }
    }
}

/// Why the coverage gate refused a question.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The question has no keywords: it is empty or all stopwords, so nothing says what
    /// it is about.
    NoKeywords,
    /// No document contains any keyword.
    NothingRetrieved {
        /// The keywords looked for.
        keywords: Vec<String>,
    },
    /// The retrieved documents miss too many keywords.
    NotCovered {
        /// The keywords not covered.
        missing: Vec<String>,
        /// How many are covered.
        covered: usize,
        /// How many keywords there are.
        keywords: usize,
        /// `covered / keywords`.
        ratio: f64,
        /// The ratio needed.
        threshold: f64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoKeywords => write!(
                f,
                "the question has no keywords (it is empty or only stopwords), so nothing can be looked up"
            ),
            Refusal::NothingRetrieved { keywords } => write!(
                f,
                "no document contains any of the keywords: {}",
                keywords.join(", ")
            ),
            Refusal::NotCovered {
                missing,
                covered,
                keywords,
                ratio,
                threshold,
            } => write!(
                f,
                "not covered by the retrieved documents: {} ({covered} of {keywords} keywords covered, {ratio:.2} < {threshold:.2})",
                missing.join(", ")
            ),
        }
    }
}

/// The prompt that puts `documents` before `question`:
///
/// ```text
/// Context:
/// [1] Title: text of the best document
/// [2] text of the second (no title)
///
/// Question: the question
/// ```
///
/// Each document is one line (runs of whitespace, newlines included, become one space),
/// so a line starting with `[n]` always starts document `n`; the title, when there is
/// one, comes first and ends with `: `. With no documents the prompt is
/// `Question: the question` alone, never an empty context.
pub fn context_prompt(question: &str, documents: &[&Document]) -> String {
    let mut prompt = String::new();
    if !documents.is_empty() {
        prompt.push_str("Context:\n");
        for (number, document) in documents.iter().enumerate() {
            prompt.push_str(&format!("[{}] ", number + 1));
            if let Some(title) = &document.title {
                prompt.push_str(&one_line(title));
                prompt.push_str(": ");
            }
            prompt.push_str(&one_line(&document.text));
            prompt.push('\n');
        }
        prompt.push('\n');
    }
    prompt.push_str("Question: ");
    prompt.push_str(&one_line(question));
    prompt
}

/// `text` with every run of whitespace made one space, trimmed.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first `chars` characters of `text` on one line, with `...` when cut: how
/// `verify-question` shows a document.
pub fn preview(text: &str, chars: usize) -> String {
    let line = one_line(text);
    match line.char_indices().nth(chars) {
        Some((end, _)) => format!("{}...", &line[..end]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document {
            id: text.to_string(),
            title: None,
            text: text.to_string(),
        }
    }

    fn index(texts: &[&str]) -> Index {
        Index::build(
            texts.iter().map(|text| doc(text)).collect(),
            Analyzer::default(),
        )
        .unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn stopwords_are_sorted_lower_case_and_unique() {
        assert!(STOPWORDS.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(STOPWORDS.iter().all(|word| word.to_lowercase() == *word));
        assert!(is_stopword("the") && is_stopword("which") && !is_stopword("river"));
    }

    #[test]
    fn analyzer_lowercases_splits_drops_stopwords_and_stems() {
        let analyzer = Analyzer::default();
        assert_eq!(
            analyzer.terms("The RIVERS of Ardelwick, in 1204: don't cross-check!"),
            ["river", "ardelwick", "1204", "don", "cross", "check"]
        );
        // Unicode: lower case beyond ASCII, letters of any script, non-ASCII separators.
        assert_eq!(
            analyzer.terms("ÉCOLE—Straße «Ἀθῆναι» 東京タワー"),
            ["école", "straße", "ἀθῆναι", "東京タワー"]
        );
        // A decomposed é (e + U+0301) stays one word.
        assert_eq!(
            analyzer.terms("cafe\u{301} au lait"),
            ["cafe\u{301}", "au", "lait"]
        );
        // Possessives and contractions leave stopword pieces behind.
        assert_eq!(
            analyzer.terms("Oskel's lute isn't here"),
            ["oskel", "lute", "isn"]
        );
        assert_eq!(analyzer.terms(""), Vec::<String>::new());
        assert_eq!(analyzer.terms("what is the"), Vec::<String>::new());
        let plain = Analyzer { stem: false };
        assert_eq!(plain.terms("Rivers flow"), ["rivers", "flow"]);
    }

    #[test]
    fn stemming_maps_plurals_to_their_singular() {
        let stemmed = |word: &str| {
            let mut word = word.to_string();
            stem(&mut word);
            word
        };
        for (plural, singular) in [
            ("rivers", "river"),
            ("ponies", "pony"),
            ("classes", "class"),
            ("houses", "house"),
            ("1990s", "1990"),
        ] {
            assert_eq!(stemmed(plural), stemmed(singular), "{plural} / {singular}");
        }
        for unchanged in ["gas", "bus", "yes", "class", "status", "glass"] {
            assert_eq!(stemmed(unchanged), unchanged);
        }
        assert_eq!(stemmed("agrees"), "agree");
        assert_eq!(stemmed("toes"), "toe");
    }

    #[test]
    fn keywords_are_distinct_in_first_occurrence_order() {
        assert_eq!(
            Analyzer::default().keywords("River? Which river... the RIVERS of Velm"),
            ["river", "velm"]
        );
    }

    /// Three short documents whose scores are worked out by hand below.
    /// Terms after analysis: d0 = [cat, sat] (|d| = 2), d1 = [cat, chased, dog] (3),
    /// d2 = [dog, dog, bird] (3). N = 3, avgdl = 8/3.
    const HAND: [&str; 3] = ["The cat sat", "The cat chased the dog", "Dog, dog, bird!"];

    #[test]
    fn bm25_scores_match_the_hand_computation() {
        let index = index(&HAND);
        // idf(cat) = idf(dog) = ln(1 + (3 - 2 + 0.5)/(2 + 0.5)) = ln 1.6
        // idf(bird) = ln(1 + (3 - 1 + 0.5)/(1 + 0.5)) = ln(8/3)
        assert!(close(index.idf("cat"), 1.6f64.ln()));
        assert!(close(index.idf("bird"), (8.0f64 / 3.0).ln()));
        assert!(close(index.idf("dog"), 0.470_003_629_245_735_6));
        // Length parts: |d| = 2: 1.2 (0.25 + 0.75 · 2/(8/3)) = 0.975;
        //               |d| = 3: 1.2 (0.25 + 0.75 · 3/(8/3)) = 1.3125.
        // "cat": d0 = ln 1.6 · 2.2/(1 + 0.975)  = 0.523548346501579
        //        d1 = ln 1.6 · 2.2/(1 + 1.3125) = 0.44713858782297017
        let hits = index.search("cat", 10);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [0, 1]);
        assert!(close(hits[0].score, 0.523_548_346_501_579));
        assert!(close(hits[1].score, 0.447_138_587_822_970_17));
        // "dog bird": d2 = ln 1.6 · 2·2.2/(2 + 1.3125) + ln(8/3) · 2.2/(1 + 1.3125)
        //                = 0.6243064394767063 + 0.9331135033473772 = 1.5574199428240534
        //             d1 = ln 1.6 · 2.2/(1 + 1.3125) = 0.44713858782297017
        let hits = index.search("dogs and birds?", 10);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [2, 1]);
        assert!(close(hits[0].score, 1.557_419_942_824_053_4));
        assert!(close(hits[1].score, 0.447_138_587_822_970_17));
        // A repeated query term counts once.
        assert_eq!(index.search("dog dog bird", 10), hits);
    }

    #[test]
    fn ranking_prefers_rare_terms_repeats_and_short_documents() {
        let index = index(&[
            "a long document about the town and the river and the market and the hills",
            "the river",
            "the river river",
            "the town",
            "nothing relevant here",
        ]);
        let ranked: Vec<usize> = index.search("river", 10).iter().map(|h| h.doc).collect();
        // Two occurrences beat one; a short document beats a long one.
        assert_eq!(ranked, [2, 1, 0]);
        // "market" is rarer than "town", so the long document wins "town market".
        let ranked: Vec<usize> = index
            .search("town market", 10)
            .iter()
            .map(|h| h.doc)
            .collect();
        assert_eq!(ranked, [0, 3]);
        assert_eq!(index.search("river", 1).len(), 1);
        assert!(index.search("zebra", 3).is_empty());
        assert!(index.search("river", 0).is_empty());
    }

    #[test]
    fn equal_scores_keep_dataset_order() {
        let index = index(&["pear tart", "apple pie", "apple tart", "apple pie", "plum"]);
        let hits = index.search("apple", 10);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(hits.iter().all(|hit| hit.score == hits[0].score));
        // The same holds when partial selection cuts the list.
        let top: Vec<usize> = index.search("apple", 2).iter().map(|h| h.doc).collect();
        assert_eq!(top, [1, 2]);
        let many: Vec<Document> = (0..50).map(|i| doc(&format!("apple {}", i % 2))).collect();
        let index = Index::build(many, Analyzer::default()).unwrap();
        let top: Vec<usize> = index.search("apple", 5).iter().map(|h| h.doc).collect();
        assert_eq!(top, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn titles_are_indexed_with_the_text() {
        let documents = vec![
            doc("nothing here"),
            Document {
                id: "x".into(),
                title: Some("Velm".into()),
                text: "A river.".into(),
            },
        ];
        let index = Index::build(documents, Analyzer::default()).unwrap();
        assert_eq!(index.search("velm", 3)[0].doc, 1);
    }

    #[test]
    fn coverage_passes_when_enough_keywords_are_retrieved() {
        let index = index(&[
            "The river Velm flows through Ardelwick.",
            "Ardelwick was founded by Tarin Oskel.",
            "Boats stop at Dunmere.",
        ]);
        let question = "Which river flows through Ardelwick?";
        let retrieval = index.retrieve(question, 3, DEFAULT_THRESHOLD);
        assert_eq!(retrieval.hits[0].doc, 0);
        let coverage = &retrieval.coverage;
        assert_eq!(coverage.keywords, ["river", "flow", "ardelwick"]);
        assert_eq!(coverage.words, ["river", "flows", "Ardelwick"]);
        assert_eq!((coverage.missing.len(), coverage.ratio), (0, 1.0));
        assert!(coverage.passed());
        // 3 of 4 keywords is exactly the default threshold.
        let coverage = index.retrieve("Which river crosses Ardelwick at Velm?", 3, 0.75);
        assert_eq!(coverage.coverage.missing, ["cross"]);
        assert_eq!(coverage.coverage.ratio, 0.75);
        assert!(coverage.coverage.passed());
    }

    #[test]
    fn coverage_refuses_uncovered_keywords_and_names_them() {
        let index = index(&[
            "The river Velm flows through Ardelwick.",
            "Ardelwick was founded by Tarin Oskel.",
        ]);
        let retrieval = index.retrieve("Which instrument does Tarin Oskel play?", 3, 0.75);
        let coverage = &retrieval.coverage;
        assert_eq!(coverage.covered, ["tarin", "oskel"]);
        assert_eq!(coverage.missing, ["instrument", "play"]);
        assert_eq!(coverage.ratio, 0.5);
        let refusal = coverage.refusal().unwrap();
        assert_eq!(
            refusal.to_string(),
            "not covered by the retrieved documents: instrument, play (2 of 4 keywords covered, 0.50 < 0.75)"
        );
        // Coverage counts only the retrieved documents: with k = 1, "founded" is missed.
        let hits = index.search("river founded Ardelwick", 1);
        assert_eq!(hits[0].doc, 0);
        let coverage = index.coverage("river founded Ardelwick", &hits, 0.75);
        assert_eq!(coverage.missing, ["founded"]);
        assert!(!coverage.passed());
        // A lower threshold lets the same question through.
        assert!(
            index
                .coverage("river founded Ardelwick", &hits, 0.5)
                .passed()
        );
    }

    #[test]
    fn questions_without_keywords_or_hits_are_refused() {
        let index = index(&["The river Velm flows through Ardelwick."]);
        let empty = index.retrieve("  What is it?  ", 3, 0.75).coverage;
        assert_eq!(empty.refusal(), Some(Refusal::NoKeywords));
        assert!(empty.refusal().unwrap().to_string().contains("no keywords"));
        let unknown = index.retrieve("zebra quagga", 3, 0.0).coverage;
        assert_eq!(unknown.retrieved, 0);
        assert_eq!(
            unknown.refusal().unwrap().to_string(),
            "no document contains any of the keywords: zebra, quagga"
        );
    }

    #[test]
    fn context_prompt_numbers_documents_one_per_line() {
        let documents = [
            Document {
                id: "a".into(),
                title: Some("Ardelwick".into()),
                text: "The river Velm\n\nflows   here.".into(),
            },
            doc("Second one."),
        ];
        let refs: Vec<&Document> = documents.iter().collect();
        assert_eq!(
            context_prompt(" Which river? ", &refs),
            "Context:\n[1] Ardelwick: The river Velm flows here.\n[2] Second one.\n\nQuestion: Which river?"
        );
        assert_eq!(context_prompt("Why?", &[]), "Question: Why?");
        let index = index(&["cat", "dog"]);
        let hits = index.search("dog", 3);
        assert_eq!(
            index.context_prompt("dog?", &hits),
            "Context:\n[1] dog\n\nQuestion: dog?"
        );
    }

    #[test]
    fn preview_cuts_at_characters_not_bytes() {
        assert_eq!(preview("ééé\nabc", 4), "ééé ...");
        assert_eq!(preview("short", 100), "short");
    }

    #[test]
    fn documents_take_ids_titles_and_text_like_ingest() {
        let parse = |line: &str| {
            let Value::Object(object) = serde_json::from_str(line).unwrap() else {
                panic!("not an object");
            };
            document(&object, "d.jsonl", 7)
        };
        let full = parse(r#"{"id": 5, "title": "T", "body_text": "b", "url": "u"}"#).unwrap();
        assert_eq!((full.id.as_str(), full.title.as_deref()), ("5", Some("T")));
        assert_eq!(full.text, "b");
        let chunked = parse(r#"{"source_url": "u", "chunk_id": 3, "text": "t"}"#).unwrap();
        assert_eq!(chunked.id, "u#3");
        let joined = parse(r#"{"chunks": [{"text": "x"}, {"text": "y"}]}"#).unwrap();
        assert_eq!(
            (joined.id.as_str(), joined.text.as_str()),
            ("d.jsonl:7", "x\n\ny")
        );
        assert_eq!(parse(r#"{"chunk_id": "c", "text": "t"}"#).unwrap().id, "c");
        let bad = parse(r#"{"text": "t", "title": 3}"#).unwrap_err();
        assert_eq!(
            bad.to_string(),
            r#""title" must be a string, found a number"#
        );
        let bad = parse(r#"{"text": "t", "id": [1]}"#).unwrap_err();
        assert_eq!(
            bad.to_string(),
            r#""id" must be a string or a number, found an array"#
        );
        assert!(parse(r#"{"messages": []}"#).is_err());
    }

    #[test]
    fn loading_names_file_and_line_and_reads_ingest_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("docs.jsonl");
        std::fs::write(&file, "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n").unwrap();
        let documents = load_documents(&file).unwrap();
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[1].id, "docs.jsonl:3");
        std::fs::write(&file, "{\"text\": \"one\"}\n{\"text\": \"two\"\n").unwrap();
        let error = load_documents(&file).unwrap_err().to_string();
        assert!(
            error.ends_with("docs.jsonl:2: invalid JSON at column 0: EOF while parsing an object"),
            "{error}"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            load_documents(&file),
            Err(RetrieveError::Empty { .. })
        ));
        let missing = load_documents(&dir.path().join("nope.jsonl")).unwrap_err();
        assert!(missing.to_string().contains("nope.jsonl"), "{missing}");
        // The cause is displayed once, not again as a source.
        assert!(std::error::Error::source(&missing).is_none());

        let out = dir.path().join("corpus");
        assert!(matches!(
            load_documents(&dir.path().join("")),
            Err(RetrieveError::NotADataset { .. })
        ));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("train.jsonl"), "{\"text\": \"train\"}\n").unwrap();
        std::fs::write(out.join("eval.jsonl"), "{\"text\": \"eval\"}\n").unwrap();
        let texts: Vec<String> = load_documents(&out)
            .unwrap()
            .into_iter()
            .map(|d| format!("{} {}", d.id, d.text))
            .collect();
        assert_eq!(texts, ["train.jsonl:1 train", "eval.jsonl:1 eval"]);
    }
}

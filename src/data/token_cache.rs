//! Token caches on disk: how the `token-cache` stage writes tokenized corpora and how
//! training reads them back.
//!
//! ```text
//! meta.json                       format, mode, dtype, tokenizer and source hashes, counts
//! train/shard_00000.bin …         pretrain: token ids, little-endian u16 (or u32 when the
//! eval/shard_00000.bin …          vocabulary does not fit), documents separated by <|endoftext|>
//! train/tokens.bin                SFT: all examples' token ids back to back
//! train/mask.bin                  SFT: one byte per token, 1 where the loss counts
//! train/offsets.bin               SFT: u64 LE start of each example, plus the end
//! ```
//!
//! Readers memory-map the files. A cache records the blake3 of the `tokenizer.json` it
//! was built with, and [`TokenCache::verify_tokenizer`] refuses any other tokenizer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::Split;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::path_error::AtPath;
use crate::rng::Rng;

/// Current `meta.json` format.
pub const FORMAT: u32 = 1;

/// Token id width on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 2 bytes per token (vocabulary ≤ 65,536).
    U16,
    /// 4 bytes per token.
    U32,
}

impl Dtype {
    /// The narrowest type that holds every id below `vocab_size`.
    pub fn for_vocab(vocab_size: u32) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

/// What a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Token streams for pretraining.
    Pretrain,
    /// Chat examples with loss masks.
    Sft,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Path relative to the cache directory.
    pub file: String,
    /// Tokens in it.
    pub tokens: u64,
}

/// Counts and files of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// Documents (pretrain) or examples (SFT) written.
    pub documents: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Pretrain shards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardInfo>,
    /// SFT: tokens the loss covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_tokens: Option<u64>,
    /// Records not written, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<String, u64>,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// [`FORMAT`].
    pub format: u32,
    /// Pretrain or SFT.
    pub mode: CacheMode,
    /// Token width.
    pub dtype: Dtype,
    /// Vocabulary size of the tokenizer (with special tokens).
    pub vocab_size: u32,
    /// blake3 of the `tokenizer.json` used.
    pub tokenizer_hash: String,
    /// blake3 over the hashes of the source corpora, by split.
    pub source_hash: String,
    /// Id of `<|endoftext|>` (document separator).
    pub eos_id: u32,
    /// Id of `<|pad|>`.
    pub pad_id: u32,
    /// Pretrain: tokens per shard (the last one may be shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_tokens: Option<u64>,
    /// SFT: the longest example kept, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    /// SFT: what happened to longer examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation: Option<String>,
    /// SFT: the chat template the examples were rendered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<TemplateRecord>,
    /// `add_tokens`: the special tokens the cache's own tokenizer (in [`TOKENIZER_DIR`])
    /// adds to the tokenizer it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_tokens: Option<AddedTokens>,
    /// `train`, `eval`.
    pub splits: BTreeMap<String, SplitInfo>,
}

/// Which chat template rendered an SFT cache, so that training can refuse a base
/// model whose own template differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// `model` (the tokenizer's own), `trainyard` or `file`.
    pub source: String,
    /// The template's hash (text and special tokens).
    pub hash: String,
}

/// Where a cache built with `add_tokens` keeps its extended tokenizer.
pub const TOKENIZER_DIR: &str = "tokenizer";

/// The special tokens a cache's tokenizer adds to the tokenizer it extends, so that
/// training resizes the model's embeddings to match and trains the new rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedTokens {
    /// The tokens asked for, in order (some may have been known already).
    pub requested: Vec<String>,
    /// The tokens that got new ids.
    pub added: Vec<AddedToken>,
    /// blake3 of the `tokenizer.json` they were added to.
    pub base_tokenizer_hash: String,
}

/// A token that `add_tokens` gave a new id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedToken {
    /// The token's text.
    pub content: String,
    /// Its id in the extended tokenizer.
    pub id: u32,
}

/// Why a cache cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// I/O on a cache file.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// `meta.json` is not what this version writes.
    #[error("{path}: not a token cache meta.json: {reason}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Built with a different tokenizer.
    #[error(
        "token cache {cache} was built with tokenizer {expected}, but {tokenizer} is {found}: rebuild the cache with this tokenizer (or use the tokenizer it was built with)"
    )]
    TokenizerMismatch {
        /// Cache directory.
        cache: PathBuf,
        /// Hash recorded in the cache.
        expected: String,
        /// The tokenizer file offered.
        tokenizer: PathBuf,
        /// Its hash.
        found: String,
    },
    /// A token id outside the vocabulary: the file changed after it was written.
    #[error(
        "{file} is corrupted: token {position} is id {id}, outside the vocabulary of {vocab_size} it was written with; run `trainyard run --verify` to find and rebuild corrupted outputs"
    )]
    Corrupted {
        /// The token file.
        file: PathBuf,
        /// Index of the first bad token in the file.
        position: u64,
        /// The id found there.
        id: u32,
        /// The cache's vocabulary size.
        vocab_size: u32,
    },
    /// Wrong mode, missing split, or a corrupt file.
    #[error("token cache {cache}: {reason}")]
    Invalid {
        /// Cache directory.
        cache: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Appends token ids to numbered shard files of at most `shard_tokens` tokens each.
pub struct ShardWriter {
    dir: PathBuf,
    split: Split,
    dtype: Dtype,
    shard_tokens: u64,
    current: Option<BufWriter<File>>,
    shards: Vec<ShardInfo>,
    buffer: Vec<u8>,
}

impl ShardWriter {
    /// A writer of `<cache_dir>/<split>/shard_NNNNN.bin`.
    pub fn new(
        cache_dir: &Path,
        split: Split,
        dtype: Dtype,
        shard_tokens: u64,
    ) -> io::Result<ShardWriter> {
        std::fs::create_dir_all(cache_dir.join(split.as_str()))?;
        Ok(ShardWriter {
            dir: cache_dir.to_path_buf(),
            split,
            dtype,
            shard_tokens: shard_tokens.max(1),
            current: None,
            shards: Vec::new(),
            buffer: Vec::new(),
        })
    }

    /// Appends `tokens`, starting new shards as they fill.
    pub fn push(&mut self, tokens: &[u32]) -> io::Result<()> {
        let mut rest = tokens;
        while !rest.is_empty() {
            let full = self
                .shards
                .last()
                .is_none_or(|shard| shard.tokens >= self.shard_tokens);
            if self.current.is_none() || full {
                self.start_shard()?;
            }
            let (Some(shard), Some(writer)) = (self.shards.last_mut(), self.current.as_mut())
            else {
                return Err(io::Error::other("shard writer lost its current shard"));
            };
            let room = (self.shard_tokens - shard.tokens) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            encode_ids(now, self.dtype, &mut self.buffer);
            writer.write_all(&self.buffer)?;
            shard.tokens += now.len() as u64;
            rest = later;
        }
        Ok(())
    }

    fn start_shard(&mut self) -> io::Result<()> {
        if let Some(mut writer) = self.current.take() {
            writer.flush()?;
        }
        let file = format!("{}/shard_{:05}.bin", self.split, self.shards.len());
        self.current = Some(BufWriter::with_capacity(
            1 << 20,
            File::create(self.dir.join(&file))?,
        ));
        self.shards.push(ShardInfo { file, tokens: 0 });
        Ok(())
    }

    /// Flushes and returns the shards written.
    pub fn finish(mut self) -> io::Result<Vec<ShardInfo>> {
        if let Some(mut writer) = self.current.take() {
            writer.flush()?;
        }
        Ok(self.shards)
    }
}

/// Little-endian bytes of `ids` at `dtype` width, into `out` (cleared first).
pub fn encode_ids(ids: &[u32], dtype: Dtype, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(ids.len() * dtype.width());
    match dtype {
        Dtype::U16 => ids
            .iter()
            .for_each(|&id| out.extend_from_slice(&(id as u16).to_le_bytes())),
        Dtype::U32 => ids
            .iter()
            .for_each(|&id| out.extend_from_slice(&id.to_le_bytes())),
    }
}

/// Writes SFT examples: tokens, loss mask and offsets.
pub struct SftWriter {
    tokens: BufWriter<File>,
    mask: BufWriter<File>,
    offsets: Vec<u64>,
    offsets_path: PathBuf,
    dtype: Dtype,
    buffer: Vec<u8>,
    trainable: u64,
}

impl SftWriter {
    /// A writer of `<cache_dir>/<split>/{tokens,mask,offsets}.bin`.
    pub fn new(cache_dir: &Path, split: Split, dtype: Dtype) -> io::Result<SftWriter> {
        let dir = cache_dir.join(split.as_str());
        std::fs::create_dir_all(&dir)?;
        Ok(SftWriter {
            tokens: BufWriter::with_capacity(1 << 20, File::create(dir.join("tokens.bin"))?),
            mask: BufWriter::with_capacity(1 << 18, File::create(dir.join("mask.bin"))?),
            offsets: vec![0],
            offsets_path: dir.join("offsets.bin"),
            dtype,
            buffer: Vec::new(),
            trainable: 0,
        })
    }

    /// Appends one example; `mask[i]` is 1 where token `i` is trained on.
    pub fn push(&mut self, tokens: &[u32], mask: &[u8]) -> io::Result<()> {
        debug_assert_eq!(tokens.len(), mask.len());
        encode_ids(tokens, self.dtype, &mut self.buffer);
        self.tokens.write_all(&self.buffer)?;
        self.mask.write_all(mask)?;
        self.trainable += mask.iter().map(|&bit| u64::from(bit)).sum::<u64>();
        let end = self.offsets.last().copied().unwrap_or(0) + tokens.len() as u64;
        self.offsets.push(end);
        Ok(())
    }

    /// Flushes; returns (examples, tokens, trainable tokens).
    pub fn finish(mut self) -> io::Result<(u64, u64, u64)> {
        self.tokens.flush()?;
        self.mask.flush()?;
        let mut bytes = Vec::with_capacity(self.offsets.len() * 8);
        for offset in &self.offsets {
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        std::fs::write(&self.offsets_path, bytes)?;
        let examples = self.offsets.len() as u64 - 1;
        Ok((
            examples,
            self.offsets.last().copied().unwrap_or(0),
            self.trainable,
        ))
    }
}

/// An opened cache.
#[derive(Debug, Clone)]
pub struct TokenCache {
    /// Its directory.
    pub dir: PathBuf,
    /// Its `meta.json`.
    pub meta: CacheMeta,
}

/// A memory-mapped file of token ids.
#[derive(Debug)]
struct TokenFile {
    map: Option<Mmap>,
    dtype: Dtype,
    len: u64,
}

impl TokenFile {
    /// Maps `path`, checking its size and that every id is below `vocab_size` (a
    /// flipped byte must be reported as a corrupted file, not fail deep in training).
    fn open(
        path: &Path,
        dtype: Dtype,
        expected_tokens: u64,
        vocab_size: u32,
    ) -> Result<TokenFile, CacheError> {
        let file = File::open(path).at(path)?;
        let bytes = file.metadata().at(path)?.len();
        if bytes != expected_tokens * dtype.width() as u64 {
            return Err(CacheError::Invalid {
                cache: path.to_path_buf(),
                reason: format!(
                    "{} bytes, but meta.json says {expected_tokens} tokens of {dtype:?}",
                    bytes
                ),
            });
        }
        // An empty file cannot be mapped; it simply holds no tokens.
        let map = if bytes == 0 {
            None
        } else {
            // SAFETY: store outputs are immutable once published; nothing writes this file
            // while it is mapped.
            Some(unsafe { Mmap::map(&file) }.at(path)?)
        };
        let token_file = TokenFile {
            map,
            dtype,
            len: expected_tokens,
        };
        if let Some((position, id)) = token_file.first_id_at_or_above(vocab_size) {
            return Err(CacheError::Corrupted {
                file: path.to_path_buf(),
                position,
                id,
                vocab_size,
            });
        }
        Ok(token_file)
    }

    /// The first token (index, id) whose id is `bound` or more.
    fn first_id_at_or_above(&self, bound: u32) -> Option<(u64, u32)> {
        use rayon::prelude::*;
        let map = self.map.as_ref()?;
        let width = self.dtype.width();
        const CHUNK_TOKENS: usize = 1 << 20;
        map.par_chunks(CHUNK_TOKENS * width)
            .enumerate()
            .find_map_first(|(chunk, bytes)| {
                let mut ids = Vec::with_capacity(bytes.len() / width);
                decode_ids(bytes, self.dtype, &mut ids);
                let offset = ids.iter().position(|&id| id >= bound)?;
                Some(((chunk * CHUNK_TOKENS + offset) as u64, ids[offset]))
            })
    }

    fn read(&self, start: u64, count: usize, out: &mut Vec<u32>) {
        let Some(map) = &self.map else { return };
        let width = self.dtype.width();
        let from = start as usize * width;
        decode_ids(&map[from..from + count * width], self.dtype, out);
    }
}

/// Appends the little-endian ids in `bytes` to `out`.
fn decode_ids(bytes: &[u8], dtype: Dtype, out: &mut Vec<u32>) {
    match dtype {
        Dtype::U16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|pair| u32::from(u16::from_le_bytes([pair[0], pair[1]]))),
        ),
        Dtype::U32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|quad| u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]])),
        ),
    }
}

impl TokenCache {
    /// Opens the cache in `dir` (reads and checks `meta.json`).
    pub fn open(dir: &Path) -> Result<TokenCache, CacheError> {
        let path = dir.join("meta.json");
        let bytes = std::fs::read(&path).at(&path)?;
        let meta: CacheMeta =
            serde_json::from_slice(&bytes).map_err(|error| CacheError::BadMeta {
                path: path.clone(),
                reason: error.to_string(),
            })?;
        if meta.format != FORMAT {
            return Err(CacheError::BadMeta {
                path,
                reason: format!(
                    "format {} (this trainyard reads format {FORMAT})",
                    meta.format
                ),
            });
        }
        Ok(TokenCache {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// Fails unless `tokenizer_file` is byte-for-byte the tokenizer the cache was built with.
    pub fn verify_tokenizer(&self, tokenizer_file: &Path) -> Result<(), CacheError> {
        let bytes = std::fs::read(tokenizer_file).at(tokenizer_file)?;
        let found = blake3::hash(&bytes).to_hex().to_string();
        if found != self.meta.tokenizer_hash {
            return Err(CacheError::TokenizerMismatch {
                cache: self.dir.clone(),
                expected: self.meta.tokenizer_hash.clone(),
                tokenizer: tokenizer_file.to_path_buf(),
                found,
            });
        }
        Ok(())
    }

    /// Whether the cache has `split`.
    pub fn has(&self, split: Split) -> bool {
        self.meta.splits.contains_key(split.as_str())
    }

    fn split(&self, split: Split, mode: CacheMode) -> Result<&SplitInfo, CacheError> {
        if self.meta.mode != mode {
            return Err(CacheError::Invalid {
                cache: self.dir.clone(),
                reason: format!(
                    "holds {:?} data, but {mode:?} data was asked for",
                    self.meta.mode
                ),
            });
        }
        self.meta
            .splits
            .get(split.as_str())
            .ok_or_else(|| CacheError::Invalid {
                cache: self.dir.clone(),
                reason: format!("has no `{split}` split"),
            })
    }

    /// The pretraining token stream of `split`.
    pub fn stream(&self, split: Split) -> Result<TokenStream, CacheError> {
        let info = self.split(split, CacheMode::Pretrain)?;
        let shards = info
            .shards
            .iter()
            .map(|shard| {
                TokenFile::open(
                    &self.dir.join(&shard.file),
                    self.meta.dtype,
                    shard.tokens,
                    self.meta.vocab_size,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenStream { shards })
    }

    /// The SFT examples of `split`.
    pub fn examples(&self, split: Split) -> Result<SftExamples, CacheError> {
        let info = self.split(split, CacheMode::Sft)?;
        let dir = self.dir.join(split.as_str());
        let offsets_path = dir.join("offsets.bin");
        let raw = std::fs::read(&offsets_path).at(&offsets_path)?;
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])))
            .collect();
        let consistent = offsets.len() as u64 == info.documents + 1
            && offsets.last() == Some(&info.tokens)
            && offsets.windows(2).all(|pair| pair[0] <= pair[1]);
        if !consistent {
            return Err(CacheError::Invalid {
                cache: self.dir.clone(),
                reason: format!("{} does not match meta.json", offsets_path.display()),
            });
        }
        let tokens = TokenFile::open(
            &dir.join("tokens.bin"),
            self.meta.dtype,
            info.tokens,
            self.meta.vocab_size,
        )?;
        let mask_path = dir.join("mask.bin");
        let mask = std::fs::read(&mask_path).at(&mask_path)?;
        if mask.len() as u64 != info.tokens {
            return Err(CacheError::Invalid {
                cache: self.dir.clone(),
                reason: format!(
                    "{} has {} bytes for {} tokens",
                    mask_path.display(),
                    mask.len(),
                    info.tokens
                ),
            });
        }
        Ok(SftExamples {
            tokens,
            mask,
            offsets,
        })
    }
}

/// A pretraining token stream: shards of token ids, read through memory maps.
#[derive(Debug)]
pub struct TokenStream {
    shards: Vec<TokenFile>,
}

impl TokenStream {
    /// Total tokens.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|shard| shard.len).sum()
    }

    /// Whether it holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A window of `length` consecutive tokens at a random place (within one shard),
    /// or `None` if no shard is that long.
    pub fn random_window(&self, rng: &mut Rng, length: usize) -> Option<Vec<u32>> {
        let starts: Vec<u64> = self
            .shards
            .iter()
            .map(|shard| (shard.len + 1).saturating_sub(length as u64))
            .collect();
        let total: u64 = starts.iter().sum();
        if total == 0 {
            return None;
        }
        let mut pick = rng.below(total);
        for (shard, count) in self.shards.iter().zip(&starts) {
            if pick < *count {
                let mut out = Vec::with_capacity(length);
                shard.read(pick, length, &mut out);
                return Some(out);
            }
            pick -= count;
        }
        None
    }

    /// How often each id below `vocab_size` occurs in the first `limit` tokens (ids at
    /// or above `vocab_size` are not counted): the statistics of a unigram baseline.
    pub fn counts(&self, vocab_size: usize, limit: u64) -> Vec<u64> {
        let mut counts = vec![0u64; vocab_size];
        let mut left = limit;
        let mut chunk = Vec::new();
        for shard in &self.shards {
            let mut start = 0;
            while start < shard.len && left > 0 {
                let take = (shard.len - start).min(left).min(1 << 20);
                chunk.clear();
                shard.read(start, take as usize, &mut chunk);
                for &id in &chunk {
                    if let Some(count) = counts.get_mut(id as usize) {
                        *count += 1;
                    }
                }
                start += take;
                left -= take;
            }
        }
        counts
    }

    /// Consecutive, non-overlapping windows of `length` tokens from the start, at most
    /// `limit` of them (for a deterministic evaluation set).
    pub fn sequential_windows(&self, length: usize, limit: usize) -> Vec<Vec<u32>> {
        let mut windows = Vec::new();
        for shard in &self.shards {
            let mut start = 0;
            while start + length as u64 <= shard.len && windows.len() < limit {
                let mut out = Vec::with_capacity(length);
                shard.read(start, length, &mut out);
                windows.push(out);
                // Windows share one token: the last target of one is the first input of the next.
                start += length as u64 - 1;
            }
        }
        windows
    }
}

/// Several token streams sampled by weight, deterministically by seed.
#[derive(Debug)]
pub struct Mixture {
    sources: Vec<(String, TokenStream, f64)>,
}

impl Mixture {
    /// A mixture of named streams with weights (normalised; need not sum to 1).
    pub fn new(sources: Vec<(String, TokenStream, f64)>) -> Result<Mixture, String> {
        if sources.is_empty() {
            return Err("a mixture needs at least one token cache".to_string());
        }
        if let Some((name, _, weight)) = sources
            .iter()
            .find(|(_, _, weight)| !(weight.is_finite() && *weight >= 0.0))
        {
            return Err(format!(
                "mixture weight of `{name}` must be a finite number ≥ 0, not {weight}"
            ));
        }
        if sources.iter().all(|(_, _, weight)| *weight == 0.0) {
            return Err("mixture weights are all zero".to_string());
        }
        Ok(Mixture { sources })
    }

    /// One window of `length` tokens: a source drawn by weight, then a random window.
    pub fn sample(&self, rng: &mut Rng, length: usize) -> Result<Vec<u32>, String> {
        let total: f64 = self.sources.iter().map(|(_, _, weight)| weight).sum();
        let mut pick = rng.next_f64() * total;
        let mut chosen = &self.sources[self.sources.len() - 1];
        for source in &self.sources {
            if pick < source.2 {
                chosen = source;
                break;
            }
            pick -= source.2;
        }
        chosen.1.random_window(rng, length).ok_or_else(|| {
            format!(
                "token cache `{}` has no shard of {length} tokens; use a shorter context",
                chosen.0
            )
        })
    }
}

/// SFT examples with their loss masks.
#[derive(Debug)]
pub struct SftExamples {
    tokens: TokenFile,
    mask: Vec<u8>,
    offsets: Vec<u64>,
}

impl SftExamples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens and loss mask of example `index`.
    pub fn example(&self, index: usize) -> (Vec<u32>, &[u8]) {
        let (start, end) = (self.offsets[index], self.offsets[index + 1]);
        let mut tokens = Vec::with_capacity((end - start) as usize);
        self.tokens.read(start, (end - start) as usize, &mut tokens);
        (tokens, &self.mask[start as usize..end as usize])
    }
}

/// A training batch: `batch × seq` inputs, the next-token targets, and per-target loss
/// weights (0 for padding and for tokens the loss must not cover).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq: usize,
    /// Input ids, row-major.
    pub inputs: Vec<u32>,
    /// Target ids, row-major.
    pub targets: Vec<u32>,
    /// 1.0 where the target counts, else 0.0.
    pub weights: Vec<f32>,
}

impl Batch {
    /// A pretraining batch from windows of `seq + 1` tokens.
    pub fn from_windows(windows: &[Vec<u32>]) -> Batch {
        let seq = windows
            .first()
            .map_or(0, |window| window.len().saturating_sub(1));
        let mut batch = Batch {
            batch: windows.len(),
            seq,
            inputs: Vec::with_capacity(windows.len() * seq),
            targets: Vec::with_capacity(windows.len() * seq),
            weights: vec![1.0; windows.len() * seq],
        };
        for window in windows {
            batch.inputs.extend_from_slice(&window[..seq]);
            batch.targets.extend_from_slice(&window[1..=seq]);
        }
        batch
    }
}

/// Position of an [`SftBatcher`], saved in checkpoints for exact resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftPosition {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Next example within this epoch's order.
    pub cursor: u64,
}

/// Deterministic SFT batches: a seeded shuffle per epoch, then either one example per
/// row (padded) or, with `packing`, consecutive examples packed into each row.
#[derive(Debug)]
pub struct SftBatcher<'a> {
    examples: &'a SftExamples,
    seed: u64,
    batch_size: usize,
    seq: usize,
    packing: bool,
    pad_id: u32,
    order: Vec<usize>,
    position: SftPosition,
}

impl<'a> SftBatcher<'a> {
    /// A batcher at `position` (`SftPosition::default()` to start).
    pub fn new(
        examples: &'a SftExamples,
        seed: u64,
        batch_size: usize,
        seq: usize,
        packing: bool,
        pad_id: u32,
        position: SftPosition,
    ) -> SftBatcher<'a> {
        let mut batcher = SftBatcher {
            examples,
            seed,
            batch_size: batch_size.max(1),
            seq: seq.max(1),
            packing,
            pad_id,
            order: Vec::new(),
            position,
        };
        batcher.shuffle();
        batcher
    }

    fn shuffle(&mut self) {
        self.order = (0..self.examples.len()).collect();
        Rng::new(self.seed, 0x5f7_0000 + self.position.epoch).shuffle(&mut self.order);
    }

    /// Where the next batch starts.
    pub fn position(&self) -> SftPosition {
        self.position
    }

    /// Moves to `position`, as [`SftBatcher::new`] would have started there.
    pub fn seek(&mut self, position: SftPosition) {
        self.position = position;
        self.shuffle();
    }

    /// The next example in order, without consuming it.
    fn peek_example(&mut self) -> usize {
        if self.position.cursor as usize >= self.order.len() {
            self.position.epoch += 1;
            self.position.cursor = 0;
            self.shuffle();
        }
        self.order[self.position.cursor as usize]
    }

    /// The next batch (`None` when there are no examples). Without packing each row
    /// holds one example, cut to `seq`; with packing, whole examples follow each other
    /// in a row (attending across their boundary, as most packing trainers do) and one
    /// that does not fit starts the next row.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.examples.is_empty() {
            return None;
        }
        let (rows, seq) = (self.batch_size, self.seq);
        let mut batch = Batch {
            batch: rows,
            seq,
            inputs: vec![self.pad_id; rows * seq],
            targets: vec![self.pad_id; rows * seq],
            weights: vec![0.0; rows * seq],
        };
        for row in 0..rows {
            let mut filled = 0;
            loop {
                let index = self.peek_example();
                let (tokens, mask) = self.examples.example(index);
                // Inputs are tokens[..n-1], targets tokens[1..]; a target is trained
                // when its token is an assistant token.
                let needed = tokens.len().saturating_sub(1);
                if filled > 0 && needed > seq - filled {
                    break;
                }
                let usable = needed.min(seq - filled);
                for offset in 0..usable {
                    let at = row * seq + filled + offset;
                    batch.inputs[at] = tokens[offset];
                    batch.targets[at] = tokens[offset + 1];
                    batch.weights[at] = f32::from(mask[offset + 1]);
                }
                filled += usable;
                self.position.cursor += 1;
                if !self.packing || filled >= seq {
                    break;
                }
            }
        }
        Some(batch)
    }
}

//! Streaming the texts of a corpus for tokenizer training and statistics: `train.jsonl`
//! style files (a `text` per line, or a chat `messages` list whose contents and tool
//! calls are all texts), plain text files, or directories of them. Files are read in
//! blocks of whole lines, so memory stays bounded whatever the corpus size, and word
//! counting runs on every core.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use serde::Deserialize;

use crate::data::records::ChatMessage;
use crate::interrupt::CancelFlag;

use super::pretokenize;
use crate::path_error::{AtPath, PathIoError};

/// How many bytes a read block holds (it grows to the next line end).
const BLOCK: usize = 1 << 20;
/// A plain-text block is cut only where no pre-token can straddle the cut (see
/// [`text_cut`]); past this size it is cut at any line end.
const MAX_TEXT_BLOCK: usize = 16 << 20;

/// Why a corpus could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A file or directory could not be read.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// A JSONL line is not a JSON object of the expected shape.
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A JSONL record has neither `text` nor `messages`.
    #[error(
        "{path}:{line}: the record has no `text` string and no `messages` list (a corpus line is {{\"text\": ...}} or {{\"messages\": [...]}})"
    )]
    NoText {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
    },
    /// A text file is not UTF-8.
    #[error("{path}:{line}: not valid UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
    },
    /// A file given by name has an extension trainyard does not read as text.
    #[error("{path}: cannot read this file as text; expected a .jsonl, .txt or .md file")]
    Unsupported {
        /// The file.
        path: PathBuf,
    },
    /// A directory holds no corpus file.
    #[error("{path}: no .jsonl, .txt or .md files in this directory")]
    NoFiles {
        /// The directory.
        path: PathBuf,
    },
    /// A counting thread panicked.
    #[error("a word-counting thread failed unexpectedly (this is a bug in trainyard)")]
    WorkerFailed,
    /// The user asked to stop.
    #[error("interrupted")]
    Interrupted,
}

/// How a corpus file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON record per line (`text` or chat `messages`).
    Jsonl,
    /// Plain UTF-8 text.
    Text,
}

impl Format {
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "jsonl" => Some(Format::Jsonl),
            "txt" | "md" | "text" => Some(Format::Text),
            _ => None,
        }
    }
}

/// One file of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusFile {
    /// Where it is.
    pub path: PathBuf,
    /// How to read it.
    pub format: Format,
}

/// The files to read for `path`: the file itself; or, for a directory, its `preferred`
/// file (`train.jsonl` of an ingest output) if it has one, else every `.jsonl`, `.txt`
/// and `.md` file below it in path order (other files, such as `stats.json` or logs, are
/// skipped).
pub fn corpus_files(path: &Path, preferred: &str) -> Result<Vec<CorpusFile>, CorpusError> {
    let metadata = std::fs::metadata(path).at(path)?;
    if !metadata.is_dir() {
        let format = Format::of(path).ok_or_else(|| CorpusError::Unsupported {
            path: path.to_path_buf(),
        })?;
        return Ok(vec![CorpusFile {
            path: path.to_path_buf(),
            format,
        }]);
    }
    let preferred_path = path.join(preferred);
    if preferred_path.is_file()
        && let Some(format) = Format::of(&preferred_path)
    {
        return Ok(vec![CorpusFile {
            path: preferred_path,
            format,
        }]);
    }
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.is_empty() {
        return Err(CorpusError::NoFiles {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

fn collect_files(dir: &Path, files: &mut Vec<CorpusFile>) -> Result<(), CorpusError> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else if let Some(format) = Format::of(&path) {
            files.push(CorpusFile { path, format });
        }
    }
    Ok(())
}

/// A block of whole lines of one file.
struct Block {
    file: usize,
    first_line: u64,
    data: Vec<u8>,
}

/// Reads the files of a corpus as blocks of whole lines, stopping after `max_docs`
/// documents (JSONL records, or lines of text files) when set.
struct BlockReader<'a> {
    files: &'a [CorpusFile],
    next_file: usize,
    open: Option<(usize, std::fs::File)>,
    pending: Vec<u8>,
    line: u64,
    docs_left: Option<u64>,
    bytes_read: u64,
}

impl<'a> BlockReader<'a> {
    fn new(files: &'a [CorpusFile], max_docs: Option<u64>) -> BlockReader<'a> {
        BlockReader {
            files,
            next_file: 0,
            open: None,
            pending: Vec::new(),
            line: 1,
            docs_left: max_docs,
            bytes_read: 0,
        }
    }

    fn next_block(&mut self) -> Result<Option<Block>, CorpusError> {
        loop {
            if self.docs_left == Some(0) {
                return Ok(None);
            }
            if self.open.is_none() {
                if self.next_file == self.files.len() {
                    return Ok(None);
                }
                let path = &self.files[self.next_file].path;
                let file = std::fs::File::open(path).at(path)?;
                self.open = Some((self.next_file, file));
                self.next_file += 1;
                self.pending.clear();
                self.line = 1;
            }
            let Some((index, file)) = self.open.as_mut() else {
                continue;
            };
            let index = *index;
            let format = self.files[index].format;
            let start = self.pending.len();
            self.pending.resize(start + BLOCK, 0);
            let read = loop {
                match file.read(&mut self.pending[start..]) {
                    Ok(read) => break read,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(PathIoError::new(&self.files[index].path, source).into());
                    }
                }
            };
            self.pending.truncate(start + read);
            self.bytes_read += read as u64;
            let at_end = read == 0;
            let cut = if at_end {
                Some(self.pending.len())
            } else {
                match format {
                    Format::Jsonl => self
                        .pending
                        .iter()
                        .rposition(|&byte| byte == b'\n')
                        .map(|at| at + 1),
                    Format::Text => text_cut(&self.pending, self.pending.len() >= MAX_TEXT_BLOCK),
                }
            };
            let Some(cut) = cut else {
                continue;
            };
            let rest = self.pending.split_off(cut);
            let mut data = std::mem::replace(&mut self.pending, rest);
            if at_end {
                self.open = None;
            }
            if let Some(left) = self.docs_left.as_mut() {
                let (kept, docs) = take_docs(&data, *left, format);
                data.truncate(kept);
                *left -= docs;
            }
            if data.is_empty() {
                continue;
            }
            let block = Block {
                file: index,
                first_line: self.line,
                data,
            };
            self.line += block.data.iter().filter(|&&byte| byte == b'\n').count() as u64;
            return Ok(Some(block));
        }
    }
}

/// Where to cut a plain-text buffer so that no pre-token straddles the cut: after a line
/// feed between two printable ASCII characters (`x\ny` splits as `x`, `\n`, `y` whether
/// cut there or not). With `anywhere`, after the last line feed (or at the last character
/// boundary) instead, when no such place exists.
fn text_cut(buffer: &[u8], anywhere: bool) -> Option<usize> {
    let printable = |byte: u8| (0x21..=0x7E).contains(&byte);
    let safe = (1..buffer.len().saturating_sub(1))
        .rev()
        .find(|&at| buffer[at] == b'\n' && printable(buffer[at - 1]) && printable(buffer[at + 1]));
    if let Some(at) = safe {
        return Some(at + 1);
    }
    if !anywhere {
        return None;
    }
    if let Some(at) = buffer.iter().rposition(|&byte| byte == b'\n') {
        return Some(at + 1);
    }
    (1..buffer.len())
        .rev()
        .find(|&at| buffer[at] & 0xC0 != 0x80)
        .or(Some(buffer.len()))
}

/// How many bytes of `data` hold its first `limit` documents, and how many it holds.
fn take_docs(data: &[u8], limit: u64, format: Format) -> (usize, u64) {
    let mut docs = 0;
    let mut start = 0;
    while start < data.len() {
        let end = data[start..]
            .iter()
            .position(|&byte| byte == b'\n')
            .map_or(data.len(), |at| start + at + 1);
        let line = &data[start..end];
        if format == Format::Text || line.iter().any(|byte| !byte.is_ascii_whitespace()) {
            docs += 1;
        }
        start = end;
        if docs == limit {
            break;
        }
    }
    (start, docs)
}

/// The parts of a corpus line that hold text; other keys (metadata) are ignored.
#[derive(Deserialize)]
struct TextLine<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
}

/// Calls `each` with every text of `block`: the block itself for plain text, and for
/// JSONL the `text` of each record, or the content and tool calls (as JSON) of every
/// message of a chat record.
fn texts_of_block(
    files: &[CorpusFile],
    block: &Block,
    each: &mut dyn FnMut(&str),
) -> Result<(), CorpusError> {
    let file = &files[block.file];
    match file.format {
        Format::Text => match std::str::from_utf8(&block.data) {
            Ok(text) => each(text),
            Err(error) => {
                let before = &block.data[..error.valid_up_to()];
                let line =
                    block.first_line + before.iter().filter(|&&byte| byte == b'\n').count() as u64;
                return Err(CorpusError::NotUtf8 {
                    path: file.path.clone(),
                    line,
                });
            }
        },
        Format::Jsonl => {
            for (number, line) in (block.first_line..).zip(block.data.split(|&byte| byte == b'\n'))
            {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record: TextLine<'_> =
                    serde_json::from_slice(line).map_err(|error| CorpusError::Json {
                        path: file.path.clone(),
                        line: number,
                        column: error.column(),
                        message: json_message(&error),
                    })?;
                match (record.messages, record.text) {
                    (Some(messages), _) => {
                        for message in &messages {
                            if !message.content.is_empty() {
                                each(&message.content);
                            }
                            for call in &message.tool_calls {
                                if let Ok(json) = serde_json::to_string(call) {
                                    each(&json);
                                }
                            }
                        }
                    }
                    (None, Some(text)) => each(&text),
                    (None, None) => {
                        return Err(CorpusError::NoText {
                            path: file.path.clone(),
                            line: number,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// serde_json's message without its `at line 1 column N` suffix (the caller names the
/// real line).
fn json_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message,
    }
}

/// Calls `each` with every text of `files`, in order, on the calling thread.
pub fn for_each_text(
    files: &[CorpusFile],
    max_docs: Option<u64>,
    cancel: &CancelFlag,
    each: &mut dyn FnMut(&str),
) -> Result<(), CorpusError> {
    let mut reader = BlockReader::new(files, max_docs);
    while let Some(block) = reader.next_block()? {
        if cancel.is_cancelled() {
            return Err(CorpusError::Interrupted);
        }
        texts_of_block(files, &block, each)?;
    }
    Ok(())
}

/// A fast, fixed-seed hasher for the word-count maps (their iteration order never
/// reaches an output: words are sorted before training).
pub type FastState = foldhash::fast::FixedState;

/// The pre-token counts of a corpus: what a tokenizer trainer needs.
#[derive(Debug, Default)]
pub struct WordCounts {
    /// Every distinct pre-token (raw text, not yet byte-level) with its count, sorted by
    /// text so that training never depends on hashing or thread timing.
    pub words: Vec<(Box<str>, u64)>,
    /// Characters of all texts read.
    pub chars: u64,
    /// Texts read (a chat message counts once, each tool call once).
    pub texts: u64,
    /// Bytes of the files read.
    pub bytes: u64,
}

#[derive(Default)]
struct LocalCounts {
    words: HashMap<Box<str>, u64, FastState>,
    chars: u64,
    texts: u64,
}

impl LocalCounts {
    fn add_text(&mut self, text: &str) {
        self.texts += 1;
        self.chars += text.chars().count() as u64;
        pretokenize::split(text, |piece| match self.words.get_mut(piece) {
            Some(count) => *count += 1,
            None => {
                self.words.insert(piece.into(), 1);
            }
        });
    }

    fn absorb(&mut self, mut other: LocalCounts) {
        if other.words.len() > self.words.len() {
            std::mem::swap(&mut self.words, &mut other.words);
        }
        for (word, count) in other.words {
            *self.words.entry(word).or_insert(0) += count;
        }
        self.chars += other.chars;
        self.texts += other.texts;
    }
}

/// Progress of a long operation, for a log line or a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// What is being done.
    pub phase: &'static str,
    /// Units done.
    pub done: u64,
    /// Units in all (0 when unknown).
    pub total: u64,
    /// What the units are (`bytes`, `merges`).
    pub unit: &'static str,
}

/// Splits every text of `files` into pre-tokens and counts them, on `threads` threads
/// (the calling thread reads; the others parse and count). Reads at most `max_docs`
/// documents when set.
pub fn count_words(
    files: &[CorpusFile],
    max_docs: Option<u64>,
    threads: usize,
    cancel: &CancelFlag,
    progress: &mut dyn FnMut(Progress),
) -> Result<WordCounts, CorpusError> {
    let total_bytes: u64 = files
        .iter()
        .filter_map(|file| std::fs::metadata(&file.path).ok())
        .map(|metadata| metadata.len())
        .sum();
    let threads = threads.max(1);
    let (sender, receiver) = mpsc::sync_channel::<Block>(threads * 2);
    let receiver = Arc::new(Mutex::new(receiver));
    let failed = AtomicBool::new(false);
    let mut reader = BlockReader::new(files, max_docs);
    let (read_result, worker_results) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let receiver = Arc::clone(&receiver);
                let failed = &failed;
                scope.spawn(move || -> Result<LocalCounts, CorpusError> {
                    let mut counts = LocalCounts::default();
                    loop {
                        let block = match receiver.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return Err(CorpusError::WorkerFailed),
                        };
                        let Ok(block) = block else {
                            return Ok(counts);
                        };
                        if let Err(error) =
                            texts_of_block(files, &block, &mut |text| counts.add_text(text))
                        {
                            failed.store(true, Ordering::Relaxed);
                            return Err(error);
                        }
                    }
                })
            })
            .collect();
        let read_result = (|| {
            while let Some(block) = reader.next_block()? {
                if cancel.is_cancelled() {
                    return Err(CorpusError::Interrupted);
                }
                if failed.load(Ordering::Relaxed) || sender.send(block).is_err() {
                    break;
                }
                progress(Progress {
                    phase: "counting words",
                    done: reader.bytes_read,
                    total: total_bytes,
                    unit: "bytes",
                });
            }
            Ok(())
        })();
        drop(sender);
        let results: Vec<_> = workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or(Err(CorpusError::WorkerFailed)))
            .collect();
        (read_result, results)
    });
    let mut errors = Vec::new();
    let mut total = LocalCounts::default();
    for result in worker_results {
        match result {
            Ok(counts) => total.absorb(counts),
            Err(error) => errors.push(error),
        }
    }
    // Report the first error in file order, whichever thread met it first.
    errors.sort_by_key(|error| match error {
        CorpusError::Json { path, line, .. }
        | CorpusError::NoText { path, line }
        | CorpusError::NotUtf8 { path, line } => {
            (files.iter().position(|file| &file.path == path), *line)
        }
        _ => (None, 0),
    });
    read_result?;
    if let Some(error) = errors.into_iter().next() {
        return Err(error);
    }
    let mut words: Vec<(Box<str>, u64)> = total.words.into_iter().collect();
    words.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(WordCounts {
        words,
        chars: total.chars,
        texts: total.texts,
        bytes: reader.bytes_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    fn texts(files: &[CorpusFile], max_docs: Option<u64>) -> Result<Vec<String>, CorpusError> {
        let mut out = Vec::new();
        for_each_text(files, max_docs, &CancelFlag::new(), &mut |text| {
            out.push(text.to_string())
        })?;
        Ok(out)
    }

    #[test]
    fn jsonl_yields_texts_and_every_part_of_chat_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "train.jsonl",
            concat!(
                "{\"text\": \"plain doc\", \"source_url\": \"x\"}\n",
                "\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"},",
                " {\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"a\": 1}}]}]}\n",
            ),
        );
        let files = corpus_files(&path, "train.jsonl").unwrap();
        assert_eq!(
            texts(&files, None).unwrap(),
            [
                "plain doc",
                "hi",
                "{\"name\":\"f\",\"arguments\":{\"a\":1}}"
            ]
        );
        assert_eq!(texts(&files, Some(1)).unwrap(), ["plain doc"]);
    }

    #[test]
    fn bad_lines_are_reported_with_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "c.jsonl", "{\"text\": \"ok\"}\n{\"text\": 3}\n");
        let files = corpus_files(&path, "train.jsonl").unwrap();
        let error = texts(&files, None).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{}:2:", path.display())),
            "{error}"
        );
        assert!(error.contains("invalid type"), "{error}");

        let path = write(dir.path(), "d.jsonl", "{\"title\": \"no text\"}\n");
        let files = corpus_files(&path, "train.jsonl").unwrap();
        let error = texts(&files, None).unwrap_err().to_string();
        assert!(
            error.contains("d.jsonl:1: the record has no `text`"),
            "{error}"
        );
        let error = count_words(&files, None, 2, &CancelFlag::new(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(error.contains("d.jsonl:1:"), "{error}");
    }

    #[test]
    fn directories_prefer_their_named_file_and_skip_other_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train.jsonl", "{\"text\": \"a\"}\n");
        write(dir.path(), "eval.jsonl", "{\"text\": \"b\"}\n");
        write(dir.path(), "stats.json", "{}");
        let files = corpus_files(dir.path(), "eval.jsonl").unwrap();
        assert_eq!(texts(&files, None).unwrap(), ["b"]);
        let files = corpus_files(dir.path(), "nothing.jsonl").unwrap();
        assert_eq!(files.len(), 2);
        assert!(matches!(
            corpus_files(&dir.path().join("stats.json"), "train.jsonl"),
            Err(CorpusError::Unsupported { .. })
        ));
    }

    #[test]
    fn plain_text_cuts_never_change_the_pre_tokens() {
        let buffer = b"one two\n\nthree\nfour\n  five";
        let cut = text_cut(buffer, false).unwrap();
        assert_eq!(&buffer[..cut], b"one two\n\nthree\n");
        assert_eq!(text_cut(b"a\n\n b", false), None);
    }

    #[test]
    fn counting_in_parallel_matches_counting_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut content = String::new();
        for index in 0..5000 {
            content.push_str(&format!(
                "{{\"text\": \"word{} the cat's hat {index}\"}}\n",
                index % 7
            ));
        }
        let path = write(dir.path(), "t.jsonl", &content);
        let files = corpus_files(&path, "train.jsonl").unwrap();
        let counts = count_words(&files, None, 3, &CancelFlag::new(), &mut |_| {}).unwrap();
        let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
        for text in texts(&files, None).unwrap() {
            pretokenize::split(&text, |piece| {
                *expected.entry(piece.to_string()).or_default() += 1
            });
        }
        let got: Vec<(String, u64)> = counts
            .words
            .iter()
            .map(|(word, count)| (word.to_string(), *count))
            .collect();
        assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
        assert_eq!(counts.texts, 5000);
        assert_eq!(counts.bytes, content.len() as u64);
    }
}

//! A throwaway workspace and the `trainyard` binary, for integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use trainyard::data::Split;

/// A temporary workspace directory.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative))
            .unwrap_or_else(|error| panic!("{relative}: {error}"))
    }

    /// `trainyard ARGS` in the sandbox, with no TRAINYARD_* variables from the caller.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trainyard"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("TRAINYARD_") {
                command.env_remove(key);
            }
        }
        command
    }

    pub fn trainyard(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run trainyard")
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trainyard")
    }

    /// Runs and asserts success; returns stdout + stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.trainyard(args);
        let text = text(&output);
        assert!(
            output.status.success(),
            "trainyard {args:?} failed:\n{text}"
        );
        text
    }

    /// Runs and asserts failure; returns stdout + stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.trainyard(args);
        let text = text(&output);
        assert!(
            !output.status.success(),
            "trainyard {args:?} should have failed:\n{text}"
        );
        text
    }

    /// The latest run's `resolved_settings.json`.
    pub fn latest_record(&self) -> serde_json::Value {
        serde_json::from_str(&self.read("runs/latest/resolved_settings.json"))
            .expect("resolved_settings.json is JSON")
    }

    /// Stage name → status in the latest run.
    pub fn latest_statuses(&self) -> BTreeMap<String, String> {
        let record = self.latest_record();
        record["stages"]
            .as_object()
            .expect("stages")
            .iter()
            .map(|(name, stage)| {
                (
                    name.clone(),
                    stage["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Stages executed by the latest run, sorted.
    pub fn executed(&self) -> Vec<String> {
        self.latest_statuses()
            .into_iter()
            .filter(|(_, status)| status == "executed")
            .map(|(name, _)| name)
            .collect()
    }

    /// Finished store entries of `stage` (directories with a manifest).
    pub fn store_entries(&self, stage: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.path(".trainyard/store").join(stage)) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries.map(|entry| entry.unwrap().path()).collect();
        dirs.sort();
        dirs
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits up to 30 s for `path` to exist.
pub fn wait_for(path: &Path) {
    for _ in 0..600 {
        if path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}

/// A diamond-ish pipeline: `left` reads x.txt, `right` reads y.txt, `join` reads both
/// outputs, `tail` reads only `right`.
pub const BRANCHES: &str = r#"
name: branches
seed: 7
stages:
  left:
    kind: command
    inputs: { src: data/x.txt }
    with: { cmd: "tr a-z A-Z < $TY_IN_SRC > out.txt", outputs: [out.txt] }
  right:
    kind: command
    inputs: { src: data/y.txt }
    with: { cmd: "rev < $TY_IN_SRC > out.txt" }
  join:
    kind: command
    inputs: { a: left/out.txt, b: right/out.txt }
    with: { cmd: "cat $TY_IN_A $TY_IN_B > joined.txt" }
  tail:
    kind: command
    inputs: { r: right }
    with: { cmd: "wc -c < $TY_IN_R/out.txt > size.txt" }
profiles:
  dev:
    description: a different join
    stages:
      join:
        with: { cmd: "cat $TY_IN_B $TY_IN_A > joined.txt" }
"#;

pub fn branches() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", BRANCHES);
    sandbox.write("data/x.txt", "left input\n");
    sandbox.write("data/y.txt", "right input\n");
    sandbox
}

/// Trains a small byte-level BPE tokenizer with trainyard's special tokens on `texts`
/// and saves it to `path` (the `tokenizer` stage does the same at full size).
pub fn write_test_tokenizer(path: &Path, texts: &[&str], vocab_size: usize) {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    let specials: Vec<AddedToken> = trainyard::tokenize::special::SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(token.to_string(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    tokenizer.train(&mut trainer, texts.iter()).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    tokenizer.save(path, false).unwrap();
}

/// The synthetic world's documents and conversations → tokenizer → text and chat
/// caches → a small pretrained llama `base`, followed by the stages in `tail`.
pub fn chat_pipeline(tail: &str) -> String {
    format!(
        "name: chat
seed: 11
stages:
  docs:
    kind: ingest
    with: {{ source: {{ synthetic: {{ part: documents, documents: 300 }} }}, eval_ratio: 0.1 }}
  chats:
    kind: ingest
    with: {{ source: {{ synthetic: {{ part: conversations, documents: 300, conversations: 300 }} }}, eval_ratio: 0.1 }}
  tok:
    kind: tokenizer
    inputs: {{ text: docs/train.jsonl }}
    with: {{ vocab_size: 384 }}
  text-cache:
    kind: token-cache
    inputs: {{ train: docs/train.jsonl, eval: docs/eval.jsonl, tokenizer: tok }}
  chat-cache:
    kind: token-cache
    inputs: {{ train: chats/train.jsonl, eval: chats/eval.jsonl, tokenizer: tok }}
    with: {{ max_len: 128 }}
  base:
    kind: pretrain
    inputs: {{ data: text-cache, tokenizer: tok }}
    with: {{ model: {{ family: llama, layers: 2, heads: 4, dim: 64 }}, context: 64, batch_size: 8, steps: 30, lr: 0.003, eval_every: 0 }}
{tail}"
    )
}

/// blake3 of a file, hex.
pub fn file_hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())))
        .to_hex()
        .to_string()
}

/// Mean assistant-token loss of the model `model` on the first batches of the eval
/// split of the SFT cache in `cache_dir`.
pub fn assistant_loss(model: &trainyard::model::CausalLm, cache_dir: &Path) -> f64 {
    use trainyard::data::token_cache::{SftBatcher, SftPosition, TokenCache};
    let cache = TokenCache::open(cache_dir).unwrap();
    let examples = cache.examples(Split::Eval).unwrap();
    let mut batcher = SftBatcher::new(
        &examples,
        1,
        8,
        128,
        false,
        cache.meta.pad_id,
        SftPosition {
            epoch: 0,
            cursor: 0,
        },
    );
    let batches: Vec<_> = (0..3).filter_map(|_| batcher.next_batch()).collect();
    trainyard::train::trainer::evaluate(model, &batches, &candle_core::Device::Cpu).unwrap()
}

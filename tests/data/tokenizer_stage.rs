//! The `tokenizer` stage end to end through the binary: training from a corpus file,
//! adopting an existing tokenizer.json, caching, and the errors a user can make.

use crate::common;

use common::Sandbox;

/// A small corpus of plain and chat records.
fn corpus(documents: usize, salt: usize) -> String {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "and",
        "runs",
        "away",
        "from",
        "a",
        "tokenizer",
        "that",
        "learns",
        "words",
        "café",
        "naïve",
        "東京",
    ];
    let mut out = String::new();
    for index in 0..documents {
        let text: Vec<&str> = (0..12)
            .map(|k| words[(index * 7 + k * 3 + salt + k * k) % words.len()])
            .collect();
        let text = format!("{}.", text.join(" "));
        let line = if index % 5 == 4 {
            serde_json::json!({ "messages": [
                { "role": "user", "content": text },
                { "role": "assistant", "content": "Sure, the dog runs." },
            ] })
        } else {
            serde_json::json!({ "text": text })
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn sandbox_with_corpus() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("data/train.jsonl", &corpus(400, 0));
    sandbox.write("data/eval.jsonl", &corpus(40, 5));
    sandbox
}

const TRAIN: &str = r#"
name: tok
stages:
  tok:
    kind: tokenizer
    inputs: { text: data/train.jsonl, eval: data/eval.jsonl }
    with: { algorithm: bpe, vocab_size: 300, min_frequency: 2 }
"#;

fn read_stats(sandbox: &Sandbox, stage: &str) -> serde_json::Value {
    serde_json::from_str(&sandbox.read(&format!("runs/latest/outputs/{stage}/stats.json")))
        .expect("stats.json is JSON")
}

#[test]
fn tokenizer_stage_writes_a_loadable_tokenizer_and_stats_and_reruns_cached() {
    let sandbox = sandbox_with_corpus();
    sandbox.write("p.yaml", TRAIN);
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["tok"]);

    let path = sandbox.path("runs/latest/outputs/tok/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path).expect("a Hugging Face tokenizer");
    let text = "the lazy fox runs to 東京 🙂";
    let ids = tokenizer
        .encode(text, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(tokenizer.decode(&ids, false).expect("decode"), text);
    assert_eq!(tokenizer.token_to_id("<|assistant|>"), Some(5));

    let stats = read_stats(&sandbox, "tok");
    assert_eq!(stats["source"], "trained");
    assert_eq!(stats["algorithm"], "bpe");
    assert_eq!(stats["vocab_size"], 300);
    assert_eq!(stats["requested_vocab_size"], 300);
    assert_eq!(stats["special_tokens"]["<|pad|>"], 0);
    assert_eq!(stats["special_tokens"]["<|tool_call|>"], 7);
    assert!(stats["train_chars"].as_u64().expect("train_chars") > 10_000);
    let chars_per_token = stats["eval"]["chars_per_token"]
        .as_f64()
        .expect("eval stats");
    assert!(chars_per_token > 1.0, "{chars_per_token}");
    assert!(
        stats.get("training_seconds").is_none(),
        "timings stay out of the output"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/tok/manifest.json")).unwrap();
    assert!(manifest["metrics"]["training_seconds"].as_f64().is_some());

    sandbox.ok(&["run", "p.yaml"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );

    // Another vocabulary size is another tokenizer.
    sandbox.ok(&["run", "p.yaml", "--set", "stages.tok.with.vocab_size=280"]);
    assert_eq!(sandbox.executed(), ["tok"]);
    assert_eq!(read_stats(&sandbox, "tok")["vocab_size"], 280);
}

#[test]
fn tokenizer_stage_trains_from_a_whole_ingest_like_directory_and_unigram() {
    let sandbox = sandbox_with_corpus();
    sandbox.write(
        "p.yaml",
        r#"
name: tok
stages:
  tok:
    kind: tokenizer
    inputs: { text: data, eval: data }
    with: { algorithm: unigram, vocab_size: 300 }
"#,
    );
    sandbox.ok(&["run", "p.yaml"]);
    let stats = read_stats(&sandbox, "tok");
    assert_eq!(stats["algorithm"], "unigram");
    assert!(stats["vocab_size"].as_u64().expect("vocab_size") <= 300);
    let path = sandbox.path("runs/latest/outputs/tok/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path).expect("a Hugging Face tokenizer");
    assert_eq!(tokenizer.token_to_id("<|end|>"), Some(2));
    // Training read train.jsonl only, not eval.jsonl beside it.
    let train_chars: u64 = corpus(400, 0)
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("json");
            match record["messages"].as_array() {
                Some(messages) => messages
                    .iter()
                    .map(|message| message["content"].as_str().unwrap_or("").chars().count())
                    .sum::<usize>() as u64,
                None => record["text"].as_str().unwrap_or("").chars().count() as u64,
            }
        })
        .sum();
    assert_eq!(stats["train_chars"], train_chars);
}

#[test]
fn tokenizer_stage_adopts_an_existing_tokenizer_byte_for_byte() {
    let sandbox = sandbox_with_corpus();
    sandbox.write("p.yaml", TRAIN);
    sandbox.ok(&["run", "p.yaml"]);
    let trained = sandbox.read("runs/latest/outputs/tok/tokenizer.json");
    // A foreign tokenizer in a model directory, with merges as strings and no specials.
    let foreign = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
        "vocab": {"t": 0, "h": 1, "e": 2, "th": 3, "the": 4, "Ġ": 5},
        "merges": ["t h", "th e"]}}"#;
    sandbox.write("models/base/tokenizer.json", foreign);
    sandbox.write("models/base/config.json", "{}");
    sandbox.write(
        "q.yaml",
        r#"
name: adopt
stages:
  base:
    kind: tokenizer
    inputs: { from: models/base, eval: data/eval.jsonl }
  copy:
    kind: tokenizer
    inputs: { from: base }
"#,
    );
    sandbox.ok(&["run", "q.yaml"]);
    assert_eq!(
        sandbox.read("runs/latest/outputs/base/tokenizer.json"),
        foreign
    );
    assert_eq!(
        sandbox.read("runs/latest/outputs/copy/tokenizer.json"),
        foreign
    );
    let stats = read_stats(&sandbox, "base");
    assert_eq!(stats["source"], "from");
    assert_eq!(stats["algorithm"], "bpe");
    assert_eq!(stats["vocab_size"], 6);
    assert_eq!(
        stats["special_tokens"]["<|endoftext|>"],
        serde_json::Value::Null
    );
    assert!(stats["eval"]["tokens"].as_u64().expect("eval tokens") > 0);
    assert!(trained.contains("<|tool_call|>"));
}

#[test]
fn tokenizer_stage_errors_name_the_problem() {
    let sandbox = sandbox_with_corpus();
    sandbox.write(
        "broken/tokenizer.json",
        r#"{"version": "1.0", "added_tokens": []}"#,
    );
    sandbox.write("notes.csv", "a,b\n");
    let cases = [
        ("inputs: { eval: data/eval.jsonl }", "needs `inputs.text`"),
        (
            "inputs: { text: data/train.jsonl, from: broken/tokenizer.json }",
            "not both",
        ),
        ("inputs: { from: broken }", "broken/tokenizer.json"),
        (
            "inputs: { from: data }",
            "a directory without tokenizer.json",
        ),
        (
            "inputs: { text: notes.csv }",
            "expected a .jsonl, .txt or .md file",
        ),
        (
            "inputs: { text: data/train.jsonl }\n    with: { vocab_size: 100 }",
            "vocab_size 100 is too small",
        ),
        (
            "inputs: { text: data/train.jsonl }\n    with: { algorithm: unigram, min_frequency: 3 }",
            "applies to `algorithm: bpe` only",
        ),
    ];
    for (stage, expected) in cases {
        sandbox.write(
            "p.yaml",
            &format!("name: bad\nstages:\n  tok:\n    kind: tokenizer\n    {stage}\n"),
        );
        let output = sandbox.fails(&["run", "p.yaml"]);
        assert!(output.contains(expected), "{stage}: {output}");
    }
    // A missing model is reported by key.
    sandbox.write(
        "p.yaml",
        "name: bad\nstages:\n  tok:\n    kind: tokenizer\n    inputs: { from: broken }\n",
    );
    let output = sandbox.fails(&["run", "p.yaml"]);
    assert!(output.contains("model"), "{output}");

    // Bad corpus lines name file and line.
    sandbox.write(
        "bad/train.jsonl",
        "{\"text\": \"fine\"}\n{\"title\": \"no text\"}\n",
    );
    sandbox.write(
        "p.yaml",
        "name: bad\nstages:\n  tok:\n    kind: tokenizer\n    inputs: { text: bad/train.jsonl }\n",
    );
    let output = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        output.contains("train.jsonl:2: the record has no `text`"),
        "{output}"
    );

    // Unknown settings are refused before anything runs.
    sandbox.write(
        "p.yaml",
        "name: bad\nstages:\n  tok:\n    kind: tokenizer\n    inputs: { text: data/train.jsonl }\n    with: { vocab: 300 }\n",
    );
    let output = sandbox.fails(&["run", "p.yaml"]);
    assert!(output.contains("unknown key `vocab`"), "{output}");
}

//! The `token-cache` stage and its readers: shards, masks, mixtures, batches.

use crate::common;
use trainyard::data::Split;

use common::{Sandbox, write_test_tokenizer};
use trainyard::data::token_cache::{Batch, Dtype, Mixture, SftBatcher, SftPosition, TokenCache};
use trainyard::rng::Rng;
use trainyard::tokenize::special;

const DOCS: &[&str] = &[
    "The river Tebris flows through Ardel.",
    "Ardel was founded in 1447 by Idon Mouvand.",
    "Peitrir is a small town beside the river Fobram.",
    "Gegrestan is the closest neighbour of Peitrir.",
];

fn corpus_sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    let train: String = DOCS
        .iter()
        .map(|text| format!("{{\"text\": {}}}\n", serde_json::json!(text)))
        .collect();
    sandbox.write("data/train.jsonl", &train);
    sandbox.write("data/eval.jsonl", "{\"text\": \"The river Fobram.\"}\n");
    let chats = [
        ("What river flows through Ardel?", "Tebris"),
        ("Who founded Ardel?", "Idon Mouvand"),
        ("What is the neighbour of Peitrir?", "Gegrestan"),
    ];
    let chat_lines: String = chats
        .iter()
        .map(|(question, answer)| {
            format!(
                "{}\n",
                serde_json::json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
            )
        })
        .collect();
    sandbox.write("data/chat.jsonl", &chat_lines);
    let mut texts: Vec<&str> = DOCS.to_vec();
    texts.extend(
        chats
            .iter()
            .flat_map(|(question, answer)| [*question, *answer]),
    );
    write_test_tokenizer(&sandbox.path("data/tokenizer.json"), &texts, 400);
    sandbox.write(
        "p.yaml",
        "name: cache
stages:
  pre:
    kind: token-cache
    inputs: { train: data/train.jsonl, eval: data/eval.jsonl, tokenizer: data/tokenizer.json }
    with: { shard_tokens: 16 }
  sft:
    kind: token-cache
    inputs: { train: data/chat.jsonl, tokenizer: data/tokenizer.json }
",
    );
    sandbox
}

fn tokenizer(sandbox: &Sandbox) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(sandbox.path("data/tokenizer.json")).unwrap()
}

#[test]
fn pretrain_cache_holds_every_document_followed_by_end_of_text_in_u16_shards() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/pre")).unwrap();
    assert_eq!(cache.meta.dtype, Dtype::U16);
    let train = &cache.meta.splits["train"];
    assert_eq!(train.documents, 4);
    assert!(train.shards.len() > 1, "16-token shards split the stream");
    assert!(train.shards.iter().all(|shard| shard.tokens <= 16));

    let tokenizer = tokenizer(&sandbox);
    let mut expected = Vec::new();
    for text in DOCS {
        expected.extend(tokenizer.encode(*text, false).unwrap().get_ids());
        expected.push(special::id_of(special::END_OF_TEXT).unwrap());
    }
    let stream = cache.stream(Split::Train).unwrap();
    assert_eq!(stream.len(), expected.len() as u64);
    // Reading the whole stream back, shard by shard, gives the ids in document order.
    let mut read_back = Vec::new();
    for shard in &train.shards {
        let bytes =
            std::fs::read(sandbox.path("runs/latest/outputs/pre").join(&shard.file)).unwrap();
        read_back.extend(
            bytes
                .chunks_exact(2)
                .map(|pair| u32::from(u16::from_le_bytes([pair[0], pair[1]]))),
        );
    }
    assert_eq!(read_back, expected);
    assert_eq!(cache.meta.splits["eval"].documents, 1);
}

#[test]
fn sft_cache_masks_exactly_the_assistant_answer_and_its_end_of_turn() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/sft")).unwrap();
    let examples = cache.examples(Split::Train).unwrap();
    assert_eq!(examples.len(), 3);
    let tokenizer = tokenizer(&sandbox);
    let (ids, mask) = examples.example(0);
    let whole = tokenizer
        .encode(
            "<|user|>What river flows through Ardel?<|end|><|assistant|>Tebris<|end|>",
            false,
        )
        .unwrap();
    assert_eq!(
        ids,
        whole.get_ids(),
        "segment-wise encoding equals encoding the rendered text"
    );
    let trained: Vec<u32> = ids
        .iter()
        .zip(mask)
        .filter(|(_, bit)| **bit == 1)
        .map(|(id, _)| *id)
        .collect();
    let mut answer = tokenizer
        .encode("Tebris", false)
        .unwrap()
        .get_ids()
        .to_vec();
    answer.push(special::id_of(special::END_OF_TURN).unwrap());
    assert_eq!(trained, answer);
    assert_eq!(
        cache.meta.splits["train"].trainable_tokens,
        Some(mask_total(&examples))
    );
}

fn mask_total(examples: &trainyard::data::token_cache::SftExamples) -> u64 {
    (0..examples.len())
        .map(|index| {
            examples
                .example(index)
                .1
                .iter()
                .map(|&bit| u64::from(bit))
                .sum::<u64>()
        })
        .sum()
}

#[test]
fn a_cache_refuses_a_different_tokenizer() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/pre")).unwrap();
    cache
        .verify_tokenizer(&sandbox.path("data/tokenizer.json"))
        .unwrap();
    write_test_tokenizer(
        &sandbox.path("other/tokenizer.json"),
        &["something else entirely"],
        300,
    );
    let error = cache
        .verify_tokenizer(&sandbox.path("other/tokenizer.json"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("was built with tokenizer"), "{error}");
    assert!(error.contains("other/tokenizer.json"), "{error}");
    let wrong_mode = cache.examples(Split::Train).unwrap_err().to_string();
    assert!(wrong_mode.contains("holds Pretrain data"), "{wrong_mode}");
}

#[test]
fn too_long_examples_follow_the_truncation_policy() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml", "--set", "stages.sft.with.max_len=8"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/sft")).unwrap();
    let split = &cache.meta.splits["train"];
    assert_eq!(split.documents, 0);
    assert_eq!(split.dropped["too_long"], 3);

    sandbox.ok(&[
        "run",
        "p.yaml",
        "--set",
        "stages.sft.with.max_len=8",
        "--set",
        "stages.sft.with.truncation=keep_end",
    ]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/sft")).unwrap();
    let examples = cache.examples(Split::Train).unwrap();
    assert_eq!(examples.len(), 3);
    for index in 0..3 {
        let (ids, mask) = examples.example(index);
        assert_eq!(ids.len(), 8);
        assert_eq!(
            *ids.last().unwrap(),
            special::id_of(special::END_OF_TURN).unwrap()
        );
        assert_eq!(*mask.last().unwrap(), 1);
    }
}

#[test]
fn malformed_lines_name_file_and_line() {
    let sandbox = corpus_sandbox();
    sandbox.write(
        "data/train.jsonl",
        "{\"text\": \"fine\"}\n{\"txt\": \"no text\"}\n",
    );
    let error = sandbox.fails(&["run", "p.yaml", "--only", "pre"]);
    assert!(
        error.contains("data/train.jsonl:2: a record needs `text` or `messages`"),
        "{error}"
    );
}

#[test]
fn a_tokenizer_where_a_corpus_is_expected_is_rejected_before_running() {
    let sandbox = corpus_sandbox();
    sandbox.write(
        "q.yaml",
        "name: q
stages:
  pre:
    kind: token-cache
    inputs: { train: data/train.jsonl, tokenizer: data/tokenizer.json }
  again:
    kind: token-cache
    inputs: { train: pre, tokenizer: data/tokenizer.json }
",
    );
    let error = sandbox.fails(&["run", "q.yaml"]);
    assert!(
        error.contains(
            "stage `pre` (token-cache) produces TokenCache, but `train` expects Files or Corpus"
        ),
        "{error}"
    );
    assert!(!sandbox.path("runs").exists(), "nothing ran");
}

#[test]
fn random_windows_and_mixtures_are_deterministic_by_seed() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/pre")).unwrap();
    let draw = |seed: u64| {
        let mixture = Mixture::new(vec![
            ("a".to_string(), cache.stream(Split::Train).unwrap(), 0.7),
            ("b".to_string(), cache.stream(Split::Train).unwrap(), 0.3),
        ])
        .unwrap();
        let mut rng = Rng::new(seed, 1);
        (0..20)
            .map(|_| mixture.sample(&mut rng, 9).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
    let batch = Batch::from_windows(&draw(1)[..4]);
    assert_eq!((batch.batch, batch.seq), (4, 8));
    assert_eq!(
        batch.inputs[1..8],
        batch.targets[0..7],
        "targets are inputs shifted by one"
    );
    let windows = cache
        .stream(Split::Train)
        .unwrap()
        .sequential_windows(9, 100);
    assert!(!windows.is_empty());
    assert!(windows.iter().all(|window| window.len() == 9));
    assert!(Mixture::new(vec![("z".into(), cache.stream(Split::Train).unwrap(), 0.0)]).is_err());
}

#[test]
fn sft_batches_pad_or_pack_and_resume_from_their_position() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    let cache = TokenCache::open(&sandbox.path("runs/latest/outputs/sft")).unwrap();
    let examples = cache.examples(Split::Train).unwrap();
    let pad = cache.meta.pad_id;
    let start = SftPosition {
        epoch: 0,
        cursor: 0,
    };

    let mut padded = SftBatcher::new(&examples, 5, 2, 64, false, pad, start);
    let batch = padded.next_batch().unwrap();
    for row in 0..2 {
        let weights = &batch.weights[row * 64..(row + 1) * 64];
        assert!(weights.contains(&1.0));
        // Padding at the end of each row carries no loss.
        assert_eq!(weights[63], 0.0);
        assert_eq!(batch.inputs[row * 64 + 63], pad);
    }

    let mut packed = SftBatcher::new(&examples, 5, 1, 64, true, pad, start);
    let batch = packed.next_batch().unwrap();
    let end_of_turn = special::id_of(special::END_OF_TURN).unwrap();
    let trained_ends: Vec<usize> = (0..64)
        .filter(|&at| batch.targets[at] == end_of_turn && batch.weights[at] == 1.0)
        .collect();
    assert!(
        trained_ends.len() >= 3,
        "several short examples share one packed row: {trained_ends:?}"
    );
    let last_end = *trained_ends.last().unwrap();
    assert!(
        batch.weights[last_end + 1..].iter().all(|&w| w == 0.0),
        "no example is cut off at the end of a row"
    );
    assert!(batch.inputs[last_end + 1..].iter().all(|&id| id == pad));

    // Resuming from a saved position continues exactly as an uninterrupted batcher.
    let mut uninterrupted = SftBatcher::new(&examples, 9, 2, 32, false, pad, start);
    uninterrupted.next_batch();
    let saved = uninterrupted.position();
    let expected: Vec<Batch> = (0..4)
        .map(|_| uninterrupted.next_batch().unwrap())
        .collect();
    let mut resumed = SftBatcher::new(&examples, 9, 2, 32, false, pad, saved);
    let got: Vec<Batch> = (0..4).map(|_| resumed.next_batch().unwrap()).collect();
    assert_eq!(got, expected);
}

#[test]
fn the_fast_encoder_gives_exactly_the_ids_of_tokenizers() {
    let sandbox = corpus_sandbox();
    let tokenizer = tokenizer(&sandbox);
    let fast = trainyard::tokenize::fast::FastEncoder::new(&tokenizer)
        .expect("a byte-level BPE tokenizer is supported");
    let pieces = [
        "a",
        "Ardel",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        " \n ",
        "'s",
        "'ll",
        "'S",
        "'",
        "42",
        " 7",
        "1447.",
        "river",
        "é",
        "天気",
        "🌧️",
        "\u{0301}",
        "\u{00a0}",
        "\u{2003}",
        "!?",
        " —",
        "<|end|>",
        "<|user",
        "x<|pad|>y",
        "\u{0}",
        "Ⅻ",
        "٣",
    ];
    let mut rng = Rng::new(11, 0);
    for _ in 0..3000 {
        let text: String = (0..rng.below(12))
            .map(|_| pieces[rng.below(pieces.len() as u64) as usize])
            .collect();
        let mut ids = Vec::new();
        fast.encode_into(&text, &mut ids).unwrap();
        assert_eq!(
            ids,
            tokenizer
                .encode_fast(text.as_str(), false)
                .unwrap()
                .get_ids(),
            "text {text:?}"
        );
    }
}

/// A sandbox with the ChatML base data/models/tiny-qwen2 copied to `base/` (and, as
/// its tokenizer, to `tok/`) and the two chats in `data/chat.jsonl`.
fn chatml_sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/tiny-qwen2");
    for dir in ["base", "tok"] {
        std::fs::create_dir_all(sandbox.path(dir)).unwrap();
        for entry in std::fs::read_dir(&base).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), sandbox.path(dir).join(entry.file_name())).unwrap();
        }
    }
    sandbox.write("data/chat.jsonl", TWO_CHATS);
    sandbox
}

/// A pipeline of one chat cache over `data/chat.jsonl` with `inputs` besides `train`,
/// followed by `tail` (more stages).
fn cache_pipeline(inputs: &str, tail: &str) -> String {
    format!(
        "name: c
stages:
  cache:
    kind: token-cache
    inputs: {{ train: data/chat.jsonl, {inputs} }}
    with: {{ mode: sft }}
{tail}"
    )
}

const TWO_CHATS: &str = r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
{"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]}
"#;

#[test]
fn a_model_template_that_refuses_a_conversation_names_the_file_line_and_its_message() {
    let sandbox = chatml_sandbox();
    sandbox.write(
        "strict.jinja",
        "{% for m in messages %}{% if m.content == 'Why?' %}{{ raise_exception('no questions starting with Why') }}{% endif %}{{ m.content }}{% endfor %}",
    );
    sandbox.write(
        "p.yaml",
        &cache_pipeline("tokenizer: base, chat_template: strict.jinja", ""),
    );
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("chat.jsonl:2"), "{error}");
    assert!(error.contains("no questions starting with Why"), "{error}");
    assert!(error.contains("strict.jinja"), "{error}");
}

#[test]
fn a_template_that_cannot_render_a_conversation_is_named_with_the_line() {
    let sandbox = chatml_sandbox();
    sandbox.write("bad.jinja", "{{ messages[0].content.nope.deeper }}");
    sandbox.write(
        "p.yaml",
        &cache_pipeline("tokenizer: base, chat_template: bad.jinja", ""),
    );
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("chat.jsonl:1"), "{error}");
    assert!(error.contains("cannot render"), "{error}");
}

#[test]
fn a_tokenizer_without_template_or_trainyard_tokens_is_refused_with_the_fix() {
    let sandbox = chatml_sandbox();
    std::fs::remove_file(sandbox.path("base/tokenizer_config.json")).unwrap();
    sandbox.write("p.yaml", &cache_pipeline("tokenizer: base", ""));
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("no chat template"), "{error}");
    assert!(error.contains("chat_template"), "{error}");
}

#[test]
fn sft_refuses_a_chat_cache_rendered_with_another_template_than_its_base() {
    let sandbox = chatml_sandbox();
    // The cache is rendered with tok/'s template (Qwen2.5's); the base's own template,
    // with the same tokenizer.json, differs.
    let config_path = sandbox.path("base/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] =
        serde_json::json!("{% for m in messages %}{{ m.content }}{% endfor %}");
    std::fs::write(&config_path, config.to_string()).unwrap();
    sandbox.write(
        "p.yaml",
        &cache_pipeline(
            "tokenizer: tok",
            "  tune:
    kind: sft
    inputs: { data: cache, base: base }
    with: { adapter: { kind: lora, rank: 2 }, steps: 1, batch_size: 2, eval_batches: 0 }
",
        ),
    );
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("another chat template"), "{error}");
    assert!(error.contains("tokenizer_config.json"), "{error}");
}

#[test]
fn a_corrupted_shard_is_reported_as_a_corrupted_file() {
    let sandbox = corpus_sandbox();
    sandbox.ok(&["run", "p.yaml"]);
    // A copy outside the store, so that only the reader's own check can notice.
    let copy = sandbox.path("copy");
    std::fs::create_dir(&copy).unwrap();
    let source = sandbox.path("runs/latest/outputs/pre");
    for entry in std::fs::read_dir(&source).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    for split in ["train", "eval"] {
        std::fs::create_dir_all(copy.join(split)).unwrap();
        for entry in std::fs::read_dir(source.join(split)).unwrap().flatten() {
            std::fs::copy(entry.path(), copy.join(split).join(entry.file_name())).unwrap();
        }
    }
    let cache = TokenCache::open(&copy).unwrap();
    let shard = copy.join(&cache.meta.splits["train"].shards[1].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[6] = 0xff;
    bytes[7] = 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let error = cache.stream(Split::Train).unwrap_err().to_string();
    assert!(
        error.contains(&format!(
            "{} is corrupted: token 3 is id 65535, outside the vocabulary of {}",
            shard.display(),
            cache.meta.vocab_size
        )),
        "{error}"
    );
}

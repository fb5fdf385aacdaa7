//! The tokenizer library as a specification: exact round trips for any UTF-8, special
//! tokens with fixed ids that are never split, honoured vocabulary sizes, deterministic
//! training, the GPT-2 split, and adopting existing `tokenizer.json` files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use tokenizers::Tokenizer;
use trainyard::interrupt::CancelFlag;
use trainyard::tokenize::corpus::{self, CorpusFile, WordCounts};
use trainyard::tokenize::learn::{self, Algorithm, TrainOptions};
use trainyard::tokenize::pretokenize;
use trainyard::tokenize::special::{SPECIAL_TOKENS, USER};
use trainyard::tokenize::{MIN_VOCAB_SIZE, load};

/// A small deterministic corpus with several scripts, numbers, code-ish text and chat
/// records, as `train.jsonl`.
fn corpus_jsonl(documents: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "learns",
        "from",
        "data",
        "and",
        "a",
        "tokenizer",
        "splits",
        "text",
        "into",
        "pieces",
        "training",
        "pipeline",
        "stage",
        "cache",
        "runs",
        "again",
        "only",
        "when",
        "inputs",
        "change",
        "naïve",
        "café",
        "Zürich",
        "東京",
        "データ",
        "модель",
        "λόγος",
        "🙂",
        "rocket🚀",
        "x=42;",
        "fn(main)",
        "don't",
        "it's",
        "we're",
        "3.14",
        "2024-01-31",
        "\t",
        "e\u{301}",
    ];
    let mut state = seed;
    let mut next = move |bound: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % bound
    };
    // Invented words on top of the fixed ones, so that there is plenty to merge.
    const SYLLABLES: &[&str] = &[
        "ka", "lo", "mi", "ne", "tur", "vas", "qui", "bre", "do", "sha", "ex", "ul", "zon", "pri",
        "ät", "ös",
    ];
    let mut lexicon: Vec<String> = WORDS.iter().map(|word| word.to_string()).collect();
    let mut word_state = 7u64;
    for _ in 0..400 {
        let mut word = String::new();
        for _ in 0..2 + (word_state >> 60) % 3 {
            word_state = word_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            word.push_str(SYLLABLES[((word_state >> 33) as usize) % SYLLABLES.len()]);
        }
        lexicon.push(word);
    }
    let mut out = String::new();
    for index in 0..documents {
        let mut text = String::new();
        for sentence in 0..1 + next(5) {
            if sentence > 0 {
                text.push_str(if next(4) == 0 { "\n\n" } else { " " });
            }
            for word in 0..3 + next(12) {
                if word > 0 {
                    text.push(' ');
                }
                text.push_str(&lexicon[next(lexicon.len()).min(next(lexicon.len()) + 5)]);
            }
            text.push_str([".", "!", "?", "..."][next(4)]);
        }
        let line = if index % 10 == 9 {
            serde_json::json!({ "messages": [
                { "role": "user", "content": text },
                { "role": "assistant", "content": "", "tool_calls": [
                    { "name": "lookup", "arguments": { "query": "café", "n": index } }
                ] },
            ] })
        } else {
            serde_json::json!({ "text": text, "source_url": "test://corpus" })
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    train: Vec<CorpusFile>,
    eval: Vec<CorpusFile>,
    counts: WordCounts,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let train_path = dir.path().join("train.jsonl");
        let eval_path = dir.path().join("eval.jsonl");
        std::fs::write(&train_path, corpus_jsonl(3000, 1)).expect("write corpus");
        std::fs::write(&eval_path, corpus_jsonl(200, 2)).expect("write corpus");
        let train = corpus::corpus_files(&train_path, "train.jsonl").expect("train files");
        let eval = corpus::corpus_files(&eval_path, "eval.jsonl").expect("eval files");
        let counts = corpus::count_words(&train, None, 2, &CancelFlag::new(), &mut |_| {})
            .expect("count words");
        Fixture {
            _dir: dir,
            train,
            eval,
            counts,
        }
    })
}

fn options(algorithm: Algorithm, vocab_size: usize) -> TrainOptions {
    TrainOptions {
        algorithm,
        vocab_size,
        min_frequency: 2,
        show_progress: false,
    }
}

fn train(algorithm: Algorithm, vocab_size: usize) -> Tokenizer {
    learn::train_tokenizer(
        &fixture().counts,
        &options(algorithm, vocab_size),
        &CancelFlag::new(),
        &mut |_| {},
    )
    .expect("training succeeds")
}

fn bpe() -> &'static Tokenizer {
    static BPE: OnceLock<Tokenizer> = OnceLock::new();
    BPE.get_or_init(|| train(Algorithm::Bpe, 600))
}

fn unigram() -> &'static Tokenizer {
    static UNIGRAM: OnceLock<Tokenizer> = OnceLock::new();
    UNIGRAM.get_or_init(|| train(Algorithm::Unigram, 500))
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    tokenizer
        .encode(text, false)
        .expect("encode")
        .get_ids()
        .to_vec()
}

fn round_trip(tokenizer: &Tokenizer, text: &str) -> String {
    tokenizer
        .decode(&encode(tokenizer, text), false)
        .expect("decode")
}

/// Strings heavy in what breaks tokenizers: controls, NUL, combining marks, emoji,
/// spaces of every kind, apostrophes, and any other scalar value.
fn nasty_text() -> impl Strategy<Value = String> {
    let interesting = prop_oneof![
        Just('\0'),
        Just(' '),
        Just('\n'),
        Just('\r'),
        Just('\t'),
        Just('\u{a0}'),
        Just('\u{3000}'),
        Just('\u{301}'),
        Just('\u{200d}'),
        Just('\''),
        Just('s'),
        Just('é'),
        Just('🙂'),
        Just('👩'),
        Just('<'),
        Just('|'),
        Just('\u{7f}'),
        Just('\u{fffd}'),
        Just('\u{10ffff}'),
        Just('7'),
        Just('٣'),
        Just('Ⅻ'),
    ];
    proptest::collection::vec(prop_oneof![2 => interesting, 1 => any::<char>()], 0..48)
        .prop_map(String::from_iter)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_utf8_round_trips_exactly_through_bpe(text in nasty_text()) {
        prop_assert_eq!(round_trip(bpe(), &text), text);
    }

    #[test]
    fn any_utf8_round_trips_exactly_through_unigram(text in nasty_text()) {
        prop_assert_eq!(round_trip(unigram(), &text), text);
    }

    #[test]
    fn arbitrary_strings_round_trip_too(text in any::<String>()) {
        prop_assert_eq!(round_trip(bpe(), &text), text.clone());
        prop_assert_eq!(round_trip(unigram(), &text), text);
    }

    #[test]
    fn the_training_split_is_exactly_the_encoders_split(text in nasty_text()) {
        use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut pretokenized = PreTokenizedString::from(text.as_str());
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, true)
            .pre_tokenize(&mut pretokenized)
            .expect("pre-tokenize");
        let expected: Vec<String> = pretokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect();
        let mut ours = Vec::new();
        pretokenize::split(&text, |piece| ours.push(pretokenize::to_byte_level(piece)));
        prop_assert_eq!(ours, expected);
    }

    #[test]
    fn special_tokens_are_never_split_inside_text(
        before in nasty_text(),
        after in nasty_text(),
        which in 0..SPECIAL_TOKENS.len(),
    ) {
        let special = SPECIAL_TOKENS[which];
        // Text that itself holds a special token would add matches of its own.
        prop_assume!(!before.contains("<|") && !after.contains("<|"));
        let text = format!("{before}{special}{after}");
        for tokenizer in [bpe(), unigram()] {
            let ids = encode(tokenizer, &text);
            prop_assert_eq!(ids.iter().filter(|&&id| id == which as u32).count(), 1);
            let at = ids.iter().position(|&id| id == which as u32).unwrap_or(0);
            prop_assert_eq!(tokenizer.decode(&ids[..at], false).expect("decode"), before.clone());
            prop_assert_eq!(tokenizer.decode(&ids[at + 1..], false).expect("decode"), after.clone());
        }
    }
}

#[test]
fn special_tokens_have_ids_zero_to_seven_in_both_algorithms() {
    for tokenizer in [bpe(), unigram()] {
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(token), Some(id as u32), "{token}");
            assert_eq!(tokenizer.id_to_token(id as u32).as_deref(), Some(*token));
            assert_eq!(encode(tokenizer, token), [id as u32], "{token}");
        }
        let ids = encode(tokenizer, "hi<|user|>there");
        assert_eq!(ids.iter().filter(|&&id| id == 4).count(), 1, "{ids:?}");
        assert_eq!(
            tokenizer.decode(&ids, false).expect("decode"),
            format!("hi{USER}there")
        );
        assert_eq!(tokenizer.decode(&ids, true).expect("decode"), "hithere");
        load::check_special_ids(tokenizer).expect("fixed ids");
    }
}

#[test]
fn bpe_fills_the_requested_vocabulary_and_never_exceeds_it() {
    assert_eq!(bpe().get_vocab_size(true), 600);
    let small = train(Algorithm::Bpe, MIN_VOCAB_SIZE + 1);
    assert_eq!(small.get_vocab_size(true), MIN_VOCAB_SIZE + 1);
    // More tokens than the corpus has frequent pairs for: BPE stops early.
    let huge = train(Algorithm::Bpe, 1_000_000);
    assert!(huge.get_vocab_size(true) < 1_000_000);
    assert!(huge.get_vocab_size(true) > 600);
}

#[test]
fn unigram_comes_close_to_the_requested_vocabulary() {
    let size = unigram().get_vocab_size(true);
    assert!(size <= 500, "{size}");
    assert!(size >= 450, "{size}");
}

#[test]
fn a_vocabulary_without_room_for_the_bytes_is_refused() {
    for algorithm in [Algorithm::Bpe, Algorithm::Unigram] {
        let error = learn::train_tokenizer(
            &fixture().counts,
            &options(algorithm, 100),
            &CancelFlag::new(),
            &mut |_| {},
        )
        .expect_err("too small");
        assert!(
            error.to_string().contains("vocab_size 100 is too small"),
            "{error}"
        );
    }
}

#[test]
fn training_twice_gives_byte_identical_tokenizer_json() {
    for algorithm in [Algorithm::Bpe, Algorithm::Unigram] {
        let vocab = if algorithm == Algorithm::Bpe {
            700
        } else {
            400
        };
        let first = learn::tokenizer_json(&train(algorithm, vocab)).expect("json");
        // Count again from the files too, with another thread count.
        let counts =
            corpus::count_words(&fixture().train, None, 3, &CancelFlag::new(), &mut |_| {})
                .expect("count");
        let second = learn::tokenizer_json(
            &learn::train_tokenizer(
                &counts,
                &options(algorithm, vocab),
                &CancelFlag::new(),
                &mut |_| {},
            )
            .expect("train"),
        )
        .expect("json");
        assert!(
            first == second,
            "{algorithm:?} training is not deterministic"
        );
    }
}

#[test]
fn saved_tokenizers_load_back_and_encode_the_same() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, tokenizer) in [("bpe.json", bpe()), ("unigram.json", unigram())] {
        let path = dir.path().join(name);
        std::fs::write(&path, learn::tokenizer_json(tokenizer).expect("json")).expect("write");
        let loaded = load::load_tokenizer(&path).expect("load");
        let text = "The naïve café in 東京 🙂 runs <|end|> again.";
        assert_eq!(encode(&loaded, text), encode(tokenizer, text));
        assert_eq!(round_trip(&loaded, text), text);
    }
}

#[test]
fn eval_statistics_count_characters_and_tokens() {
    let stats = learn::eval_stats(bpe(), &fixture().eval, &CancelFlag::new()).expect("eval");
    let mut chars = 0;
    let mut tokens = 0;
    corpus::for_each_text(&fixture().eval, None, &CancelFlag::new(), &mut |text| {
        chars += text.chars().count() as u64;
        tokens += encode(bpe(), text).len() as u64;
    })
    .expect("read");
    assert_eq!((stats.chars, stats.tokens), (chars, tokens));
    let ratio = stats.chars_per_token.expect("tokens");
    assert!(
        ratio > 2.0,
        "a trained BPE compresses its own kind of text: {ratio}"
    );
}

/// A tiny GPT-2 style tokenizer.json, with merges written as `"a b"` strings or as
/// `["a", "b"]` pairs.
fn hand_written_tokenizer(pairs: bool) -> String {
    let merges = if pairs {
        r#"[["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"]]"#
    } else {
        r#"["h e", "l l", "he ll", "hell o"]"#
    };
    format!(
        r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {{"id": 9, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
      "rstrip": false, "normalized": false, "special": true}}
  ],
  "normalizer": null,
  "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "post_processor": null,
  "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
  "model": {{
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
    "vocab": {{"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5, "hell": 6, "hello": 7, "Ġ": 8}},
    "merges": {merges}
  }}
}}"#
    )
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write");
    path
}

#[test]
fn existing_tokenizers_load_with_either_form_of_merges() {
    let dir = tempfile::tempdir().expect("temp dir");
    for pairs in [false, true] {
        let path = write(dir.path(), "tokenizer.json", &hand_written_tokenizer(pairs));
        let tokenizer = load::load_tokenizer(&path).expect("load");
        assert_eq!(encode(&tokenizer, "hello"), [7], "pairs: {pairs}");
        assert_eq!(encode(&tokenizer, "hell<|endoftext|>"), [6, 9]);
        // A model directory holding tokenizer.json works too.
        let from_dir = load::load_tokenizer(dir.path()).expect("load from directory");
        assert_eq!(encode(&from_dir, "hello"), [7]);
        let ids = load::special_token_ids(&tokenizer);
        assert_eq!(ids["<|endoftext|>"], Some(9));
        assert_eq!(ids["<|pad|>"], None);
    }
}

#[test]
fn a_file_without_a_model_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "broken.json",
        r#"{"version": "1.0", "added_tokens": []}"#,
    );
    let error = load::load_tokenizer(&path)
        .expect_err("no model")
        .to_string();
    assert!(error.contains("broken.json"), "{error}");
    assert!(error.contains("model"), "{error}");
    let error = load::load_tokenizer(&dir.path().join("sub"))
        .expect_err("missing")
        .to_string();
    assert!(error.contains("sub"), "{error}");
}

#[test]
fn bpe_learns_the_same_merges_as_the_tokenizers_crate_trainer() {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainer};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let mut texts = Vec::new();
    corpus::for_each_text(&fixture().train, None, &CancelFlag::new(), &mut |text| {
        texts.push(text.to_string())
    })
    .expect("read");
    let mut reference = Tokenizer::new(BPE::default());
    reference.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(700)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(learn::special_added_tokens())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    reference
        .train(&mut trainer, texts.iter())
        .expect("reference training");
    let model_of = |tokenizer: &Tokenizer| -> serde_json::Value {
        let json: serde_json::Value =
            serde_json::from_str(&tokenizer.to_string(false).expect("json")).expect("json");
        json["model"].clone()
    };
    let ours = model_of(&train(Algorithm::Bpe, 700));
    let theirs = model_of(&reference);
    assert_eq!(ours["vocab"], theirs["vocab"]);
    assert_eq!(ours["merges"], theirs["merges"]);
}

//! The generation library on small random models of both families: special tokens are
//! never generated, stop tokens end a generation, the budget and the context bound it,
//! the same seed gives the same text, streamed pieces add up to the text, and a chat
//! forgets its oldest exchanges to fit the context.

use crate::common;

use std::path::Path;

use candle_core::{Device, Tensor};
use trainyard::generate::{Conversation, Generator, SamplingOptions, StopReason};
use trainyard::model::{self, Gpt2Config, LlamaConfig, LlamaFlavor, ModelConfig};
use trainyard::tokenize::special::{self, END_OF_TEXT, END_OF_TURN};

const TEXTS: &[&str] = &[
    "The river Ardel runs past the old mill of Tebris.",
    "Tebris is the capital; its mill grinds wheat from the northern farms.",
    "Questions about the weather in Ardel are answered by the harbour office.",
    "Über die Brücke gehen täglich viele Menschen — naïve café façade.",
];

/// Writes a random model of `config` with a small trained tokenizer into `dir`. With
/// `never_stop`, the stop tokens' rows of `lm_head` are zeroed, so that greedy decoding
/// never picks them (their logit is 0, below the largest of the others).
fn random_model(dir: &Path, mut config: ModelConfig, never_stop: bool) {
    let tokenizer = dir.join("tokenizer.json");
    common::write_test_tokenizer(&tokenizer, TEXTS, 300);
    let size = tokenizers::Tokenizer::from_file(&tokenizer)
        .unwrap()
        .get_vocab_size(true);
    assert!(size <= 300);
    // Four more rows than the tokenizer has tokens: those ids must never be generated.
    match &mut config {
        ModelConfig::Llama(llama) => llama.vocab_size = size + 4,
        ModelConfig::Gpt2(gpt2) => gpt2.vocab_size = size + 4,
    }
    let (_, varmap) =
        model::new_trainable(&config, candle_core::DType::F32, &Device::Cpu, 3).expect("model");
    if never_stop {
        let vars = model::sorted_vars(&varmap);
        let name = match config {
            ModelConfig::Llama(_) => "lm_head.weight",
            ModelConfig::Gpt2(_) => "transformer.wte.weight",
        };
        let (_, head) = vars.iter().find(|(var, _)| var == name).expect("head");
        let mut rows: Vec<Vec<f32>> = head.as_tensor().to_vec2().unwrap();
        for token in [END_OF_TEXT, END_OF_TURN] {
            let id = special::id_of(token).unwrap() as usize;
            rows[id].iter_mut().for_each(|value| *value = 0.0);
        }
        head.set(&Tensor::new(rows, &Device::Cpu).unwrap()).unwrap();
    }
    model::save_pretrained(&varmap, &config, dir).expect("save");
}

fn llama(context: usize) -> ModelConfig {
    let mut config = LlamaConfig::tiny(LlamaFlavor::Llama, false);
    config.max_position_embeddings = context;
    ModelConfig::Llama(config)
}

fn gpt2(context: usize) -> ModelConfig {
    let mut config = Gpt2Config::tiny();
    config.n_positions = context;
    ModelConfig::Gpt2(config)
}

fn load(dir: &Path) -> Generator {
    Generator::load(dir, &Device::Cpu).expect("load the generator")
}

fn options(temperature: f64, seed: u64, max_new_tokens: usize) -> SamplingOptions {
    SamplingOptions {
        temperature,
        top_k: None,
        top_p: None,
        seed,
        max_new_tokens,
    }
}

#[test]
fn special_tokens_are_never_generated_and_stop_tokens_end_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    random_model(dir.path(), llama(256), false);
    let generator = load(dir.path());
    let banned = generator.banned_ids();
    for token in [
        "<|pad|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|tool|>",
    ] {
        let id = special::id_of(token).unwrap();
        assert!(banned.contains(&id), "{token} is banned");
    }
    // A chat shows the model's tool calls.
    assert!(!banned.contains(&special::id_of("<|tool_call|>").unwrap()));
    let vocab = generator.config().vocab_size() as u32;
    for id in vocab - 4..vocab {
        assert!(banned.contains(&id), "id {id} has no token and is banned");
    }
    let stops = [1u32, 2];
    assert_eq!(generator.stop_ids(), [2, 1]);

    // A random model at a high temperature spreads its samples over the whole
    // vocabulary: without the ban, the 10 banned ids would come up many times.
    let prompt = generator.raw_prompt("The river").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut stopped = 0;
    for seed in 0..20 {
        let generation = generator
            .generate(&prompt, &options(3.0, seed, 64), &mut |_| Ok(()))
            .unwrap();
        assert!(generation.tokens.len() <= 64);
        for id in &generation.tokens {
            assert!(!banned.contains(id), "banned id {id} was generated");
            assert!(
                !stops.contains(id),
                "a stop token is not part of the output"
            );
        }
        match generation.stop {
            StopReason::EndOfTurn | StopReason::EndOfText => stopped += 1,
            StopReason::MaxNewTokens => assert_eq!(generation.tokens.len(), 64),
            StopReason::ContextFull => panic!("the context is not full"),
        }
        seen.extend(generation.tokens.iter().copied());
    }
    assert!(
        seen.len() > 150,
        "samples are spread ({} distinct ids)",
        seen.len()
    );
    assert!(stopped > 0, "some generations end at a stop token");
}

#[test]
fn the_same_seed_gives_the_same_text_and_greedy_ignores_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    random_model(dir.path(), llama(256), true);
    let generator = load(dir.path());
    let prompt = generator.raw_prompt("Tebris is").unwrap();
    let run = |options: SamplingOptions| {
        generator
            .generate(&prompt, &options, &mut |_| Ok(()))
            .unwrap()
            .tokens
    };
    let sampled = run(options(1.0, 7, 40));
    assert_eq!(sampled.len(), 40);
    assert_eq!(run(options(1.0, 7, 40)), sampled);
    assert_ne!(
        run(options(1.0, 8, 40)),
        sampled,
        "another seed, another text"
    );
    let filtered = SamplingOptions {
        top_k: Some(20),
        top_p: Some(0.9),
        ..options(1.0, 7, 40)
    };
    assert_eq!(run(filtered.clone()), run(filtered));
    assert_eq!(run(options(0.0, 1, 40)), run(options(0.0, 2, 40)));
}

#[test]
fn max_new_tokens_and_the_context_bound_the_generation_for_both_families() {
    for (name, config) in [("llama", llama(24)), ("gpt2", gpt2(24))] {
        let dir = tempfile::tempdir().unwrap();
        random_model(dir.path(), config, true);
        let generator = load(dir.path());
        let prompt = generator.raw_prompt("The river Ardel").unwrap();
        let short = generator
            .generate(&prompt, &options(0.0, 0, 5), &mut |_| Ok(()))
            .unwrap();
        assert_eq!(short.tokens.len(), 5, "{name}");
        assert_eq!(short.stop, StopReason::MaxNewTokens, "{name}");
        assert_eq!(short.decode_steps, 4, "{name}");

        // 24 positions: the prompt, then every generated token but the last.
        let long = generator
            .generate(&prompt, &options(0.0, 0, 1000), &mut |_| Ok(()))
            .unwrap();
        assert_eq!(long.stop, StopReason::ContextFull, "{name}");
        assert_eq!(long.tokens.len(), 24 - prompt.len() + 1, "{name}");
        assert_eq!(
            long.tokens[..5],
            short.tokens[..],
            "{name}: greedy is greedy"
        );

        let too_long: Vec<u32> = std::iter::repeat_n(prompt[1], 25).collect();
        let error = generator
            .generate(&too_long, &options(0.0, 0, 5), &mut |_| Ok(()))
            .unwrap_err();
        assert!(
            error.to_string().contains("context is 24 tokens"),
            "{error}"
        );
    }
}

#[test]
fn streamed_pieces_add_up_to_the_text() {
    let dir = tempfile::tempdir().unwrap();
    random_model(dir.path(), gpt2(256), true);
    let generator = load(dir.path());
    // Random byte-level tokens split UTF-8 characters; the stream holds them back
    // until they are whole.
    for seed in 0..10 {
        let mut streamed = String::new();
        let generation = generator
            .generate(
                &generator.raw_prompt("Über").unwrap(),
                &options(2.0, seed, 60),
                &mut |piece| {
                    streamed.push_str(piece);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(streamed, generation.text, "seed {seed}");
        assert_eq!(
            generation.text,
            generator.decode(&generation.tokens).unwrap()
        );
    }
}

#[test]
fn a_chat_keeps_its_history_and_forgets_the_oldest_exchanges_to_fit_the_context() {
    let dir = tempfile::tempdir().unwrap();
    random_model(dir.path(), llama(64), true);
    let generator = load(dir.path());
    let mut conversation = Conversation::new(Some("Be brief.".to_string()));
    let question = "Where does the river Ardel run?";
    let options = options(0.0, 0, 8);
    let first = conversation
        .reply(&generator, question, &options, &mut |_| Ok(()))
        .unwrap();
    assert_eq!(first.forgotten_turns, 0);
    assert_eq!(first.generation.tokens.len(), 8);
    assert_eq!(conversation.history().len(), 2);
    assert_eq!(conversation.history()[1].content, first.generation.text);
    let mut forgotten = 0;
    for _ in 0..4 {
        let reply = conversation
            .reply(&generator, question, &options, &mut |_| Ok(()))
            .unwrap();
        forgotten += reply.forgotten_turns;
        assert!(reply.generation.prompt_tokens + 8 <= 64);
    }
    assert!(forgotten > 0, "the history outgrew 64 positions");
    assert_eq!(conversation.history().len(), 2 * (5 - forgotten));
    conversation.reset();
    assert!(conversation.history().is_empty());

    // A long answer budget reserves at most half the context: a short history is kept.
    let mut generous = Conversation::new(None);
    generous
        .reply(&generator, "Where?", &options, &mut |_| Ok(()))
        .unwrap();
    let long_answers = SamplingOptions {
        max_new_tokens: 1000,
        ..options
    };
    let reply = generous
        .reply(&generator, "Where?", &long_answers, &mut |_| Ok(()))
        .unwrap();
    assert_eq!(reply.forgotten_turns, 0);
    assert_eq!(generous.history().len(), 4);
}

#[test]
fn a_missing_or_incomplete_model_directory_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let error = Generator::load(&missing, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains(&missing.display().to_string()), "{error}");

    let model_dir = dir.path().join("lm");
    random_model(&model_dir, llama(32), false);
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let error = Generator::load(&model_dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("no tokenizer.json") && error.contains("lm"),
        "{error}"
    );

    random_model(&model_dir, llama(32), false);
    std::fs::remove_file(model_dir.join("model.safetensors")).unwrap();
    let error = Generator::load(&model_dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("no model.safetensors") && error.contains("lm"),
        "{error}"
    );
}

/// Models from elsewhere (tests/fixtures/prompts, made by transformers): a plain prompt
/// gets exactly what the tokenizer's post-processor adds (a BOS for the Llama-3-style
/// tokenizer, nothing for Qwen2 and GPT-2), and greedy decoding continues exactly as
/// transformers' `generate(do_sample=False)` does — from bf16 (llama), f32 (qwen2) and
/// f16 (gpt2) weights.
#[test]
fn prompt_ids_and_greedy_text_equal_transformers_for_llama_qwen2_gpt2_and_mistral() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompts");
    for family in ["llama", "qwen2", "gpt2", "mistral"] {
        let dir = root.join(family);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let generator = load(&dir);
        let prompts = expected["prompts"].as_array().unwrap();
        assert!(!prompts.is_empty());
        for case in prompts {
            let prompt = case["prompt"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                generator.raw_prompt(prompt).unwrap(),
                ids,
                "{family}: {prompt:?}"
            );
            let mut new_ids: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
            let budget = new_ids.len();
            // transformers keeps the stop token it ended on; trainyard reports it apart.
            let stopped = new_ids
                .last()
                .is_some_and(|id| generator.stop_ids().contains(id));
            if stopped {
                new_ids.pop();
            }
            let generation = generator
                .generate(&ids, &options(0.0, 1, budget), &mut |_| Ok(()))
                .unwrap();
            assert_eq!(generation.tokens, new_ids, "{family}: {prompt:?}");
            if stopped {
                assert_ne!(generation.stop, StopReason::MaxNewTokens, "{family}");
            } else {
                assert_eq!(generation.text, case["text"].as_str().unwrap(), "{family}");
            }
        }
    }
}

//! The data half of a training pipeline, end to end on the built-in synthetic world:
//! ingest → tokenizer → pretrain cache and SFT cache.

use crate::common;
use trainyard::data::Split;

use common::Sandbox;
use trainyard::data::token_cache::{CacheMode, TokenCache};

const PIPELINE: &str = "name: data
seed: 42
stages:
  corpus:
    kind: ingest
    with: { source: { synthetic: { part: documents, documents: 600 } }, eval_ratio: 0.1 }
  chats:
    kind: ingest
    with: { source: { synthetic: { part: conversations, documents: 600, conversations: 200 } }, eval_ratio: 0.1 }
  tok:
    kind: tokenizer
    inputs: { text: corpus/train.jsonl, eval: corpus/eval.jsonl }
    with: { vocab_size: 600 }
  pretrain-cache:
    kind: token-cache
    inputs: { train: corpus, tokenizer: tok }
  sft-cache:
    kind: token-cache
    inputs: { train: chats, tokenizer: tok }
";

#[test]
fn synthetic_world_becomes_pretrain_and_sft_caches() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed().len(), 5);

    let pretrain = TokenCache::open(&sandbox.path("runs/latest/outputs/pretrain-cache")).unwrap();
    assert_eq!(pretrain.meta.mode, CacheMode::Pretrain);
    pretrain
        .verify_tokenizer(&sandbox.path("runs/latest/outputs/tok/tokenizer.json"))
        .unwrap();
    let train = &pretrain.meta.splits["train"];
    let eval = &pretrain.meta.splits["eval"];
    assert!(
        train.documents > 400 && eval.documents > 20,
        "{train:?} {eval:?}"
    );
    assert_eq!(train.documents + eval.documents, 600);
    assert!(pretrain.stream(Split::Train).unwrap().len() > 10_000);

    let sft = TokenCache::open(&sandbox.path("runs/latest/outputs/sft-cache")).unwrap();
    assert_eq!(sft.meta.mode, CacheMode::Sft);
    let examples = sft.examples(Split::Train).unwrap();
    assert!(examples.len() > 100);
    let (ids, mask) = examples.example(0);
    assert_eq!(ids.len(), mask.len());
    assert!(mask.contains(&1) && mask.contains(&0));

    let questions = sandbox.read("runs/latest/outputs/chats/questions.jsonl");
    assert!(questions.lines().count() > 10);

    // Nothing changed: everything is cached. A new vocabulary size reruns the tokenizer
    // and both caches, but not the ingest stages.
    sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty());
    sandbox.ok(&["run", "p.yaml", "--set", "stages.tok.with.vocab_size=700"]);
    assert_eq!(sandbox.executed(), ["pretrain-cache", "sft-cache", "tok"]);
}

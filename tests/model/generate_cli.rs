//! `trainyard generate` and `trainyard chat` end to end, on a small llama trained by a
//! pipeline (synthetic corpus → tokenizer → token cache → pretrain) once for all tests
//! and used through the run's stage output link, as a user would.

use crate::common;

use std::io::Write;
use std::process::Stdio;
use std::sync::OnceLock;

use common::{Sandbox, text};

const PIPELINE: &str = "name: lm
seed: 7
stages:
  corpus:
    kind: ingest
    with: { source: { synthetic: { part: documents, documents: 300 } }, eval_ratio: 0.1 }
  tok:
    kind: tokenizer
    inputs: { text: corpus/train.jsonl }
    with: { vocab_size: 384 }
  cache:
    kind: token-cache
    inputs: { train: corpus/train.jsonl, eval: corpus/eval.jsonl, tokenizer: tok }
  lm:
    kind: pretrain
    inputs: { data: cache, tokenizer: tok }
    with: { model: { family: llama, layers: 2, heads: 4, kv_heads: 2, dim: 64, max_positions: 128 },
            context: 32, batch_size: 8, steps: 30, lr: 0.003, warmup: 3, eval_every: 30, eval_batches: 2 }
";

const MODEL: &str = "runs/latest/outputs/lm";

/// The trained workspace, shared by every test of this file.
static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// The trained workspace (trained on first use). A static is never dropped, so its
/// directory is removed when the test process exits.
fn trained() -> &'static Sandbox {
    SANDBOX.get_or_init(|| {
        let sandbox = Sandbox::new();
        // SAFETY: registers a plain function with the C library, once.
        unsafe {
            libc::atexit(remove_trained);
        }
        sandbox.write("p.yaml", PIPELINE);
        sandbox.ok(&["run", "p.yaml"]);
        sandbox
    })
}

extern "C" fn remove_trained() {
    if let Some(sandbox) = SANDBOX.get() {
        let _ = std::fs::remove_dir_all(sandbox.dir.path());
    }
}

/// Runs trainyard and returns (stdout, stderr), asserting success.
fn run(args: &[&str]) -> (String, String) {
    let output = trained().trainyard(args);
    assert!(
        output.status.success(),
        "trainyard {args:?} failed:\n{}",
        text(&output)
    );
    (
        String::from_utf8(output.stdout).expect("UTF-8 output"),
        String::from_utf8(output.stderr).expect("UTF-8 errors"),
    )
}

/// The value of `key` in the `stats:` lines of `stderr`, one per answer.
fn stats(stderr: &str, key: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter(|line| line.starts_with("stats:"))
        .map(|line| {
            line.split_whitespace()
                .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {line}"))
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn greedy_generation_twice_gives_identical_text() {
    let args = [
        "generate",
        MODEL,
        "--raw",
        "--prompt",
        "The river",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ];
    let (first, _) = run(&args);
    let (second, _) = run(&args);
    assert!(!first.trim().is_empty(), "some text was generated");
    assert_eq!(first, second);
    // Greedy ignores the seed.
    let mut seeded = args.to_vec();
    seeded.extend(["--seed", "99"]);
    assert_eq!(run(&seeded).0, first);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = |seed: &'static str| {
        [
            "generate",
            MODEL,
            "--prompt",
            "Tell me about the capital.",
            "--system",
            "You answer questions.",
            "--temperature",
            "1.0",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "32",
        ]
    };
    let (first, _) = run(&args("3"));
    assert_eq!(run(&args("3")).0, first);
    let others: Vec<String> = ["4", "5", "6"]
        .iter()
        .map(|seed| run(&args(seed)).0)
        .collect();
    assert!(
        others.iter().any(|other| *other != first),
        "other seeds sample other texts"
    );
}

#[test]
fn max_new_tokens_is_respected_and_special_tokens_never_appear() {
    for seed in ["1", "2", "3"] {
        let (stdout, stderr) = run(&[
            "generate",
            MODEL,
            "--raw",
            "--prompt",
            "In",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-new-tokens",
            "7",
            "--stats",
        ]);
        let generated = stats(&stderr, "generated_tokens");
        assert_eq!(generated.len(), 1, "{stderr}");
        assert!(generated[0] <= 7, "{stderr}");
        assert!(
            !stdout.contains("<|"),
            "no special token in the output: {stdout}"
        );
        assert!(stderr.contains("decode_tokens_per_s="), "{stderr}");
    }
    // The chat template's role tokens are banned too.
    let (stdout, _) = run(&[
        "generate",
        MODEL,
        "--prompt",
        "Hello",
        "--temperature",
        "2.0",
        "--max-new-tokens",
        "64",
    ]);
    assert!(!stdout.contains("<|"), "{stdout}");
}

#[test]
fn chat_repl_keeps_the_conversation_over_stdin_and_reset_clears_it() {
    let mut child = trained()
        .command(&[
            "chat",
            MODEL,
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            "--stats",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"Where is the mill?\n\nAnd the river?\n/reset\nAnd the river?\n/exit\nnever read\n",
        )
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let prompts = stats(&stderr, "prompt_tokens");
    let generated = stats(&stderr, "generated_tokens");
    assert_eq!(
        prompts.len(),
        3,
        "three answers, nothing after /exit:\n{stderr}"
    );
    assert!(
        prompts[1] > prompts[0] + generated[0],
        "the second turn's prompt holds the first exchange: {prompts:?}"
    );
    assert!(stderr.contains("(history cleared)"), "{stderr}");
    assert!(
        prompts[2] < prompts[1],
        "after /reset the prompt is the question alone: {prompts:?}"
    );

    // One-shot: `--prompt` answers once, like the REPL's first turn.
    let (oneshot, _) = run(&[
        "chat",
        MODEL,
        "--prompt",
        "Where is the mill?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with(&oneshot),
        "REPL:\n{stdout}\none-shot:\n{oneshot}"
    );
}

#[test]
fn a_system_prompt_from_a_file_is_the_same_as_inline() {
    let sandbox = trained();
    sandbox.write("system.txt", "You answer questions about Ardel.\n");
    let common_args = [
        "--prompt",
        "Hi",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ];
    let mut inline = vec![
        "generate",
        MODEL,
        "--system",
        "You answer questions about Ardel.",
    ];
    inline.extend(common_args);
    let mut from_file = vec!["generate", MODEL, "--system-file", "system.txt"];
    from_file.extend(common_args);
    assert_eq!(run(&inline).0, run(&from_file).0);
}

#[test]
fn bad_model_directories_and_flags_are_clear_errors() {
    let sandbox = trained();
    let out = sandbox.fails(&["generate", "no/such/model", "--prompt", "x"]);
    assert!(
        out.contains("no/such/model") && out.contains("no such"),
        "{out}"
    );

    // A run directory is not a model, but the error points at the model inside it.
    let out = sandbox.fails(&["chat", "runs/latest", "--prompt", "x"]);
    assert!(out.contains("no config.json"), "{out}");
    assert!(out.contains("outputs/lm"), "{out}");

    let out = sandbox.fails(&["generate", "p.yaml", "--prompt", "x"]);
    assert!(
        out.contains("p.yaml") && out.contains("not a directory"),
        "{out}"
    );

    let out = sandbox.fails(&["generate", MODEL, "--prompt", "x", "--temperature", "-1"]);
    assert!(out.contains("temperature"), "{out}");
    let out = sandbox.fails(&["generate", MODEL, "--prompt", "x", "--raw", "--system", "s"]);
    assert!(out.contains("--system"), "{out}");
    let out = sandbox.fails(&[
        "generate",
        MODEL,
        "--prompt",
        "x",
        "--system-file",
        "missing.txt",
    ]);
    assert!(out.contains("missing.txt"), "{out}");
}

#[test]
fn chat_with_retrieval_answers_covered_questions_and_refuses_the_rest() {
    let sandbox = trained();
    let corpus = "runs/latest/outputs/corpus";
    let questions = sandbox.read("runs/latest/outputs/corpus/questions.jsonl");
    // A question whose keywords the documents cover (the gate alone says so).
    let covered = questions
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|row| row["question"].as_str().unwrap().to_string())
        .find(|question| {
            sandbox
                .trainyard(&[
                    "verify-question",
                    "--retrieve",
                    corpus,
                    "--context-docs",
                    "1",
                    question,
                ])
                .status
                .success()
        })
        .expect("some synthetic question passes the coverage gate");
    let flags = ["--temperature", "0", "--max-new-tokens", "5", "--stats"];
    let with_documents = [
        &[
            "chat",
            MODEL,
            "--retrieve",
            corpus,
            "--context-docs",
            "1",
            "--doc-chars",
            "150",
        ][..],
        &flags,
        &["--prompt", &covered],
    ]
    .concat();
    let (_, stderr) = run(&with_documents);
    let plain = [&["chat", MODEL][..], &flags, &["--prompt", &covered]].concat();
    let (_, plain_stderr) = run(&plain);
    assert!(
        stats(&stderr, "prompt_tokens")[0] > stats(&plain_stderr, "prompt_tokens")[0] + 10,
        "the retrieved document is put before the question"
    );

    let made_up = [
        &["chat", MODEL, "--retrieve", corpus][..],
        &flags,
        &["--prompt", "Who founded Zzqxville in Plorbania?"],
    ]
    .concat();
    let output = sandbox.trainyard(&made_up);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("I can't answer that from the documents"),
        "{}",
        text(&output)
    );
}

/// With `--workspace`, a model path like `runs/latest/…` is the workspace's, even when
/// the current directory holds a directory of that name.
#[test]
fn model_paths_resolve_against_the_workspace() {
    let workspace = trained().dir.path();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(elsewhere.path().join(MODEL)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .current_dir(elsewhere.path())
        .args([
            "--workspace",
            workspace.to_str().unwrap(),
            "generate",
            MODEL,
            "--raw",
            "--prompt",
            "The river",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
}

/// `--bf16-weights` (f32 matrices kept as bf16) generates, greedily the same text twice,
/// and on a trained model the same first words as f32: rounding the weights to bf16
/// moves logits far less than the gaps between a trained model's top tokens.
#[test]
fn bf16_weights_generate_reproducibly_and_start_as_f32_does() {
    let args = |bf16: bool| {
        let mut args = vec![
            "generate",
            MODEL,
            "--raw",
            "--prompt",
            "The river",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--stats",
        ];
        if bf16 {
            args.push("--bf16-weights");
        }
        args
    };
    let (light, stderr) = run(&args(true));
    assert_eq!(stats(&stderr, "generated_tokens").len(), 1);
    assert_eq!(run(&args(true)).0, light);
    let (full, _) = run(&args(false));
    let first_word = |text: &str| text.split_whitespace().next().map(str::to_string);
    assert!(first_word(&light).is_some(), "no text: {light:?}");
    assert_eq!(first_word(&light), first_word(&full));
}

//! GGUF export, checked from the outside: candle's GGUF reader (`gguf_file::Content`)
//! reads back every metadata key and tensor, and candle-transformers' `quantized_llama`
//! and `quantized_qwen2` — independent implementations of llama.cpp's conventions (tensor
//! names, interleaved RoPE for `llama`, half-split RoPE for `qwen2`) — run the exported
//! file and must give trainyard's own logits.
//!
//! The models are random but not at their init values: every weight is uniform with
//! variance 1/fan_in, norm gains are 1 ± 0.3 and biases ± 0.2, so the logits have a scale
//! of a few units and a wrong permutation or a swapped tensor shows up as an O(1) error.
//! `bench/gguf_llama_cpp.sh` runs the same kind of export through llama.cpp itself (see
//! [`exports_and_reference_logits_for_the_llama_cpp_check`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device, Tensor};
use trainyard::export::gguf::{GgufDtype, GgufError, write_gguf};
use trainyard::interrupt::CancelFlag;
use trainyard::model::{self, Gpt2Config, Kernels, LlamaConfig, LlamaFlavor, ModelConfig};
use trainyard::rng::Rng;
use trainyard::tokenize::chat::JINJA_TEMPLATE;
use trainyard::tokenize::corpus::WordCounts;
use trainyard::tokenize::learn::{Algorithm, TrainOptions, tokenizer_json, train_tokenizer};
use trainyard::tokenize::{pretokenize, special};

/// Tokens the test tokenizer has: the 8 special tokens, 256 bytes, and 36 merges.
const TOKENIZER_VOCAB: usize = 300;

/// f32 export through candle's quantized models: only summation order differs.
const F32_TOLERANCE: f32 = 1e-4;

/// A trained byte-level BPE tokenizer's `tokenizer.json` text (trained once per run).
fn tokenizer_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let corpus = "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox \
                      runs to the river, and the river runs to the sea. Foxes and dogs and \
                      rivers: the end of the story is the start of another one.";
        let mut counts: BTreeMap<Box<str>, u64> = BTreeMap::new();
        for _ in 0..20 {
            pretokenize::split(corpus, |piece| {
                *counts.entry(piece.into()).or_insert(0) += 1
            });
        }
        let counts = WordCounts {
            words: counts.into_iter().collect(),
            ..WordCounts::default()
        };
        let options = TrainOptions {
            algorithm: Algorithm::Bpe,
            vocab_size: TOKENIZER_VOCAB,
            min_frequency: 2,
            show_progress: false,
        };
        let tokenizer = train_tokenizer(&counts, &options, &CancelFlag::new(), &mut |_| {})
            .expect("train tokenizer");
        tokenizer_json(&tokenizer).expect("serialize tokenizer")
    })
}

/// A small llama-family config whose matrix rows are multiples of q8_0's 32-wide blocks.
fn config(flavor: LlamaFlavor, tied: bool, vocab_size: usize) -> LlamaConfig {
    LlamaConfig {
        flavor,
        vocab_size,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: match flavor {
            LlamaFlavor::Qwen2 => 1_000_000.0,
            _ => 50_000.0,
        },
        rope_scaling: None,
        sliding_window: None,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        qkv_bias: flavor == LlamaFlavor::Qwen2,
        o_bias: false,
        mlp_bias: false,
    }
}

/// A small GPT-2 config, q8_0-friendly like [`config`].
fn gpt2_config(vocab_size: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_positions: 128,
        layer_norm_epsilon: 1e-5,
        n_inner: 160,
    }
}

/// Whether a GPT-2 tensor is a Conv1D weight (`[in, out]`, transposed in GGUF).
fn is_conv1d_weight(name: &str) -> bool {
    [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// A checkpoint directory (`config.json`, `model.safetensors`, `tokenizer.json`) of a
/// random model of `config`.
struct Checkpoint {
    dir: tempfile::TempDir,
    config: ModelConfig,
}

impl Checkpoint {
    fn new(config: ModelConfig, seed: u64) -> Checkpoint {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, varmap) =
            model::new_trainable(&config, DType::F32, &Device::Cpu, seed).expect("build model");
        for (index, (name, var)) in model::sorted_vars(&varmap).into_iter().enumerate() {
            let mut rng = Rng::new(seed, index as u64);
            let dims = var.dims().to_vec();
            let fan_in = if is_conv1d_weight(&name) {
                dims[0]
            } else {
                *dims.last().expect("no scalar parameters")
            } as f64;
            let (centre, half_width) = if name.ends_with(".bias") {
                (0.0, 0.2)
            } else if name.contains("norm") || name.contains(".ln_") {
                (1.0, 0.3)
            } else {
                (0.0, (3.0 / fan_in).sqrt())
            };
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| (centre + half_width * (2.0 * rng.next_f64() - 1.0)) as f32)
                .collect();
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
        model::save_pretrained(&varmap, &config, dir.path()).expect("save model");
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_text()).unwrap();
        Checkpoint { dir, config }
    }

    fn llama(config: LlamaConfig, seed: u64) -> Checkpoint {
        Checkpoint::new(ModelConfig::Llama(config), seed)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config of a llama-family checkpoint.
    fn llama_config(&self) -> &LlamaConfig {
        match &self.config {
            ModelConfig::Llama(config) => config,
            ModelConfig::Gpt2(_) => panic!("not a llama-family checkpoint"),
        }
    }

    fn tokenizer(&self) -> PathBuf {
        self.dir.path().join("tokenizer.json")
    }

    /// Exports to `<dir>/model-<dtype>.gguf`.
    fn export(&self, dtype: GgufDtype) -> PathBuf {
        let out = self.dir.path().join(format!("model-{dtype}.gguf"));
        write_gguf(self.path(), &self.tokenizer(), &out, dtype).expect("export succeeds");
        out
    }

    /// The Hugging Face tensors as f32, by name.
    fn hf_tensors(&self) -> BTreeMap<String, Tensor> {
        candle_core::safetensors::load(self.path().join("model.safetensors"), &Device::Cpu)
            .expect("load safetensors")
            .into_iter()
            .collect()
    }
}

fn read_gguf(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).expect("open gguf");
    let content = gguf_file::Content::read(&mut file).expect("candle reads the file");
    (content, file)
}

fn u32_of(content: &gguf_file::Content, key: &str) -> u32 {
    content.metadata[key]
        .to_u32()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn f32_of(content: &gguf_file::Content, key: &str) -> f32 {
    content.metadata[key]
        .to_f32()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn string_of<'a>(content: &'a gguf_file::Content, key: &str) -> &'a str {
    content.metadata[key]
        .to_string()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn strings_of(content: &gguf_file::Content, key: &str) -> Vec<String> {
    content.metadata[key]
        .to_vec()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .iter()
        .map(|value| value.to_string().expect("string element").clone())
        .collect()
}

/// llama.cpp's GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let whole = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("transformer.wte.weight", "token_embd.weight"),
        ("transformer.wpe.weight", "position_embd.weight"),
        ("transformer.ln_f.weight", "output_norm.weight"),
        ("transformer.ln_f.bias", "output_norm.bias"),
    ];
    if let Some((_, name)) = whole.iter().find(|(from, _)| *from == hf) {
        return name.to_string();
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .or_else(|| hf.strip_prefix("transformer.h."))
        .expect("a layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let renamed = [
        ("ln_1.", "attn_norm."),
        ("attn.c_attn.", "attn_qkv."),
        ("attn.c_proj.", "attn_output."),
        ("ln_2.", "ffn_norm."),
        ("mlp.c_fc.", "ffn_up."),
        ("mlp.c_proj.", "ffn_down."),
        ("input_layernorm.", "attn_norm."),
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("post_attention_layernorm.", "ffn_norm."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
    ]
    .iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))
    .unwrap_or_else(|| panic!("unmapped tensor {hf}"));
    format!("blk.{layer}.{renamed}")
}

/// Undoes llama.cpp's rotary row order by index arithmetic (independent of the
/// writer's reshape): GGUF row `h·d + 2i + j` is Hugging Face row `h·d + j·d/2 + i`.
fn unpermute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let width = values.len() / rows;
    let head_dim = rows / heads;
    let mut out = vec![0f32; values.len()];
    for head in 0..heads {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let gguf_row = head * head_dim + 2 * i + j;
                let hf_row = head * head_dim + j * head_dim / 2 + i;
                out[hf_row * width..(hf_row + 1) * width]
                    .copy_from_slice(&values[gguf_row * width..(gguf_row + 1) * width]);
            }
        }
    }
    out
}

/// An expected hyper-parameter value.
#[derive(Debug, Clone, Copy)]
enum Hyper {
    Count(usize),
    Float(f64),
}

/// `general.architecture` and the hyper-parameter keys (without that prefix) llama.cpp
/// reads for `config`, with their values.
fn hyper(config: &ModelConfig) -> (&'static str, Vec<(&'static str, Hyper)>) {
    use Hyper::{Count, Float};
    match config {
        ModelConfig::Llama(c) => (
            c.flavor.model_type(),
            vec![
                ("vocab_size", Count(c.vocab_size)),
                ("context_length", Count(c.max_position_embeddings)),
                ("embedding_length", Count(c.hidden_size)),
                ("feed_forward_length", Count(c.intermediate_size)),
                ("block_count", Count(c.num_hidden_layers)),
                ("attention.head_count", Count(c.num_attention_heads)),
                ("attention.head_count_kv", Count(c.num_key_value_heads)),
                ("attention.key_length", Count(c.head_dim)),
                ("attention.value_length", Count(c.head_dim)),
                ("rope.dimension_count", Count(c.head_dim)),
                ("rope.freq_base", Float(c.rope_theta)),
                ("attention.layer_norm_rms_epsilon", Float(c.rms_norm_eps)),
            ],
        ),
        ModelConfig::Gpt2(c) => (
            "gpt2",
            vec![
                ("vocab_size", Count(c.vocab_size)),
                ("context_length", Count(c.n_positions)),
                ("embedding_length", Count(c.n_embd)),
                ("feed_forward_length", Count(c.n_inner)),
                ("block_count", Count(c.n_layer)),
                ("attention.head_count", Count(c.n_head)),
                ("attention.layer_norm_epsilon", Float(c.layer_norm_epsilon)),
            ],
        ),
    }
}

fn expected_keys(config: &ModelConfig) -> BTreeSet<String> {
    let (arch, hyper) = hyper(config);
    let mut keys: BTreeSet<String> = [
        "general.architecture",
        "general.file_type",
        "general.quantization_version",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.chat_template",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    keys.extend(hyper.iter().map(|(key, _)| format!("{arch}.{key}")));
    keys
}

/// Checks every metadata key and value of an export of `checkpoint`.
fn check_metadata(checkpoint: &Checkpoint, path: &Path, dtype: GgufDtype) {
    let config = &checkpoint.config;
    let (arch, hyper) = hyper(config);
    let (content, _) = read_gguf(path);
    assert!(
        matches!(content.magic, gguf_file::VersionedMagic::GgufV3),
        "GGUF version 3"
    );
    let keys: BTreeSet<String> = content.metadata.keys().cloned().collect();
    assert_eq!(keys, expected_keys(config));

    assert_eq!(string_of(&content, "general.architecture"), arch);
    let file_type = match dtype {
        GgufDtype::F32 => 0,
        GgufDtype::F16 => 1,
        GgufDtype::Q8_0 => 7,
    };
    assert_eq!(u32_of(&content, "general.file_type"), file_type);
    assert_eq!(u32_of(&content, "general.quantization_version"), 2);
    for (key, value) in hyper {
        let key = format!("{arch}.{key}");
        match value {
            Hyper::Count(count) => assert_eq!(u32_of(&content, &key) as usize, count, "{key}"),
            Hyper::Float(float) => assert_eq!(f32_of(&content, &key), float as f32, "{key}"),
        }
    }

    // The vocabulary: the tokenizer's tokens in id order, padded to the model's size.
    let tokenizer = tokenizers::Tokenizer::from_file(checkpoint.tokenizer()).unwrap();
    assert_eq!(string_of(&content, "tokenizer.ggml.model"), "gpt2");
    assert_eq!(string_of(&content, "tokenizer.ggml.pre"), "gpt-2");
    let tokens = strings_of(&content, "tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), config.vocab_size());
    let types: Vec<i32> = content.metadata["tokenizer.ggml.token_type"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|value| value.to_i32().expect("i32 token types"))
        .collect();
    assert_eq!(types.len(), config.vocab_size());
    for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
        match tokenizer.id_to_token(id as u32) {
            Some(expected) => {
                assert_eq!(token, &expected, "token {id}");
                let expected_kind = if id < special::SPECIAL_TOKENS.len() {
                    3
                } else {
                    1
                };
                assert_eq!(*kind, expected_kind, "type of token {id} {token:?}");
            }
            None => {
                assert_eq!(token, &format!("[PAD{id}]"));
                assert_eq!(*kind, 5, "type of padding token {id}");
            }
        }
    }
    assert_eq!(&tokens[..8], special::SPECIAL_TOKENS);
    let json: serde_json::Value = serde_json::from_str(tokenizer_text()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|merge| match merge {
            serde_json::Value::String(text) => text.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
        })
        .collect();
    assert_eq!(merges.len(), TOKENIZER_VOCAB - 264);
    assert_eq!(strings_of(&content, "tokenizer.ggml.merges"), merges);
    assert_eq!(u32_of(&content, "tokenizer.ggml.bos_token_id"), 1);
    assert_eq!(u32_of(&content, "tokenizer.ggml.eos_token_id"), 2);
    assert_eq!(u32_of(&content, "tokenizer.ggml.eot_token_id"), 2);
    assert_eq!(u32_of(&content, "tokenizer.ggml.padding_token_id"), 0);
    assert!(
        !content.metadata["tokenizer.ggml.add_bos_token"]
            .to_bool()
            .unwrap()
    );
    assert!(
        !content.metadata["tokenizer.ggml.add_eos_token"]
            .to_bool()
            .unwrap()
    );
    assert_eq!(
        string_of(&content, "tokenizer.chat_template"),
        JINJA_TEMPLATE
    );
}

/// Checks every tensor's name, shape, type and placement; for f32, that each equals
/// the Hugging Face tensor exactly once llama's q/k rows are put back.
fn check_tensors(checkpoint: &Checkpoint, path: &Path, dtype: GgufDtype) {
    let config = &checkpoint.config;
    let (content, mut file) = read_gguf(path);
    let hf = checkpoint.hf_tensors();
    let expected_names: BTreeSet<String> = hf.keys().map(|name| gguf_name(name)).collect();
    let names: BTreeSet<String> = content.tensor_infos.keys().cloned().collect();
    assert_eq!(names, expected_names);
    let untied = matches!(config, ModelConfig::Llama(c) if !c.tie_word_embeddings);
    assert_eq!(
        names.contains("output.weight"),
        untied,
        "output.weight exactly when untied"
    );
    assert_eq!(content.tensor_data_offset % 32, 0, "data section aligned");
    for (hf_name, original) in &hf {
        let name = gguf_name(hf_name);
        let info = &content.tensor_infos[&name];
        // Conv1D weights are stored as [out, in]; everything else keeps its shape.
        let transposed = is_conv1d_weight(hf_name);
        let original = if transposed {
            original.t().unwrap().contiguous().unwrap()
        } else {
            original.clone()
        };
        assert_eq!(info.shape.dims(), original.dims(), "{name} shape");
        assert_eq!(info.offset % 32, 0, "{name} aligned");
        let expected_type = match (original.rank(), dtype) {
            (1, _) | (_, GgufDtype::F32) => GgmlDType::F32,
            _ if name == "position_embd.weight" => GgmlDType::F32,
            (_, GgufDtype::F16) => GgmlDType::F16,
            (_, GgufDtype::Q8_0) => GgmlDType::Q8_0,
        };
        assert_eq!(info.ggml_dtype, expected_type, "{name} type");
        let stored = content
            .tensor(&mut file, &name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let heads = match config {
            ModelConfig::Llama(c) if c.flavor == LlamaFlavor::Llama => {
                if hf_name.contains("q_proj") {
                    Some(c.num_attention_heads)
                } else if hf_name.contains("k_proj") {
                    Some(c.num_key_value_heads)
                } else {
                    None
                }
            }
            _ => None,
        };
        let restored = match heads {
            Some(heads) => unpermute_rows(&stored, original.dims()[0], heads),
            None => stored.clone(),
        };
        let original = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if heads.is_some() {
            assert_ne!(stored, original, "{name} should be stored permuted");
        }
        match expected_type {
            GgmlDType::F32 => assert!(
                restored
                    .iter()
                    .zip(&original)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} differs from {hf_name}"
            ),
            // Round to nearest f16: relative error at most 2^-11, or half the spacing
            // 2^-24 of f16's subnormals for tiny values.
            GgmlDType::F16 => {
                for (a, b) in restored.iter().zip(&original) {
                    assert!(
                        (a - b).abs() <= (b.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
                        "{name}: {a} vs {b}"
                    );
                }
            }
            // q8_0: each block of 32 consecutive values shares d = max|x|/127, stored as
            // f16; x is rounded to the nearest multiple q·d, so the error is at most
            // d/2 plus |q| ≤ 127 times d's own f16 rounding (d·2^-11).
            _ => {
                for (block, (a, b)) in restored.chunks(32).zip(original.chunks(32)).enumerate() {
                    let d = b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                    let bound = d * (0.5 + 127.0 * 2f32.powi(-11)) * (1.0 + 1e-5);
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= bound, "{name} block {block}: {x} vs {y}");
                    }
                }
            }
        }
    }
}

#[test]
fn llama_export_has_every_llama_cpp_key_and_tensor() {
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Llama, false, TOKENIZER_VOCAB), 1);
    for dtype in [GgufDtype::F32, GgufDtype::F16, GgufDtype::Q8_0] {
        let path = checkpoint.export(dtype);
        check_metadata(&checkpoint, &path, dtype);
        check_tensors(&checkpoint, &path, dtype);
    }
}

#[test]
fn qwen2_export_has_every_key_and_tensor_unpermuted_with_biases_and_padding() {
    // Tied embeddings (no output.weight), and a model vocabulary larger than the
    // tokenizer's: the extra ids become unused [PAD] tokens.
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Qwen2, true, TOKENIZER_VOCAB + 4), 2);
    for dtype in [GgufDtype::F32, GgufDtype::Q8_0] {
        let path = checkpoint.export(dtype);
        check_metadata(&checkpoint, &path, dtype);
        check_tensors(&checkpoint, &path, dtype);
    }
}

#[test]
fn llama_biases_are_permuted_like_their_rows() {
    let mut config = config(LlamaFlavor::Llama, true, TOKENIZER_VOCAB);
    config.qkv_bias = true;
    config.o_bias = true;
    config.mlp_bias = true;
    let checkpoint = Checkpoint::llama(config, 3);
    let path = checkpoint.export(GgufDtype::F32);
    check_tensors(&checkpoint, &path, GgufDtype::F32);
    let (content, _) = read_gguf(&path);
    for name in [
        "blk.1.attn_q.bias",
        "blk.1.attn_output.bias",
        "blk.1.ffn_down.bias",
    ] {
        assert!(content.tensor_infos.contains_key(name), "{name}");
    }
}

#[test]
fn export_is_byte_identical_across_runs_and_summarised() {
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Llama, false, TOKENIZER_VOCAB), 4);
    let first = checkpoint.path().join("a.gguf");
    let second = checkpoint.path().join("b.gguf");
    let summary = write_gguf(
        checkpoint.path(),
        &checkpoint.tokenizer(),
        &first,
        GgufDtype::Q8_0,
    )
    .unwrap();
    // The tokenizer may also be named by the directory that holds it.
    write_gguf(
        checkpoint.path(),
        checkpoint.path(),
        &second,
        GgufDtype::Q8_0,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap()
    );
    assert_eq!(summary.bytes, std::fs::metadata(&first).unwrap().len());
    assert_eq!(summary.architecture, "llama");
    assert_eq!(summary.tokenizer_pre, "gpt-2");
    assert_eq!(summary.tensors[0].name, "token_embd.weight");
    assert_eq!(summary.tensors[0].shape, [TOKENIZER_VOCAB, 64]);
    assert_eq!(summary.tensors[0].dtype, "q8_0");
    assert_eq!(summary.tensors.len(), 1 + 2 * 9 + 2);
    assert_eq!(
        summary.metadata_keys.len(),
        expected_keys(&checkpoint.config).len()
    );
    assert!(!checkpoint.path().join("a.gguf.partial").exists());
}

/// Largest absolute difference between trainyard's last-position logits and those of
/// candle-transformers' quantized model run on the exported file, and the largest
/// absolute logit (the scale the difference is judged against).
fn logit_gap(checkpoint: &Checkpoint, dtype: GgufDtype) -> (f32, f32) {
    let ids: Vec<u32> = vec![1, 17, 200, 45, 9, 123, 250, 3, 77, 64, 280, 5];
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (ours, _) = model::load_pretrained(checkpoint.path(), DType::F32, &Device::Cpu).unwrap();
    let ours = ours
        .forward(&input, None, Kernels::Differentiable)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let path = checkpoint.export(dtype);
    let (content, mut file) = read_gguf(&path);
    let theirs = match checkpoint.llama_config().flavor {
        LlamaFlavor::Llama | LlamaFlavor::Mistral => {
            use candle_transformers::models::quantized_llama::ModelWeights;
            let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            model.forward(&input, 0).unwrap()
        }
        LlamaFlavor::Qwen2 => {
            use candle_transformers::models::quantized_qwen2::ModelWeights;
            let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            model.forward(&input, 0).unwrap()
        }
    };
    let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(theirs.len(), ours.len());
    let gap = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = ours.iter().map(|a| a.abs()).fold(0f32, f32::max);
    eprintln!(
        "{} {dtype}: max |logit diff| {gap:.3e}, max |logit| {scale:.3}",
        checkpoint.llama_config().flavor.model_type()
    );
    (gap, scale)
}

fn check_logits(flavor: LlamaFlavor, tied: bool) {
    let checkpoint = Checkpoint::llama(config(flavor, tied, TOKENIZER_VOCAB), 5);
    let (gap, scale) = logit_gap(&checkpoint, GgufDtype::F32);
    assert!(scale > 1.0, "logits of scale {scale} would hide errors");
    assert!(gap <= F32_TOLERANCE, "f32: {gap}");
    // f16 keeps 11 significant bits (relative error ≤ 2^-11 per weight); q8_0 keeps
    // 8 bits per block of 32, and candle (like llama.cpp) also rounds the activations to
    // q8_0 before each product. Both stay far below the O(scale) error of a wrong layout.
    let (gap, _) = logit_gap(&checkpoint, GgufDtype::F16);
    assert!(gap <= 0.01 * scale, "f16: {gap} against scale {scale}");
    let (gap, _) = logit_gap(&checkpoint, GgufDtype::Q8_0);
    assert!(gap <= 0.05 * scale, "q8_0: {gap} against scale {scale}");
}

#[test]
fn candle_quantized_llama_reproduces_our_logits_from_the_export() {
    check_logits(LlamaFlavor::Llama, false);
}

#[test]
fn candle_quantized_qwen2_reproduces_our_logits_from_the_export() {
    check_logits(LlamaFlavor::Qwen2, true);
}

#[test]
fn gpt2_export_has_every_key_and_tensor_with_conv1d_weights_transposed() {
    let checkpoint = Checkpoint::new(ModelConfig::Gpt2(gpt2_config(TOKENIZER_VOCAB)), 8);
    for dtype in [GgufDtype::F32, GgufDtype::F16, GgufDtype::Q8_0] {
        let path = checkpoint.export(dtype);
        check_metadata(&checkpoint, &path, dtype);
        check_tensors(&checkpoint, &path, dtype);
    }
}

#[test]
fn original_gpt2_files_without_the_transformer_prefix_export_the_same_file() {
    let checkpoint = Checkpoint::new(ModelConfig::Gpt2(gpt2_config(TOKENIZER_VOCAB)), 9);
    let prefixed = checkpoint.export(GgufDtype::Q8_0);
    // OpenAI's files name the tensors `wte.weight`, `h.0.attn.c_attn.weight`, … and carry
    // the causal-mask buffers `h.N.attn.bias`.
    let bare = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, Tensor)> = checkpoint
        .hf_tensors()
        .into_iter()
        .map(|(name, tensor)| (name.trim_start_matches("transformer.").to_string(), tensor))
        .collect();
    let mask = Tensor::ones((1, 1, 128, 128), DType::F32, &Device::Cpu).unwrap();
    tensors.push(("h.0.attn.bias".to_string(), mask));
    model::save_tensors(&tensors, &bare.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        checkpoint.path().join("config.json"),
        bare.path().join("config.json"),
    )
    .unwrap();
    let out = bare.path().join("model.gguf");
    write_gguf(bare.path(), &checkpoint.tokenizer(), &out, GgufDtype::Q8_0).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&prefixed).unwrap()
    );
}

/// A change to a `tokenizer.json`.
type Edit = fn(&mut serde_json::Value);

#[test]
fn tokenizers_llama_cpp_cannot_reproduce_are_refused_by_key() {
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Llama, true, TOKENIZER_VOCAB), 6);
    let out = checkpoint.path().join("model.gguf");
    let cases: [(&str, Edit); 4] = [
        ("model.type", |json| {
            json["model"]["type"] = "Unigram".into()
        }),
        ("pre_tokenizer", |json| {
            json["pre_tokenizer"]["add_prefix_space"] = true.into()
        }),
        ("normalizer", |json| {
            json["normalizer"] = serde_json::json!({"type": "Lowercase"})
        }),
        ("vocab_size", |json| {
            json["model"]["vocab"]["extra"] = 999.into()
        }),
    ];
    for (key, edit) in cases {
        let mut json: serde_json::Value = serde_json::from_str(tokenizer_text()).unwrap();
        edit(&mut json);
        let path = checkpoint.path().join("edited.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let error = write_gguf(checkpoint.path(), &path, &out, GgufDtype::F32).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, GgufError::Tokenizer { .. }), "{message}");
        assert!(message.contains("edited.json"), "{message}");
        assert!(message.contains(key), "{key}: {message}");
        assert!(!out.exists());
    }
}

#[test]
fn a_tensor_that_disagrees_with_the_config_fails_before_anything_is_written() {
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Llama, true, TOKENIZER_VOCAB), 7);
    // The MLP shrinks in config.json but not in the weights.
    let path = checkpoint.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["intermediate_size"] = 64.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let out = checkpoint.path().join("model.gguf");
    let error = write_gguf(
        checkpoint.path(),
        &checkpoint.tokenizer(),
        &out,
        GgufDtype::F32,
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, GgufError::Tensor { .. }), "{message}");
    assert!(
        message.contains("model.layers.0.mlp.gate_proj.weight"),
        "{message}"
    );
    assert!(message.contains("[96, 64]"), "{message}");
    assert!(!out.exists());
    assert!(!checkpoint.path().join("model.gguf.partial").exists());
}

/// Writes what `bench/gguf_llama_cpp.py` checks llama.cpp against: four checkpoints
/// (llama untied; llama with every bias, tied; qwen2 tied with [PAD] ids; gpt2), each
/// exported as f32, f16 and q8_0, and `reference.json` with trainyard's logits at every position
/// of one input, the ids trainyard's tokenizer gives some texts, and a rendered chat.
/// Into `$TRAINYARD_GGUF_EXPORT` when set, else a temporary directory (then it only
/// checks that these exports succeed).
#[test]
fn exports_and_reference_logits_for_the_llama_cpp_check() {
    let temp = tempfile::tempdir().unwrap();
    let root = std::env::var_os("TRAINYARD_GGUF_EXPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    let mut llama_biases = config(LlamaFlavor::Llama, true, TOKENIZER_VOCAB);
    llama_biases.qkv_bias = true;
    llama_biases.o_bias = true;
    llama_biases.mlp_bias = true;
    let models = [
        (
            "llama",
            ModelConfig::Llama(config(LlamaFlavor::Llama, false, TOKENIZER_VOCAB)),
        ),
        ("llama_biases", ModelConfig::Llama(llama_biases)),
        (
            "qwen2",
            ModelConfig::Llama(config(LlamaFlavor::Qwen2, true, TOKENIZER_VOCAB + 4)),
        ),
        ("gpt2", ModelConfig::Gpt2(gpt2_config(TOKENIZER_VOCAB))),
    ];
    let input_ids: Vec<u32> = vec![1, 17, 200, 45, 9, 123, 250, 3, 77, 64, 280, 5];
    let input = Tensor::new(input_ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut reference_models = serde_json::Map::new();
    for (seed, (name, config)) in models.into_iter().enumerate() {
        let checkpoint = Checkpoint::new(config, 100 + seed as u64);
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(checkpoint.path().join(file), dir.join(file)).unwrap();
        }
        for dtype in [GgufDtype::F32, GgufDtype::F16, GgufDtype::Q8_0] {
            let out = dir.join(format!("model-{dtype}.gguf"));
            write_gguf(&dir, &dir.join("tokenizer.json"), &out, dtype).unwrap();
        }
        let (model, _) = model::load_pretrained(&dir, DType::F32, &Device::Cpu).unwrap();
        let logits = model
            .forward(&input, None, Kernels::Differentiable)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        reference_models.insert(name.to_string(), serde_json::json!({ "logits": logits }));
    }

    let tokenizer = tokenizers::Tokenizer::from_str(tokenizer_text()).unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "  rivers,\n\nand   the SEA's end — 42 foxes! ünïcödé 🦊",
        "<|user|>Where does the river run?<|end|><|assistant|>To the sea.<|end|>",
    ];
    let encoded: Vec<serde_json::Value> = texts
        .iter()
        .map(|text| {
            let ids = tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
            serde_json::json!({ "text": text, "ids": ids })
        })
        .collect();
    let messages: Vec<trainyard::data::records::ChatMessage> =
        serde_json::from_value(serde_json::json!([
            { "role": "system", "content": "Be brief." },
            { "role": "user", "content": "Where does the river run?" },
            { "role": "assistant", "content": "", "tool_calls": [
                { "name": "lookup", "arguments": { "river": "Ardel", "n": 2 } }
            ] },
            { "role": "tool", "content": "the sea" },
            { "role": "assistant", "content": "To the sea." },
            { "role": "user", "content": "Thanks." },
        ]))
        .unwrap();
    let rendered = trainyard::tokenize::chat::render_text(&messages, true);
    let reference = serde_json::json!({
        "input_ids": input_ids,
        "models": reference_models,
        "texts": encoded,
        "chat": { "messages": messages, "rendered": rendered },
    });
    std::fs::write(
        root.join("reference.json"),
        serde_json::to_string(&reference).unwrap(),
    )
    .unwrap();
}

/// A copy of `checkpoint`'s directory with every tensor converted to `dtype`.
fn converted(checkpoint: &Checkpoint, dtype: DType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<(String, Tensor)> = checkpoint
        .hf_tensors()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_dtype(dtype).unwrap()))
        .collect();
    model::save_model_dir(dir.path(), &checkpoint.config, &tensors).unwrap();
    std::fs::copy(checkpoint.tokenizer(), dir.path().join("tokenizer.json")).unwrap();
    dir
}

#[test]
fn a_bf16_checkpoint_exports_the_gguf_of_its_f32_widening() {
    // bf16 → f32 is exact, so a bf16 source and the same weights widened to f32 must give
    // byte-identical GGUF files of every type.
    let checkpoint = Checkpoint::llama(config(LlamaFlavor::Llama, false, TOKENIZER_VOCAB), 9);
    let bf16 = converted(&checkpoint, DType::BF16);
    let rounded = tempfile::tempdir().unwrap();
    let widened: Vec<(String, Tensor)> =
        candle_core::safetensors::load(bf16.path().join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, tensor)| {
                assert_eq!(tensor.dtype(), DType::BF16);
                (name, tensor.to_dtype(DType::F32).unwrap())
            })
            .collect();
    model::save_model_dir(rounded.path(), &checkpoint.config, &widened).unwrap();
    for dtype in [GgufDtype::F32, GgufDtype::F16, GgufDtype::Q8_0] {
        let a = bf16.path().join("a.gguf");
        let b = rounded.path().join("b.gguf");
        write_gguf(bf16.path(), &checkpoint.tokenizer(), &a, dtype).unwrap();
        write_gguf(rounded.path(), &checkpoint.tokenizer(), &b, dtype).unwrap();
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{dtype}: the bf16 source exports differently"
        );
    }
}

#[test]
fn llama3_rope_scaling_is_exported_as_llama_cpp_rope_freqs() {
    let mut llama = config(LlamaFlavor::Llama, false, TOKENIZER_VOCAB);
    llama.rope_scaling = Some(model::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 256,
    });
    let checkpoint = Checkpoint::llama(llama.clone(), 10);
    let path = checkpoint.export(GgufDtype::F16);
    let (content, mut file) = read_gguf(&path);
    let freqs = content
        .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // llama.cpp divides frequency i by rope_freqs[i]: llama.cpp's converter's factors.
    assert_eq!(freqs.len(), llama.head_dim / 2);
    let plain = |i: usize| {
        1.0 / llama
            .rope_theta
            .powf((2 * i) as f64 / llama.head_dim as f64)
    };
    for (i, factor) in freqs.iter().enumerate() {
        let want = (plain(i) / llama.inv_freq(i)) as f32;
        assert!(
            (factor - want).abs() <= 1e-6 * want,
            "{i}: {factor} vs {want}"
        );
        assert!((1.0..=8.0).contains(factor));
    }
    assert_eq!(freqs[0], 1.0);
    assert_eq!(*freqs.last().unwrap(), 8.0);
    assert!(freqs.iter().any(|f| *f > 1.0 && *f < 8.0), "{freqs:?}");

    // Mistral is llama to llama.cpp.
    let mut mistral = config(LlamaFlavor::Mistral, false, TOKENIZER_VOCAB);
    mistral.sliding_window = Some(4096);
    let checkpoint = Checkpoint::llama(mistral, 11);
    let path = checkpoint.export(GgufDtype::F16);
    let (content, _) = read_gguf(&path);
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "llama"
    );
}

"""Checks trainyard's GGUF exports against llama.cpp itself (through llama-cpp-python)
and against gguf-py, llama.cpp's own GGUF reader and reference quantizer.

Reads the directory `cargo test --test model gguf::exports_and_reference_logits_for_the_llama_cpp_check`
writes when TRAINYARD_GGUF_EXPORT is set (see bench/gguf_llama_cpp.sh): for each model
(`llama`, `llama_biases`, `qwen2`, `gpt2`) and type (f32, f16, q8_0) it checks that

- gguf-py parses the file as GGUF v3 with the expected architecture, keys and tensor types,
  and that the f16 and q8_0 tensors are byte-identical to gguf-py's quantization of the f32
  export's tensors (gguf-py's quantizers are bit-exact ports of ggml's reference ones);
- llama.cpp loads it and its logits at every position of the reference input match
  trainyard's (f32 within 1e-4; f16 and q8_0 within a fraction of the logit scale, with
  the same greedy token at every position for f32 and f16);
- llama.cpp's tokenizer gives trainyard's ids for the reference texts (special tokens
  included) and decodes plain texts back; BOS/EOS/EOT are <|endoftext|>/<|end|>/<|end|>
  and both end generation;
- the chat template stored in the file renders, through llama-cpp-python's own Jinja
  formatter, exactly the text trainyard renders.

Exits non-zero on the first failed check; prints the measured differences.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import gguf
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

MODELS = ["llama", "llama_biases", "qwen2", "gpt2"]
ARCH = {"llama": "llama", "llama_biases": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
DTYPES = ["f32", "f16", "q8_0"]
# Largest |logit difference| accepted, as a fraction of the largest |logit| (f32: absolute).
F32_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = {"f16": 0.01, "q8_0": 0.05}
GGML_TYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def field_value(reader, key):
    field = reader.fields[key]
    return field.contents()


def check_with_gguf_py(path, dtype, arch, f32_tensors):
    reader = gguf.GGUFReader(path)
    check(field_value(reader, "GGUF.version") == 3, f"{path}: GGUF version")
    check(field_value(reader, "general.architecture") == arch, f"{path}: architecture")
    check(field_value(reader, "general.file_type") == FILE_TYPE[dtype], f"{path}: file_type")
    check(field_value(reader, "tokenizer.ggml.pre") == "gpt-2", f"{path}: tokenizer.ggml.pre")
    keys = ["context_length", "embedding_length", "feed_forward_length", "block_count",
            "attention.head_count"]
    if arch == "gpt2":
        keys += ["attention.layer_norm_epsilon"]
    else:
        keys += ["attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"]
    for key in keys:
        check(f"{arch}.{key}" in reader.fields, f"{path}: missing {arch}.{key}")
    check(reader.data_offset % 32 == 0, f"{path}: data section not aligned")
    tensors = {}
    for tensor in reader.tensors:
        check(tensor.data_offset % 32 == 0, f"{path}: {tensor.name} not aligned")
        always_f32 = len(tensor.shape) == 1 or tensor.name == "position_embd.weight"
        expected = gguf.GGMLQuantizationType.F32 if always_f32 else GGML_TYPE[dtype]
        check(tensor.tensor_type == expected,
              f"{path}: {tensor.name} is {tensor.tensor_type.name}, expected {expected.name}")
        tensors[tensor.name] = tensor
    if f32_tensors is None:
        return {name: np.array(tensor.data) for name, tensor in tensors.items()}
    check(set(tensors) == set(f32_tensors), f"{path}: tensor names differ from the f32 export")
    for name, tensor in tensors.items():
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        requantized = gguf.quants.quantize(f32_tensors[name], tensor.tensor_type)
        check(np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1),
                             requantized.view(np.uint8).reshape(-1)),
              f"{path}: {name} differs from gguf-py's {dtype} quantization of the f32 tensor")
    return None


def read_safetensors(path):
    """The f32 tensors of a safetensors file (an 8-byte header length, a JSON header,
    then the raw little-endian data)."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        check(info["dtype"] == "F32", f"{path}: {name} is not f32")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"])
    return tensors


def gpt2_logits(model_dir, ids, f16_gelu):
    """GPT-2's logits in numpy, with GELU exact (`gelu_new`, as transformers and
    trainyard compute it) or as ggml's CPU back end computes it: through a table indexed
    by the f16 rounding of the input, holding f16 values."""
    config = json.loads((model_dir / "config.json").read_text())
    w = read_safetensors(model_dir / "model.safetensors")
    heads, eps = config["n_head"], config["layer_norm_epsilon"]

    def norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def gelu(x):
        if f16_gelu:
            x = x.astype(np.float16).astype(np.float32)
        y = 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + 0.044715 * x ** 3)))
        if f16_gelu:
            y = np.where(x <= -10, 0, np.where(x >= 10, x, y.astype(np.float16)))
        return y.astype(np.float32)

    t = len(ids)
    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:t]
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    for layer in range(config["n_layer"]):
        p = f"transformer.h.{layer}"
        qkv = norm(x, f"{p}.ln_1") @ w[f"{p}.attn.c_attn.weight"] + w[f"{p}.attn.c_attn.bias"]
        q, k, v = (part.reshape(t, heads, -1).transpose(1, 0, 2) for part in np.split(qkv, 3, -1))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = (probs @ v).transpose(1, 0, 2).reshape(t, -1)
        x = x + y @ w[f"{p}.attn.c_proj.weight"] + w[f"{p}.attn.c_proj.bias"]
        h = gelu(norm(x, f"{p}.ln_2") @ w[f"{p}.mlp.c_fc.weight"] + w[f"{p}.mlp.c_fc.bias"])
        x = x + h @ w[f"{p}.mlp.c_proj.weight"] + w[f"{p}.mlp.c_proj.bias"]
    return norm(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    reference = json.loads((args.dir / "reference.json").read_text())
    ids = reference["input_ids"]

    for name in MODELS:
        arch = ARCH[name]
        ours = np.array(reference["models"][name]["logits"], dtype=np.float32)
        scale = float(np.abs(ours).max())
        f32_tensors = None
        for dtype in DTYPES:
            path = args.dir / name / f"model-{dtype}.gguf"
            tensors = check_with_gguf_py(str(path), dtype, arch, f32_tensors)
            if dtype == "f32":
                f32_tensors = tensors
            # f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-3 in the logits.
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=64, n_threads=2,
                                  logits_all=True, type_k=0, type_v=0, flash_attn=False,
                                  verbose=False)
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
            check(theirs.shape == ours.shape, f"{path}: logits shape {theirs.shape}")
            gap = float(np.abs(theirs - ours).max())
            rms = float(np.sqrt(((theirs - ours) ** 2).mean() / (ours ** 2).mean()))
            same_greedy = bool((theirs.argmax(1) == ours.argmax(1)).all())
            print(f"{name:13} {dtype:5} max |logit diff| {gap:.3e}  (max |logit| {scale:.3f}, "
                  f"relative rms {rms:.2e}, greedy tokens {'equal' if same_greedy else 'differ'})")
            if dtype == "f32" and arch == "gpt2":
                # ggml's CPU GELU reads a table of f16 values indexed by the f16 rounding of
                # its input, which alone moves GPT-2's logits by ~1e-3. A numpy GPT-2 shows
                # it: with exact GELU it gives trainyard's logits, with ggml's table it
                # gives llama.cpp's, both within the f32 tolerance.
                exact = gpt2_logits(args.dir / name, ids, f16_gelu=False)
                tabled = gpt2_logits(args.dir / name, ids, f16_gelu=True)
                ours_gap = float(np.abs(exact - ours).max())
                table_gap = float(np.abs(tabled - theirs).max())
                print(f"{'':19} numpy GPT-2: exact GELU vs trainyard {ours_gap:.3e}, "
                      f"ggml's f16 GELU table vs llama.cpp {table_gap:.3e}")
                check(ours_gap <= F32_TOLERANCE, f"{path}: numpy GPT-2 differs from trainyard")
                check(table_gap <= F32_TOLERANCE, f"{path}: llama.cpp differs from numpy GPT-2 "
                                                  f"with ggml's GELU by {table_gap}")
            elif dtype == "f32":
                check(gap <= F32_TOLERANCE, f"{path}: f32 logits differ by {gap}")
            else:
                check(gap <= RELATIVE_TOLERANCE[dtype] * scale,
                      f"{path}: {dtype} logits differ by {gap} (scale {scale})")
            if dtype != "q8_0":
                check(same_greedy, f"{path}: greedy tokens differ")

            if dtype != "f32":
                continue
            # Tokenizer, special ids and chat template (identical in every type).
            for case in reference["texts"]:
                got = llm.tokenize(case["text"].encode(), add_bos=False, special=True)
                check(got == case["ids"], f"{path}: tokenize({case['text']!r}) = {got}, "
                                          f"trainyard {case['ids']}")
                if "<|" not in case["text"]:
                    back = llm.detokenize(got).decode()
                    check(back == case["text"], f"{path}: detokenize gave {back!r}")
            vocab = llm._model.vocab
            check(llm.token_bos() == 1 and llm.token_eos() == 2, f"{path}: bos/eos ids")
            check(llama_cpp.llama_vocab_eot(vocab) == 2, f"{path}: eot id")
            check(llama_cpp.llama_vocab_is_eog(vocab, 2), f"{path}: <|end|> must end generation")
            check(llama_cpp.llama_vocab_is_eog(vocab, 1),
                  f"{path}: <|endoftext|> must end generation")
            check(not llama_cpp.llama_vocab_get_add_bos(vocab), f"{path}: add_bos")
            template = llm.metadata["tokenizer.chat_template"]
            formatter = Jinja2ChatFormatter(template=template, eos_token="<|end|>",
                                            bos_token="<|endoftext|>")
            rendered = formatter(messages=reference["chat"]["messages"]).prompt
            check(rendered == reference["chat"]["rendered"],
                  f"{path}: chat template renders {rendered!r}, "
                  f"trainyard {reference['chat']['rendered']!r}")
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) and gguf-py {gguf_version()} "
          f"agree with trainyard on {len(MODELS)} models x {len(DTYPES)} types")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()

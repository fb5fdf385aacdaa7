"""Makes data/models/tiny-qwen2: a tiny randomly initialised Qwen2ForCausalLM in the layout
Qwen/Qwen2.5-*-Instruct ships on the Hugging Face Hub, for the `chat-lora` pipeline and the
parity tests that need a "model people bring" with its own ChatML tokenizer.

What is written (all small: ~0.4 MB in all):

    config.json                        Qwen2Config as save_pretrained writes it (dtype bfloat16,
                                       tie_word_embeddings, q/k/v biases, GQA 4/2 heads,
                                       vocab_size padded past the tokenizer, as Qwen pads it)
    model-00001-of-00002.safetensors   bf16 weights in two shards ...
    model-00002-of-00002.safetensors
    model.safetensors.index.json       ... with the index save_pretrained writes
    generation_config.json             Qwen2.5-Instruct's fields, eos_token_id a LIST
                                       [<|im_end|>, <|endoftext|>]
    tokenizer.json                     byte-level BPE trained here with Python `tokenizers`
                                       on data/samples/, with Qwen2's NFC normalizer, split
                                       regex + ByteLevel pre-tokenizer and ByteLevel decoder
    tokenizer_config.json              as Qwen2.5-Instruct's: Qwen2Tokenizer, eos <|im_end|>,
                                       pad <|endoftext|>, bos null, add_bos_token false, the
                                       real Qwen2.5-Instruct chat_template (with tools)

Special tokens, in Qwen2.5's order after the BPE vocabulary: <|endoftext|>, <|im_start|>,
<|im_end|> (special), then <tool_call>, </tool_call> (added but NOT special, as Qwen2.5 has
them, so skip_special_tokens keeps them).

The chat template is Qwen2.5-Instruct's, byte for byte. Source: the file
`trl/chat_templates/qwen2_5.jinja` of the PyPI package trl==1.16.0, which TRL keeps as an
exact copy of the Hub template (it identifies models by comparing templates for equality);
the same text appears in public code that quotes Qwen2.5-Instruct's tokenizer_config.json
verbatim. It is inlined below (QWEN25_CHAT_TEMPLATE) so this script needs no trl.

The weights are transformers' own random initialisation (seeded), cast to bfloat16; no
hub is involved. Everything is seeded and the tokenizer training is deterministic, so a
rerun with the pinned versions is byte-identical. The script checks its output with
transformers: AutoTokenizer and AutoModelForCausalLM load the directory, the tokenizer
transformers builds encodes like tokenizer.json itself, and apply_chat_template renders
a tool conversation.

Run from the repository root:

    python3 -m venv /tmp/hf-venv
    /tmp/hf-venv/bin/pip install torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 \\
        safetensors==0.8.0 jinja2==3.1.6
    /tmp/hf-venv/bin/python data/models/make-tiny-qwen2.py

Other versions are refused unless --any-version is given; the versions used are recorded
in tokenizer_config.json ("_generated_by") either way.
"""

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "data/models/tiny-qwen2"
SAMPLES = ROOT / "data/samples"

PINNED = {"torch": "2.15.0", "transformers": "5.23.0", "tokenizers": "0.23.3"}

SEED = 2512
# Byte-level BPE size before the special/added tokens; the model's vocab_size is padded up
# to a multiple of 64 past len(tokenizer), as Qwen2.5 pads 151665 tokens to 151936 rows.
BPE_VOCAB = 800
PAD_TO = 64

# transformers' Qwen2 pre-tokenizer regex (models/qwen2/tokenization_qwen2.py), the one in
# Qwen2.5's tokenizer.json.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_NOT_SPECIAL = ["<tool_call>", "</tool_call>"]

# Qwen/Qwen2.5-*-Instruct chat_template, verbatim (see the module docstring for the source).
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# sha256 of the template text in trl 1.16.0's qwen2_5.jinja, to catch a transcription slip.
QWEN25_CHAT_TEMPLATE_SHA256 = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"


def sample_texts() -> list[str]:
    """The training text for every tokenizer made for trainyard's fixtures: all of
    data/samples, in a fixed order. Chat rows contribute each message's content and each
    tool call's name and arguments (as JSON), so JSON punctuation gets merges too."""
    texts = []
    for path in sorted(SAMPLES.rglob("*")):
        if not path.is_file() or path.suffix == ".py":
            continue
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if "text" in row:
                    texts.append(row["text"])
                for message in row.get("messages", []):
                    if isinstance(message.get("content"), str):
                        texts.append(message["content"])
                    for call in message.get("tool_calls") or []:
                        function = call.get("function", call)
                        arguments = function.get("arguments")
                        texts.append(function["name"])
                        texts.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def build_chatml_tokenizer(bpe_vocab: int = BPE_VOCAB):
    """A Qwen2-style tokenizer (tokenizers.Tokenizer): NFC, Qwen2 split regex + ByteLevel,
    byte-level BPE trained on data/samples, ByteLevel decoder, then the ChatML special
    tokens and the non-special <tool_call> tokens. JSON fields are set as Qwen2.5's
    tokenizer.json has them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(sample_texts(), trainer)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_NOT_SPECIAL])
    data = json.loads(tokenizer.to_str())
    # As in Qwen2.5's tokenizer.json (values the trainer leaves null).
    data["model"].update({"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False})
    return Tokenizer.from_str(json.dumps(data))


def added_tokens_decoder(tokenizer) -> dict:
    """tokenizer_config.json's "added_tokens_decoder", as transformers writes it."""
    return {
        str(tokenizer.token_to_id(t["content"])): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in json.loads(tokenizer.to_str())["added_tokens"]
    }


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_tokenizer_agrees(directory: pathlib.Path, texts: list[str]) -> None:
    """The tokenizer transformers builds from `directory` (which may rebuild the normalizer,
    pre-tokenizer and post-processor from its own class) must encode and decode like the
    plain tokenizer.json that Rust's `tokenizers` reads."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(directory)
    for text in texts:
        for special in (True, False):
            ours = raw.encode(text, add_special_tokens=special)
            theirs = hf(text, add_special_tokens=special, return_offsets_mapping=True)
            assert ours.ids == theirs["input_ids"], (directory.name, text, special, ours.ids, theirs["input_ids"])
            assert [list(o) for o in ours.offsets] == [list(o) for o in theirs["offset_mapping"]], (directory.name, text)
        ids = raw.encode(text).ids
        assert raw.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), text


PROBE_TEXTS = [
    "Hello world",
    " leading space, two  spaces and a tab\there.",
    "Ünïcödé — 天気 🌧️ naïve café (NFD: cafe\u0301)",
    "<|im_start|>user\nWhich birds nest on Ithen?<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "get_forecast", "arguments": {"island": "Varro", "days": 1}}\n</tool_call>',
    "numbers 1234567 and 3.14159, don't won't I'm we'll\r\n\r\nend",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_forecast",
            "description": "Weather forecast for an island.",
            "parameters": {
                "type": "object",
                "properties": {"island": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["island"],
            },
        },
    }
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--any-version", action="store_true", help="run with unpinned torch/transformers/tokenizers")
    args = parser.parse_args()
    found = versions()
    if found != PINNED and not args.any_version:
        sys.exit(f"pinned {PINNED}, found {found}: install the pinned versions or pass --any-version")

    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    assert hashlib.sha256(QWEN25_CHAT_TEMPLATE.encode()).hexdigest() == QWEN25_CHAT_TEMPLATE_SHA256, "template text changed"

    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.iterdir():
        stale.unlink()

    # Tokenizer.
    tokenizer = build_chatml_tokenizer()
    tokenizer.save(str(OUT / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_NOT_SPECIAL}
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tokens // PAD_TO) * PAD_TO
    write_json(
        OUT / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder(tokenizer),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": QWEN25_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
            "_generated_by": {"script": "data/models/make-tiny-qwen2.py", **found},
        },
    )

    # Model: transformers' own init, seeded, stored in bf16.
    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=1024,
        max_window_layers=2,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=None,
        hidden_act="silu",
        attention_dropout=0.0,
        use_cache=True,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(OUT, max_shard_size="200KB")
    (OUT / "generation_config.json").unlink(missing_ok=True)
    # Qwen2.5-7B-Instruct's generation_config.json, field for field, with our ids.
    write_json(
        OUT / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "repetition_penalty": 1.05,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "transformers_version": found["transformers"],
        },
    )
    for path in OUT.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; a committed fixture is world-readable
    names = sorted(p.name for p in OUT.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ], names

    # Checks with transformers.
    check_tokenizer_agrees(OUT, PROBE_TEXTS)
    hf_tok = AutoTokenizer.from_pretrained(OUT)
    assert hf_tok.bos_token is None and hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
    assert len(hf_tok) == n_tokens, (len(hf_tok), n_tokens)
    reloaded = AutoModelForCausalLM.from_pretrained(OUT)
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name
    messages = [
        {"role": "user", "content": "What's the weather on Varro tomorrow?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_forecast", "arguments": {"island": "Varro", "days": 1}}}]},
        {"role": "tool", "content": '{"forecast": "drizzle"}'},
        {"role": "assistant", "content": "Drizzle."},
    ]
    text = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen") and "<tools>\n{" in text and "<tool_call>\n{" in text, text
    chat_ids = hf_tok.apply_chat_template(messages, tools=TOOLS, return_dict=False)
    assert ids["<tool_call>"] in chat_ids and ids["<|im_end|>"] in chat_ids
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([chat_ids])).logits
    assert logits.shape == (1, len(chat_ids), vocab_size) and torch.isfinite(logits).all()

    sizes = {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}
    print(json.dumps({"tokens": n_tokens, "vocab_size": vocab_size, "special_ids": ids, "params": sum(p.numel() for p in model.parameters()), "bytes": sum(sizes.values()), "files": sizes}, indent=1))


if __name__ == "__main__":
    main()

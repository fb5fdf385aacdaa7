"""One greedy generation by llama.cpp (through llama-cpp-python's C API), timed as
`trainyard generate --stats` times its own; bench/generate.py runs it once per repeat.

    bench/.work/venv-llama-cpp/bin/python bench/generate_llama_cpp.py MODEL.gguf \\
        --prompt-ids 1,124,476 --threads 2 --max-new-tokens 128

Loads the GGUF file (model loading is not timed) with llama.cpp's default model and
context settings but the thread count (`n_threads` and `n_threads_batch`), evaluates the
prompt ids as given in one batch (no tokenizer involved: the caller passes the ids
`trainyard generate --raw` feeds), picks each next token as the argmax of the last
logits with the same special tokens banned as trainyard bans, and feeds it back one
token at a time (`llama_decode` of a one-token batch, the kv cache kept) until
`--max-new-tokens` tokens are generated. An end token does not stop it, so every run
decodes the same number of tokens.

Timing, as trainyard's: `prefill_s` is the prompt's evaluation plus the first token's
choice; `decode_tokens_per_s` is the tokens after the first one over the time from the
first token's choice to the last one's. llama.cpp's own counter for the same steps
(`llama_perf_context`: the time inside `llama_decode` alone) is reported beside it.

`--no-extra-bufts` loads the weights without llama.cpp's extra buffer types (AMX and
repacked layouts, `use_extra_bufts`): a CPU that advertises AMX in a VM or sandbox that
does not let a process use its tiles dies of SIGILL in them otherwise.

Prints one JSON object on standard output.
"""

import argparse
import ctypes
import json
import sys
import time

import numpy as np

import llama_cpp

# trainyard bans every special token except the two that end a generation.
BANNED_IDS = [0, 3, 4, 5, 6, 7]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the model's GGUF file")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--context", type=int, default=0,
                        help="n_ctx (0: the model's own context length)")
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="load without llama.cpp's extra buffer types (AMX, repacking)")
    args = parser.parse_args()
    prompt = [int(token) for token in args.prompt_ids.split(",")]

    # llama.cpp logs to stderr through this callback; kept referenced until the end.
    silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(silence, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()

    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = not args.no_extra_bufts
    model = llama_cpp.llama_model_load_from_file(args.gguf.encode(), model_params)
    if not model:
        sys.exit(f"llama.cpp could not load {args.gguf}")
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = args.context
    context_params.n_threads = args.threads
    context_params.n_threads_batch = args.threads
    context_params.no_perf = False
    ctx = llama_cpp.llama_init_from_model(model, context_params)
    if not ctx:
        sys.exit("llama.cpp could not make a context")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(len(prompt), 0, 1)

    def decode(tokens, position):
        """One llama_decode of `tokens` at `position` on, the last one's logits kept."""
        batch.n_tokens = len(tokens)
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = position + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = index == len(tokens) - 1
        code = llama_cpp.llama_decode(ctx, batch)
        if code != 0:
            sys.exit(f"llama_decode returned {code}")

    def next_token():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        logits[BANNED_IDS] = -np.inf
        return int(logits.argmax())

    llama_cpp.llama_perf_context_reset(ctx)
    start = time.perf_counter()
    decode(prompt, 0)
    tokens = [next_token()]
    first = time.perf_counter()
    prefill_perf = llama_cpp.llama_perf_context(ctx)
    while len(tokens) < args.max_new_tokens:
        decode(tokens[-1:], len(prompt) + len(tokens) - 1)
        tokens.append(next_token())
    end = time.perf_counter()
    perf = llama_cpp.llama_perf_context(ctx)

    steps = len(tokens) - 1
    # llama.cpp counts a batch of several tokens under p_eval and one of one under eval.
    decode_ms = perf.t_eval_ms - prefill_perf.t_eval_ms
    decode_count = perf.n_eval - prefill_perf.n_eval
    print(json.dumps(dict(
        decode_tokens_per_s=steps / (end - first) if steps > 0 else 0.0,
        generated=len(tokens),
        prefill_s=first - start,
        llama_decode_tokens_per_s=(decode_count / (decode_ms / 1e3)
                                   if decode_count > 0 and decode_ms > 0 else None),
        ids=tokens,
        extra_bufts=not args.no_extra_bufts,
        llama_cpp_python=llama_cpp.__version__,
        system_info=llama_cpp.llama_print_system_info().decode().strip(),
    )))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()

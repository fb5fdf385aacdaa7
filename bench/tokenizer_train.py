"""Trains a byte-level BPE tokenizer with Hugging Face `tokenizers` (Python) with the
settings trainyard's `tokenizer` stage uses, and prints the training time as JSON.

    python bench/tokenizer_train.py CORPUS.jsonl OUT.json --vocab-size 8192 --min-frequency 2

`--mode memory` (the default) reads every text into a list first and times only
`train_from_iterator` over that list, the most favourable setting for Python;
`--mode stream` times reading the JSONL inside the training call, as trainyard does.
"""

import argparse
import json
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|end|>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|tool|>", "<|tool_call|>"]


def texts(path):
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)["text"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--mode", choices=["memory", "stream"], default="memory")
    args = parser.parse_args()

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    source = list(texts(args.corpus)) if args.mode == "memory" else texts(args.corpus)
    start = time.perf_counter()
    tokenizer.train_from_iterator(source, trainer=trainer)
    seconds = time.perf_counter() - start
    tokenizer.save(args.out)
    print(json.dumps({"mode": args.mode, "training_seconds": seconds,
                      "vocab_size": tokenizer.get_vocab_size()}))


if __name__ == "__main__":
    main()

"""Deterministic pseudo-natural corpus for the tokenizer benchmark.

Writes `train.jsonl` and `eval.jsonl` (one `{"text": ...}` object per line) of roughly
the requested size: Zipf-distributed invented words built from syllables, sentences with
punctuation, numbers, dates, some accented and non-Latin words, and paragraph breaks.
The same arguments always give byte-identical files.

    python3 bench/tokenizer_corpus.py OUT_DIR --megabytes 80 --seed 1
"""

import argparse
import json
import os
import random


def make_lexicon(rng, size):
    onsets = ["", "b", "br", "c", "ch", "d", "f", "g", "gr", "h", "k", "l", "m", "n",
              "p", "pr", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m"]
    foreign = ["é", "ü", "ø", "ñ", "ç", "à", "ß"]
    words = set()
    lexicon = []
    while len(lexicon) < size:
        syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(syllables))
        if rng.random() < 0.03:
            position = rng.randrange(len(word) + 1)
            word = word[:position] + rng.choice(foreign) + word[position:]
        if word and word not in words:
            words.add(word)
            lexicon.append(word)
    # A few scripts beyond Latin, so the byte-level alphabet is exercised.
    lexicon += ["東京", "データ", "модель", "обучение", "λόγος", "مرحبا", "नमस्ते", "🙂", "🚀"]
    return lexicon


def zipf_weights(count, exponent=1.1):
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


def sentence(rng, lexicon, cumulative):
    length = rng.randint(4, 22)
    words = rng.choices(lexicon, cum_weights=cumulative, k=length)
    parts = []
    for index, word in enumerate(words):
        roll = rng.random()
        if roll < 0.03:
            word = str(rng.randint(0, 10_000))
        elif roll < 0.04:
            word = f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        elif roll < 0.05:
            word = word + "'s"
        if index == 0:
            word = word[:1].upper() + word[1:]
        parts.append(word)
        if index < length - 1 and rng.random() < 0.08:
            parts[-1] += rng.choice([",", ",", ";", ":", " -"])
    text = " ".join(parts)
    return text + rng.choice([".", ".", ".", "?", "!"])


def document(rng, lexicon, cumulative):
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        paragraphs.append(" ".join(sentence(rng, lexicon, cumulative)
                                   for _ in range(rng.randint(2, 8))))
    return "\n\n".join(paragraphs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--megabytes", type=float, default=80.0)
    parser.add_argument("--eval-megabytes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lexicon = make_lexicon(rng, 30_000)
    weights = zipf_weights(len(lexicon))
    cumulative = []
    total = 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    os.makedirs(args.out, exist_ok=True)
    for name, megabytes in (("train.jsonl", args.megabytes), ("eval.jsonl", args.eval_megabytes)):
        target = int(megabytes * 1_000_000)
        written = 0
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as out:
            while written < target:
                line = json.dumps({"text": document(rng, lexicon, cumulative)},
                                  ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Ingest memory benchmark: peak memory of `trainyard run` over an ingest stage on a JSONL
# corpus of N MB and of 10×N MB. Target: flat (ratio ≈ 1), because the stage streams.
# Not a test: it prints figures.
#
#   bash bench/ingest_memory.sh            # N = 50 (50 MB and 500 MB); BENCH_MB=20 for a quick one
#
# Each size runs with dedup on (the default) and off: the de-duplication set is the one
# thing that grows with the corpus, 16 bytes of hash per unique document (about 20 with
# the hash table around it).
# Two figures per run, both peaks over the whole trainyard process:
# - peak RSS (VmHWM, as /usr/bin/time -v reports it). It includes file pages mapped
#   while the engine hashes the input and the output with blake3's mmap, which are page
#   cache rather than memory the process allocated.
# - peak anonymous RSS (RssAnon, sampled from /proc every 20 ms): the heap and stacks,
#   i.e. what the stage itself holds. This is the figure the streaming design keeps flat.
# Everything lives in bench/.work/ (gitignored).
set -euo pipefail

mb="${BENCH_MB:-50}"
bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/ingest_memory"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
say() { printf '>> %s\n' "$*" >&2; }

[[ -x /usr/bin/time ]] || { echo "needs GNU time: apt-get install -y time" >&2; exit 1; }
say "building trainyard (release)"
(cd "$repo" && cargo build --release -j1 --quiet)
trainyard="$CARGO_TARGET_DIR/release/trainyard"

# A JSONL corpus of about $1 MB: unique documents of 200-4000 characters (mean ~2 KB),
# with a few duplicates, so that every filter has work to do.
make_corpus() {
    python3 - "$1" "$2" <<'EOF'
import json, random, sys
target, path = int(sys.argv[1]) * 1_000_000, sys.argv[2]
rng = random.Random(7)
words = ["river", "town", "stone", "market", "bridge", "winter", "harbour", "lantern",
         "orchard", "copper", "meadow", "signal", "thread", "glass", "harvest", "north"]
written, i = 0, 0
with open(path, "w") as out:
    while written < target:
        n = rng.randint(30, 600)
        text = f"Document {i}. " + " ".join(rng.choice(words) for _ in range(n)) + "."
        if i % 50 == 49:
            text = f"Document {i - 1}. duplicate"
        line = json.dumps({"text": text, "url": f"https://example.org/{i}"}) + "\n"
        out.write(line)
        written += len(line)
        i += 1
EOF
}

# Runs the pipeline in $1 and prints "peak_rss_kb peak_anon_kb seconds".
measure() {
    local dir="$1" start end child="" peak_anon=0 anon
    start=$(date +%s.%N)
    pushd "$dir" >/dev/null
    /usr/bin/time -v -o time.txt "$trainyard" run p.yaml >/dev/null 2>stderr.txt &
    local timer=$!
    popd >/dev/null
    while kill -0 "$timer" 2>/dev/null; do
        [[ -n "$child" ]] || child=$(pgrep -P "$timer" || true)
        if [[ -n "$child" ]]; then
            anon=$(awk '/^RssAnon:/ { print $2 }' "/proc/$child/status" 2>/dev/null || true)
            if [[ -n "$anon" && "$anon" -gt "$peak_anon" ]]; then peak_anon=$anon; fi
        fi
        sleep 0.02
    done
    wait "$timer" || { cat "$dir/stderr.txt" >&2; exit 1; }
    end=$(date +%s.%N)
    local peak_rss
    peak_rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$dir/time.txt")
    echo "$peak_rss $peak_anon $(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
}

declare -A rss anon secs docs
for size in "$mb" "$((mb * 10))"; do
    corpus="$work/web-$size.jsonl"
    say "generating a ${size} MB corpus"
    make_corpus "$size" "$corpus"
    for dedup in true false; do
        key="$size/$dedup"
        dir="$work/$size-dedup-$dedup"
        rm -rf "$dir" && mkdir -p "$dir/data"
        ln "$corpus" "$dir/data/web.jsonl"
        printf '%s\n' "name: ingest-memory" "seed: 1" "stages:" "  corpus:" "    kind: ingest" \
            "    inputs: { web: data/web.jsonl }" \
            "    with: { source: { jsonl: { input: web } }, min_chars: 100, eval_ratio: 0.02, dedup: $dedup }" \
            >"$dir/p.yaml"
        say "ingesting ${size} MB (dedup: $dedup)"
        read -r rss[$key] anon[$key] secs[$key] < <(measure "$dir")
        docs[$key]=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['documents_read'])" "$dir/runs/latest/outputs/corpus/stats.json")
    done
    rm -f "$corpus"
done

big=$((mb * 10))
echo
echo "CPU: $(lscpu | awk -F': *' '/Model name/ { print $2; exit }') ($(nproc) cores)"
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
printf '%-8s %6s %11s %14s %19s %9s %9s\n' corpus dedup documents "peak RSS (MB)" "peak anon RSS (MB)" "time (s)" "docs/s"
for dedup in true false; do
    for size in "$mb" "$big"; do
        key="$size/$dedup"
        printf '%-8s %6s %11s %14s %19s %9s %9s\n' "${size}MB" "$dedup" "${docs[$key]}" \
            "$(calc "${rss[$key]} / 1024")" "$(calc "${anon[$key]} / 1024")" \
            "$(calc "${secs[$key]}")" "$(calc "${docs[$key]} / ${secs[$key]}" 0)"
    done
done
for dedup in true false; do
    echo "ratio ${big}/${mb} MB, dedup $dedup: peak RSS $(calc "${rss[$big/$dedup]} / ${rss[$mb/$dedup]}" 2)x," \
        "peak anonymous RSS $(calc "${anon[$big/$dedup]} / ${anon[$mb/$dedup]}" 2)x (target: flat, about 1x)"
done

#!/usr/bin/env bash
# Configuration-scale benchmark: how long `resolve`, `status` and a no-op `run` take on
# pipelines of 1,000 and 10,000 `command` stages, and how fast a 1 MB line of `[`
# (nested a million deep) is rejected. Not a test: it prints figures and PASS/MISS
# against the targets (10,000 stages: each command <= 1 s; the nested file <= 0.1 s).
#
#   bash bench/config_scale.sh        # everything lives in bench/.work/scale/ (gitignored)
#
# The pipelines are a fan-out tree: stage s0 writes a file, every other stage sK reads
# the output of s((K-1)/4) and writes `echo K > out.txt`. The no-op run needs every
# stage in the store once, so the first run of each size really runs its stages
# (10,000 tiny shell commands: about two minutes on 2 cores); it is timed too.
#
# Environment knobs: BENCH_SIZES (default "1000 10000"), BENCH_REPEAT (best of N,
# default 3), BENCH_JOBS (--jobs of the first run, default 2).
set -euo pipefail

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/scale"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
sizes="${BENCH_SIZES:-1000 10000}"
repeat="${BENCH_REPEAT:-3}"
jobs="${BENCH_JOBS:-2}"
mkdir -p "$work"

say() { printf '>> %s\n' "$*" >&2; }

say "building trainyard (release)"
(cd "$repo" && cargo build --release --quiet)
trainyard="$CARGO_TARGET_DIR/release/trainyard"
[[ -x "$trainyard" ]] || { echo "no binary at $trainyard" >&2; exit 1; }

# "WALL CPU" seconds (3 decimals) of the fastest of $repeat runs of "$@" (CPU = user +
# system, which other work on the machine does not inflate), output discarded; the
# command must succeed unless EXPECT_FAIL=1.
best_of() {
    local best="" cpu="" status timing real user sys
    for _ in $(seq "$repeat"); do
        set +e
        timing=$( { TIMEFORMAT='%R %U %S'; time "$@" >/dev/null 2>"$work/last.stderr"; } 2>&1 )
        status=$?
        set -e
        if [[ "${EXPECT_FAIL:-0}" == 1 ]]; then
            [[ $status -ne 0 ]] || { echo "expected failure: $*" >&2; exit 1; }
        elif [[ $status -ne 0 ]]; then
            echo "failed ($status): $*" >&2
            cat "$work/last.stderr" >&2
            exit 1
        fi
        read -r real user sys <<<"$timing"
        if [[ -z "$best" ]] || (( $(echo "$real < $best" | bc -l) )); then
            best=$real
            cpu=$(echo "$user + $sys" | bc -l)
        fi
    done
    printf '%.3f %.3f' "$best" "$cpu"
}

once() {
    local timing
    timing=$( { TIMEFORMAT='%R'; time "$@" >/dev/null 2>"$work/last.stderr"; } 2>&1 ) \
        || { cat "$work/last.stderr" >&2; exit 1; }
    printf '%.3f' "$timing"
}

verdict() { # value target
    if (( $(echo "$1 <= $2" | bc -l) )); then echo PASS; else echo MISS; fi
}

generate() { # stages file
    awk -v n="$1" 'BEGIN {
        print "name: scale-" n
        print "seed: 1"
        print "stages:"
        for (i = 0; i < n; i++) {
            print "  s" i ":"
            print "    kind: command"
            if (i > 0) print "    inputs: { up: s" int((i - 1) / 4) " }"
            print "    with:"
            print "      cmd: \"echo " i " > out.txt\""
            print "      outputs: [out.txt]"
        }
    }' > "$2"
}

rows=()
row() { # what, "wall cpu" or wall, target (seconds, optional)
    local wall cpu result="" target=""
    read -r wall cpu <<<"$2"
    if [[ -n "${3:-}" ]]; then
        target="<= $3 s"
        result=$(verdict "$wall" "$3")
    fi
    rows+=("$1|$wall s|${cpu:+$cpu s}|$target|$result")
}
for n in $sizes; do
    dir="$work/$n"
    rm -rf "$dir"
    mkdir -p "$dir"
    generate "$n" "$dir/pipeline.yaml"
    say "$n stages: $(wc -c < "$dir/pipeline.yaml") bytes"
    resolve=$(best_of "$trainyard" --workspace "$dir" resolve "$dir/pipeline.yaml")
    dry=$(best_of "$trainyard" --workspace "$dir" run --dry-run "$dir/pipeline.yaml")
    say "$n stages: first run (--jobs $jobs), really running every stage"
    first=$(once "$trainyard" --workspace "$dir" run --jobs "$jobs" "$dir/pipeline.yaml")
    status=$(best_of "$trainyard" --workspace "$dir" status "$dir/pipeline.yaml")
    noop=$(best_of "$trainyard" --workspace "$dir" run "$dir/pipeline.yaml")
    grep -q "0 executed, $n cached" "$work/last.stderr" \
        || { echo "the no-op run was not a no-op:" >&2; tail -3 "$work/last.stderr" >&2; exit 1; }
    target=""
    [[ "$n" == 10000 ]] && target=1
    row "$n stages: resolve" "$resolve" "$target"
    row "$n stages: status" "$status" "$target"
    row "$n stages: no-op run" "$noop" "$target"
    row "$n stages: run --dry-run (empty store)" "$dry"
    row "$n stages: first run (--jobs $jobs)" "$first"
done

# 1 MB of `[` on one line after a valid start: the depth must be refused before the
# parser (whose cost grows with depth) ever sees it.
nested="$work/nested.yaml"
{ printf 'name: deep\nstages:\n  a: '; head -c 1048576 /dev/zero | tr '\0' '['; printf '\n'; } > "$nested"
reject=$(EXPECT_FAIL=1 best_of "$trainyard" --workspace "$work" resolve "$nested")
message=$(head -2 "$work/last.stderr" | sed 's/^error: //' | tr '\n' ' ')
row "1 MB nested file rejected" "$reject" 0.1

echo
echo "trainyard $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown), release build"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1) ($(nproc) cores; load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
echo
printf '| %-42s | %-9s | %-9s | %-8s | %-6s |\n' "measure (best of $repeat)" "wall" "CPU" "target" "result"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..44})" "-----------" "-----------" "----------" "--------"
for line in "${rows[@]}"; do
    IFS='|' read -r what wall cpu target result <<<"$line"
    printf '| %-42s | %-9s | %-9s | %-8s | %-6s |\n' "$what" "$wall" "$cpu" "$target" "$result"
done
echo
echo "The targets are on wall time; CPU (user + system) is what the machine's other work"
echo "does not inflate."
echo
echo "the nested file's error: $message"

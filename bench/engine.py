#!/usr/bin/env python3
"""Engine benchmark driver (run through bench/engine.sh, which builds and installs DVC).

Layout under --work (bench/.work/, gitignored):
  data/        1 GB of external input: in01.bin..in07.bin (100 MB each) and
               in08/ in09/ in10/ (100 files x 1 MB each); deterministic content
  ty/          trainyard workspace: pipeline.yaml, .trainyard/, runs/
  dvc/         DVC workspace (git repo): dvc.yaml, dvc.lock, out/, .dvc/
  dvc-site/    DVC's site cache dir (its stat/hash state database)
  results.json the figures of the last run

Both tools see the same 10-stage chain: stage sNN depends on one external input (a file or
a directory, read through the same ../data/ path) and on the small output of s(NN-1), and
writes a one-line-per-stage text file. The commands only stat their input, so the time goes
into hashing the inputs (first run) and into the engines' own overhead (no-op run).

Timing uses time.perf_counter around subprocess.run (process spawn included), no hyperfine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MB = 1_000_000
BIG_FILES = 7  # in01.bin .. in07.bin
BIG_SIZE = 100 * MB
DIRS = 3  # in08/ .. in10/
DIR_FILES = 100
DIR_FILE_SIZE = 1 * MB
STAGES = BIG_FILES + DIRS
TOTAL_BYTES = BIG_FILES * BIG_SIZE + DIRS * DIR_FILES * DIR_FILE_SIZE  # 1e9

TARGET_GBPS = 1.0
TARGET_NOOP_MS = 50.0
TARGET_RATIO = 20.0


def say(message: str) -> None:
    print(f">> {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Data


def inputs() -> list[tuple[str, bool]]:
    """(name, is_dir) of the input of each stage, in stage order."""
    names = [(f"in{i:02d}.bin", False) for i in range(1, BIG_FILES + 1)]
    names += [(f"in{i:02d}", True) for i in range(BIG_FILES + 1, STAGES + 1)]
    return names


class Stream:
    """Deterministic pseudo-random bytes: AES-128-CTR of zeros through the openssl CLI
    (fast), or SHAKE-128 blocks when openssl is missing (slower, different bytes)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.counter = 0
        self.process = None
        if shutil.which("openssl"):
            with open("/dev/zero", "rb") as zeros:
                self.process = subprocess.Popen(
                    ["openssl", "enc", "-aes-128-ctr", "-nosalt",
                     "-K", "7472616e6e7961726462656e63680000", "-iv", f"{seed:032x}"],
                    stdin=zeros, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )

    @property
    def generator(self) -> str:
        return "openssl-aes-128-ctr" if self.process else "shake128"

    def read(self, size: int) -> bytes:
        if self.process:
            data = self.process.stdout.read(size)
            if len(data) != size:
                raise RuntimeError("openssl stream ended early")
            return data
        self.counter += 1
        return hashlib.shake_128(f"trainyard-bench-{self.seed}-{self.counter}".encode()).digest(size)

    def close(self) -> None:
        if self.process:
            self.process.stdout.close()
            self.process.kill()
            self.process.wait()


def write_stream(stream: Stream, path: Path, size: int) -> None:
    chunk = 8 * MB
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(chunk, left)
            out.write(stream.read(n))
            left -= n


def ensure_data(data: Path) -> str:
    generator = "openssl-aes-128-ctr" if shutil.which("openssl") else "shake128"
    spec = {
        "generator": generator,
        "big_files": [BIG_FILES, BIG_SIZE],
        "dirs": [DIRS, DIR_FILES, DIR_FILE_SIZE],
    }
    marker = data / ".spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec and data_size(data) == TOTAL_BYTES:
        say(f"reusing {TOTAL_BYTES / 1e9:.1f} GB of input data in {data}")
        return generator
    say(f"generating {TOTAL_BYTES / 1e9:.1f} GB of input data in {data} ({generator})")
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    started = time.perf_counter()
    for index, (name, is_dir) in enumerate(inputs(), start=1):
        stream = Stream(index)
        try:
            if is_dir:
                (data / name).mkdir()
                for part in range(DIR_FILES):
                    write_stream(stream, data / name / f"part-{part:04d}.bin", DIR_FILE_SIZE)
            else:
                write_stream(stream, data / name, BIG_SIZE)
        finally:
            stream.close()
    marker.write_text(json.dumps(spec))
    say(f"  generated in {time.perf_counter() - started:.1f} s")
    return generator


def data_files(data: Path) -> list[Path]:
    files = []
    for name, is_dir in inputs():
        path = data / name
        if is_dir:
            files += sorted(p for p in path.iterdir()) if path.is_dir() else []
        elif path.exists():
            files.append(path)
    return files


def data_size(data: Path) -> int:
    return sum(path.stat().st_size for path in data_files(data))


def warm_page_cache(data: Path) -> None:
    """Reads every input once so that both tools hash from the page cache."""
    buffer = bytearray(8 * MB)
    for path in data_files(data):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


# ---------------------------------------------------------------------------------------
# Pipelines


def stage_cmd(number: int, prev: str | None, data: str, out: str) -> str:
    head = f'cat "{prev}"; ' if prev else ""
    return f'{{ {head}echo "s{number:02d} $(du -sbL "{data}" | cut -f1)"; }} > {out}'


def q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text)


def trainyard_pipeline() -> str:
    lines = ["# Generated by bench/engine.py: 10 command stages over 1 GB of external input.",
             "name: engine-bench", "seed: 1", "stages:"]
    for number, (name, _) in enumerate(inputs(), start=1):
        stage_inputs = [f"data: {q('../data/' + name)}"]
        if number > 1:
            stage_inputs.append(f"prev: {q(f's{number - 1:02d}/out.txt')}")
        cmd = stage_cmd(number, "$TY_IN_PREV" if number > 1 else None, "$TY_IN_DATA", "out.txt")
        lines += [
            f"  s{number:02d}:",
            "    kind: command",
            f"    inputs: {{ {', '.join(stage_inputs)} }}",
            "    with:",
            f"      cmd: {q(cmd)}",
            "      outputs: [out.txt]",
        ]
    return "\n".join(lines) + "\n"


def dvc_pipeline() -> str:
    lines = ["# Generated by bench/engine.py: the same chain as ../ty/pipeline.yaml.", "stages:"]
    for number, (name, _) in enumerate(inputs(), start=1):
        deps = [f"../data/{name}"]
        prev = f"out/s{number - 1:02d}.txt" if number > 1 else None
        if prev:
            deps.append(prev)
        cmd = stage_cmd(number, prev, f"../data/{name}", f"out/s{number:02d}.txt")
        lines += [
            f"  s{number:02d}:",
            f"    cmd: {q(cmd)}",
            f"    deps: [{', '.join(q(dep) for dep in deps)}]",
            f"    outs: [{q(f'out/s{number:02d}.txt')}]",
        ]
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------------------------------
# Running and timing


class Tool:
    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.cwd = cwd
        self.env = env

    def run(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        process = subprocess.run(self.argv + list(args), cwd=self.cwd, env=self.env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(
                f"`{' '.join(self.argv + list(args))}` (in {self.cwd}) exited with {process.returncode}\n"
                f"--- stdout\n{process.stdout}--- stderr\n{process.stderr}"
            )
        return elapsed, process


def expect(condition: bool, what: str, process: subprocess.CompletedProcess) -> None:
    if not condition:
        raise SystemExit(f"unexpected result: {what}\n--- stdout\n{process.stdout}--- stderr\n{process.stderr}")


def repeat(tool: Tool, args: list[str], runs: int, warmup: int, check) -> list[float]:
    times = []
    for index in range(warmup + runs):
        elapsed, process = tool.run(*args)
        check(process)
        if index >= warmup:
            times.append(elapsed)
    return times


class BackgroundLoad:
    """CPU time used by *other* processes while a phase ran, as a fraction of all cores:
    busy time from /proc/stat minus this process's and its children's CPU time."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = os.cpu_count() or 1
        self.start = self.sample()

    def sample(self) -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        if len(fields) > 8:
            busy -= sum(fields[8:10])  # guest time is already counted in user
        own = os.times()
        ours = own.user + own.system + own.children_user + own.children_system
        return time.monotonic(), busy / self.tick, ours

    def fraction(self) -> float | None:
        end = self.sample()
        if not self.start or not end:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / (wall * self.cores)) if wall > 0 else None


def cpu_model() -> str:
    """`model name` from /proc/cpuinfo, with family/model and the SIMD level blake3 uses."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not line.strip():
                break  # the first processor is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    simd = [flag for flag in ("avx512f", "avx2", "sse4_1") if flag in flags][:1]
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details += simd
    model = fields.get("model name", platform.processor() or "unknown")
    return f"{model} ({', '.join(details)})" if details else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainyard", required=True, type=Path)
    parser.add_argument("--dvc", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--noop-runs", type=int, default=20)
    parser.add_argument("--dvc-runs", type=int, default=5)
    parser.add_argument("--cold-runs", type=int, default=3, help="cold-stat-cache status repetitions")
    args = parser.parse_args()

    work = args.work.resolve()
    args.trainyard, args.dvc = args.trainyard.resolve(), args.dvc.resolve()
    data, ty_dir, dvc_dir, dvc_site = work / "data", work / "ty", work / "dvc", work / "dvc-site"
    generator = ensure_data(data)

    # --- workspaces
    ty_dir.mkdir(exist_ok=True)
    write_if_changed(ty_dir / "pipeline.yaml", trainyard_pipeline())
    # DVC as a user runs it: no analytics ping, and Python may cache bytecode.
    dvc_env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc_env.pop("PYTHONDONTWRITEBYTECODE", None)
    dvc = Tool([str(args.dvc)], dvc_dir, dvc_env)
    dvc_dir.mkdir(exist_ok=True)
    if not (dvc_dir / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=dvc_dir, check=True)
    if not (dvc_dir / ".dvc").exists():
        say("dvc init")
        dvc.run("init", "-q")
    # Local, hermetic settings: no network calls, state database inside bench/.work.
    dvc.run("config", "core.analytics", "false")
    dvc.run("config", "core.check_update", "false")
    dvc.run("config", "core.site_cache_dir", str(dvc_site))
    write_if_changed(dvc_dir / "dvc.yaml", dvc_pipeline())
    (dvc_dir / "out").mkdir(exist_ok=True)
    trainyard = Tool([str(args.trainyard)], ty_dir)

    _, version = trainyard.run("--version")
    ty_version = version.stdout.strip()
    _, version = dvc.run("--version")
    dvc_version = version.stdout.strip()

    cores = os.cpu_count() or 0
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load_before = os.getloadavg()
    print(f"cpu       {cpu_model()}, {cores} cores ({affinity} usable)")
    print(f"system    {platform.system()} {platform.release()}, python {platform.python_version()}, "
          f"load avg {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(f"tools     {ty_version}; dvc {dvc_version}")
    print(f"data      {TOTAL_BYTES / 1e9:.3f} GB: {BIG_FILES} files x {BIG_SIZE // MB} MB + "
          f"{DIRS} dirs x {DIR_FILES} files x {DIR_FILE_SIZE // MB} MB ({generator}), in page cache")
    sys.stdout.flush()

    say("warming the page cache")
    warm_page_cache(data)

    # --- first runs and hashing throughput (trainyard, then DVC)
    hashing_load = BackgroundLoad()
    say("trainyard: first run (empty store)")
    shutil.rmtree(ty_dir / ".trainyard", ignore_errors=True)
    shutil.rmtree(ty_dir / "runs", ignore_errors=True)
    ty_first, process = trainyard.run("run", "pipeline.yaml")
    expect(f"{STAGES} executed, 0 cached" in process.stderr, f"{STAGES} stages executed", process)

    say(f"trainyard: status with a cold stat cache x{args.cold_runs}")
    cold = []
    for _ in range(args.cold_runs):
        (ty_dir / ".trainyard" / "stat-cache.json").unlink(missing_ok=True)
        elapsed, process = trainyard.run("status", "pipeline.yaml")
        cached = sum(1 for line in process.stdout.splitlines() if line.split()[:1] == ["cached"])
        expect(cached == STAGES, f"status shows {STAGES} cached stages", process)
        cold.append(elapsed)
    ty_cold = statistics.median(cold)
    ty_gbps = TOTAL_BYTES / 1e9 / ty_cold
    warm_status = repeat(trainyard, ["status", "pipeline.yaml"], 5, 1, lambda p: None)

    say("dvc: first repro (no lock, cache or state)")
    (dvc_dir / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(dvc_dir / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(dvc_site, ignore_errors=True)
    for old in (dvc_dir / "out").glob("*.txt"):
        old.unlink()
    dvc_first, process = dvc.run("repro")
    expect(process.stdout.count("Running stage") == STAGES, f"{STAGES} stages ran", process)

    say(f"dvc: status with a cold state database x{args.cold_runs}")
    dvc_cold_times = []
    for _ in range(args.cold_runs):
        shutil.rmtree(dvc_site, ignore_errors=True)
        elapsed, process = dvc.run("status")
        expect("up to date" in process.stdout, "dvc status: up to date", process)
        dvc_cold_times.append(elapsed)
    dvc_cold = statistics.median(dvc_cold_times)
    dvc_gbps = TOTAL_BYTES / 1e9 / dvc_cold
    hashing_background = hashing_load.fraction()

    # --- no-op runs, interleaved so that both tools see the same machine
    noop_load = BackgroundLoad()
    say(f"no-op runs: trainyard x{args.noop_runs}, dvc repro x{args.dvc_runs}, interleaved (after warm-ups)")
    noop_check = lambda p: expect(f"0 executed, {STAGES} cached" in p.stderr, "a no-op run", p)  # noqa: E731
    dvc_check = lambda p: expect("up to date" in p.stdout and "Running stage" not in p.stdout, "a no-op dvc repro", p)  # noqa: E731
    repeat(trainyard, ["run", "pipeline.yaml"], 0, 2, noop_check)
    repeat(dvc, ["repro"], 0, 1, dvc_check)
    ty_noop: list[float] = []
    dvc_noop: list[float] = []
    rounds = max(1, args.dvc_runs)
    for round_index in range(rounds):
        if round_index < args.dvc_runs:
            dvc_noop += repeat(dvc, ["repro"], 1, 0, dvc_check)
        share = args.noop_runs * (round_index + 1) // rounds - len(ty_noop)
        ty_noop += repeat(trainyard, ["run", "pipeline.yaml"], share, 0, noop_check)
    ty_noop_med, ty_noop_min = statistics.median(ty_noop), min(ty_noop)
    dvc_noop_med, dvc_noop_min = statistics.median(dvc_noop), min(dvc_noop)
    noop_background = noop_load.fraction()
    ratio = dvc_noop_med / ty_noop_med
    hash_ok, noop_ok, ratio_ok = ty_gbps >= TARGET_GBPS, ty_noop_med * 1000 <= TARGET_NOOP_MS, ratio >= TARGET_RATIO

    # --- report
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    ms = lambda seconds: f"{seconds * 1000:.1f} ms"  # noqa: E731
    rows = [
        ("(a) hashing, cold stat cache (status)", f"{ty_gbps:.2f} GB/s", f"{dvc_gbps:.2f} GB/s",
         f">= {TARGET_GBPS:g} GB/s", verdict(hash_ok)),
        ("    cold status wall time (median)", ms(ty_cold), ms(dvc_cold), "", ""),
        ("    first run wall time (GB/s overall)", f"{ms(ty_first)} ({TOTAL_BYTES / 1e9 / ty_first:.2f})",
         f"{ms(dvc_first)} ({TOTAL_BYTES / 1e9 / dvc_first:.2f})", "", ""),
        (f"(b) no-op run, median of {len(ty_noop)}", ms(ty_noop_med), "", f"<= {TARGET_NOOP_MS:g} ms",
         verdict(noop_ok)),
        ("    no-op run, min", ms(ty_noop_min), "", "", ""),
        ("    no-op status, median of 5", ms(statistics.median(warm_status)), "", "", ""),
        (f"(c) no-op dvc repro, median of {len(dvc_noop)} (min)", "",
         f"{ms(dvc_noop_med)} ({ms(dvc_noop_min)})", "", ""),
        ("    ratio dvc / trainyard (medians)", f"{ratio:.0f}x", "", f">= {TARGET_RATIO:g}x",
         verdict(ratio_ok)),
    ]
    header = ("metric", "trainyard", "dvc", "target", "result")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(5)]
    print()
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    shown = lambda fraction: "n/a" if fraction is None else f"{fraction * 100:.0f}%"  # noqa: E731
    busy = max(hashing_background or 0, noop_background or 0) > 0.10
    print(f"background CPU load from other processes: {shown(hashing_background)} during the first/cold runs, "
          f"{shown(noop_background)} during the no-op runs (of {cores} cores)"
          + ("  -- busy machine, figures are pessimistic" if busy else ""))

    results = {
        "cpu": cpu_model(), "cores": cores, "usable_cores": affinity,
        "load_avg_before": load_before, "background_load": {"first_and_cold_runs": hashing_background, "noop_runs": noop_background},
        "trainyard_version": ty_version, "dvc_version": dvc_version,
        "data_bytes": TOTAL_BYTES, "data_generator": generator,
        "trainyard": {
            "first_run_s": ty_first, "cold_status_s": cold, "hash_gbps": ty_gbps,
            "noop_run_s": ty_noop, "noop_run_median_s": ty_noop_med, "noop_run_min_s": ty_noop_min,
            "noop_status_s": warm_status,
        },
        "dvc": {
            "first_repro_s": dvc_first, "cold_status_s": dvc_cold_times, "hash_gbps": dvc_gbps,
            "noop_repro_s": dvc_noop, "noop_repro_median_s": dvc_noop_med, "noop_repro_min_s": dvc_noop_min,
        },
        "ratio_dvc_over_trainyard": ratio,
        "pass": {"hash": hash_ok, "noop": noop_ok, "ratio": ratio_ok},
    }
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"figures saved to {work / 'results.json'}")


if __name__ == "__main__":
    main()

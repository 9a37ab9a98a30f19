#!/usr/bin/env python3
"""Side-by-side throughput of brise and llama.cpp (llama-bench) on the same GGUF files.

What is run
    For every (model, thread count, test) and every repetition round, one
    `brise bench` process and one `llama-bench` process are started, each doing
    exactly one test with one measured repetition (`-r 1`) after its own warm-up
    run. The two engines are interleaved: round 0 runs brise first, round 1
    llama.cpp first, and so on, so slow drift of the machine (other work on its
    2 cores, thermal state) hits both engines alike. Each process yields one t/s
    sample; the report gives the median of the samples per engine and the ratio
    brise / llama.cpp of the medians. Ratios are the number to look at: absolute
    t/s on a shared 2-core machine move from minute to minute.

    Tests (defaults, configurable with --pp/--tg):
      pp512  process 512 prompt tokens from an empty KV cache   (-p 512 -n 0)
      tg128  generate 128 tokens one at a time from an empty cache (-p 0 -n 128)

llama-bench settings
    llama-bench -m FILE -t N -p P -n 0 | -p 0 -n G  -r 1 -o json -fa 0
    Everything else is llama-bench's default in the pinned version (llama.cpp as
    vendored by llama-cpp-python 0.3.36): n_batch 2048, n_ubatch 512 (brise bench
    uses ubatch 512 too, so a 512-token prompt is one batch for both), f16 K/V
    cache, mmap, weight repacking on (--repack 1), poll 50, no CPU mask, one
    warm-up run (a full prompt run for pp, one token for tg).

    Flash attention: this llama-bench's default is `-fa auto`, which on the CPU
    backend resolves to *enabled* (its log says "Flash Attention enabled" and the
    graph uses FLASH_ATTN_EXT). brise implements the ordinary (non-flash)
    attention path: softmax(QK^T)V with an explicit score matrix. We pass
    `-fa 0` (off) so that both engines do the same attention work and the ratio
    compares kernels, not attention algorithms. Use --llama-fa auto|on to see
    llama.cpp's default configuration instead (recorded in the JSON header).

Peak RSS
    Every process runs under `/usr/bin/time -v`; its "Maximum resident set size"
    is the peak RSS reported for both engines (brise's own peak_rss_bytes, read
    from VmHWM, is kept in the raw samples too). Without /usr/bin/time
    (`apt-get install time`) the script polls /proc/PID/status VmHWM instead.

Targets
    From the performance issue, as ratio brise / llama.cpp:
      SmolLM2  pp >= 4.0, tg >= 2.0
      Qwen     pp >= 4.0, tg >= 1.4
    With --brise-cpu avx512-vnni (brise restricted to the "no AMX" kernels) the
    pp target is 2.0. Models matching neither name have no target.

Output
    A markdown table on stdout (also saved as bench/out/compare-<stamp>.md) and
    every raw sample with the run's header (machine, date, brise commit,
    llama.cpp build, exact command lines) in bench/out/compare-<stamp>.json.

Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DEFAULT = ROOT / "bench" / "out"

# Names brise knows (see `brise list`) -> file in $BRISE_HOME/models.
KNOWN_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "smollm2:135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder:0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}

# (filename regex, {test kind: minimum ratio brise/llama.cpp})
TARGETS = [
    (re.compile(r"smollm2", re.I), {"pp": 4.0, "tg": 2.0}),
    (re.compile(r"qwen", re.I), {"pp": 4.0, "tg": 1.4}),
]
NO_AMX_PP_TARGET = 2.0


def log(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def brise_home() -> Path:
    h = os.environ.get("BRISE_HOME")
    return Path(h) if h else Path.home() / ".brise"


def resolve_model(arg: str) -> Path:
    p = Path(arg).expanduser()
    if p.is_file():
        return p.resolve()
    models = brise_home() / "models"
    for cand in (KNOWN_MODELS.get(arg.lower()), arg, arg + ".gguf"):
        if cand and (models / cand).is_file():
            return (models / cand).resolve()
    sys.exit(
        f"compare: no model {arg!r}: not a file, and not in {models} "
        f"(known names: {', '.join(sorted(KNOWN_MODELS))}; `brise pull NAME` fetches one)"
    )


def target_for(model_file: str, kind: str, brise_cpu: str | None) -> float | None:
    for rx, t in TARGETS:
        if rx.search(model_file):
            if kind == "pp" and brise_cpu == "avx512-vnni":
                return NO_AMX_PP_TARGET
            return t.get(kind)
    return None


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def machine_info() -> dict:
    info = {"hostname": platform.node(), "kernel": platform.release()}
    try:
        out = sh(["lscpu"])
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (l.partition(":") for l in out.splitlines()) if v
        )
        info["cpu_model"] = fields.get("Model name", "?")
        info["cpus"] = int(fields.get("CPU(s)", os.cpu_count() or 0))
        cps = fields.get("Core(s) per socket")
        sockets = fields.get("Socket(s)")
        if cps and sockets:
            info["cores"] = int(cps) * int(sockets)
        flags = fields.get("Flags", "").split()
        info["isa_flags"] = [f for f in flags if f.startswith(("avx", "amx"))]
    except (OSError, subprocess.CalledProcessError):
        info["cpus"] = os.cpu_count()
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def git_info() -> dict:
    try:
        commit = sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).strip()
        dirty = sh(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


TIME_BIN = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU time so far (all CPUs), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    guest = sum(f[8:10]) if len(f) > 9 else 0  # already counted in user/nice
    return (sum(f) - idle - guest) / CLK_TCK


def children_cpu() -> float:
    """User+system CPU seconds of all waited-for descendants so far (runs are sequential,
    so the difference around one run is that run's own CPU time)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Run:
    """One measured process: stdout, peak RSS, wall time and the CPU others used meanwhile."""

    def __init__(self, stdout: str, peak_rss: int | None, wall: float, own_cpu: float, busy: float):
        self.stdout, self.peak_rss, self.wall = stdout, peak_rss, wall
        # Share of the machine's capacity (NCPU x wall) used by *other* processes
        # while this one ran: the noise indicator of the sample.
        self.own_cpu = own_cpu
        self.others_cpu = max(0.0, busy - own_cpu) / (wall * NCPU) if wall > 0 else None


def run_measured(cmd: list[str], timeout: float | None) -> Run:
    """Run cmd under /usr/bin/time -v (or with /proc VmHWM polling when that is missing).

    Raises RuntimeError on a non-zero exit and subprocess.TimeoutExpired on timeout (after
    killing the whole process group, so no orphaned benchmark keeps loading the machine)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = [TIME_BIN, "-v", "-o", tf.name, *cmd] if TIME_BIN else cmd
        b0, c0, t0 = busy_cpu_seconds(), children_cpu(), time.monotonic()
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        peak: list[int | None] = [None]

        def poll():  # fallback peak RSS: the benchmark is our direct child here
            while p.poll() is None:
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak[0] = int(line.split()[1]) * 1024
                except OSError:
                    pass
                time.sleep(0.05)

        th = None
        if not TIME_BIN:
            th = threading.Thread(target=poll, daemon=True)
            th.start()
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        finally:
            if th:
                th.join()
        wall, busy = time.monotonic() - t0, busy_cpu_seconds() - b0
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {p.returncode}:\n{err[-3000:]}")
        if TIME_BIN:
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tf.read())
            peak[0] = int(m.group(1)) * 1024 if m else None
        return Run(out, peak[0], wall, children_cpu() - c0, busy)


def parse_json_list(out: str, who: str) -> dict:
    # Both tools print a JSON list; tolerate stray lines before it.
    i = out.find("[")
    if i < 0:
        raise RuntimeError(f"{who}: no JSON in output:\n{out[-2000:]}")
    rows = json.loads(out[i:])
    if len(rows) != 1:
        raise RuntimeError(f"{who}: expected one result row, got {len(rows)}")
    return rows[0]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Interleaved brise vs llama.cpp (llama-bench) throughput comparison.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (head of this file) for what exactly is run.",
    )
    ap.add_argument("--models", default="smollm2,qwen2.5-coder",
                    help="comma-separated .gguf paths or brise model names (default: %(default)s)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=5, help="repetition rounds (default: %(default)s)")
    ap.add_argument("--pp", default="512", help="prompt lengths, comma-separated; 0 = none (default: %(default)s)")
    ap.add_argument("--tg", default="128", help="generation lengths, comma-separated; 0 = none (default: %(default)s)")
    ap.add_argument("--brise-cpu", choices=["scalar", "avx2", "avx512-vnni"],
                    help="pass --cpu to brise bench (avx512-vnni selects the 'no AMX' pp target)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds instead of --reps")
    ap.add_argument("--llama-bench", metavar="PATH", help="use this llama-bench (skip bench/llamacpp.sh)")
    ap.add_argument("--llama-fa", default="0", choices=["0", "1", "auto", "on", "off"],
                    help="llama-bench -fa value (default 0: brise has no flash attention)")
    ap.add_argument("--llama-args", default="", metavar="ARGS",
                    help="extra llama-bench arguments, space-separated (e.g. '--poll 0'); recorded in the JSON")
    ap.add_argument("--brise", metavar="PATH", help="use this brise binary (skip cargo build)")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cargo build; use target/release/brise as it is")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds before one benchmark process is killed and its sample recorded as "
                         "failed; 0 = none (default: %(default)s)")
    ap.add_argument("--out", metavar="DIR", default=str(OUT_DEFAULT), help="output dir (default: bench/out)")
    args = ap.parse_args()

    reps = 2 if args.quick else args.reps
    if reps < 1:
        sys.exit("compare: --reps must be >= 1")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    tests = [("pp", int(n)) for n in args.pp.split(",") if n.strip() and int(n) > 0]
    tests += [("tg", int(n)) for n in args.tg.split(",") if n.strip() and int(n) > 0]
    if not tests or not threads:
        sys.exit("compare: nothing to run (no tests or no thread counts)")
    models = [resolve_model(m.strip()) for m in args.models.split(",") if m.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- engines
    if args.brise:
        brise = Path(args.brise).resolve()
    else:
        brise = ROOT / "target" / "release" / "brise"
        if not args.no_build:
            log("cargo build --release -p brise-cli")
            subprocess.run(["cargo", "build", "--release", "-p", "brise-cli"], cwd=ROOT, check=True,
                           stdout=sys.stderr)
    if not os.access(brise, os.X_OK):
        sys.exit(f"compare: no brise binary at {brise}")
    if args.llama_bench:
        llama = Path(args.llama_bench).resolve()
    else:
        log("bench/llamacpp.sh (builds llama-bench on first use; several minutes)")
        llama = Path(subprocess.run(["bash", str(ROOT / "bench" / "llamacpp.sh")], check=True,
                                    stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    if not os.access(llama, os.X_OK):
        sys.exit(f"compare: no llama-bench at {llama}")

    def cmd_for(engine: str, model: Path, t: int, kind: str, n: int) -> list[str]:
        p, g = (n, 0) if kind == "pp" else (0, n)
        if engine == "brise":
            c = [str(brise), "bench", "-m", str(model), "-t", str(t), "-p", str(p), "-n", str(g),
                 "-r", "1", "-o", "json"]
            if args.brise_cpu:
                c += ["--cpu", args.brise_cpu]
            return c
        return [str(llama), "-m", str(model), "-t", str(t), "-p", str(p), "-n", str(g),
                "-r", "1", "-o", "json", "-fa", args.llama_fa, *args.llama_args.split()]

    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    header = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "brise": {**git_info(), "binary": str(brise), "cpu": args.brise_cpu or "auto"},
        "llama_cpp": {"source": "llama-cpp-python 0.3.36 sdist (vendor/llama.cpp)", "binary": str(llama),
                      "flash_attn": args.llama_fa},
        "reps": reps,
        "threads": threads,
        "tests": [f"{k}{n}" for k, n in tests],
        "models": [str(m) for m in models],
        "command_example": {e: cmd_for(e, models[0], threads[0], *tests[0]) for e in ("brise", "llama.cpp")},
        "peak_rss_source": "/usr/bin/time -v" if TIME_BIN else "/proc/PID/status VmHWM polling",
    }
    json_path = out_dir / f"compare-{stamp}.json"
    md_path = out_dir / f"compare-{stamp}.md"
    samples: list[dict] = []

    def save() -> None:
        json_path.write_text(json.dumps({"header": header, "samples": samples}, indent=1) + "\n")

    total = reps * len(models) * len(threads) * len(tests) * 2
    done = failures = 0
    for rnd in range(reps):
        order = ("brise", "llama.cpp") if rnd % 2 == 0 else ("llama.cpp", "brise")
        for model in models:
            for t in threads:
                for kind, n in tests:
                    for engine in order:
                        cmd = cmd_for(engine, model, t, kind, n)
                        done += 1
                        try:
                            r = run_measured(cmd, args.timeout or None)
                            row = parse_json_list(r.stdout, engine)
                        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                            err = (f"timed out after {args.timeout:.0f} s"
                                   if isinstance(e, subprocess.TimeoutExpired) else str(e))
                            log(f"[{done}/{total}] round {rnd} {engine} {model.name} t={t} {kind}{n}: "
                                f"FAILED: {err.strip().splitlines()[-1] if err.strip() else err}")
                            samples.append({"round": rnd, "engine": engine, "model": model.name,
                                            "threads": t, "test": f"{kind}{n}", "kind": kind,
                                            "n_tokens": n, "ts": None, "ns": None,
                                            "peak_rss_bytes": None, "self_peak_rss_bytes": None,
                                            "others_cpu": None, "error": err, "cmd": cmd})
                            failures += 1
                            save()
                            continue
                        rss, wall = r.peak_rss, r.wall
                        if engine == "llama.cpp" and "build_commit" not in header["llama_cpp"]:
                            header["llama_cpp"]["build_commit"] = row.get("build_commit")
                            header["llama_cpp"]["n_batch"] = row.get("n_batch")
                            header["llama_cpp"]["n_ubatch"] = row.get("n_ubatch")
                        ts = row["samples_ts"][0]
                        samples.append({
                            "round": rnd,
                            "engine": engine,
                            "model": model.name,
                            "threads": t,
                            "test": f"{kind}{n}",
                            "kind": kind,
                            "n_tokens": n,
                            "ts": ts,
                            "ns": row["samples_ns"][0],
                            "peak_rss_bytes": rss,
                            "self_peak_rss_bytes": row.get("peak_rss_bytes"),
                            "cpu_info": row.get("cpu_info"),
                            "wall_s": round(wall, 3),
                            "others_cpu": None if r.others_cpu is None else round(r.others_cpu, 3),
                            "cmd": cmd,
                        })
                        save()
                        log(f"[{done}/{total}] round {rnd} {engine:9s} {model.name} t={t} "
                            f"{kind}{n}: {ts:.2f} t/s, peak RSS {mib(rss)}, {wall:.1f}s wall, "
                            f"others' CPU {pct(r.others_cpu)}")

    # ---- report
    def pick(engine, model, t, test, key):
        return [s[key] for s in samples if s["engine"] == engine and s["model"] == model
                and s["threads"] == t and s["test"] == test and s[key] is not None]

    m = header["machine"]
    g = header["brise"]
    lines = [
        f"# brise vs llama.cpp — {header['date']}",
        "",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cores', m.get('cpus', '?'))} cores"
        f" ({m.get('cpus', '?')} CPUs), {m.get('mem_gib', '?')} GiB",
        f"- brise: {g['commit'][:12]}{' (dirty work tree)' if g['dirty'] else ''}, kernels "
        f"{', '.join(sorted({s.get('cpu_info') or '?' for s in samples if s['engine'] == 'brise'}))}"
        f"{' (--cpu ' + args.brise_cpu + ')' if args.brise_cpu else ''}",
        f"- llama.cpp: {header['llama_cpp'].get('build_commit', '?')} (llama-cpp-python 0.3.36), "
        f"-fa {args.llama_fa}, n_batch {header['llama_cpp'].get('n_batch')}, "
        f"n_ubatch {header['llama_cpp'].get('n_ubatch')}",
        f"- {reps} interleaved rounds; t/s = median of per-process samples; ratio = brise / llama.cpp",
        "",
        "| model | threads | test | brise t/s | llama.cpp t/s | ratio | target | met? |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    rss_lines = [
        "",
        "| model | threads | test | brise peak RSS | llama.cpp peak RSS | others' CPU (brise / llama.cpp) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    summary = []
    worst_noise = 0.0
    for model in models:
        for t in threads:
            for kind, n in tests:
                test = f"{kind}{n}"
                b = med(pick("brise", model.name, t, test, "ts"))
                l = med(pick("llama.cpp", model.name, t, test, "ts"))
                ratio = b / l if b and l else None
                tgt = target_for(model.name, kind, args.brise_cpu)
                met = "—" if tgt is None or ratio is None else ("yes" if ratio >= tgt else "no")
                lines.append(f"| {model.name} | {t} | {test} | {fmt(b)} | {fmt(l)} | {fmt(ratio)} | "
                             f"{'—' if tgt is None else f'≥{tgt:.1f}'} | {met} |")
                rb = pick("brise", model.name, t, test, "peak_rss_bytes")
                rl = pick("llama.cpp", model.name, t, test, "peak_rss_bytes")
                ob = med(pick("brise", model.name, t, test, "others_cpu"))
                ol = med(pick("llama.cpp", model.name, t, test, "others_cpu"))
                noisy = max(x for x in (ob, ol, 0.0) if x is not None)
                worst_noise = max(worst_noise, noisy)
                rss_lines.append(f"| {model.name} | {t} | {test} | {mib(max(rb) if rb else None)} | "
                                 f"{mib(max(rl) if rl else None)} | {pct(ob)} / {pct(ol)} |")
                summary.append({"model": model.name, "threads": t, "test": test, "brise_ts": b,
                                "llama_ts": l, "ratio": ratio, "target": tgt, "met": met,
                                "brise_peak_rss": max(rb) if rb else None,
                                "llama_peak_rss": max(rl) if rl else None,
                                "brise_others_cpu": ob, "llama_others_cpu": ol})
    notes = ["", "Peak RSS: max over the rounds. Others' CPU: median share of the machine's "
             f"{NCPU} CPUs used by other processes while a sample ran (0% = quiet machine)."]
    if failures:
        notes.append(f"**{failures} of {total} runs failed or timed out (see \"error\" in the JSON); "
                     "medians use the remaining samples.**")
    if worst_noise > 0.10:
        notes.append(f"**Warning: other processes used up to {pct(worst_noise)} of the machine during "
                     "these runs. Both engines' threads meet at a barrier after every op, so at threads = "
                     "cores a stolen core can stall a run by a scheduler time slice per op: single "
                     "samples (either engine) can collapse by 10x, and ratios are distorted. Rerun on a "
                     "quiet machine before drawing conclusions.**")
    report = "\n".join(lines + rss_lines + notes) + f"\n\nraw samples: {json_path}\n"
    header["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header["summary"] = summary
    save()
    md_path.write_text(report)
    print(report)
    return 1 if failures == total else 0


if __name__ == "__main__":
    sys.exit(main())

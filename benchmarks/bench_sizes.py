"""Generation cost by adapter size: `oral bench generate --json` per size, each in a fresh process, then
the time and peak memory fitted as linear functions of the adapter's parameter count.

    OMP_NUM_THREADS=1 python benchmarks/bench_sizes.py --out bench-sizes.jsonl [--rows 1,2,4] [--threads 1]

Each row records the command, the thread count and the machine's load average before and after (the
machine is shared: compare rows of like load, and prefer cpu_s, the process's CPU time, under load).
Prints a markdown table and the fits (time_s = a + b * params at fixed steps; peak_extra_mb = a + b * MiB
of the fp32 adapter). Rows already in --out (same command and threads) are not run again.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (spec, targets, rank, steps, extra flags). Row 3 is the goal: 42M parameters in 60 s on 2 cores.
ROWS = [
    ("smollm2-135m", "q_proj,v_proj", 4, 60, []),
    ("mistral-7b", "q_proj,v_proj", 4, 60, []),
    ("mistral-7b", "all-linear", 16, 60, []),
    ("mistral-7b", "q_proj,v_proj", 4, 10, []),
    ("mistral-7b", "all-linear", 16, 10, []),
    ("mistral-7b", "all-linear", 16, 10, ["--bf16"]),
    ("mistral-7b", "all-linear", 16, 10, ["--preset", "smol", "--bf16"]),
    ("mistral-7b", "q_proj,v_proj", 4, 10, ["--preset", "smol", "--bf16"]),
    ("llama-3.1-8b", "all-linear", 128, 1, []),
    ("mistral-7b", "q_proj,v_proj", 4, 1, []),
    ("mistral-7b", "all-linear", 16, 1, []),
]


def command(row) -> list[str]:
    spec, targets, rank, steps, extra = row
    return ["oral", "bench", "generate", "--spec", spec, "--targets", targets, "--rank", str(rank),
            "--steps", str(steps), *extra, "--json"]


def run_row(row, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    t0 = time.time()
    out = subprocess.run(command(row), env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(command(row))} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {**r, "command": f"OMP_NUM_THREADS={threads} " + " ".join(command(row)), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "process_s": round(time.time() - t0, 1)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a, b of y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def table(rows: list[dict]) -> str:
    lines = ["| size | params | preset | tokens x D | steps | wall s | cpu s | cpu us/param | peak extra MiB | adapter MiB | load | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flags = " bf16" if r.get("autocast") else ""
        lines.append(
            f"| {r['spec']} r={r['rank']} {r['targets'] if isinstance(r['targets'], str) else ','.join(r['targets'])} "
            f"| {r['params'] / 1e6:.2f}M | {r['preset']}{flags} | {r['tokens']:,} x {r['token_size']} | {r['steps']} "
            f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s'] / r['params'] * 1e6:.2f} | {r['peak_extra_mb']:.0f} "
            f"| {r['adapter_mb']:.1f} | {r['load_before']:.1f} | `{r['command']}` |")
    return "\n".join(lines)


def fits(rows: list[dict]) -> list[str]:
    """Per (preset, steps, autocast, threads) group with >= 2 sizes: time and memory against size."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["steps"], r.get("autocast"), r["threads"]), []).append(r)
    out = []
    for (preset, steps, autocast, threads), g in sorted(groups.items(), key=str):
        if len({r["params"] for r in g}) < 2:
            continue
        a, b = fit([r["params"] for r in g], [r["cpu_s"] for r in g])
        ma, mb = fit([r["adapter_mb"] for r in g], [r["peak_extra_mb"] for r in g])
        per = [r["cpu_s"] / r["params"] * 1e6 for r in sorted(g, key=lambda r: r["params"])]
        out.append(f"{preset}{' bf16' if autocast else ''}, {steps} steps, {threads} thread(s), {len(g)} sizes: "
                   f"cpu_s = {a:.2f} + {b * 1e6:.3f} us x params; peak extra MiB = {ma:.0f} + {mb:.2f} x adapter MiB; "
                   f"us/param from smallest to largest: {', '.join(f'{p:.2f}' for p in per)}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-sizes.jsonl", help="JSON lines, one per row run")
    p.add_argument("--rows", help="comma-separated 1-based row numbers of ROWS (default: all)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for i in [int(x) for x in args.rows.split(",")] if args.rows else range(1, len(ROWS) + 1):
        cmd = f"OMP_NUM_THREADS={args.threads} " + " ".join(command(ROWS[i - 1]))
        if any(r["command"] == cmd for r in done):
            continue
        r = run_row(ROWS[i - 1], args.threads)
        print(json.dumps(r), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        done.append(r)
    print(table(done))
    print("\n".join(fits(done)))


if __name__ == "__main__":
    main()

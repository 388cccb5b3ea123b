"""The quick start's convergence table: ``main_nni.py --dataset demo`` for each precision and seed, one run
after another, with its wall time, test SRCC/PLCC and validation SRCC by epoch (a benchmark, not a test).

    python tools/quickstart_table.py                          # float32 and bf16, seeds 0 and 1
    python tools/quickstart_table.py --amps none --seeds 0 1  # float32 only

Each run goes to OUT/<precision>-seed<seed>; a finished run (its results.json) is read again, not rerun,
so an interrupted table continues where it stopped. The table is printed and written to OUT/table.md and
OUT/table.json. bf16 on a CPU without bfloat16 instructions is emulated, about 10x slower.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:  # run as `python tools/quickstart_table.py`
    sys.path.insert(0, str(REPO_DIR))

from helpers.runtime import cpu_bf16_instructions, cpu_model, usable_cpus  # noqa: E402
from helpers.safe_io import atomic_save_json, atomic_write  # noqa: E402

GOAL_SRCC = 0.70  # every run's test SRCC at least this ...
GOAL_SPREAD = 0.03  # ... and the highest and lowest within this


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amps", nargs="+", choices=("none", "bf16", "auto"), default=["none", "bf16"],
                   help="precisions (main_nni.py --amp)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (main_nni.py --seed)")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart_table"), help="folder of the runs and the table")
    p.add_argument("--python", default=sys.executable, help="the Python that runs main_nni.py")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main_nni.py options for every run")
    return p


def run_one(args: argparse.Namespace, amp: str, seed: int) -> dict:
    """One quick start (or its earlier results): the figures of a table row."""
    folder = args.out / f"{amp}-seed{seed}"
    timing = folder / "quickstart_wall.json"
    if not (folder / "results.json").is_file() or not timing.is_file():
        extra = [a for a in args.extra if a != "--"]
        command = [args.python, str(REPO_DIR / "main_nni.py"), "--dataset", "demo", "--amp", amp, "--seed", str(seed),
                   "--experiment_dir_name", str(folder), "--no_report", "--quiet", *extra]
        if folder.exists():
            command.append("--resume")  # a run stopped part way continues (its wall time then counts from here)
        print(f"running: {' '.join(command)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO_DIR, check=True)
        atomic_save_json({"wall_s": time.perf_counter() - start, "resumed": "--resume" in command}, timing)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    wall = json.loads(timing.read_text(encoding="utf-8"))
    history = results.get("history") or []
    return {"precision": results.get("precision", amp), "seed": seed, "test_srcc": results["srcc"],
            "test_plcc": results["plcc"], "val_srcc_by_epoch": [h.get("val_srcc") for h in history],
            "minutes": wall["wall_s"] / 60, "resumed": wall["resumed"], "folder": str(folder)}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, with the spread and the goal."""
    lines = [f"Quick start (`python main_nni.py --dataset demo`) on a {usable_cpus()}-core {cpu_model()} "
             f"({'with' if cpu_bf16_instructions() else 'without'} bfloat16 instructions)", "",
             "| precision | seed | test SRCC | test PLCC | val SRCC by epoch | minutes |", "|---|---|---|---|---|---|"]
    for r in rows:
        epochs = ", ".join("-" if s is None else f"{s:.3f}" for s in r["val_srcc_by_epoch"])
        lines.append(f"| {r['precision']} | {r['seed']} | {r['test_srcc']:.4f} | {r['test_plcc']:.4f} | {epochs} | "
                     f"{r['minutes']:.1f}{' (resumed)' if r['resumed'] else ''} |")
    srcc = [r["test_srcc"] for r in rows]
    spread = max(srcc) - min(srcc)
    met = min(srcc) >= GOAL_SRCC and spread <= GOAL_SPREAD
    lines += ["", f"lowest test SRCC {min(srcc):.4f}, highest {max(srcc):.4f}, spread {spread:.4f}: "
              f"{'meets' if met else 'misses'} the goal (every run >= {GOAL_SRCC}, spread <= {GOAL_SPREAD})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for amp in args.amps:
        for seed in args.seeds:
            try:
                rows.append(run_one(args, amp, seed))
            except subprocess.CalledProcessError as e:
                print(f"quickstart_table.py: the run --amp {amp} --seed {seed} failed (exit {e.returncode}); "
                      f"its log is in {args.out / f'{amp}-seed{seed}'}", file=sys.stderr)
                return 1
    text = table(rows)
    with atomic_write(args.out / "table.md", "w") as f:
        f.write(text + "\n")
    atomic_save_json({"rows": rows}, args.out / "table.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's ablation (Table 5): APNet alone, APNet + TUNet, APNet + RGBNet and the full TANet, each
trained and tested by ``main_nni.py`` with the same data and recipe over several seeds, then the table
in the paper's layout (SRCC, PLCC, MSE or EMD, training images/s; mean ± std over seeds).

Every run is a ``main_nni.py`` child process in its own folder under the table's folder; a rerun after
an interruption skips the finished runs and resumes the interrupted one (``--resume``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.console import clip, progress
from helpers.runtime import run_tied_child, stopped_by_signal
from helpers.safe_io import atomic_save_json, atomic_write, json_text

REPO = Path(__file__).resolve().parents[1]
# The rows of Table 5: the paper's name of each variant and its branches.
VARIANTS = (("APNet", ("aesthetics",)), ("APNet + TUNet", ("aesthetics", "theme")),
            ("APNet + RGBNet", ("aesthetics", "rgb")), ("TANet", ("aesthetics", "theme", "rgb")))
# The paper's Table 5 on TAD66K (SRCC, PLCC, MSE): quoted, for comparison.
PAPER = {"APNet": (0.440, 0.457, 0.020), "APNet + TUNet": (0.483, 0.513, 0.017),
         "APNet + RGBNet": (0.462, 0.478, 0.019), "TANet": (0.513, 0.531, 0.016)}
# Options the table sets for every run; the rest of main_nni.py's options are the caller's.
OWN_OPTIONS = ("--branches", "--seed", "--experiment_dir_name", "--resume", "--test_only")
OPTIONS_FILE = "options.json"
RUN_OUTPUTS = ("last.pth", "best.pth", "results.json")  # what a run that has trained leaves


class AblationError(ValueError):
    """A table that cannot be made (the message says why)."""


@dataclass(frozen=True)
class Run:
    """One training run of the table: a variant with a seed."""

    name: str
    branches: tuple[str, ...]
    seed: int
    folder: Path

    def command(self, options: Sequence[str]) -> list[str]:
        return [sys.executable, str(REPO / "main_nni.py"), *options, "--branches", ",".join(self.branches),
                "--seed", str(self.seed), "--experiment_dir_name", str(self.folder), "--quiet"]


def plan(out: Path, seeds: Sequence[int]) -> list[Run]:
    """Every (variant, seed) run, the variants in the table's order."""
    return [Run(name, branches, seed, out / f"{'-'.join(branches)}-seed{seed}") for name, branches in VARIANTS
            for seed in seeds]


ReadOptions = Callable[[Sequence[str]], argparse.Namespace]  # main_nni.py's parser: option.parse_trial_options


def check_options(options: Sequence[str], read_options: ReadOptions) -> dict[str, Any]:
    """main_nni.py's options as ``read_options`` (its parser) reads them (the data set's defaults filled in,
    as JSON values); AblationError naming an option it does not take, a bad value, or one the table sets itself."""
    taken = [o for o in options if o.split("=")[0] in OWN_OPTIONS]
    if taken:
        raise AblationError(f"{', '.join(taken)}: the ablation table sets these for each run itself")
    try:
        args = read_options(options)
    except ValueError as exc:
        raise AblationError(f"main_nni.py's options: {exc}") from None
    defaults = read_options([])
    own = [f"--{dest}" for dest in (o.lstrip("-") for o in OWN_OPTIONS)
           if getattr(args, dest) != getattr(defaults, dest)]
    if own:  # given abbreviated
        raise AblationError(f"{', '.join(own)}: the ablation table sets these for each run itself")
    return json.loads(json_text(vars(args), default=str))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Parsed options alike (an option one of them does not know, from another version, is left aside)."""
    return all(a[k] == b[k] for k in set(a) & set(b))


def _started(folder: Path) -> list[str]:
    """The run folders in ``folder`` that hold a checkpoint or results (a run made with its options)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and any((d / n).exists() for n in RUN_OUTPUTS))


def check_same_options(folder: Path, options: Sequence[str], *, read_options: ReadOptions) -> None:
    """Record the runs' options in ``folder/options.json``; refuse a rerun that changes them (its finished
    runs would not compare with the new ones) once a run has trained with them. Options are compared as
    main_nni.py reads them, so another spelling or order is the same."""
    parsed = check_options(options, read_options)
    record = folder / OPTIONS_FILE
    if record.is_file():
        before = json.loads(record.read_text(encoding="utf-8"))
        argv = before.get("argv", []) if isinstance(before, dict) else before  # a list in earlier versions
        try:
            old = before["parsed"] if isinstance(before, dict) else check_options(argv, read_options)
        except (AblationError, KeyError, TypeError):
            old = None
        started = _started(folder)
        if started and (old is None or not _same(old, parsed)):
            raise AblationError(f"{folder} holds runs ({', '.join(started[:3])}{', ...' if len(started) > 3 else ''}) "
                                f"made with the options {shlex.join(argv)!r}, not {shlex.join(options)!r}; run it "
                                f"with the same options, or pick another --out")
        if started:
            return
    atomic_save_json({"argv": list(options), "parsed": parsed}, record)


def finished(run: Run) -> bool:
    return (run.folder / "results.json").is_file()


def _last_line(log: Path, start: int) -> str:
    """The last line a run wrote into ``log`` from byte ``start`` on, without its time stamp."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return clip(re.sub(r"^\d\d:\d\d:\d\d ", "", lines[-1])) if lines else "no output"


def execute(run: Run, options: Sequence[str], log: Path) -> None:
    """Train and test one run (resuming it when an earlier attempt was interrupted), output into ``log``;
    the run ends with this process (``runtime.run_tied_child``)."""
    command = run.command(options)
    if (run.folder / "last.pth").is_file() or (run.folder / "best.pth").is_file():
        command.append("--resume")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        start = f.tell()
        code = run_tied_child(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        again = "; run the same command again to go on" if stopped_by_signal(code) else ""
        raise AblationError(f"the run {run.folder.name} stopped (exit {code}): {_last_line(log, start)} (its output "
                            f"is in {log}, its folder {run.folder}){again}")


def run_seconds(run: Run) -> float:
    """Training and test time of a finished run (its epochs and its test, as results.json records them)."""
    results = json.loads((run.folder / "results.json").read_text())
    return sum(e["seconds"] for e in results.get("history", [])) + results.get("test_seconds", 0.0)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarise(runs: Sequence[Run]) -> dict:
    """The table's numbers from the runs' results.json: per variant, mean and std over seeds."""
    rows = []
    for name, branches in VARIANTS:
        mine = [r for r in runs if r.name == name]
        results = [json.loads((r.folder / "results.json").read_text()) for r in mine]
        error_key = "emd" if results and "emd" in results[0] else "mse"
        speeds = [statistics.fmean(e["train_images_per_s"] for e in res["history"]) for res in results
                  if res.get("history")]
        row = {"variant": name, "branches": list(branches), "seeds": [r.seed for r in mine], "error": error_key}
        for key in ("srcc", "plcc", error_key):
            row[key] = _mean_std([res[key] for res in results])
            row[f"{key}_per_seed"] = [res[key] for res in results]
        row["train_images_per_s"] = _mean_std(speeds)
        row["undefined_seeds"] = [r.seed for r, res in zip(mine, results) if "undefined" in res]
        rows.append(row)
    return {"rows": rows}


def _cell(value: tuple[float, float], digits: int = 3) -> str:
    mean, std = value
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(table: dict) -> str:
    """The table in the paper's layout, with the paper's TAD66K figures beside it (quoted)."""
    error = table["rows"][0]["error"].upper()
    lines = [f"| variant | branches | SRCC | PLCC | {error} | training images/s | paper (TAD66K): SRCC / PLCC / MSE |",
             "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        paper = "{:.3f} / {:.3f} / {:.3f}".format(*PAPER[row["variant"]])
        lines.append(f"| {row['variant']} | {', '.join(row['branches'])} | {_cell(row['srcc'])} | {_cell(row['plcc'])} "
                     f"| {_cell(row[row['error']], 4)} | {_cell(row['train_images_per_s'], 1)} | {paper} |")
    return "\n".join(lines) + "\n"


def run_table(out: str | os.PathLike, seeds: Sequence[int], options: Sequence[str], *, read_options: ReadOptions,
              show_progress: bool = True, on_run: Callable[[Run], None] | None = None) -> dict:
    """Run what is missing of the table in ``out`` (``options``: main_nni.py's data and recipe options, as
    ``read_options`` reads them), then write ``out/table5.md`` and ``out/table5.json``; returns the JSON."""
    if not seeds:
        raise AblationError("give at least one seed")
    check_options(options, read_options)  # before anything is made
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    check_same_options(folder, options, read_options=read_options)
    runs = plan(folder, seeds)
    started = time.monotonic()
    todo = [r for r in runs if not finished(r)]
    with progress(total=len(runs), initial=len(runs) - len(todo), desc="ablation", unit="run",
                  enabled=show_progress) as bar:
        for run in todo:
            execute(run, options, folder / "runs.log")
            bar.update(1)
            if on_run is not None:
                on_run(run)
    table = summarise(runs)
    table.update({"seeds": list(seeds), "options": list(options), "seconds_this_call": time.monotonic() - started,
                  "seconds_of_the_runs": sum(run_seconds(r) for r in runs),
                  "commands": ["python " + shlex.join(r.command(options)[1:]).replace(str(REPO) + os.sep, "")
                               for r in runs]})
    atomic_save_json(table, folder / "table5.json")
    with atomic_write(folder / "table5.md", "w") as f:
        f.write(markdown(table))
    return table

"""Wall time of every pipeline stage of one dataset, from Snakemake's ``benchmark:`` files.

Every rule writes ``results/<dataset>/benchmarks/<stage>.tsv`` (columns ``s``, ``h:m:s``,
``max_rss``, ``max_vms``, ``max_uss``, ``max_pss``, ``io_in``, ``io_out``, ``mean_load``,
``cpu_time``; one row per run of the job). This script gathers them into one table in pipeline
order and writes it as JSON and markdown, with the machine description. Each stage's start and end
come from its file's modification time (written when the job ends) minus its wall time; their span
is the pipeline's own wall time when one Snakemake invocation ran every stage, and the script warns
when a stage's file is older than the run (``--since``), i.e. left from an earlier run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/stage_times.py --dataset all-aria2021
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from machine import describe

from leukofed.errors import DataError, LeukofedError
from leukofed.io import write_json, write_text

HERE = Path(__file__).resolve().parent
# Rule names in the order the pipeline runs them; a stage file is <rule>[_<wildcards>].tsv.
PIPELINE_ORDER = ("acquire", "preprocess", "split", "train_centralized", "partition", "federate", "privacy", "evaluate",
                  "calibrate", "explain", "compare", "audit", "report")
SNAKEMAKE_COLUMNS = ("s", "cpu_time", "max_rss", "mean_load")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="dataset name: reads <results>/<dataset>/benchmarks/*.tsv")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results",
                        help="where stage_times_<dataset>.{json,md} go (default: benchmarks/results)")
    parser.add_argument("--note", default="", help="free text recorded with the table (e.g. what else ran meanwhile)")
    parser.add_argument("--since", type=datetime.fromisoformat,
                        help="when the run started (ISO 8601, e.g. 2026-11-28T09:00, local time unless an offset is given): "
                             "stages that ended before it are listed as stale and left out of the sums")
    return parser.parse_args(argv)


def read_stage(path: Path) -> dict:
    """One stage's benchmark file: its last run (a rerun appends a row)."""
    try:
        table = pd.read_csv(path, sep="\t")
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: unreadable Snakemake benchmark file ({error}); rerun the stage or delete the file") from None
    missing = [column for column in SNAKEMAKE_COLUMNS if column not in table.columns]
    if missing or table.empty:
        problem = f"missing columns {missing}" if missing else "no rows"
        raise DataError(f"{path}: not a Snakemake benchmark file ({problem}); rerun the stage or delete the file")
    row = table.iloc[-1]
    ended = path.stat().st_mtime
    return {
        "stage": path.stem,
        "rule": rule_of(path.stem),
        "started_at": _iso(ended - float(row["s"])),
        "ended_at": _iso(ended),
        "wall_seconds": float(row["s"]),
        "cpu_seconds": float(row["cpu_time"]),
        "max_rss_mb": float(row["max_rss"]),
        "mean_load_percent": float(row["mean_load"]),
        "runs_recorded": len(table),
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def span_seconds(stages: list[dict]) -> float:
    """From the first stage's start to the last stage's end."""
    starts = [datetime.fromisoformat(entry["started_at"]) for entry in stages]
    ends = [datetime.fromisoformat(entry["ended_at"]) for entry in stages]
    return (max(ends) - min(starts)).total_seconds()


def rule_of(stage: str) -> str:
    """The rule a stage file belongs to: the longest known rule name it starts with, else the stem itself."""
    known = [rule for rule in PIPELINE_ORDER if stage == rule or stage.startswith(f"{rule}_")]
    return max(known, key=len) if known else stage


def stage_order(entry: dict) -> tuple[float, str]:
    """Pipeline order; rules this script does not know go just before the report, by name."""
    rule = entry["rule"]
    position = PIPELINE_ORDER.index(rule) if rule in PIPELINE_ORDER else PIPELINE_ORDER.index("report") - 0.5
    return position, entry["stage"]


def collect(bench_dir: Path) -> list[dict]:
    paths = sorted(bench_dir.glob("*.tsv"))
    if not paths:
        raise DataError(f"{bench_dir}: no Snakemake benchmark files (*.tsv); run the pipeline for this dataset first")
    return sorted((read_stage(path) for path in paths), key=stage_order)


def markdown(dataset: str, stages: list[dict], total: dict, machine: dict, note: str, span: float, stale: list[dict]) -> str:
    lines = [
        f"# Pipeline wall time per stage: {dataset}",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, torch {machine['torch']}. "
        "From Snakemake's `benchmark:` files (the last run of each stage). The total is the sum of the stages; "
        "stages that ran in parallel overlap, so the pipeline's own wall time can be shorter.",
        "",
        f"First stage start to last stage end: {span:.0f} s ({clock(span)}).",
        "",
        *([f"Note: {note}", ""] if note else []),
        *([f"Left out (ended before --since, from an earlier run): {', '.join(entry['stage'] for entry in stale)}", ""]
          if stale else []),
        "| Stage | Wall time (s) | Wall time | CPU time (s) | Max RSS (MB) | Mean load (%) |",
        "| :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in [*stages, total]:
        lines.append(
            f"| {entry['stage']} | {entry['wall_seconds']:.1f} | {clock(entry['wall_seconds'])} | {entry['cpu_seconds']:.1f} "
            f"| {format_optional(entry.get('max_rss_mb'), '.0f')} | {format_optional(entry.get('mean_load_percent'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def clock(seconds: float) -> str:
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


def format_optional(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = args.results / args.dataset / "benchmarks"
    try:
        stages = collect(bench_dir)
    except LeukofedError as error:
        print(f"stage_times: error: {error}", file=sys.stderr)
        return 2
    stale = []
    if args.since is not None:
        since = args.since if args.since.tzinfo else args.since.astimezone()
        stale = [entry for entry in stages if datetime.fromisoformat(entry["ended_at"]) < since]
        stages = [entry for entry in stages if entry not in stale]
        if not stages:
            print(f"stage_times: error: every stage in {bench_dir} ended before --since {args.since.isoformat()}", file=sys.stderr)
            return 2
    span = span_seconds(stages)
    total = {"stage": "**total (sum of stages)**", "wall_seconds": sum(entry["wall_seconds"] for entry in stages),
             "cpu_seconds": sum(entry["cpu_seconds"] for entry in stages)}
    machine = describe()
    result = {"benchmark": "stage_times", "dataset": args.dataset, "source": str(bench_dir), "note": args.note, "machine": machine,
              "stages": stages, "stale_stages": stale, "total_wall_seconds": total["wall_seconds"],
              "total_cpu_seconds": total["cpu_seconds"], "span_seconds": span}
    stem = args.out_dir / f"stage_times_{args.dataset}"
    write_json(stem.with_suffix(".json"), result)
    table = markdown(args.dataset, stages, total, machine, args.note, span, stale)
    write_text(stem.with_suffix(".md"), table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The end of a recipe run: `report.md` and `report.json` in the work folder (written by `run_recipe`), and what
`polyfuse run` and `polyfuse demo` print (the accuracy table, the gains and the report's path).

The report says in words what fusion changed and by how much, with its 95% paired bootstrap interval (against
the pivot before fusion, and against SFT when a stage followed it), and why a domain did not improve when its
training data says why; its wall-time table covers the whole run, the toy world's build included (`run.json`,
written by the runner).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from polyfuse.data import PreferenceRow, SampleRow, SFTRow, UnpairedRow, read_rows
from polyfuse.data.io import atomic_write_text, write_json
from polyfuse.data.sharded import process_state
from polyfuse.evaluation import accuracy_table, load_eval_report
from polyfuse.evaluation.report import describe_gains, run_report
from polyfuse.pipeline.context import Context

REPORT = "report.md"


def domain_data(ctx: Context) -> dict[str, dict[str, int]]:
    """Per domain, what the run trained on: SFT rows, preference pairs and unpaired rows (from `pairs`), and how many sampled
    responses there were and how many the verifiers passed (from `score`)."""
    data: dict[str, Counter] = {}

    def add(rows, key: str, counted=lambda row: True) -> None:
        for row in rows:
            data.setdefault(row.domain, Counter())[key] += int(counted(row))

    if "pairs" in ctx.outputs:
        add(read_rows(ctx.output("pairs", "sft"), SFTRow), "SFT rows")
        add(read_rows(ctx.output("pairs", "preference"), PreferenceRow), "pairs")
        if "unpaired" in ctx.outputs["pairs"]:
            unpaired = read_rows(ctx.output("pairs", "unpaired"), UnpairedRow)
            add(unpaired, "unpaired D rows", lambda row: row.label == "D")
            add(unpaired, "unpaired U rows", lambda row: row.label == "U")
    if "score" in ctx.outputs:
        samples = [row for row in read_rows(ctx.output("score", "scored"), SampleRow) if row.correct is not None]
        add(samples, "samples")
        add(samples, "correct samples", lambda row: row.correct)
    return {domain: dict(counts) for domain, counts in sorted(data.items())}


def _timings(run: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for step, timing in run["steps"].items():
        wall = "-" if timing.get("wall_s") is None else f"{timing['wall_s']:.1f} s"
        rows.append((step, f"{wall} (earlier run)" if timing.get("skipped") else wall))
    return [*rows, ("**total, this run**", f"**{run['wall_s']:.1f} s**")]


def _data_lines(per_domain: dict[str, dict[str, int]], pairs: dict[str, Any]) -> list[str]:
    lines = [f"- {domain}: " + ", ".join(f"{key} {n}" for key, n in counts.items()) for domain, counts in per_domain.items()]
    if pairs:
        lines.append("- pair building: " + ", ".join(f"{key} {n}" for key, n in pairs.items()))
    return lines or ["No training data was built from samples."]


def write_run_report(ctx: Context) -> Path | None:
    """Write `report.md` and `report.json` into the work folder when the recipe evaluates (`run_recipe` does, on
    the main process, after `run.json`); returns the report's path, else None."""
    if "eval" not in ctx.outputs:
        return None
    recipe, work_dir = ctx.recipe, ctx.work_dir
    results = load_eval_report(Path(ctx.output("eval", "results")).parent)
    per_domain = domain_data(ctx)
    findings = describe_gains([results], {s.label for s in recipe.sources}, per_domain)
    pairs: dict[str, Any] = json.loads(Path(ctx.output("pairs", "report")).read_text()) if "pairs" in ctx.outputs else {}
    run = json.loads((work_dir / "run.json").read_text())
    title = f"{recipe.name}: {' → '.join(recipe.stages)} (seed {recipe.seed})"
    chart = os.path.relpath(ctx.output("eval", "chart"), work_dir)
    path = work_dir / REPORT
    atomic_write_text(path, run_report(title, findings, results, chart, _data_lines(per_domain, pairs), _timings(run)))
    write_json(work_dir / "report.json", {
        "recipe": recipe.name, "seed": recipe.seed, "wall_s": run["wall_s"], "steps": run["steps"],
        "accuracy": {label: r.summary() for label, r in results.items()}, "pairs": pairs, "domains": per_domain,
        "findings": findings,
    })
    return path


def print_run_summary(ctx: Context, console: Console) -> None:
    """What `polyfuse run` ends with: the accuracy table and the report's path, or the work folder. Printed by
    the main process alone (under `accelerate launch` every process returns from `run_recipe`), from the report
    `run_recipe` wrote."""
    if not process_state().is_main_process:
        return
    if "eval" not in ctx.outputs:
        console.print(f"[green]done[/]: {ctx.work_dir}", soft_wrap=True)
        return
    console.print(accuracy_table(load_eval_report(Path(ctx.output("eval", "results")).parent)))
    findings = json.loads((ctx.work_dir / "report.json").read_text())["findings"]
    for line in findings[: findings.index("")] if "" in findings else findings:  # the gains, with their intervals
        console.print(line.replace("**", ""), soft_wrap=True, highlight=False)
    console.print(f"[green]done[/]: {ctx.work_dir}; report: {ctx.work_dir / REPORT}", soft_wrap=True)  # paths stay whole

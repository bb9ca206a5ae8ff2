"""`polyfuse run RECIPE.yaml`: the stages of a recipe, in order, in one work directory.

Each stage runs in `<work_dir>/<stage>/` and records a manifest (resolved config, input hashes,
package versions). A finished stage whose config and inputs are unchanged is skipped; a stage whose
fingerprint changed starts over in a clean folder; an unfinished one resumes from its finished shards.
Stages only communicate through files, so a killed run, rerun, gives the same result.

Under `accelerate launch` every process runs this loop. The main process alone decides (fingerprint,
skip), deletes and creates stage folders and writes manifests, and tells the others; a stage that spreads
its work over the processes (`Stage.every_process`: sharded inference, data-parallel training) runs on
all of them, any other stage on the main process only while the others wait for its manifest to say done.
They wait on the file, not on a collective barrier, so a long single-process stage (a big model's
evaluation, a merge) cannot run into the process group's timeout; if the main process dies, the launcher
stops the others. At the end the main process writes `run.json` (this run's wall times) and the report,
and every process waits for it: none returns while they are missing or still an earlier run's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from polyfuse.data.hashing import hash_path
from polyfuse.data.io import remove_stale_temporaries, write_json
from polyfuse.data.sharded import process_state
from polyfuse.errors import DataError
from polyfuse.pipeline.checks import check_recipe
from polyfuse.pipeline.context import Context, stage
from polyfuse.pipeline.manifest import Manifest, fingerprint
from polyfuse.pipeline.recipe import Recipe
from polyfuse.pipeline.sources import toy_world
from polyfuse.pipeline.summary import write_run_report
from polyfuse.progress import is_quiet, set_quiet

console = Console(stderr=True)
POLL_S = 0.5  # how often a waiting process looks at the main process's manifest


def _broadcast(state, value):
    """`value` as the main process has it, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _wait_until_done(manifest: Manifest, print_: str) -> None:
    while not manifest.is_done(print_):
        time.sleep(POLL_S)


def _refuse_empty_inputs(name: str, inputs: dict[str, str], work_dir: Path) -> None:
    """A stage whose input rows an earlier stage left empty (e.g. `pairs` kept no SFT row) stops before it
    starts, naming the file and the stage that wrote it."""
    for path in map(Path, inputs.values()):
        if path.suffix == ".jsonl" and path.is_file() and path.stat().st_size == 0:
            message = f"stage '{name}': its input {path} has no rows"
            if path.is_relative_to(work_dir):
                writer = path.relative_to(work_dir).parts[0]
                report = work_dir / writer / "report.json"
                message += f"; stage '{writer}' kept none" + (f" (see {report})" if report.exists() else "")
            raise DataError(message)


def run_recipe(recipe: Recipe, work_dir: str | Path | None = None, quiet: bool = False) -> Context:
    """Run (or resume) every stage of `recipe`; returns the context with every stage's outputs. `quiet`: no
    progress bars, stage lines or notes."""
    was_quiet = is_quiet()
    set_quiet(quiet or was_quiet)
    try:
        return _run(recipe, work_dir, quiet)
    finally:
        set_quiet(was_quiet)


def _run(recipe: Recipe, work_dir: str | Path | None, quiet: bool) -> Context:
    started = time.perf_counter()
    state = process_state()
    main = state.is_main_process
    ctx = Context(recipe=recipe, work_dir=Path(work_dir or recipe.resolved_work_dir), quiet=quiet or not main)
    say = console.print if main and not is_quiet() else (lambda *_: None)
    timings: dict[str, dict] = {}
    if main:
        if recipe.toyworld is not None:
            world_started = time.perf_counter()
            toy_world(recipe.toyworld, ctx.quiet)  # built once and cached; every toyworld:// path must exist before hashing inputs
            timings["toy world (build or cache)"] = {"wall_s": round(time.perf_counter() - world_started, 2)}
        check_recipe(recipe).enforce()  # models, data files, prompts: before anything is written
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ctx.work_dir, recursive=True)  # of writers killed in an earlier run
        recipe.save_resolved(ctx.work_dir / "recipe.resolved.yaml")
    state.wait_for_everyone()
    for name in recipe.stages:
        step = stage(name)
        folder = ctx.work_dir / name
        manifest = Manifest(folder)
        decision = None
        if main:
            inputs = {k: hash_path(v) for k, v in step.inputs(ctx).items()}
            config = step.config(recipe)
            print_ = fingerprint(config, inputs)
            done = manifest.is_done(print_)
            if not done:
                _refuse_empty_inputs(name, step.inputs(ctx), ctx.work_dir)
                if manifest.read().get("fingerprint") not in (None, print_):
                    shutil.rmtree(folder)  # config or inputs changed: partial work is not reusable
                folder.mkdir(parents=True, exist_ok=True)
                manifest.start(name, config, inputs, print_)
            decision = (print_, done)
        print_, done = _broadcast(state, decision)
        if done:
            ctx.outputs[name] = manifest.read()["outputs"]
            timings[name] = {"wall_s": manifest.read().get("wall_s"), "skipped": True}
            say(f"[green]✓[/] {name}: finished earlier, skipped")
            continue
        say(f"[bold]▶ {name}[/]")
        stage_started = time.perf_counter()
        if main or step.every_process:
            outputs = step.run(ctx, folder)
        if main:
            manifest.finish(outputs)
        if step.every_process:
            state.wait_for_everyone()
        elif not main:
            _wait_until_done(manifest, print_)
        ctx.outputs[name] = manifest.read()["outputs"]
        timings[name] = {"wall_s": round(time.perf_counter() - stage_started, 2)}
        say(f"[green]✓[/] {name}: done in {timings[name]['wall_s']:.1f}s")
    if main:  # this run's wall times, the toy world's build included (a skipped stage: its earlier time)
        write_json(ctx.work_dir / "run.json", {"recipe": recipe.name, "wall_s": round(time.perf_counter() - started, 2),
                                               "steps": timings})
        write_run_report(ctx)
    state.wait_for_everyone()  # no process returns before this run's run.json and report are written
    return ctx

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

With a `stage_cache` folder, runs share finished stages by content: a stage's fingerprint (its config and the
content hashes of its inputs) names a pointer there to the run folder that finished it, and another run reaching
the same fingerprint takes hard links of that folder instead of running it (two recipes that differ only after
their SFT data train the SFT model once). A lock per fingerprint makes a second process wait for the first one's
stage rather than redo it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console

from polyfuse.data.hashing import hash_path
from polyfuse.data.io import atomic_write_folder, link_or_copy, remove_stale_temporaries, write_json
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


@contextmanager
def _claimed(stage_cache: Path, name: str, print_: str):
    """Held while one process checks, reuses or runs the stage of this fingerprint."""
    lock = stage_cache / name / f"{print_}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _moved(value, old: str, new: str):
    """An output as it reads in the run that takes the stage over: paths under `old` moved under `new`."""
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return value


def _reuse(stage_cache: Path, name: str, print_: str, folder: Path) -> bool:
    """Take over another run's finished stage of the same fingerprint: hard links of its folder (files are
    written once by atomic rename, so neither run can change the other's), its outputs moved to this folder."""
    pointer = stage_cache / name / f"{print_}.json"
    if not pointer.is_file():
        return False
    found = json.loads(pointer.read_text())
    source = Path(found["folder"])
    if source == folder.resolve() or not Manifest(source).is_done(print_):  # moved, deleted or redone since
        return False
    data = Manifest(source).read()
    data.update(outputs=_moved(data["outputs"], found["written"], str(folder)), reused_from=str(source))

    def fill(tmp: Path) -> None:  # in a temporary folder renamed into place: a kill leaves no half copy
        shutil.copytree(source, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
        write_json(tmp / "manifest.json", data)  # a new file: the link to the source's manifest is replaced

    atomic_write_folder(folder, fill)
    return True


def _register(stage_cache: Path, name: str, print_: str, folder: Path) -> None:
    """Point the fingerprint at this run's finished stage, unless a finished one is already pointed at."""
    pointer = stage_cache / name / f"{print_}.json"
    if not pointer.is_file() or not Manifest(json.loads(pointer.read_text())["folder"]).is_done(print_):
        write_json(pointer, {"folder": str(folder.resolve()), "written": str(folder)})


def run_recipe(recipe: Recipe, work_dir: str | Path | None = None, quiet: bool = False,
               stage_cache: str | Path | None = None) -> Context:
    """Run (or resume) every stage of `recipe`; returns the context with every stage's outputs. `quiet`: no
    progress bars, stage lines or notes. `stage_cache`: a folder through which runs share finished stages of
    equal fingerprints (module docstring)."""
    was_quiet = is_quiet()
    set_quiet(quiet or was_quiet)
    try:
        return _run(recipe, work_dir, quiet, Path(stage_cache) if stage_cache else None)
    finally:
        set_quiet(was_quiet)


def _run(recipe: Recipe, work_dir: str | Path | None, quiet: bool, stage_cache: Path | None) -> Context:
    started = time.perf_counter()
    state = process_state()
    main = state.is_main_process
    ctx = Context(recipe=recipe, work_dir=Path(work_dir or recipe.resolved_work_dir), quiet=quiet or not main,
                  stage_cache=stage_cache)
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
        decision, claim = None, ExitStack()
        with claim:  # released at the latest here, an error included: another process may wait on it
            if main:
                inputs = {k: hash_path(v) for k, v in step.inputs(ctx).items()}
                config = step.config(recipe)
                print_ = fingerprint(config, inputs)
                if stage_cache is not None:
                    claim.enter_context(_claimed(stage_cache, name, print_))
                done = manifest.is_done(print_)
                reused = not done and stage_cache is not None and _reuse(stage_cache, name, print_, folder)
                if done and stage_cache is not None:  # finished here, maybe before there was a cache
                    _register(stage_cache, name, print_, folder)
                done = done or reused
                if not done:
                    _refuse_empty_inputs(name, step.inputs(ctx), ctx.work_dir)
                    if manifest.read().get("fingerprint") not in (None, print_):
                        shutil.rmtree(folder)  # config or inputs changed: partial work is not reusable
                    folder.mkdir(parents=True, exist_ok=True)
                    manifest.start(name, config, inputs, print_)
                decision = (print_, done)
            print_, done = _broadcast(state, decision)
            if done:
                claim.close()
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
                if stage_cache is not None:
                    _register(stage_cache, name, print_, folder)
                claim.close()
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

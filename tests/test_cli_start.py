"""`polyfuse --help` answers at once: the stage commands are generated from the stages, and the stage modules,
their config classes and the objectives import no torch or transformers (`polyfuse.lazy`); the command that
runs imports them. Checked in a fresh interpreter (this test process has torch loaded): the command runs as
`python -X importtime -m polyfuse ...` would, and reports every module it imported (`sys.modules`: importtime
alone misses modules imported through `importlib`, as the registries and `lazy_import` do); on a failure the
importtime lines say which import pulled the heavy one in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = {"torch", "transformers", "accelerate", "peft", "datasets", "vllm"}
RUN = """import json, os, runpy, sys
sys.argv = ["polyfuse", *sys.argv[1:]]
try:
    runpy.run_module("polyfuse", run_name="__main__")
finally:
    with open(os.environ["MODULES_FILE"], "w") as f:
        json.dump(sorted(sys.modules), f)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("args", "shows"), [
    (["--help"], ["sample", "score", "pairs", "logprobs", "consensus", "teacher", "train", "merge"]),
    (["sample", "--help"], ["--prompts", "--config", "--out"]),
    (["train", "--help"], ["sft", "distill", "dpo", "infifpo", "kto", "cgpo"]),
    (["train", "dpo", "--help"], ["--data", "--model", "Optional: the defaults apply"]),
    (["train", "cgpo", "--help"], ["--data", "--model", "Optional: the defaults apply"]),
])  # fmt: skip
def test_help_imports_no_torch(args, shows, tmp_path):
    modules_file = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", RUN, *args], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "MODULES_FILE": str(modules_file), "COLUMNS": "300"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(modules_file.read_text())
    assert "polyfuse.pipeline.stages.po" in modules  # the commands were generated from the registered stages
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    if heavy:
        lines = done.stderr.splitlines()
        first = next((i for i, line in enumerate(lines) if line.rsplit("| ", 1)[-1].split(".")[0] in HEAVY), 0)
        pytest.fail(f"{' '.join(args)} imported {heavy[:5]}; importtime up to the first:\n"
                    + "\n".join(lines[max(0, first - 25): first + 1]))
    for text in shows:
        assert text in done.stdout, f"{text!r} not in the help of {' '.join(args)}:\n{done.stdout}"

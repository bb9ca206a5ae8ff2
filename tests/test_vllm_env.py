"""`python -m polyfuse.sampling.vllm_env FOLDER` deletes and rebuilds only a venv it made (or an empty
folder): a folder the user names by mistake is refused with one line and left as it was. (Building the
venv itself is what the engine tests' `vllm_python` fixture does; test_engines.py checks it runs the
checkout's code.)"""

from __future__ import annotations

import json
import threading

import pytest
from filelock import FileLock

from polyfuse.sampling import vllm_env


@pytest.mark.parametrize("name", ["venvs", "."])
def test_a_folder_it_did_not_make_is_refused_and_left_alone(tmp_path, monkeypatch, capsys, name):
    home = tmp_path / "home"
    (home / "venvs" / "mine").mkdir(parents=True)
    (home / "venvs" / "mine" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (home / "notes.txt").write_text("keep me")
    monkeypatch.chdir(home)
    with pytest.raises(SystemExit) as stop:
        vllm_env.main([name])
    assert stop.value.code == 2
    folder = home / "venvs" if name == "venvs" else home
    assert capsys.readouterr().err == (f"error: {folder}: not a vLLM venv made by polyfuse (no polyfuse-vllm-env.json) "
                                       "and not empty; name a new or empty folder, or remove this one yourself\n")
    assert (home / "notes.txt").read_text() == "keep me" and (home / "venvs" / "mine" / "pyvenv.cfg").is_file()


def test_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "venv").write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        vllm_env.main([str(tmp_path / "venv")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'venv'}: is a file; name a new or empty folder for the vLLM venv\n"
    assert (tmp_path / "venv").read_text() == "not a folder"


def test_a_marker_cut_short_counts_as_a_different_venv_that_may_be_rebuilt(tmp_path):
    """A build killed while it wrote the marker: the venv is ours (it is rebuilt), its marker matches nothing."""
    wanted = json.dumps(vllm_env._wanted("polyfuse==0.1.0"))
    (tmp_path / "bin").mkdir()
    (tmp_path / vllm_env.MARKER).write_text(wanted[: len(wanted) // 2])
    assert vllm_env.read_marker(tmp_path) is None
    vllm_env.check_replaceable(tmp_path)  # no error: its own marker makes it replaceable
    (tmp_path / vllm_env.MARKER).write_text(wanted)
    assert vllm_env.read_marker(tmp_path) == vllm_env._wanted("polyfuse==0.1.0")


def test_an_empty_or_missing_folder_may_be_built(tmp_path):
    vllm_env.check_replaceable(tmp_path)
    vllm_env.check_replaceable(tmp_path / "new")



def test_a_second_caller_waits_for_the_first_to_finish(tmp_path):
    """pytest-xdist workers (and a bench's subprocess) call `ensure_vllm_env` at once: each waits for the lock
    the other holds, so two pips never install into one venv together (CI saw pip's temporary files vanish)."""
    folder = tmp_path / "venv"
    folder.mkdir()
    (folder / "someone-elses.txt").write_text("x")  # refused as soon as the lock is taken: nothing is built
    outcome = []

    def second_caller():
        try:
            vllm_env.ensure_vllm_env(folder, polyfuse="polyfuse==0.1.0", quiet=True)
        except vllm_env.UserError as err:
            outcome.append(str(err))

    with FileLock(vllm_env.lock_of(folder)):
        waiter = threading.Thread(target=second_caller)
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and outcome == []  # blocked while the first holds the lock
    waiter.join(timeout=10)
    assert not waiter.is_alive() and "not a vLLM venv made by polyfuse" in outcome[0]
    assert (folder / "someone-elses.txt").read_text() == "x"

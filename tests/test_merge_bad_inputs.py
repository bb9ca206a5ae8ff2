"""Bad inputs and kills for `polyfuse merge` and `polyfuse merge extract-lora`, through the CLI: every mistake is
exit code 2 with one line naming the file and key, before any tensor is read, and leaves nothing behind; a
killed merge can always be rerun, and resuming cleans up after it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polyfuse.cli.main import main
from polyfuse.merge import MergeOptions, load_merge_config, run_merge
from polyfuse.merge.methods.base import MERGE_METHODS
from polyfuse.merge.writer import MANIFEST
from tiny_lm import build_tiny_model

SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("zoo")
    base = build_tiny_model(root / "base", seed=0)
    out = {"base": base}
    for seed in (1, 2):
        model = LlamaForCausalLM.from_pretrained(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(root / f"ft{seed}", max_shard_size="40KB")
        out[f"ft{seed}"] = str(root / f"ft{seed}")
    return out


def ties(zoo, **changes) -> dict:
    config = {"merge_method": "ties", "base_model": zoo["base"], "dtype": "float32",
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": zoo["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    config.update(changes)
    return config


def polyfuse(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["polyfuse", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out + captured.err


def merge_cli(monkeypatch, capsys, tmp_path: Path, config: dict, out: Path | None = None) -> tuple[int, str]:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return polyfuse(monkeypatch, capsys, "merge", str(path), str(out or tmp_path / "out"), "--no-smoke-check", "-q")


def with_model_params(zoo, index: int, **params) -> dict:
    config = ties(zoo)
    config["models"][index]["parameters"].update(params)
    return config


REFUSED = [  # (config change, message): each refused before any tensor is read
    (lambda z: with_model_params(z, 0, weight="heavy"), r"models[0].parameters.weight: expected a number (got 'heavy')"),
    (lambda z: with_model_params(z, 1, density="half"), r"models[1].parameters.density: expected a number (got 'half')"),
    (lambda z: ties(z, parameters={"normalize": "yes"}), "parameters.normalize: expected a bool like the default True"),
    (lambda z: ties(z, parameters={"lambda": True}), "parameters.lambda: expected a number (got True)"),
    (lambda z: ties(z, parameters={"seed": 1.5}), "parameters.seed: expected an integer (got 1.5)"),
    (lambda z: with_model_params(z, 0, density=[0.5, "x"]), "models.0.parameters.density"),
    (lambda z: with_model_params(z, 1, density=1.5), "models[1].parameters.density: must be between 0 and 1"),
    (lambda z: with_model_params(z, 0, density=-0.1), "models[0].parameters.density: must be between 0 and 1"),
    (lambda z: with_model_params(z, 0, density=[0.5, 1.2]),
     "models[0].parameters.density: must be between 0 and 1, the fraction of the task vector kept (got 1.2; mergekit "
     "would treat it as 1) (at tensor model.layers.1."),
    (lambda z: ties(z, merge_method="della", parameters={"epsilon": 0.6}), "merge.yaml: parameters.epsilon: density 0.5 and "
     "epsilon 0.6 need epsilon >= 0"),
    (lambda z: ties(z, parameters={"rescale_mode": "l2"}), "parameters.rescale_mode: expected one of paper, l1_norm"),
    (lambda z: {"merge_method": "slerp", "base_model": z["base"], "models": [{"model": z["ft1"]}],
                "parameters": {"t": 1.2}}, "parameters.t: must be between 0 (the base) and 1 (the other model) (got 1.2)"),
    (lambda z: {"merge_method": "slerp", "base_model": z["base"], "models": [{"model": z["ft1"]}],
                "parameters": {"t": [0, -0.5]}}, "parameters.t: must be between 0 (the base) and 1 (the other model) "
     "(got -0.5) (at tensor model.layers.1."),
    (lambda z: {"merge_method": "linear", "models": [{"model": z["ft1"], "parameters": {"weight": 1}},
                                                     {"model": z["ft2"], "parameters": {"weight": -1}}]},
     "models[1].parameters.weight: the weights sum to 0, but linear with normalize: true divides by their sum"),
    (lambda z: {"merge_method": "multislerp", "models": [{"model": z["ft1"], "parameters": {"weight": 0.5}},
                                                         {"model": z["ft2"], "parameters": {"weight": -0.5}}]},
     "the weights sum to 0, but multislerp with normalize_weights: true divides"),
    (lambda z: {"merge_method": "nearswap", "base_model": z["base"], "models": [{"model": z["ft1"]}],
                "parameters": {"t": -1}}, "parameters.t: must be >= 0"),
]


@pytest.mark.parametrize(("make", "message"), REFUSED, ids=[
    "weight-heavy", "density-half", "normalize-yes", "lambda-bool", "seed-float", "density-list-of-str",
    "density-above-1", "density-negative", "density-gradient-above-1", "della-epsilon", "rescale-mode", "slerp-t-1.2",
    "slerp-t-gradient", "linear-zero-sum", "multislerp-zero-sum", "nearswap-negative-t"])
def test_bad_parameters_exit_2_naming_the_key_and_leave_nothing(tmp_path, zoo, monkeypatch, capsys, make, message):
    from polyfuse.merge.sources import ModelReader

    monkeypatch.setattr(ModelReader, "read", lambda self, key: pytest.fail(f"{key} read before validation"))
    code, text = merge_cli(monkeypatch, capsys, tmp_path, make(zoo))
    assert code == 2 and message in text, text
    assert "Traceback" not in text and "merge.yaml" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_density_zero_drops_the_task_vector_as_mergekit(tmp_path, zoo):
    """mergekit's rule for a density <= 0 (`magnitude`, `della_magprune`): the model's task vector is dropped, so
    TIES of one model at density 0 is the base."""
    config = ties(zoo, models=[{"model": zoo["ft1"], "parameters": {"weight": 1.0, "density": 0.0}}])
    path = tmp_path / "zero.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run_merge(load_merge_config(path), tmp_path / "out", str(path), MergeOptions(smoke_check=False, quiet=True))
    from safetensors.torch import load_file

    merged, base = load_file(out.out / "model.safetensors"), load_file(Path(zoo["base"], "model.safetensors"))
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)


def test_zero_weight_sum_with_normalize_follows_mergekit_in_task_arithmetic():
    """mergekit's generalized task arithmetic divides by sum(w) but by 1 when |sum(w)| < 1e-8: the weights are then
    used as given. th0 = 0, tau = [1, 2], [3, 5], w = (1, -1): (1 - 3, 2 - 5) = [-2, -3]."""
    from polyfuse.merge.methods.base import TensorTask

    task = TensorTask("layers.0.mlp.weight", torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])],
                      [{"weight": 1.0}, {"weight": -1.0}], {"normalize": True, "lambda": 1.0})
    method = MERGE_METHODS.get("task_arithmetic")
    method.check(task.params, task.model_params)  # not refused
    torch.testing.assert_close(method().merge(task), torch.tensor([-2.0, -3.0]))


def test_output_that_is_a_file_is_refused_and_untouched(tmp_path, zoo, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.write_text("the user's file")
    code, text = merge_cli(monkeypatch, capsys, tmp_path, ties(zoo), taken)
    assert code == 2 and f"{taken}: is a file, expected an output folder" in text
    assert taken.read_text() == "the user's file"


def test_truncated_tensor_is_found_from_the_headers(tmp_path, zoo, monkeypatch, capsys):
    copy = Path(shutil.copytree(zoo["ft2"], tmp_path / "ft2"))
    last = sorted(copy.glob("model-*.safetensors"))[-1]
    os.truncate(last, last.stat().st_size - 10)
    config = ties(zoo)
    config["models"][1]["model"] = str(copy)
    code, text = merge_cli(monkeypatch, capsys, tmp_path, config)
    assert code == 2 and f"models[1]: {last}: tensor " in text and "the file is truncated" in text
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_is_refused_and_untouched(tmp_path, zoo, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".notes.tmp").write_text("mine")
    code, text = merge_cli(monkeypatch, capsys, tmp_path, ties(zoo))
    assert code == 2 and "not empty and holds no polyfuse merge (it holds .notes.tmp)" in text
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".notes.tmp"]


def test_merge_killed_before_its_first_manifest_can_be_rerun(tmp_path, zoo, monkeypatch, capsys):
    """A real kill between mkstemp and os.replace of the first manifest, and the issue's reproduction."""
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(ties(zoo)))
    script = (f"import os, sys; sys.path.insert(0, {SRC!r})\n"
              "from polyfuse.data import io\n"
              "real = os.replace\n"
              f"io.os.replace = lambda a, b: os._exit(9) if str(b).endswith({MANIFEST!r}) else real(a, b)\n"
              "from polyfuse.merge import MergeOptions, load_merge_config, run_merge\n"
              f"run_merge(load_merge_config({str(path)!r}), {str(tmp_path / 'killed')!r}, 'c', "
              "MergeOptions(smoke_check=False, quiet=True))\n")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 9
    left = [p.name for p in (tmp_path / "killed").iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{MANIFEST}.") and left[0].endswith(".tmp")
    (tmp_path / "issue").mkdir()
    (tmp_path / "issue" / f".{MANIFEST}.x.tmp").touch()
    for out in ("killed", "issue"):
        code, text = polyfuse(monkeypatch, capsys, "merge", str(path), str(tmp_path / out), "--no-smoke-check", "-q")
        assert code == 0, text
        names = sorted(p.name for p in (tmp_path / out).iterdir())
        assert MANIFEST in names and not any(n.endswith((".tmp", ".partial")) for n in names)


def test_resume_clears_its_own_temporary_files_and_keeps_the_users(tmp_path, zoo, monkeypatch, capsys):
    options = MergeOptions(smoke_check=False, quiet=True, max_shard_size="40KB")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(ties(zoo)))
    out = tmp_path / "out"
    first = run_merge(load_merge_config(path), out, str(path), options)
    strays = [f".{first.files[1]}.partial", ".config.json.host-123-abc.tmp", f".{MANIFEST}.host-1-x.tmp"]
    for name in strays:
        (out / name).write_text("half")
    (out / "NOTES.md").write_text("the user's notes")
    again = run_merge(load_merge_config(path), out, str(path), options)
    assert again.merged == 0
    names = {p.name for p in out.iterdir()}
    assert not names & set(strays) and (out / "NOTES.md").read_text() == "the user's notes"


def test_shards_are_fsynced_before_they_are_renamed(tmp_path, zoo, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(ties(zoo)))
    result = run_merge(load_merge_config(path), tmp_path / "out", str(path),
                       MergeOptions(smoke_check=False, quiet=True, max_shard_size="40KB"))
    assert len(result.files) > 1
    for file in result.files:
        partial = str(tmp_path / "out" / f".{file}.partial")
        assert events.index(("fsync", partial)) < events.index(("replace", partial))
        assert events[events.index(("replace", partial)) + 1] == ("fsync", str(tmp_path / "out"))  # the rename


def test_touched_or_copied_inputs_still_resume_and_changed_ones_do_not(tmp_path, zoo, monkeypatch):
    inputs = {name: shutil.copytree(zoo[name], tmp_path / name) for name in ("base", "ft1", "ft2")}
    config = ties({k: str(v) for k, v in inputs.items()})
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    options = MergeOptions(smoke_check=False, quiet=True, max_shard_size="40KB")
    method, calls = MERGE_METHODS.get("ties"), []
    real = method.merge

    def crash(self, task):
        calls.append(task.name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(self, task)

    monkeypatch.setattr(method, "merge", crash)
    with pytest.raises(KeyboardInterrupt):
        run_merge(load_merge_config(path), tmp_path / "out", str(path), options)
    monkeypatch.setattr(method, "merge", real)
    done = json.loads((tmp_path / "out" / MANIFEST).read_text())["done"]
    assert done
    for file in Path(inputs["ft1"]).glob("*.safetensors"):
        os.utime(file, (1, 1))  # touched
    for file in Path(inputs["ft2"]).glob("*.safetensors"):
        shutil.copyfile(file, tmp_path / "copy")  # copied over itself: new inode, new mtime
        os.replace(tmp_path / "copy", file)
    resumed = run_merge(load_merge_config(path), tmp_path / "out", str(path), options)
    assert 0 < resumed.merged < len(calls) + 20 and json.loads((tmp_path / "out" / MANIFEST).read_text())["complete"]
    shard = sorted(Path(inputs["ft1"]).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:header + 4] = bytes(255 - b for b in data[header:header + 4])  # retrained: same shapes, new values
    shard.write_bytes(bytes(data))
    from polyfuse.errors import ConfigError

    with pytest.raises(ConfigError, match="holds a merge of a different config or inputs"):
        run_merge(load_merge_config(path), tmp_path / "out", str(path), options)


def test_a_full_disk_mid_merge_leaves_no_folder_behind(tmp_path, zoo):
    """The file-size limit (EFBIG) hits the first shard: exit 2, and the folder this run created goes."""
    import resource

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(ties(zoo)))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, "-m", "polyfuse", "merge", str(path), str(tmp_path / "out"),
                             "--no-smoke-check", "-q"], capture_output=True, text=True, preexec_fn=limit,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert result.returncode == 2 and "file too large" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_bad_lora_reference_exits_2_naming_the_adapter(tmp_path, zoo, monkeypatch, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(4, 32)},
              adapter / "adapter_model.safetensors")
    config = ties(zoo)
    config["models"][0]["model"] = f"{zoo['ft1']}+{adapter}"
    code, text = merge_cli(monkeypatch, capsys, tmp_path, config)
    assert code == 2 and f"LoRA adapter {adapter}" in text and "module model.layers.0.mlp.up_proj has no lora_B" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setup", "args", "message"), ids=["file", "other-files", "rank-0", "bad-regex", "nothing"],
                         argvalues=[
    (lambda out: out.write_text("mine"), [], "is a file, expected an output folder for the adapter"),
    (lambda out: (out.mkdir(), (out / "weights.bin").write_text("mine")), [], "holds other files than a LoRA adapter"),
    (lambda out: None, ["--rank", "0"], "--max-rank: expected a positive rank (got 0)"),
    (lambda out: None, ["-e", "mlp("], "--exclude-regex: 'mlp(' is not a regular expression"),
    (lambda out: None, ["--include-regex", "nothing"], "no linear or embedding module to decompose"),
])
def test_extract_lora_bad_inputs_exit_2_and_leave_nothing(tmp_path, zoo, monkeypatch, capsys, setup, args, message):
    out = tmp_path / "adapter"
    setup(out)
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))
    code, text = polyfuse(monkeypatch, capsys, "merge", "extract-lora", zoo["base"], zoo["ft1"], str(out), "-q", *args)
    assert code == 2 and message in text and "Traceback" not in text, text
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("tokenizers", [(), ("a",)], ids=["neither", "one"])
def test_vocabularies_of_different_sizes_without_a_tokenizer_block_are_refused_before_any_read(
        tmp_path, monkeypatch, capsys, tokenizers):
    """Same architecture, 64 and 80 embedding rows, no tokenizer files on (at least) one side: one line naming both
    sizes and models and the way to merge them, before any tensor is read (was a RuntimeError mid-merge)."""
    from polyfuse.merge.sources import ModelReader
    from test_merge_mergekit_configs import bpe_tokenizer, pico_llama

    a, b = pico_llama(tmp_path / "a", 1), pico_llama(tmp_path / "b", 2, vocab_size=80)
    for name in tokenizers:
        bpe_tokenizer(64, []).save_pretrained(tmp_path / name)
    monkeypatch.setattr(ModelReader, "read", lambda self, key: pytest.fail(f"{key} read before validation"))
    config = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                   {"model": b, "parameters": {"weight": 1.0}}]}
    code, text = merge_cli(monkeypatch, capsys, tmp_path, config)
    assert code == 2 and "Traceback" not in text, text
    line = next(x for x in text.splitlines() if "vocabularies differ" in x)  # the whole message, on one line
    assert line.startswith(f"error: {tmp_path / 'merge.yaml'}: the vocabularies differ in size")
    assert f"(embedding rows: models[0] ({a}) 64, models[1] ({b}) 80)" in line and "tokenizer: {source: base}" in line
    assert not (tmp_path / "out").exists()


def test_one_model_listed_twice_counts_its_inputs_once_and_the_same_way(tmp_path, zoo, monkeypatch, capsys):
    """A linear merge of one path twice reads it twice per tensor: the layout line and the memory estimate both
    say 2 inputs, and the layout says they are one model; the result is that model."""
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 0.5}},
                         {"model": zoo["ft1"] + "/", "parameters": {"weight": 0.5}}]}
    code, text = merge_cli(monkeypatch, capsys, tmp_path, config)
    text = " ".join(text.split())
    assert code == 0 and "merge linear: 2 inputs (1 distinct model), " in text and "(2 inputs x " in text, text
    from safetensors.torch import load_file

    merged = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    source = {k: v for f in Path(zoo["ft1"]).glob("*.safetensors") for k, v in load_file(f).items()}
    assert merged.keys() == source.keys() and all(torch.equal(merged[k], source[k]) for k in merged)
    ties_config = ties(zoo)
    ties_config["models"].insert(0, {"model": zoo["base"]})  # mergekit's idiom: the base listed, no parameters
    code, text = merge_cli(monkeypatch, capsys, tmp_path, ties_config, tmp_path / "ties")
    assert code == 0 and "merge ties: 3 inputs (the base and 2 models), " in " ".join(text.split()), text

"""Stage manifests: what a stage ran with (resolved config, input hashes, package versions) and whether
it finished. A stage is skipped on rerun only when its manifest says done *and* its fingerprint (config +
input hashes) is unchanged."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from polyfuse.data.io import write_json

PACKAGES = ("polyfuse", "torch", "transformers", "accelerate", "datasets", "tokenizers", "peft")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fingerprint(config: dict[str, Any], inputs: dict[str, str]) -> str:
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Manifest:
    """`<stage dir>/manifest.json`. Written at start (status running) and at the end (status done)."""

    def __init__(self, stage_dir: str | Path):
        self.path = Path(stage_dir) / "manifest.json"

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def is_done(self, print_: str) -> bool:
        data = self.read()
        return data.get("status") == "done" and data.get("fingerprint") == print_

    def start(self, stage: str, config: dict[str, Any], inputs: dict[str, str], print_: str) -> None:
        write_json(self.path, {
            "stage": stage, "status": "running", "fingerprint": print_, "config": config,
            "inputs": inputs, "versions": package_versions(), "started": time.time(),
        })

    def finish(self, outputs: dict[str, Any]) -> None:
        data = self.read()
        data.update(status="done", outputs=outputs, finished=time.time())
        data["wall_s"] = round(data["finished"] - data["started"], 2)
        write_json(self.path, data)

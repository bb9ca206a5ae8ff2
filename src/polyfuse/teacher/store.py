"""The teacher store: each model's top-K next-token logits over the response tokens of the training texts.

Layout: one folder per model, `<store>/<model name>/`, holding `manifest.json` and shards
`shard-<chunk>.npz` of about `chunk_size` examples each. Models are independent artefacts: adding a
source computes that source only. A shard is a compressed `.npz` (no pickles) written atomically:

| array | shape | dtype | meaning |
|---|---|---|---|
| `example_ids` | E | str | the row ids, the key everything is matched on (never row order) |
| `offsets` | E + 1 | int64 | example e owns positions `offsets[e]:offsets[e+1]` |
| `token_ids` | P | int32 | the model's own response tokens (its tokenizer and chat template) |
| `spans` | P x 2 | int32 | each token's `[start, end)` character span in the response text, -1 for none |
| `topk_ids` | P x K | int32 | top-K vocabulary ids of the distribution predicting that token |
| `topk_logits` | P x K | float16 | their raw logits |
| `std` | P | float32 | the std of the full-vocabulary logits (`logit_std`, for logit standardisation) |
| `token_logps` | P | float32 | log-prob of the token itself (the model's CE on the gold text, for MinCE) |
| `logsumexp` | P | float32 | the log-normaliser of the full-vocabulary logits (absent in stores written before it was added) |

The normalised top-K log-probs that the sparse KL losses read (`kd`, `gold`) are `topk_logits - logsumexp`,
computed when a shard is read (fp16 logits: about 1e-2 in log-prob at logits near 30).

Position p of an example holds the distribution that *predicts* its p-th response token (logits at t predict
token t+1), so aligned tokens pair the positions that predict them.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from polyfuse.data.io import atomic_write
from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import TeacherOutputs

np = lazy_import("numpy")

FORMAT = "polyfuse-teacher-1"
ARRAYS = ("token_ids", "spans", "topk_ids", "topk_logits", "std", "token_logps")
OPTIONAL = ("logsumexp",)  # arrays added since the format was fixed; older shards lack them


@dataclass(frozen=True)
class TeacherExample(TeacherOutputs):
    """One stored example's arrays (see the module table): what an objective reads, and each token's
    character span, which only the alignment reads."""

    spans: np.ndarray
    logsumexp: np.ndarray | None = field(default=None, kw_only=True)

    def span_list(self) -> list[tuple[int, int] | None]:
        return [None if start < 0 else (int(start), int(end)) for start, end in self.spans]

    def outputs(self) -> TeacherOutputs:
        """The arrays an objective reads, as the objectives' own plain type; with the log-normaliser stored,
        the normalised top-K log-probs too."""
        arrays = {f.name: getattr(self, f.name) for f in fields(TeacherOutputs)}
        if self.logsumexp is not None and self.topk_logprobs is None:
            arrays["topk_logprobs"] = self.topk_logits.astype(np.float32) - self.logsumexp[:, None]
        return TeacherOutputs(**arrays)


def write_shard(path: Path, examples: dict[str, TeacherExample]) -> None:
    """Write one shard atomically (temporary file in the same folder, then rename)."""
    ids = list(examples)
    lengths = [len(examples[i].token_ids) for i in ids]
    arrays: dict[str, np.ndarray] = {
        "example_ids": np.array(ids, dtype=str),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    for name in ARRAYS:
        arrays[name] = np.concatenate([getattr(examples[i], name) for i in ids]) if ids else np.zeros(0)
    for name in OPTIONAL:
        if ids and all(getattr(examples[i], name) is not None for i in ids):
            arrays[name] = np.concatenate([getattr(examples[i], name) for i in ids])
    atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def _read_arrays(path: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Arrays of a shard (`optional` ones when it has them); a damaged shard (truncated, overwritten) is a
    `DataError` that says how to mend it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in (*names, *(n for n in optional if n in data.files))}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: a damaged teacher shard ({err}); delete it and rerun `polyfuse teacher`, "
                        "which recomputes only the missing shards") from None


def read_shard_ids(path: Path) -> list[str]:
    """The example ids a shard holds, in order."""
    return _read_arrays(path, ("example_ids",))["example_ids"].tolist()


def read_shard(path: Path) -> dict[str, TeacherExample]:
    arrays = _read_arrays(path, ("example_ids", "offsets", *ARRAYS), OPTIONAL)
    ids, offsets = arrays["example_ids"].tolist(), arrays["offsets"]
    stored = [name for name in (*ARRAYS, *OPTIONAL) if name in arrays]
    return {
        example_id: TeacherExample(**{name: arrays[name][offsets[e] : offsets[e + 1]] for name in stored})
        for e, example_id in enumerate(ids)
    }


class TeacherStore:
    """One model's finished outputs (`<store>/<name>/`): its manifest and example lookup by id."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            raise DataError(f"{self.folder}: no teacher outputs here (manifest.json missing); run `polyfuse teacher`")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if not self.manifest.get("complete"):
            raise DataError(f"{self.folder}: the teacher run did not finish; rerun `polyfuse teacher` to resume it")

    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    def shards(self) -> list[Path]:
        return [self.folder / name for name in self.manifest["shards"]]

    def examples(self) -> Iterator[tuple[str, TeacherExample]]:
        """Every stored example, shard by shard (one shard in memory at a time)."""
        for shard in self.shards():
            yield from read_shard(shard).items()

    def check_rows(self, hashes: dict[str, str]) -> None:
        """Refuse outputs computed for other data: every training row (id -> `text_hash`) must have been
        run with the same text, or left out for its length (listed in the manifest's `dropped`)."""
        stored = self.manifest["examples"]
        changed = [i for i, h in hashes.items() if i in stored and stored[i] != h]
        missing = [i for i in hashes if i not in stored and i not in set(self.manifest["dropped"])]
        for problem, ids in (("have other text than when", changed), ("were not in the data when", missing)):
            if ids:
                raise DataError(
                    f"{self.folder}: {len(ids)} training rows {problem} the teacher ran (e.g. {ids[:3]}); "
                    "rerun `polyfuse teacher` on this data"
                )


def text_hash(prompt: Any, response: str) -> str:
    """What a stored example was computed from, to match training rows against it."""
    from polyfuse.data.schemas import as_messages

    blob = json.dumps([as_messages(prompt), response], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def open_stores(root: str | Path, names: list[str] | None = None) -> list[TeacherStore]:
    """The stores under `root` (a `polyfuse teacher` output) in `names` order; None: every store, by name."""
    root = Path(root)
    stored = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    if not stored:
        raise DataError(f"{root}: no teacher outputs here; run `polyfuse teacher`")
    missing = [n for n in names or [] if n not in stored]
    if missing:
        raise DataError(f"{root}: no teacher outputs for {missing}; it has {stored}")
    return [TeacherStore(root / name) for name in (stored if names is None else names)]

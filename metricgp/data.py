"""Text sources, splits and token windows, with the split discipline built in.

A `DataRef` names a source (`wikitext2`, `c4`, `ptb`, or a path to a text file) and a split.
What a split may be used for is fixed by *purpose*:

  calibration  -> train (or validation where a source has no local train split)
  fitness      -> validation
  report       -> test

`windows(ref, purpose, ...)` refuses a test split for calibration or fitness, so the search can
never select on the numbers it reports. Local files under the data directory are used first
(`../shared/data` when present, else `$METRICGP_DATA`); online users fall back to the hub.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from metricgp.errors import MetricGPError

PURPOSE_SPLITS = {
    "calibration": ("train", "validation"),
    "fitness": ("validation", "train"),
    "report": ("test",),
}
C4_TRAIN_DOCS = 800  # first 800 documents of the local C4 file calibrate; the last 200 evaluate
C4_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
C4_VALID_FILE = "c4/olmo-test-fixture.c4-sample.00000-of-00001.json.gz"


def data_dir() -> Path | None:
    """The local data directory: $METRICGP_DATA; else `shared/data` beside the repository or the
    working directory or any of their parents (../shared/data in a checkout); else, for a clone
    of a local checkout, the one beside its origin. None when there is none (hub fallback)."""
    env = os.environ.get("METRICGP_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    for start in (repo, Path.cwd().resolve(), _local_origin(repo)):
        if start is None:
            continue
        for folder in (start, *start.parents):
            if (folder / "shared" / "data").is_dir():
                return folder / "shared" / "data"
    return None


def _local_origin(repo: Path) -> Path | None:
    """The directory a git clone was made from, when that was a local path."""
    try:
        url = subprocess.run(["git", "config", "--get", "remote.origin.url"], cwd=repo, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.replace("file://", "") else None
    return path.resolve() if path is not None and path.is_dir() else None


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _local_wikitext2(root: Path, split: str) -> str | None:
    name = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}[split]
    path = root / "wikitext-2-raw" / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _local_ptb(root: Path, split: str) -> str | None:
    name = {"train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"}[split]
    path = root / "ptb" / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _local_c4(root: Path, split: str) -> list[str] | None:
    if split == "validation":
        path = root / C4_VALID_FILE
        return _read_jsonl(path) if path.is_file() else None
    path = root / C4_FILE
    if not path.is_file():
        return None
    docs = _read_jsonl(path)
    return docs[:C4_TRAIN_DOCS] if split == "train" else docs[C4_TRAIN_DOCS:]


def _hub_text(source: str, split: str) -> str | list[str]:
    """Online fallback through `datasets` (not reachable on offline machines)."""
    try:
        from datasets import load_dataset

        if source == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if source == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return "\n".join(ds["sentence"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files={split: files.get(split, files["validation"])}, split=split)
        return list(ds["text"][:1000])
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
        raise MetricGPError(
            f"{source}/{split} is not in the local data directory ({data_dir()}; set METRICGP_DATA to a "
            "folder holding wikitext-2-raw/, c4/, ptb/) and the hub failed: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


_LOCAL = {"wikitext2": _local_wikitext2, "ptb": _local_ptb, "c4": _local_c4}
SOURCES = tuple(_LOCAL)


@dataclass(frozen=True)
class DataRef:
    """A source and a split. `source` is a known name or a path to a .txt/.jsonl file."""

    source: str
    split: str

    def __str__(self) -> str:
        return f"{self.source}:{self.split}"


def parse_data_ref(text: str, purpose: str) -> DataRef:
    """'wikitext2' / 'c4:validation' / 'path/to/file.txt' -> DataRef, validated for `purpose`."""
    if purpose not in PURPOSE_SPLITS:
        raise ValueError(f"unknown purpose {purpose}")
    source, _, split = text.partition(":") if text.split(":")[0] in SOURCES else (text, "", "")
    if source not in SOURCES:
        path = Path(source).expanduser()
        if not path.is_file():
            raise MetricGPError(f"data '{text}' is neither a known dataset ({', '.join(SOURCES)}) nor a file")
        # A user's file has no split of its own: it is what they said it is for.
        return DataRef(str(path), "file")
    split = split or _default_split(source, purpose)
    allowed = PURPOSE_SPLITS[purpose]
    if split not in ("train", "validation", "test"):
        raise MetricGPError(f"unknown split '{split}' in '{text}' (train, validation, test)")
    if split not in allowed:
        raise MetricGPError(
            f"{source}:{split} cannot be used for {purpose}: {purpose} uses {' or '.join(allowed)} "
            "(the test split is reserved for reports)"
        )
    return DataRef(source, split)


def parse_report_data(text: str) -> list[str]:
    """A comma-separated list of evaluation data ('wikitext2,c4,ptb' or files), each checked for reports."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise MetricGPError("no evaluation data named")
    for name in names:
        parse_data_ref(name, "report")
    return names


def _default_split(source: str, purpose: str) -> str:
    root = data_dir()
    for split in PURPOSE_SPLITS[purpose]:
        if root is None or _LOCAL[source](root, split) is not None:
            return split
    return PURPOSE_SPLITS[purpose][0]


def load_text(ref: DataRef) -> str | list[str]:
    """The raw text of a split: one string, or a list of documents (C4, .jsonl files)."""
    if ref.split == "file":
        path = Path(ref.source)
        return _read_jsonl(path) if path.suffix in (".jsonl", ".gz") else path.read_text(encoding="utf-8")
    root = data_dir()
    local = _LOCAL[ref.source](root, ref.split) if root is not None else None
    return local if local is not None else _hub_text(ref.source, ref.split)


def token_stream(ref: DataRef, tokenizer) -> torch.Tensor:
    """The split as one 1-D token tensor; documents are joined with the EOS token."""
    text = load_text(ref)
    if isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = [t for doc in tokenizer(text, add_special_tokens=False)["input_ids"] for t in doc + eos]
    if not ids:
        raise MetricGPError(f"{ref} is empty")
    return torch.tensor(ids, dtype=torch.long)


def windows(
    ref: DataRef, tokenizer, purpose: str, seqlen: int, n_windows: int | None, seed: int = 0
) -> torch.Tensor:
    """Token windows of shape (n, seqlen).

    Calibration samples random windows (seeded, Wanda-style). Fitness and report windows are the
    first `n_windows` consecutive non-overlapping windows (all of them when n_windows is None),
    so every candidate and every report sees the same tokens.
    """
    if ref.split == "test" and purpose != "report":
        raise MetricGPError(f"{ref} is a test split; only reports may read it")
    if seqlen < 2:
        raise MetricGPError(f"seqlen must be at least 2, got {seqlen}")
    stream = token_stream(ref, tokenizer)
    total = stream.numel() // seqlen
    if total == 0:
        raise MetricGPError(f"{ref} has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if purpose == "calibration":
        n = n_windows or total
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=gen)
        return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    n = total if n_windows is None else min(n_windows, total)
    return stream[: n * seqlen].view(n, seqlen)

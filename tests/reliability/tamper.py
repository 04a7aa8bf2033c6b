"""Ways to damage a checkpoint on purpose (tests of the reliability suite): code-carrying pickles,
edited meta.json / train_state.json with checksums made valid again, so only the loader's own checks
stand between the damage and a crash (or code execution)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path, wrap: str) -> None:
    """A torch.save file whose object graph hides the payload where the real file keeps its data."""
    obj = {"optimizer": {"state": {0: {"exp_avg": Payload(marker)}}, "param_groups": []},
           "scheduler": {"last_epoch": Payload(marker)},
           "rng": {"random_state": Payload(marker), "torch_manual_seed": torch.get_rng_state()},
           "weights": {"w": torch.zeros(2), "x": Payload(marker)}}[wrap]
    torch.save(obj, path)


def rechecksum(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def edit_json(path: Path, fn) -> None:
    """Replace a JSON file by fn(parsed) (fn may return any JSON value, or a str written verbatim)."""
    value = fn(json.loads(path.read_text()))
    path.write_text(value if isinstance(value, str) else json.dumps(value))

"""Local ESM checkpoints (ESMFold, ESM-2): path checks, identity, loading, rank sharding, atomic files.

Nothing here downloads: every model is read from a local directory with `local_files_only=True`.
The top level is torch-free so that diffold.config can call resolve_local_models().
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from diffold.config import Config, ConfigError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PLM_MARKER = "plm_model.json"   # in data.feature_dir: which model and layer made the features there
_HOW = {  # how to get each model onto a machine without internet (README "Predicted structures")
    "esmfold": ("download facebook/esmfold_v1 on a machine with internet (hf download facebook/esmfold_v1 "
                "--local-dir DIR) and point model.structure_encoder.esmfold_path at it, or set "
                "model.structure_encoder.use_esmfold=false and data.use_predicted_structures=false"),
    "plm": ("download an ESM-2 model on a machine with internet (e.g. hf download facebook/esm2_t33_650M_UR50D "
            "--local-dir DIR) and point model.structure_encoder.plm_path at it, or set "
            "model.structure_encoder.plm_path=null"),
}


def check_model_dir(path: str | None, key: str, folding: bool) -> dict:
    """config.json of a local ESM checkpoint directory, or a one-line ConfigError that says how to get one."""
    how = _HOW["esmfold" if folding else "plm"]
    p = Path(path).expanduser() if path else None
    if p is None or not (p / "config.json").is_file():
        raise ConfigError(f"{key}={path} not found: {how}")
    try:
        conf = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{key}={path}: unreadable config.json ({type(e).__name__}); {how}") from None
    if not isinstance(conf, dict) or conf.get("model_type") != "esm":
        kind = conf.get("model_type") if isinstance(conf, dict) else type(conf).__name__
        raise ConfigError(f"{key}={path} holds a '{kind}' model, not an ESM one; {how}")
    if bool(conf.get("is_folding_model")) != folding:
        what = "an ESMFold (EsmForProteinFolding)" if folding else "an ESM-2 language model (EsmModel)"
        raise ConfigError(f"{key}={path} is not {what} checkpoint (config.json is_folding_model="
                          f"{conf.get('is_folding_model')}); {how}")
    if not _weight_files(p):
        raise ConfigError(f"{key}={path} has config.json but no weights (*.safetensors / *.bin); {how}")
    if not folding and not any((p / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise ConfigError(f"{key}={path} has no tokenizer (vocab.txt); download the whole model repo. {how}")
    return conf


def _weight_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def model_identity(path: str | Path) -> str:
    """16-hex id of a local checkpoint: config.json + each weight file's name, size and first/last MiB.

    Cheap (no full read of multi-GB weights) and stable under copying, unlike mtimes.
    """
    p = Path(path).expanduser()
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in _weight_files(p):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_local_models(cfg: Config) -> Config:
    """load_config's last step: check local ESMFold / ESM-2 dirs; set model.feature_dim and data.feature_dir.

    With model.structure_encoder.plm_path, features are the PLM's hidden states, so model.feature_dim is
    set to its hidden size (a different non-zero value is an error) and data.feature_dir defaults to
    <cache_dir>/plm/<model id>-layer<k>.
    """
    se, d = cfg.model.structure_encoder, cfg.data
    if d.use_predicted_structures and cfg.task != "protein":
        raise ConfigError(f"data.use_predicted_structures=true: ESMFold predicts proteins only, task is {cfg.task}; "
                          "give RNA structure files or set data.use_predicted_structures=false")
    if se.use_esmfold:
        check_model_dir(se.esmfold_path, "model.structure_encoder.esmfold_path", folding=True)
    if not se.plm_path:
        return cfg
    if cfg.task != "protein":
        raise ConfigError(f"model.structure_encoder.plm_path: ESM-2 is a protein language model, task is {cfg.task}; "
                          "set model.structure_encoder.plm_path=null")
    conf = check_model_dir(se.plm_path, "model.structure_encoder.plm_path", folding=False)
    hidden, layers = int(conf["hidden_size"]), int(conf["num_hidden_layers"])
    if not -(layers + 1) <= se.plm_layer <= layers:
        raise ConfigError(f"model.structure_encoder.plm_layer={se.plm_layer} is out of range for a {layers}-layer "
                          f"model (0 = embeddings .. {layers}, or -1 = last)")
    if cfg.model.feature_dim not in (0, hidden):
        raise ConfigError(f"model.feature_dim={cfg.model.feature_dim} but the PLM at {se.plm_path} has hidden size "
                          f"{hidden}; set model.feature_dim={hidden} (or 0: set automatically)")
    ident = plm_identity(se.plm_path, se.plm_layer)
    fdir = Path(d.feature_dir) if d.feature_dir else \
        Path(d.cache_dir or ".cache/diffold") / "plm" / f"{ident['model']}-layer{ident['layer']}"
    seen = read_marker(fdir)
    if seen is not None and seen != ident:
        raise ConfigError(f"data.feature_dir={fdir} holds features of another PLM or layer ({seen}, now {ident}); "
                          "point data.feature_dir at a new directory (or null for the default) or delete it")
    model = dataclasses.replace(cfg.model, feature_dim=hidden)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(d, feature_dir=str(fdir)))


def plm_identity(plm_path: str, plm_layer: int) -> dict:
    """What made a feature directory: PLM id, hidden-state layer (-1 resolved) and width."""
    conf = json.loads((Path(plm_path).expanduser() / "config.json").read_text(encoding="utf-8"))
    layers = int(conf["num_hidden_layers"])
    return {"model": model_identity(plm_path), "layer": plm_layer % (layers + 1),  # -1 == last: one cache
            "hidden_size": int(conf["hidden_size"])}


def read_marker(feature_dir: Path) -> dict | None:
    """The PLM marker of a feature directory ({} if unreadable), None if there is none."""
    marker = Path(feature_dir) / PLM_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}


# --------------------------------------------------------------------------- loading
def inference_device():
    """This process's accelerator (accelerate has set the current CUDA device per rank), else CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def half_dtype(device):
    """bf16 where the GPU supports it (no overflow), else fp16; None on CPU (fp32 there)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pretrained(cls, path: str | Path, **kwargs):
    """cls.from_pretrained from a local directory only (never the Hub), in eval mode without gradients."""
    model = cls.from_pretrained(str(Path(path).expanduser()), local_files_only=True, **kwargs)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- ranks and files
def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group): all ranks then see all shards' files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def owner(key: str, world: int) -> int:
    """Rank that computes item `key` (a hex hash): stable, so ranks never duplicate or miss work."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % world


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a unique temp file + rename: readers never see half a file, even with several ranks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""What the data pipeline used and skipped, per split (data_report.json, docs/run_directory.md)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class SplitReport:
    """What one split used and skipped."""

    files_seen: int = 0
    chains_used: int = 0
    by_kind: Counter = field(default_factory=Counter)  # every parsed chain by molecule kind
    skipped: Counter = field(default_factory=Counter)  # reason category -> count
    skipped_items: list[dict] = field(default_factory=list)
    cropped: int = 0
    ids: list[str] = field(default_factory=list)

    def skip(self, source: str, chain: str | None, reason: str) -> None:
        """Count one skipped item under its category (the reason before ': ') and keep the full line."""
        self.skipped[reason.split(": ", 1)[0]] += 1
        self.skipped_items.append({"source": source, "chain": chain, "reason": reason})

    def top_reasons(self, n: int = 3) -> str:
        return ", ".join(f"{r} x{c}" for r, c in self.skipped.most_common(n)) or "nothing was found"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["by_kind"], d["skipped"] = dict(self.by_kind), dict(self.skipped)
        return d


@dataclass
class DataReport:
    """Per-split reports plus how train/val were split and what the featurization cache did."""

    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)
    split_method: str = "separate files"
    cache_hit: dict[str, bool] = field(default_factory=dict)  # source path -> nothing had to be parsed
    featurization: dict[str, dict] = field(default_factory=dict)  # source path -> files parsed/reused, workers, s
    clustering: dict = field(default_factory=dict)  # method (mmseqs2 / built-in), settings, clusters, reused
    preprocessing: dict = field(default_factory=dict)  # predicted-structure / PLM-feature pass counts

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "val": self.val.to_dict(),
                "split_method": self.split_method, "cache_hit": dict(self.cache_hit),
                "featurization": dict(self.featurization), "clustering": dict(self.clustering),
                "preprocessing": dict(self.preprocessing)}

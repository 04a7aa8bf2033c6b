"""Cheap device/host memory statistics for logging and the health monitor (log interval only).

Keys: device_gb (peak allocated by this process), device_used_gb / device_total_gb / device_share
(whole GPU, other processes included: that is what runs out), host_gb (this process's RSS),
host_total_gb / host_share (used share of the host or, if tighter, of the container's cgroup limit;
dataloader workers count). Values are None where the platform cannot tell.
"""
from __future__ import annotations

import functools
import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional

GB = float(1 << 30)
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def memory_stats(device: Any = None) -> dict[str, Optional[float]]:
    """Memory use of `device` (a torch.device or string; CUDA only for device keys) and of the host."""
    out: dict[str, Optional[float]] = dict.fromkeys(
        ("device_gb", "device_used_gb", "device_total_gb", "device_share"), None
    )
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(device)
            out["device_gb"] = torch.cuda.max_memory_allocated(device) / GB
            out["device_used_gb"] = (total - free) / GB
            out["device_total_gb"] = total / GB
            out["device_share"] = (total - free) / total if total else None
    out.update(host_memory())
    return out


def host_memory() -> dict[str, Optional[float]]:
    """This process's RSS and the host (or cgroup) used share."""
    rss = _rss_bytes()
    shares = []
    total_gb = None
    meminfo = _read_kv(Path("/proc/meminfo"))
    if "MemTotal" in meminfo and "MemAvailable" in meminfo:
        total, avail = meminfo["MemTotal"] * 1024, meminfo["MemAvailable"] * 1024
        shares.append(1.0 - avail / total)
        total_gb = total / GB
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        total_gb = total / GB
        if "SC_AVPHYS_PAGES" in os.sysconf_names:  # free pages: an upper bound on the used share
            shares.append(1.0 - os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / total)
    cgroup = _cgroup_usage()
    if cgroup is not None and (total_gb is None or cgroup[1] / GB < total_gb):
        shares.append(cgroup[0] / cgroup[1])
        total_gb = cgroup[1] / GB
    return {
        "host_gb": rss / GB if rss is not None else None,
        "host_total_gb": total_gb,
        "host_share": max(shares) if shares else None,
    }


def _rss_bytes() -> Optional[int]:
    """Current resident set size; falls back to the peak RSS from `resource` off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@functools.lru_cache(maxsize=1)
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _read_kv(path: Path) -> dict[str, int]:
    """'Key: 123 kB' or 'key 123' lines -> {key: 123}; {} if the file is absent."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_usage() -> Optional[tuple[int, int]]:
    """(working-set bytes, limit bytes) of this container's memory cgroup, if it has a real limit."""
    for root, limit_f, usage_f, inactive_key in (
        (_CGROUP_V2, "memory.max", "memory.current", "inactive_file"),
        (_CGROUP_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        limit = _read_int(root / limit_f)
        usage = _read_int(root / usage_f)
        if limit is None or usage is None or limit >= 1 << 60:  # v1 reports ~2^63 for "unlimited"
            continue
        # Page cache can be reclaimed; the working set (usage - inactive file) is what the OOM killer sees.
        inactive = _read_kv(root / "memory.stat").get(inactive_key, 0)
        return max(usage - inactive, 0), limit
    return None

"""Sampling this machine's resources with psutil (and NVML when pynvml and a GPU are present).

Everything here blocks (psutil reads /proc, NVML talks to the driver), so the agent calls
:func:`sample` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable

import psutil

from protos.node import GpuInfo, Heartbeat

log = logging.getLogger("magi.agent.resources")

GB = 1024**3
DEGRADED_PERCENT = 90.0
LABELS_ENV = "MAGI_NODE_LABELS"
HOME_ENV = "MAGI_HOME"


def labels_from_env(raw: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}``; items without ``=`` or with an empty key are ignored."""
    labels = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            labels[key.strip()] = value.strip()
    return labels


@functools.lru_cache(maxsize=1)
def nvml_available() -> bool:
    """Whether GPUs can be read at all; probed once, since drivers and pynvml do not appear at runtime."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # pynvml without a driver or GPU: a CPU node
        return False
    return True


def gpus() -> list[GpuInfo]:
    """Every NVIDIA GPU with its memory; an empty list on CPU nodes or when NVML fails."""
    if not nvml_available():
        return []
    import pynvml

    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(GpuInfo(name=name if isinstance(name, str) else name.decode(),
                                 memory_total_gb=round(mem.total / GB, 2), memory_used_gb=round(mem.used / GB, 2)))
        return found
    except Exception as exc:  # a GPU that vanished mid-read must not cost the node its heartbeat
        log.warning("could not read GPUs", extra={"error": str(exc)})
        return []
    finally:
        pynvml.nvmlShutdown()


def disk_anchor(home: Path) -> Path:
    """The MAGI home, or its nearest existing parent: the home may not be created yet, its filesystem is."""
    path = home.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def sample(node_name: str, seq: int, instances: Iterable[str] = (), *, home: Path | None = None) -> Heartbeat:
    """One heartbeat with this machine's current figures (blocking; call it off the event loop)."""
    home = home if home is not None else Path(os.environ.get(HOME_ENV, ".magi"))
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_anchor(home)))
    degraded = mem.percent > DEGRADED_PERCENT or disk.percent > DEGRADED_PERCENT
    return Heartbeat(
        node=node_name, seq=seq, sent_at=time.time(), host=socket.gethostname(),
        # interval=None: the CPU share since the previous call, without sleeping here.
        cpu_count=psutil.cpu_count() or 0, cpu_percent=psutil.cpu_percent(interval=None),
        load_1m=round(psutil.getloadavg()[0], 2),
        # "used" as total - available, the same basis psutil computes mem.percent on.
        ram_total_gb=round(mem.total / GB, 2), ram_used_gb=round((mem.total - mem.available) / GB, 2),
        ram_percent=round(mem.percent, 2), disk_total_gb=round(disk.total / GB, 2), disk_percent=round(disk.percent, 2),
        gpus=gpus(), instances=list(instances),
        health="DEGRADED" if degraded else "HEALTHY",
        labels=labels_from_env(os.environ.get(LABELS_ENV, "")),
    )


def prime_cpu_percent() -> None:
    """The first non-blocking cpu_percent() reads 0.0; a call at start makes the first heartbeat meaningful."""
    psutil.cpu_percent(interval=None)

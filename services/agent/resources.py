"""Sampling this machine's resources with psutil (and NVML when a GPU and pynvml are present)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil

from protos.node import GpuInfo, Heartbeat

GB = 1024**3
DEGRADED_PERCENT = 90.0


def labels_from_env(raw: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver or no GPU: a CPU node
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
    finally:
        pynvml.nvmlShutdown()


def sample(node: str, seq: int, disk_path: Path, instances: list[str] | None = None, gpu_list=None) -> Heartbeat:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path if disk_path.exists() else Path("/")))
    degraded = mem.percent > DEGRADED_PERCENT or disk.percent > DEGRADED_PERCENT
    return Heartbeat(
        node=node, seq=seq, sent_at=time.time(), host=socket.gethostname(),
        cpu_count=psutil.cpu_count() or 0, cpu_percent=psutil.cpu_percent(interval=None),
        load_1m=round(os.getloadavg()[0], 2),
        ram_total_gb=round(mem.total / GB, 2), ram_used_gb=round((mem.total - mem.available) / GB, 2),
        ram_percent=mem.percent, disk_total_gb=round(disk.total / GB, 2), disk_percent=disk.percent,
        gpus=gpu_list if gpu_list is not None else [], instances=list(instances or []),
        health="DEGRADED" if degraded else "HEALTHY",
        labels=labels_from_env(os.environ.get("MAGI_NODE_LABELS", "")),
    )

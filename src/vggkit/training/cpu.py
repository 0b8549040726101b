"""What the CPU is, read once from /proc/cpuinfo: the engine picks its precision by it, and
the fused kernels are built once per CPU kind."""

from __future__ import annotations

import functools


@functools.cache
def cpu_info(field: str) -> str:
    """One field of /proc/cpuinfo's first processor ("flags", "model name", "cpu family"), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset(cpu_info("flags").split())

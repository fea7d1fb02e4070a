"""What the CPU this process runs on reports of itself (Linux ``/proc/cpuinfo``): model, family/model, ISA flags.

Every benchmark row and every run's ``config.json`` names the CPU and the ISA that decides its
speed (AVX2, AVX-512 VPOPCNTDQ, AVX512-BF16, AMX), since development machines differ from one
day to the next.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

ISA_FLAGS = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@cache
def _first_cpu() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    """The ISA flags the kernel reports for this CPU; empty where it reports none."""
    return set(_first_cpu().get("flags", "").split())


def cpu_model() -> str:
    """E.g. "Intel(R) Xeon(R) Processor" (the machine type where the kernel names no model)."""
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str:
    fields = _first_cpu()
    return f"{fields['cpu family']}/{fields['model']}" if "cpu family" in fields and "model" in fields else ""


def isa() -> str:
    """The speed-relevant ISA flags this CPU has, space-separated, in :data:`ISA_FLAGS` order."""
    flags = cpu_flags()
    return " ".join(f for f in ISA_FLAGS if f in flags)


__all__ = ["ISA_FLAGS", "cpu_family_model", "cpu_flags", "cpu_model", "isa"]

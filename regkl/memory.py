"""Memory checks before work: the memory available (``MemAvailable``, capped by a cgroup limit;
``REGKL_MEMORY_LIMIT_GB`` overrides) against the memory an image needs, refused up front with
both figures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import InputError


#: float32 copies of the 3D volume a registration keeps besides the image (pyramid, output, masks).
WORKING_COPIES = 4
_GIB = float(1 << 30)


def _read_int(path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None if unlimited/unknown."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                candidates.append(Path("/sys/fs/cgroup") / parts[2].lstrip("/"))
    except OSError:
        pass
    candidates.append(Path("/sys/fs/cgroup"))
    for base in candidates:  # cgroup v2
        limit = _read_int(base / "memory.max")
        usage = _read_int(base / "memory.current")
        if limit is not None and usage is not None:
            return max(limit - usage + _stat_field(base / "memory.stat", "inactive_file"), 0)
    base = Path("/sys/fs/cgroup/memory")  # cgroup v1
    limit = _read_int(base / "memory.limit_in_bytes")
    usage = _read_int(base / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < (1 << 60):
        return max(limit - usage + _stat_field(base / "memory.stat", "total_inactive_file"), 0)
    return None


def _stat_field(path, key) -> int:
    """A field of a cgroup memory.stat file (reclaimable page cache), 0 if absent."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def available_memory() -> int | None:
    """Bytes of memory regkl may still use, or None when unknown.

    ``REGKL_MEMORY_LIMIT_GB`` (GiB) if set; otherwise the kernel's ``MemAvailable`` (free memory
    plus reclaimable cache; ``SC_AVPHYS_PAGES`` where there is no /proc), capped by the room left
    under a cgroup (container) memory limit.
    """
    override = os.environ.get("REGKL_MEMORY_LIMIT_GB")
    if override:
        try:
            return int(float(override) * _GIB)
        except ValueError:
            pass
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def memory_needed(shape, itemsize: int, *, compressed: bool = False, scaled: bool = False) -> int:
    """Bytes needed to read an image of ``shape`` and register it (an estimate, on the high side).

    The file's data (twice for a gzip file: the decompressed bytes and the array), one float copy
    of the whole image (float64 when scaled by scl_slope/inter) and :data:`WORKING_COPIES` float32
    copies of the 3D volume.
    """
    n = math.prod(int(s) for s in shape)
    n3 = math.prod(int(s) for s in tuple(shape)[:3])
    raw = n * int(itemsize)
    return raw * (2 if compressed else 1) + n * (8 if scaled else 4) + n3 * 4 * WORKING_COPIES


def check_memory(shape, dtype, path, *, compressed: bool = False, scaled: bool = False, extra: int = 0) -> None:
    """Refuse (InputError, with the figures in GiB) an image that does not fit in memory.

    ``extra``: bytes read besides the image data (the NIfTI header and extensions).
    """
    need = memory_needed(shape, np.dtype(dtype).itemsize, compressed=compressed, scaled=scaled) + int(extra)
    avail = available_memory()
    if avail is not None and need > avail:
        raise InputError(f"image of shape {tuple(int(s) for s in shape)} ({np.dtype(dtype).name}) needs about "
                         f"{_gib(need)} GiB of memory to load and register, but only {_gib(avail)} GiB is "
                         "available (set REGKL_MEMORY_LIMIT_GB to override)", path=path)


def _gib(nbytes) -> str:
    g = nbytes / _GIB
    return f"{g:.0f}" if g >= 10 else f"{g:.1f}" if g >= 0.1 else f"{g:.3g}"

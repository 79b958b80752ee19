"""Host memory of long training processes: make glibc give large freed buffers back to the operating system.

Why: glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps it on
``free``; smaller ones come from the heap, whose free space stays mapped. By default the threshold is *dynamic*:
each time an mmapped block is freed, the threshold rises to that block's size (up to 32 MiB on 64-bit). A
sharded training step allocates and frees many buffers of a few MiB (FSDP2 all-gathers parameters and
reduce-scatters gradients block by block), so after the first frees those buffers land on the heap and the
process keeps their peak footprint. Measured on the ViT-L/14 step over 4 gloo ranks: 4.1-4.2 GB per rank with
the dynamic threshold, 2.87 GB with a fixed 4 MiB one (docs/benchmarks.md). Setting the threshold by hand
also turns the dynamic adjustment off.

The setting changes where memory comes from, not what is computed: results are bit-identical. On a system
without glibc (musl, macOS) it is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> parameter number


def set_mmap_threshold(mib: float | None) -> bool:
    """Serve allocations of at least ``mib`` MiB with their own mmap (returned to the OS on free).

    Args:
        mib: the fixed threshold in MiB; ``None`` leaves glibc's dynamic default untouched. glibc caps the
            threshold at 32 MiB on 64-bit systems.

    Returns:
        True when glibc accepted the setting; False when ``mib`` is None, there is no glibc, or it refused.
    """
    if mib is None:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt here: the mmap threshold stays the system's default")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = mallopt(_M_MMAP_THRESHOLD, int(mib * 1024 * 1024)) == 1
    if not accepted:
        log.warning("glibc refused an mmap threshold of %s MiB (it allows at most 32 MiB)", mib)
    return accepted


__all__ = ["set_mmap_threshold"]

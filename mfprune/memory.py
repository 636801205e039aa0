"""How much memory there is, and whether a model of a given size fits in it.

``available_bytes`` reads what the kernel says can be allocated without swapping
(``MemAvailable`` in /proc/meminfo, or the cgroup's limit minus its usage when that is lower), or
``torch.cuda.mem_get_info`` on a GPU. ``check_fits`` refuses, with the numbers, a whole-model load
that would not fit. Both answer None / pass where the machine does not say (not Linux).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfprune.errors import MfpruneError

#: a loaded model needs its weights plus working memory (activations, the framework's own);
#: this share of the available memory is what a whole-model load may take.
USABLE_SHARE = 0.9


class NotEnoughMemory(MfpruneError):
    """A whole model would not fit in the memory there is."""


def human_bytes(n: float) -> str:
    """Decimal units, e.g. ``1.50 GB``; the same style as every mfprune table."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def available_bytes(device: Any = None) -> int | None:
    """Memory a new allocation can take now on ``device`` (a torch.device, "cpu" or None)."""
    kind = getattr(device, "type", device) or "cpu"
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _ram_available()


def _ram_available() -> int | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            found = int(line.split()[1]) * 1024
    cgroup = _cgroup_free()
    if cgroup is not None:
        found = cgroup if found is None else min(found, cgroup)
    return found


def _cgroup_free() -> int | None:
    """cgroup v2 ``memory.max - memory.current`` of this process's group, when it has a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        usage = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(int(limit) - usage, 0)


def loaded_bytes(ckpt: Any, dtype: Any = "auto") -> int:
    """Bytes of a checkpoint's tensors once loaded in ``dtype`` (a torch dtype; "auto": as
    stored). Floating-point tensors take the dtype's size, others keep theirs."""
    size = getattr(dtype, "itemsize", None)
    if size is None:
        return int(ckpt.nbytes)
    return sum(
        t.numel * (size if t.dtype.startswith(("F", "BF")) else t.itemsize)
        for t in ckpt.tensors.values()
    )


def check_fits(need: int, *, device: Any = None, what: str, hint: str) -> None:
    """Refuse (NotEnoughMemory) a load of about ``need`` bytes that would not fit on ``device``."""
    free = available_bytes(device)
    if free is None or need <= USABLE_SHARE * free:
        return
    where = "GPU memory" if getattr(device, "type", device) == "cuda" else "RAM"
    raise NotEnoughMemory(
        f"{what} needs about {human_bytes(need)} but only {human_bytes(free)} of {where} is "
        "available",
        hint=hint,
    )

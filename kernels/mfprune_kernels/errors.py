"""The one exception the kernels raise for inputs they cannot handle."""

from __future__ import annotations


class KernelInputError(ValueError):
    """The inputs (shapes, dtypes, device, expert layout) do not fit the kernel.

    The message says what was found and what to do instead.
    """

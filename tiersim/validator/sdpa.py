"""Which SDPA kernels a decode step may use: on Hopper this one setting decides much of an HF eager step's host time."""

from __future__ import annotations

import contextlib

#: ``--sdpa`` choices: ``default`` lets torch pick (cuDNN first on Hopper with torch >= 2.5), ``no-cudnn``
#: excludes cuDNN attention. cuDNN builds an execution plan for every new KV length (measured on an
#: H100, torch 2.11: ~60 ms the first time a length is seen, ~80 us after), and a decode step has a
#: new length every step, so the default path pays the plan build in every step.
SDPA_CHOICES = ("default", "no-cudnn")


@contextlib.contextmanager
def sdpa_backends(choice: str):
    """Restrict SDPA's kernel choice for the block (``no-cudnn``: flash, memory-efficient, math)."""
    if choice == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield

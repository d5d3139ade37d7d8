"""Options shared by every command."""

from __future__ import annotations

import typer

JSON = typer.Option(
    False, "--json", help="Print one JSON document (schema_version 1) on stdout and nothing else."
)
QUIET = typer.Option(False, "-q", "--quiet", help="Print nothing but errors.")
FORCE = typer.Option(False, "--force", help="Replace the output if it exists (never an input).")
FORMAT = typer.Option(None, "--format", help="Adapter format instead of detecting it (peft).")
ALLOW_PICKLE = typer.Option(
    False, "--allow-pickle", help="Accept .bin/.pt/.ckpt pickles (read with torch.load(weights_only=True))."
)
SUBFOLDER = typer.Option(
    None, "--subfolder", help="For a Hub adapter (org/name[@revision]): the folder inside the repo."
)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep and reuse freed memory instead of handing it back to the kernel.

    By default, blocks of a few MB and up are mmap'd and unmapped one by one, and every reuse costs a
    page fault per 4 KiB page, which the kernel must zero first; a 1.1B merge with its receipt took
    about a million such faults, a second or more of system time. The merge and unmerge commands run in
    a short-lived process, so they keep what they free (the library itself never changes the allocator;
    commands that hold whole adapters do not call this, so their memory goes back as they free it).
    No-op where there is no glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: blocks under 256 MiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only past 1 GiB free at the top
    except (OSError, AttributeError):
        pass

"""Writing a model tensor by tensor: read, compute and write overlap on three threads.

Every tensor of the output is either copied from the base unchanged (by the kernel, or through the
O_DIRECT staging buffer) or read, given to its *job* and written. A job is a function of the tensor
read that returns the tensor to write and, optionally, the receipt's parts for it (what an unmerge
needs to restore the original bit for bit); the parts go to ``on_parts`` on the computing thread.
Reading the next tensor, computing this one and writing the previous overlap; at most three tensors
are in memory at once, in buffers from a :class:`~loractl.io.buffers.BufferPool` that are reused from
tensor to tensor. Each finished file is fsynced on another thread while the next one is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .buffers import BufferPool
from .safetensors import SafetensorsWriter, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import BaseModel
    from .layout import Files, OutTensor

#: called with (bytes done, bytes total)
Progress = Callable[[int, int], None]
#: the receipt's parts of one tensor, by part name (see :mod:`loractl.io.receipt`)
Parts = dict[str, "torch.Tensor"]
#: a tensor read -> the tensor to write, and its receipt parts (or None)
Job = Callable[["torch.Tensor"], "tuple[torch.Tensor, Parts | None]"]


def largest_job(base: BaseModel, files: Files, jobs: Mapping[str, object]) -> int:
    """Bytes of the largest tensor a job reads or writes (the size of the streaming buffers)."""
    sizes = [
        max(t.nbytes, base.info(t.name).nbytes)
        for _, items in files
        for t in items
        if t.name in jobs and t.name in base.tensors
    ]
    return max(sizes, default=0)


@dataclass
class Stream:
    """One streaming write of ``files`` from ``base``.

    Attributes:
        base: the model read.
        jobs: the job of each tensor that is computed; the others are copied.
        loaders: how to read tensors that are not stored as such (e.g. 4-bit weights, dequantized).
        on_read: called on the reading thread with each tensor read for a job (e.g. to checksum it).
        on_parts: called with each job's receipt parts.
        progress: called with (bytes done, bytes total), first with (0, total).
        mode: the written files' permission bits.
    """

    base: BaseModel
    jobs: Mapping[str, Job]
    loaders: Mapping[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    on_read: Callable[[str, torch.Tensor], None] | None = None
    on_parts: Callable[[str, Parts], None] | None = None
    progress: Progress | None = None
    mode: int | None = None
    pool: BufferPool | None = None

    def write(self, target: Path, files: Files, metadata_for: Callable[[int, dict[str, str]], dict[str, str]], *, single_file: bool) -> int:
        """Write ``files`` into the folder ``target`` (or, with ``single_file``, as the file ``target``);
        ``metadata_for(file number, source shard's metadata)`` gives each file's header metadata.

        Returns:
            The bytes written.
        """
        self.pool = self.pool or BufferPool(largest_job(self.base, files, self.jobs))
        self._total = sum(t.nbytes for _, items in files for t in items)
        self._done = 0
        self._tick(0)  # the total before the first tensor: a bar of known length from the start
        writers: list[SafetensorsWriter] = []
        syncs: list[Future[None]] = []
        try:
            with (
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="loractl-io") as io,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-sync") as syncer,
            ):
                for fi, (fname, items) in enumerate(files):
                    src_meta = dict(self.base.shards[items[0].src].metadata) if items else {}
                    writer = SafetensorsWriter(
                        target if single_file else target / fname,
                        [(t.name, t.dtype, t.shape) for t in items],
                        metadata_for(fi, src_meta),
                        direct=True,
                        mode=self.mode,
                    )
                    writers.append(writer)
                    self._write_file(writer, items, io)
                    syncs.append(syncer.submit(writer.sync))
                for f in syncs:
                    f.result()
        finally:  # after the threads are done with them
            for w in writers:
                w.close()
        return sum(w.path.stat().st_size for w in writers)

    def _tick(self, nbytes: int) -> None:
        self._done += nbytes
        if self.progress is not None:
            self.progress(self._done, self._total)

    def _read(self, t: OutTensor) -> torch.Tensor | None:
        """The tensor a job needs (None: the tensor is copied); on a reading thread."""
        assert self.pool is not None
        if t.name in self.loaders:
            data = self.loaders[t.name]()
        elif t.name not in self.jobs:
            return None
        else:
            info = self.base.info(t.name)
            data = self.base.read(t.name, out=self.pool.empty(info.shape, torch_dtype(info.dtype)))
        if self.on_read is not None:
            self.on_read(t.name, data)
        return data

    def _compute(self, t: OutTensor, data: torch.Tensor) -> torch.Tensor:
        """Run ``t``'s job on the computing thread; the buffer read goes back to the pool unless the
        job wrote its result into it."""
        assert self.pool is not None
        result, parts = self.jobs[t.name](data)
        if parts is not None and self.on_parts is not None:
            self.on_parts(t.name, parts)
        if result.dtype != torch_dtype(t.dtype):
            result = result.to(torch_dtype(t.dtype))
        if result.untyped_storage().data_ptr() != data.untyped_storage().data_ptr():
            self.pool.release(data)
        return result

    def _write_file(self, writer: SafetensorsWriter, items: list[OutTensor], io: ThreadPoolExecutor) -> None:
        """Every tensor of one file: reading the next, computing this one and writing the previous overlap."""
        pool = self.pool
        assert pool is not None
        pending: Future[None] | None = None
        nxt: Future[torch.Tensor | None] | None = io.submit(self._read, items[0]) if items else None
        for k, t in enumerate(items):
            assert nxt is not None
            data = nxt.result()
            nxt = io.submit(self._read, items[k + 1]) if k + 1 < len(items) else None
            result = None if data is None else self._compute(t, data)
            if pending is not None:
                pending.result()

            def write(t: OutTensor = t, result: torch.Tensor | None = result) -> None:
                if result is None:
                    src = self.base.file_of(t.name)
                    writer.copy_from(t.name, src, src.tensors[t.name])
                else:
                    writer.write(t.name, result)
                    pool.release(result)

            pending = io.submit(write)
            del data, result
            self._tick(t.nbytes)
        if pending is not None:
            pending.result()
        writer.finish()

"""Real text without a download: the Python standard library's own sources and `pydoc_data`'s help topics, as
bytes (a 256-token vocabulary).

Example:
    >>> batches = byte_batches(stdlib_text(["json", "textwrap"]), batch=4, seq=128, count=10)
    >>> batches[0].shape
    torch.Size([4, 128])
"""

from __future__ import annotations

import os
import sysconfig

import torch

VOCAB = 256


def stdlib_text(modules: list[str]) -> bytes:
    """The concatenated sources of standard-library modules (a module name or a package directory name)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks = []
    for name in modules:
        path = os.path.join(root, name.replace(".", os.sep))
        files = [path + ".py"] if os.path.exists(path + ".py") else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py"))
        if not files:
            raise FileNotFoundError(f"no standard-library sources for {name!r} under {root}")
        for file in files:
            with open(file, "rb") as f:
                chunks.append(f.read())
    return b"\n".join(chunks)


def pydoc_text() -> bytes:
    """English prose that every Python ships: the help topics of `pydoc_data` (about 0.5 MB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode()


def byte_batches(text: bytes, batch: int, seq: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches of `batch` random windows of `seq` bytes each, as int64 token ids."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if len(data) <= seq:
        raise ValueError(f"text of {len(data)} bytes is too short for windows of {seq}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq, (count, batch), generator=generator)
    return [torch.stack([data[s:s + seq] for s in row.tolist()]) for row in starts]

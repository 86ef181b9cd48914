"""Read the records of a W&B transaction log (``run-<id>.wandb``) with W&B's own protobuf schema.

wandb 0.31 ships no Python reader for offline runs (its old ``datastore`` module moved into the Go core),
so this follows that module's framing: a 7-byte header (":W&B", id 0xBEE1, version 0), then 32 KiB blocks
of chunks, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    magic, ident, version = struct.unpack("<4sHB", data[:HEADER])
    assert magic == b":W&B" and ident == 0xBEE1, f"{path}: not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # too small for a chunk header: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record

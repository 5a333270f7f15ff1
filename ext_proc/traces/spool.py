"""Durable outage spool: batches the store could not take, replayed in order later.

Each batch is one file named by a sequence number, holding the batch's deduplication
token and its serialized ``ExportRequest``. A file is written to a temporary name,
fsync'd, renamed and its directory fsync'd, so after a crash a batch is either complete
or absent. Replaying with the stored token makes a batch that did reach the store before
the failure a no-op the second time.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SPOOL_LIMIT_BYTES = 1024**3
_MAGIC = b"XTS1"
# magic, token length, payload length, CRC-32 of token and payload
_HEADER = struct.Struct(">4sHII")
_SUFFIX = ".batch"


class SpoolCorrupt(Exception):
    """A spool file is truncated or fails its checksum."""


class Spool:
    """Ordered, size-limited directory of pending batches."""

    def __init__(self, directory: Path, limit_bytes: int = DEFAULT_SPOOL_LIMIT_BYTES) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob("*.tmp"):
            leftover.unlink()
        self._files = sorted(directory.glob("*" + _SUFFIX))
        self._sizes = {path: path.stat().st_size for path in self._files}
        self.size_bytes = sum(self._sizes.values())
        self._next_sequence = int(self._files[-1].stem) + 1 if self._files else 0

    def __len__(self) -> int:
        return len(self._files)

    def append(self, token: str, payload: bytes) -> bool:
        """Store one batch durably; return False, storing nothing, when over the limit."""
        token_bytes = token.encode()
        crc = zlib.crc32(payload, zlib.crc32(token_bytes))
        record = _HEADER.pack(_MAGIC, len(token_bytes), len(payload), crc) + token_bytes + payload
        if self.size_bytes + len(record) > self.limit_bytes:
            return False
        path = self.directory / f"{self._next_sequence:020d}{_SUFFIX}"
        temp = path.with_suffix(".tmp")
        with open(temp, "wb") as handle:
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_directory(self.directory)
        self._next_sequence += 1
        self._files.append(path)
        self._sizes[path] = len(record)
        self.size_bytes += len(record)
        return True

    def oldest(self) -> Path | None:
        return self._files[0] if self._files else None

    def read(self, path: Path) -> tuple[str, bytes]:
        """Return the token and payload stored in ``path``."""
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise SpoolCorrupt(f"{path} is truncated")
        magic, token_length, payload_length, crc = _HEADER.unpack_from(data)
        body = data[_HEADER.size :]
        if magic != _MAGIC or len(body) != token_length + payload_length:
            raise SpoolCorrupt(f"{path} is not a complete spool record")
        token_bytes, payload = body[:token_length], body[token_length:]
        if zlib.crc32(payload, zlib.crc32(token_bytes)) != crc:
            raise SpoolCorrupt(f"{path} fails its checksum")
        return token_bytes.decode(), payload

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._files.remove(path)
        self.size_bytes -= self._sizes.pop(path)

    def quarantine(self, path: Path) -> None:
        """Move an unreadable file aside so that replay can go on."""
        path.rename(path.with_suffix(".corrupt"))
        self._files.remove(path)
        self.size_bytes -= self._sizes.pop(path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

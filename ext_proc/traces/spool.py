"""Durable outage spool: batches the store could not take, replayed in order later.

Each batch is one file named by a sequence number, holding the batch's deduplication
token and its serialized ``ExportRequest``. A file is written to a temporary name,
fsync'd, renamed and its directory fsync'd, so after a crash a batch is either complete
or absent. Replaying with the stored token makes a batch that did reach the store before
the failure a no-op the second time.

``WriteAheadLog`` is the collector's log of accepted exports that are not yet written or
spooled. It is not fsync'd, so it survives a kill of the process, but a power loss can
lose what the kernel had not yet written to disk.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from ext_proc.pb import trace_pb2

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


# Write-ahead log records: magic, kind, sequence number, body length, CRC-32 of kind,
# number and body.
_WAL_MAGIC = b"XTW1"
_WAL_HEADER = struct.Struct(">4sBQII")
_WAL_NUMBERS = struct.Struct(">BQ")
_WAL_EXPORT = 1  # number: the export's sequence number; body: its ExportRequest bytes
_WAL_BATCH = 2  # number: the batch's first sequence number; body: last number, token
_WAL_LAST = struct.Struct(">Q")
_WAL_SUFFIX = ".wal"
# A segment is closed once it is this large, and deleted once all of its exports are
# written or spooled. The current segment is truncated instead whenever the writer has
# caught up, so under steady load the log stays near one flush interval of traffic.
WAL_SEGMENT_BYTES = 64 * 1024**2
# Maximum payload bytes of one spool batch made from exports that no batch had taken.
_WAL_RECOVERY_BATCH_BYTES = 16 * 1024**2


class WriteAheadLog:
    """
    Append-only log of accepted exports, kept until the writer has stored or spooled them.

    The collector appends each export before acknowledging it, so an acknowledged export
    survives a kill of the collector process: the data is in the kernel's page cache once
    ``write`` returns. There is no fsync per export, so a power loss or kernel crash can
    lose the exports not yet written back (on Linux, by default up to about 30 s:
    vm.dirty_expire_centisecs).

    Before inserting a batch, the writer records its token and the exports it covers
    (``mark_batch``), and after storing or spooling it calls ``release``. ``recover``
    moves what a killed collector left into the spool with each batch's token, so a
    batch that reached the store before the kill is deduplicated by the store.

    Segments are named ``<run>.<first sequence number>.wal``. The run id starts with the
    start time, so names sort in write order and tokens made from them are unique.
    """

    def __init__(self, directory: Path, segment_bytes: int = WAL_SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._run = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._next_sequence = 0
        self._batched_upto = -1
        self._released_upto = -1
        # Closed segments, oldest first, with the last sequence number each contains.
        self._closed: deque[tuple[Path, int]] = deque()
        self._path, self._fd, self._size = self._open_segment()

    def _open_segment(self) -> tuple[Path, int, int]:
        path = self.directory / f"{self._run}.{self._next_sequence:020d}{_WAL_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        return path, fd, 0

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append exports; on OSError none of them stays in the log."""
        with self._lock:
            if self._size >= self.segment_bytes:
                os.close(self._fd)
                self._closed.append((self._path, self._next_sequence - 1))
                self._path, self._fd, self._size = self._open_segment()
            records = []
            for offset, payload in enumerate(payloads):
                records += _wal_record(_WAL_EXPORT, self._next_sequence + offset, payload)
            self._write(records)
            self._next_sequence += len(payloads)

    def mark_batch(self, token: str, count: int) -> int:
        """Record that the next ``count`` exports are inserted with ``token``; return the
        last one's sequence number."""
        with self._lock:
            first = self._batched_upto + 1
            last = first + count - 1
            self._batched_upto = last
            try:
                body = _WAL_LAST.pack(last) + token.encode()
                self._write(_wal_record(_WAL_BATCH, first, body))
            except OSError as exc:
                # Without the record, recovery gives these exports a new token, so a
                # batch that reached the store before a kill would be stored twice.
                logger.error("failed to record trace batch %s in %s: %s", token, self.directory, exc)
            return last

    def release(self, last: int) -> None:
        """Forget the exports up to sequence number ``last``, which are stored or spooled."""
        with self._lock:
            self._released_upto = last
            while self._closed and self._closed[0][1] <= last:
                path, _ = self._closed.popleft()
                path.unlink(missing_ok=True)
            if last >= self._next_sequence - 1 and self._size:
                os.ftruncate(self._fd, 0)
                self._size = 0

    def close(self) -> None:
        """Close the log, deleting every segment once all exports are released."""
        with self._lock:
            os.close(self._fd)
            if self._released_upto >= self._next_sequence - 1 and not self._closed:
                self._path.unlink(missing_ok=True)

    def _write(self, buffers: list[bytes]) -> None:
        total = sum(len(buffer) for buffer in buffers)
        try:
            written = os.writev(self._fd, buffers)
            if written < total:
                rest = b"".join(buffers)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError:
            # Cut partly written records, so that records appended later stay readable.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += total

    @staticmethod
    def recover(directory: Path, spool: Spool) -> list[str]:
        """
        Move the exports a stopped or killed collector left in ``directory`` to ``spool``.

        Exports that a batch record covers are spooled with that batch's token. The rest
        are spooled in batches with tokens made from the run id and sequence numbers, so
        a recovery that is itself interrupted and run again writes nothing twice. Returns
        the trace ids of the exports moved, oldest first: the last export may have been
        stored without its acknowledgement reaching the exporter, which then sends it
        again. Segments are deleted once their exports are spooled.

        A damaged record (failed checksum) or a record that does not decode is skipped,
        with an error logged, and reading goes on at the next valid record. Its segment
        is then kept as ``<segment>.corrupt`` for inspection.
        """
        if not directory.is_dir():
            return []
        segments = sorted(directory.glob("*" + _WAL_SUFFIX))
        runs: dict[str, list[Path]] = {}
        for path in segments:
            runs.setdefault(path.name.split(".", 1)[0], []).append(path)
        moved = 0
        trace_ids: list[str] = []
        for run, paths in runs.items():
            records = _RunRecords()
            for path in paths:
                _read_segment(path, records)
            _drop_finished_batches(run, records)
            moved += len(records.exports)
            for number in sorted(records.exports):
                trace_ids += records.trace_ids[number]
            exports = records.exports
            for token, first, last in records.batches:
                payloads = [exports.pop(n) for n in range(first, last + 1) if n in exports]
                if payloads:
                    _spool_recovered(spool, token, payloads)
            group: list[int] = []
            size = 0
            for number in sorted(exports):
                group.append(number)
                size += len(exports[number])
                if size >= _WAL_RECOVERY_BATCH_BYTES:
                    _spool_group(spool, run, group, exports)
                    group, size = [], 0
            if group:
                _spool_group(spool, run, group, exports)
            for path in paths:
                if path in records.damaged:
                    os.replace(path, _corrupt_path(path))
                else:
                    path.unlink()
        if moved:
            logger.warning(
                "moved %d trace exports from the write-ahead log %s to the spool",
                moved,
                directory,
            )
        return trace_ids


def _wal_record(kind: int, number: int, body: bytes) -> list[bytes]:
    crc = zlib.crc32(body, zlib.crc32(_WAL_NUMBERS.pack(kind, number)))
    return [_WAL_HEADER.pack(_WAL_MAGIC, kind, number, len(body), crc), body]


@dataclass
class _RunRecords:
    """The valid records read from the segments of one run."""

    exports: dict[int, bytes] = field(default_factory=dict)
    trace_ids: dict[int, list[str]] = field(default_factory=dict)
    # Token, first and last sequence number of each batch record.
    batches: list[tuple[str, int, int]] = field(default_factory=list)
    # Segments with damaged or undecodable records, kept for inspection.
    damaged: set[Path] = field(default_factory=set)


def _read_segment(path: Path, records: _RunRecords) -> None:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        record = _record_at(data, offset)
        if record is None:
            offset = _skip_damaged(path, data, offset, records)
            continue
        kind, number, body, end = record
        _add_record(path, offset, kind, number, body, records)
        offset = end


def _record_at(data: bytes, offset: int) -> tuple[int, int, bytes, int] | None:
    """Return kind, number, body and end offset of the valid record at ``offset``, or None."""
    if len(data) - offset < _WAL_HEADER.size:
        return None
    magic, kind, number, length, crc = _WAL_HEADER.unpack_from(data, offset)
    start = offset + _WAL_HEADER.size
    end = start + length
    if magic != _WAL_MAGIC or end > len(data):
        return None
    body = data[start:end]
    if zlib.crc32(body, zlib.crc32(_WAL_NUMBERS.pack(kind, number))) != crc:
        return None
    return kind, number, body, end


def _skip_damaged(path: Path, data: bytes, offset: int, records: _RunRecords) -> int:
    """Log the bytes from ``offset`` up to the next valid record, and return its offset."""
    # A valid record starts with the magic, and a single flipped byte cannot give a
    # record with a matching CRC-32, so scanning for the next magic with a valid record
    # skips only the damaged bytes.
    resume = data.find(_WAL_MAGIC, offset + 1)
    while resume != -1 and _record_at(data, resume) is None:
        resume = data.find(_WAL_MAGIC, resume + 1)
    if resume != -1:
        records.damaged.add(path)
        logger.error(
            "skipped %d damaged bytes at offset %d in the middle of %s, reading on at"
            " offset %d; the segment is kept as %s",
            resume - offset,
            offset,
            path,
            resume,
            _corrupt_path(path),
        )
        return resume
    if _is_incomplete_record(data, offset):
        # The record being written when the collector was killed: its export was
        # never acknowledged.
        logger.warning(
            "ignoring %d bytes of an incomplete record at offset %d at the end of %s",
            len(data) - offset,
            offset,
            path,
        )
    else:
        records.damaged.add(path)
        logger.error(
            "skipped %d damaged bytes at offset %d at the end of %s; the segment is kept as %s",
            len(data) - offset,
            offset,
            path,
            _corrupt_path(path),
        )
    return len(data)


def _is_incomplete_record(data: bytes, offset: int) -> bool:
    """Tell whether the bytes from ``offset`` to the end are the start of a record."""
    rest = data[offset:]
    if len(rest) < _WAL_HEADER.size:
        return _WAL_MAGIC.startswith(rest[: len(_WAL_MAGIC)])
    magic, _, _, length, _ = _WAL_HEADER.unpack_from(rest)
    return magic == _WAL_MAGIC and _WAL_HEADER.size + length > len(rest)


def _add_record(
    path: Path, offset: int, kind: int, number: int, body: bytes, records: _RunRecords
) -> None:
    # The checksum matched, so the bytes are as written, but they can still be invalid.
    # Such a record is skipped and its segment kept, so one bad record does not stop recovery.
    if kind == _WAL_EXPORT:
        try:
            request = trace_pb2.ExportRequest.FromString(body)
        except DecodeError as exc:
            _log_invalid_record(path, offset, f"export {number}", exc, records)
            return
        records.exports[number] = body
        records.trace_ids[number] = [trace.trace_id for trace in request.traces]
    elif kind == _WAL_BATCH:
        try:
            (last,) = _WAL_LAST.unpack_from(body)
            token = body[_WAL_LAST.size :].decode()
        except (struct.error, UnicodeDecodeError) as exc:
            _log_invalid_record(path, offset, f"the batch record of export {number}", exc, records)
            return
        records.batches.append((token, number, last))
    else:
        _log_invalid_record(path, offset, f"record {number}", f"unknown kind {kind}", records)


def _log_invalid_record(
    path: Path, offset: int, what: str, reason: object, records: _RunRecords
) -> None:
    records.damaged.add(path)
    logger.error(
        "skipped %s at offset %d of %s, which does not decode (%s); the segment is kept as %s",
        what,
        offset,
        path,
        reason,
        _corrupt_path(path),
    )


def _drop_finished_batches(run: str, records: _RunRecords) -> None:
    """Drop the exports of batches whose record is missing but that the writer finished."""
    # The writer records a batch only after it has written, spooled or dropped the one
    # before, so exports older than a recorded batch and covered by no record were in a
    # finished batch. Their record was damaged, or failed to be written. Spooling them
    # again with a new token would store them twice.
    if not records.batches:
        return
    newest_first = max(first for _, first, _ in records.batches)
    covered = set()
    for _, first, last in records.batches:
        covered.update(range(first, last + 1))
    finished = [n for n in records.exports if n < newest_first and n not in covered]
    for number in finished:
        del records.exports[number]
        del records.trace_ids[number]
    if finished:
        logger.warning(
            "dropped %d exports of write-ahead log run %s (sequence numbers %d to %d) that"
            " have no batch record: the writer finished their batch before a later one",
            len(finished),
            run,
            min(finished),
            max(finished),
        )


def _corrupt_path(path: Path) -> Path:
    return path.with_suffix(".corrupt")


def _spool_group(spool: Spool, run: str, group: list[int], exports: dict[int, bytes]) -> None:
    token = f"wal-{run}-{group[0]}-{group[-1]}"
    _spool_recovered(spool, token, [exports.pop(number) for number in group])


def _spool_recovered(spool: Spool, token: str, payloads: list[bytes]) -> None:
    # Payloads are ExportRequest bytes, so joined they are one ExportRequest.
    if not spool.append(token, b"".join(payloads)):
        logger.error(
            "trace spool %s is full (%d bytes, limit %d): dropped %d recovered exports",
            spool.directory,
            spool.size_bytes,
            spool.limit_bytes,
            len(payloads),
        )

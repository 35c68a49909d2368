"""The learner's durable episode buffer: what it acknowledged survives a crash.

Files in the state directory:
  episodes.bin  the spool: the magic b"FWBUF\x00\x01\n", then a record per accepted episode in arrival
                order: a header `<IId` (payload length; CRC32 of the arrival time's 8 bytes and the
                payload; arrival time, unix seconds), then the payload, `Episode.SerializeToString()`.
  consumed.txt  ids of episodes an update has used, one a line, oldest first; once trimmed, its first
                line is `#forgotten <n>`: how many older ids were dropped from it.

Crash guarantees: `add` returns only once its records are fsynced, `consume` once its ids are, so a
kill -9 at any byte loses nothing acknowledged. A crash mid-append leaves a torn last record (or id);
on open each file is cut back to the end of its last good record, a spool record being good when whole
and its checksum holds, so the next write follows good data. Writes go at the end of the good data and
cut the file there: leftovers of a write that failed half-way are overwritten, never followed.
Compaction and trimming replace a file atomically (temp file, fsync, rename, fsync of the directory).

Bounds: on open and after each consume, the spool is rewritten with only the pending records once
consumed ones take more than `compact_min_bytes` and more than half of it. `consumed.txt` is trimmed
to its `consumed_ids_kept` most recent ids once it holds twice that, so an id consumed longer ago is
no longer refused as a duplicate: the proxy marks pushed episodes in its store and does not send very
old ones again. Opening streams the spool record by record and keeps only the pending episodes.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from flywheel.learner.durable import fsync_dir, replace_atomically
from flywheel.protos import flywheel_pb2 as pb

log = logging.getLogger("flywheel.learner")

_MAGIC = b"FWBUF\x00\x01\n"
_HEADER = struct.Struct("<IId")  # payload length, crc32, arrival time
_FORGOTTEN = "#forgotten "


def _checksum(arrived: float, payload: bytes) -> int:
    """Covers the arrival time too: a flipped bit there would otherwise pass unnoticed."""
    return zlib.crc32(payload, zlib.crc32(struct.pack("<d", arrived)))


def _encode_record(episode: pb.Episode, arrived: float) -> bytes:
    payload = episode.SerializeToString()
    return _HEADER.pack(len(payload), _checksum(arrived, payload), arrived) + payload


def _read_records(f: BinaryIO, size: int) -> Iterator[tuple[int, float, pb.Episode]]:
    """(record bytes, arrival time, episode) for each good record after the magic, up to the first
    one cut short or failing its checksum: from there on is the torn tail of a crashed append."""
    offset = f.seek(len(_MAGIC))
    while len(header := f.read(_HEADER.size)) == _HEADER.size:
        length, crc, arrived = _HEADER.unpack(header)
        if length > size - offset - _HEADER.size:
            return  # checked before reading, so a garbled length cannot make us allocate gigabytes
        payload = f.read(length)
        if _checksum(arrived, payload) != crc:
            return
        offset += _HEADER.size + length
        yield _HEADER.size + length, arrived, pb.Episode.FromString(payload)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Write at the end of the good data and cut the file there, durably: bytes past `offset`
    (a torn tail, or what a failed write left) are overwritten or cut, never followed."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def _starts_with_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_MAGIC)) == _MAGIC


def _id_lines(ids: Iterable[str]) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode()


class EpisodeBuffer:
    """`pending`: episode id -> episode, in arrival order; `arrived`: when each pending one was first
    accepted (time.time()); `received`: episodes ever accepted, across restarts."""

    def __init__(self, state_dir: Path, *, compact_min_bytes: int = 1 << 20, consumed_ids_kept: int = 100_000):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "episodes.bin"
        self.consumed_file = self.dir / "consumed.txt"
        self.compact_min_bytes = compact_min_bytes
        self.consumed_ids_kept = consumed_ids_kept
        self.pending: dict[str, pb.Episode] = {}
        self.arrived: dict[str, float] = {}  # of the pending episodes
        self._record_bytes: dict[str, int] = {}  # of the pending episodes' records
        self._consumed: dict[str, None] = {}  # ids, oldest first
        self._forgotten = 0  # consumed ids trimmed from consumed.txt
        self._consumed_end = 0
        self._spool_end = len(_MAGIC)
        self._consumed_record_bytes = 0  # spool bytes held by consumed episodes: compaction frees them
        self._load_consumed()
        self._load_spool()
        self.received = self._forgotten + len(self._consumed) + len(self.pending)
        self._compact_if_due()

    def _load_consumed(self) -> None:
        if not self.consumed_file.exists():
            replace_atomically(self.consumed_file, [])
        data = self.consumed_file.read_bytes()
        self._consumed_end = data.rfind(b"\n") + 1
        if self._consumed_end < len(data):
            _write_at(self.consumed_file, self._consumed_end, b"")  # a torn id: its consume never returned
        ids = data[:self._consumed_end].decode().split("\n")[:-1]
        if ids and ids[0].startswith(_FORGOTTEN):
            self._forgotten = int(ids.pop(0)[len(_FORGOTTEN):])
        self._consumed = dict.fromkeys(ids)

    def _load_spool(self) -> None:
        if self.spool.exists() and not _starts_with_magic(self.spool):
            aside = self.spool.with_name(f"{self.spool.name}.old-{int(time.time())}")
            os.replace(self.spool, aside)
            fsync_dir(self.dir)
            log.warning("%s is not in this buffer's format: moved aside to %s, its episodes are not loaded",
                        self.spool, aside.name)
        if not self.spool.exists():
            replace_atomically(self.spool, [_MAGIC])
        size = self.spool.stat().st_size
        with self.spool.open("rb") as f:
            for record_bytes, arrived, episode in _read_records(f, size):
                self._spool_end += record_bytes
                episode_id = episode.episode_id
                if episode_id in self._consumed or episode_id in self.pending:
                    self._consumed_record_bytes += record_bytes
                    continue
                self.pending[episode_id] = episode
                self.arrived[episode_id] = arrived
                self._record_bytes[episode_id] = record_bytes
        if self._spool_end < size:
            log.warning("%s: cut %d bytes of torn or damaged records after the last good one",
                        self.spool, size - self._spool_end)
            _write_at(self.spool, self._spool_end, b"")

    def add(self, episodes: Iterable[pb.Episode]) -> tuple[int, int]:
        """Store new episodes durably; returns (accepted, duplicates)."""
        fresh: dict[str, pb.Episode] = {}
        duplicates = 0
        for episode in episodes:
            episode_id = episode.episode_id
            if episode_id in self.pending or episode_id in self._consumed or episode_id in fresh:
                duplicates += 1
            else:
                fresh[episode_id] = episode
        if fresh:
            arrived = time.time()
            records = [_encode_record(episode, arrived) for episode in fresh.values()]
            _write_at(self.spool, self._spool_end, b"".join(records))
            for (episode_id, episode), record in zip(fresh.items(), records):
                self.pending[episode_id] = episode
                self.arrived[episode_id] = arrived
                self._record_bytes[episode_id] = len(record)
                self._spool_end += len(record)
            self.received += len(fresh)
        return len(fresh), duplicates

    def consume(self, episode_ids: Iterable[str]) -> None:
        """The episodes leave `pending` durably; their ids are still refused as duplicates."""
        ids = list(dict.fromkeys(i for i in episode_ids if i in self.pending))
        if not ids:
            return
        lines = _id_lines(ids)
        _write_at(self.consumed_file, self._consumed_end, lines)
        self._consumed_end += len(lines)
        for i in ids:
            del self.pending[i], self.arrived[i]
            self._consumed[i] = None
            self._consumed_record_bytes += self._record_bytes.pop(i)
        self._compact_if_due()

    def erase(self, episode_ids: Iterable[str]) -> int:
        """Remove episodes durably, content and all (an erasure request): pending ones leave as if
        consumed, and the spool is rewritten without them and without any consumed episode's record,
        so none of their bytes stays on disk. Returns how many of `episode_ids` it held."""
        wanted = set(episode_ids)
        held = len(wanted & (self.pending.keys() | self._consumed.keys()))
        pending = [i for i in self.pending if i in wanted]
        if pending:
            lines = _id_lines(pending)  # still refused as duplicates if a push of one comes late
            _write_at(self.consumed_file, self._consumed_end, lines)
            self._consumed_end += len(lines)
            for i in pending:
                del self.pending[i], self.arrived[i]
                self._consumed[i] = None
                self._record_bytes.pop(i)
        if pending or self._consumed_record_bytes:
            self._compact()
        return held

    def _compact_if_due(self) -> None:
        trim = len(self._consumed) > 2 * self.consumed_ids_kept
        worthwhile = self._consumed_record_bytes > self.compact_min_bytes and 2 * self._consumed_record_bytes > self._spool_end
        if self._consumed_record_bytes and (trim or worthwhile):
            self._compact()  # before a trim: a forgotten id's record left in the spool would come back pending
        if trim:
            self._trim_consumed()

    def _compact(self) -> None:
        records = [_encode_record(episode, self.arrived[i]) for i, episode in self.pending.items()]
        replace_atomically(self.spool, [_MAGIC, *records])
        self._record_bytes = {i: len(record) for i, record in zip(self.pending, records)}
        self._spool_end = len(_MAGIC) + sum(self._record_bytes.values())
        self._consumed_record_bytes = 0

    def _trim_consumed(self) -> None:
        ids = list(self._consumed)
        kept = ids[len(ids) - self.consumed_ids_kept:]
        forgotten = self._forgotten + len(ids) - len(kept)
        lines = _id_lines([f"{_FORGOTTEN}{forgotten}", *kept])
        replace_atomically(self.consumed_file, [lines])
        self._forgotten = forgotten
        self._consumed = dict.fromkeys(kept)
        self._consumed_end = len(lines)

"""The learner's durable episode buffer: what it acknowledged survives a crash.

Episodes are appended to a spool file (length-prefixed protobuf) and fsynced before the
proxy gets its ack; ids of episodes an update has used are appended to `consumed.txt`
once the update is published. A restarted learner reloads the spool minus what was
consumed, and ignores any episode id it has seen before.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

from flywheel.protos import flywheel_pb2 as pb

_LENGTH = struct.Struct("<I")


class EpisodeBuffer:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "episodes.bin"
        self.consumed_file = self.dir / "consumed.txt"
        consumed = set(self.consumed_file.read_text().split()) if self.consumed_file.exists() else set()
        self.seen: set[str] = set(consumed)
        self.pending: dict[str, pb.Episode] = {}
        for episode in self._read_spool():
            if episode.episode_id not in self.seen:
                self.pending[episode.episode_id] = episode
            self.seen.add(episode.episode_id)
        self.received = len(self.seen)

    def _read_spool(self) -> Iterable[pb.Episode]:
        if not self.spool.exists():
            return
        data = self.spool.read_bytes()
        offset = 0
        while offset + _LENGTH.size <= len(data):
            (size,) = _LENGTH.unpack_from(data, offset)
            end = offset + _LENGTH.size + size
            if end > len(data):
                break  # a write cut short by a crash: never acknowledged, the proxy sends it again
            yield pb.Episode.FromString(data[offset + _LENGTH.size:end])
            offset = end

    def add(self, episodes: Iterable[pb.Episode]) -> tuple[int, int]:
        """Store new episodes durably; returns (accepted, duplicates)."""
        fresh, duplicates = [], 0
        for episode in episodes:
            if episode.episode_id in self.seen:
                duplicates += 1
            else:
                self.seen.add(episode.episode_id)
                fresh.append(episode)
        if fresh:
            with self.spool.open("ab") as f:
                for episode in fresh:
                    blob = episode.SerializeToString()
                    f.write(_LENGTH.pack(len(blob)) + blob)
                f.flush()
                os.fsync(f.fileno())
            for episode in fresh:
                self.pending[episode.episode_id] = episode
            self.received += len(fresh)
        return len(fresh), duplicates

    def consume(self, episode_ids: Iterable[str]) -> None:
        ids = [i for i in episode_ids if i in self.pending]
        if not ids:
            return
        with self.consumed_file.open("a") as f:
            f.write("".join(f"{i}\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())
        for i in ids:
            del self.pending[i]

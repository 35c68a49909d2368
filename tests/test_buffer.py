"""The durable episode buffer: what `add` acknowledged survives a crash at any byte, and its
files stay bounded."""

import logging
import struct
import time

from flywheel.learner.buffer import EpisodeBuffer
from flywheel.protos import flywheel_pb2 as pb


def episode(episode_id, completion=(3,)):
    return pb.Episode(episode_id=episode_id, task_id="t",
                      calls=[pb.Call(call_id="c1", agent="a", prompt_token_ids=[1, 2], completion_token_ids=completion)])


def spool(state_dir):
    return state_dir / "episodes.bin"


def test_add_and_consume_survive_a_restart_and_ids_seen_are_refused(tmp_path):
    buffer = EpisodeBuffer(tmp_path)
    assert buffer.add([episode("e1"), episode("e2"), episode("e1")]) == (2, 1)
    buffer.consume(["e1", "unknown"])
    reopened = EpisodeBuffer(tmp_path)
    assert list(reopened.pending) == ["e2"] and reopened.pending["e2"] == episode("e2")
    assert reopened.received == 2
    assert reopened.add([episode("e1"), episode("e2"), episode("e3")]) == (1, 2)  # consumed or pending: duplicates


def test_arrival_time_is_set_at_add_and_survives_a_restart(tmp_path):
    before = time.time()
    EpisodeBuffer(tmp_path).add([episode("e1")])
    after = time.time()
    arrived = EpisodeBuffer(tmp_path).arrived
    assert list(arrived) == ["e1"] and before <= arrived["e1"] <= after


def test_a_torn_last_record_is_cut_off_so_the_next_add_survives(tmp_path):
    # defect 1: the torn bytes were skipped but left in place, and the next append landed behind them
    buffer = EpisodeBuffer(tmp_path)
    buffer.add([episode("e1"), episode("e2")])
    good_size = spool(tmp_path).stat().st_size
    buffer.add([episode("e3")])
    with spool(tmp_path).open("r+b") as f:
        f.truncate(good_size + 10)  # kill -9 mid-append: e3 was never acknowledged
    reopened = EpisodeBuffer(tmp_path)
    assert list(reopened.pending) == ["e1", "e2"]
    assert spool(tmp_path).stat().st_size == good_size
    assert reopened.add([episode("e4")]) == (1, 0)
    assert list(EpisodeBuffer(tmp_path).pending) == ["e1", "e2", "e4"]


def test_leftovers_of_a_failed_write_are_overwritten_not_followed(tmp_path):
    buffer = EpisodeBuffer(tmp_path)
    buffer.add([episode("e1")])
    with spool(tmp_path).open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03")  # what a write that failed half-way (disk full) leaves behind
    buffer.add([episode("e2")])
    assert list(EpisodeBuffer(tmp_path).pending) == ["e1", "e2"]


def test_a_record_failing_its_checksum_ends_the_good_data(tmp_path):
    # defect 2: no checksum, so a damaged record was loaded as if it were what the proxy sent
    buffer = EpisodeBuffer(tmp_path)
    buffer.add([episode("e1"), episode("e2")])
    good_size = spool(tmp_path).stat().st_size
    buffer.add([episode("e3")])
    data = bytearray(spool(tmp_path).read_bytes())
    data[-1] ^= 0x01  # e3's last completion token id: 3 becomes 2, still a valid protobuf
    spool(tmp_path).write_bytes(bytes(data))
    reopened = EpisodeBuffer(tmp_path)
    assert list(reopened.pending) == ["e1", "e2"] and reopened.pending["e2"] == episode("e2")
    assert spool(tmp_path).stat().st_size == good_size
    reopened.add([episode("e4")])
    assert list(EpisodeBuffer(tmp_path).pending) == ["e1", "e2", "e4"]


def test_compaction_keeps_only_pending_records_and_recent_consumed_ids(tmp_path):
    # defect 3: the spool and the ids seen grew forever, and a restart read the whole spool at once
    buffer = EpisodeBuffer(tmp_path, compact_min_bytes=0, consumed_ids_kept=5)
    buffer.add(episode(f"e{i}") for i in range(50))
    full_size = spool(tmp_path).stat().st_size
    for start in range(0, 49, 7):
        buffer.consume(f"e{i}" for i in range(start, min(start + 7, 49)))
    assert spool(tmp_path).stat().st_size < full_size / 10
    assert len((tmp_path / "consumed.txt").read_text().splitlines()) <= 2 * 5 + 1
    reopened = EpisodeBuffer(tmp_path, compact_min_bytes=0, consumed_ids_kept=5)
    assert list(reopened.pending) == ["e49"] and list(reopened.arrived) == ["e49"]
    assert reopened.received == 50
    assert reopened.add([episode("e48"), episode("e44")]) == (0, 2)  # consumed recently: still refused
    assert reopened.add([episode("e0")]) == (1, 0)  # consumed long ago: forgotten, as documented
    assert EpisodeBuffer(tmp_path).received == 51


def test_the_production_thresholds_compact_once_consumed_records_pass_a_mebibyte(tmp_path):
    long = list(range(100_000, 200_000))  # about 300 KB an episode
    buffer = EpisodeBuffer(tmp_path)
    buffer.add(episode(f"e{i}", long) for i in range(8))
    full_size = spool(tmp_path).stat().st_size
    buffer.consume(["e0", "e1", "e2"])  # about 0.9 MB consumed: under the threshold, the spool stays
    assert spool(tmp_path).stat().st_size == full_size
    buffer.consume(["e3", "e4"])
    assert spool(tmp_path).stat().st_size < full_size / 2
    assert list(EpisodeBuffer(tmp_path).pending) == ["e5", "e6", "e7"]


def test_compaction_waits_for_its_threshold_and_also_runs_on_open(tmp_path):
    buffer = EpisodeBuffer(tmp_path)  # production thresholds: a few small records stay put
    buffer.add(episode(f"e{i}") for i in range(10))
    full_size = spool(tmp_path).stat().st_size
    buffer.consume(f"e{i}" for i in range(9))
    assert spool(tmp_path).stat().st_size == full_size
    reopened = EpisodeBuffer(tmp_path, compact_min_bytes=0)
    assert spool(tmp_path).stat().st_size < full_size / 5
    assert list(reopened.pending) == ["e9"] and reopened.received == 10
    assert reopened.add([episode("e3")]) == (0, 1)


def test_a_torn_consumed_id_is_cut_off_so_the_next_consume_survives(tmp_path):
    buffer = EpisodeBuffer(tmp_path)
    buffer.add([episode("e1"), episode("e2")])
    with (tmp_path / "consumed.txt").open("a") as f:
        f.write("e")  # kill -9 mid-consume(["e2"]): that consume never returned, e2 is still pending
    reopened = EpisodeBuffer(tmp_path)
    assert list(reopened.pending) == ["e1", "e2"]
    reopened.consume(["e2"])
    assert list(EpisodeBuffer(tmp_path).pending) == ["e1"]


def test_a_spool_in_another_format_is_moved_aside(tmp_path, caplog):
    blob = episode("old").SerializeToString()
    spool(tmp_path).write_bytes(struct.pack("<I", len(blob)) + blob)  # the length-prefixed format before this one
    with caplog.at_level(logging.WARNING):
        buffer = EpisodeBuffer(tmp_path)
    assert buffer.pending == {} and "moved aside" in caplog.text
    [aside] = tmp_path.glob("episodes.bin.old-*")
    assert aside.read_bytes() == struct.pack("<I", len(blob)) + blob
    buffer.add([episode("e1")])
    assert list(EpisodeBuffer(tmp_path).pending) == ["e1"]

"""The gRPC contract: generated code is current, the store's column spec maps onto it, rows become messages."""

import filecmp

import aiohttp
import openai
import pytest
from google.protobuf.descriptor import FieldDescriptor

from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos.generate import HERE, generate
from flywheel.store.proto_map import episode_proto
from flywheel.store.schema import TABLES

MESSAGES = [{"role": "user", "content": "count to four"}]

_PROTO_TYPES = {  # DuckDB type -> (protobuf field type, repeated)
    "VARCHAR": (FieldDescriptor.TYPE_STRING, False),
    "INTEGER": (FieldDescriptor.TYPE_INT32, False),
    "BIGINT": (FieldDescriptor.TYPE_INT64, False),
    "DOUBLE": (FieldDescriptor.TYPE_DOUBLE, False),
    "TIMESTAMPTZ": (FieldDescriptor.TYPE_DOUBLE, False),  # unix seconds
    "INTEGER[]": (FieldDescriptor.TYPE_INT32, True),
    "FLOAT[]": (FieldDescriptor.TYPE_FLOAT, True),
    "JSON": (FieldDescriptor.TYPE_MESSAGE, True),  # a map
}


def test_generated_code_is_current(tmp_path):
    out = tmp_path / "protos"
    out.mkdir()
    generate(out)
    for name in ("flywheel_pb2.py", "flywheel_pb2_grpc.py"):
        assert filecmp.cmp(out / name, HERE / name, shallow=False), f"{name} is stale: run python -m flywheel.protos.generate"


@pytest.mark.parametrize("table", [t for t in TABLES if t.proto_message], ids=lambda t: t.name)
def test_every_proto_column_has_a_matching_field(table):
    message = pb.DESCRIPTOR.message_types_by_name[table.proto_message]
    for column in table.proto_columns:
        field = message.fields_by_name.get(column.name)
        assert field is not None, f"{table.name}.{column.name} has no field in {table.proto_message}"
        kind, repeated = _PROTO_TYPES[column.sql_type]
        assert field.type == kind, f"{table.name}.{column.name}: {column.sql_type} vs proto type {field.type}"
        assert field.is_repeated == repeated


async def test_pushed_calls_carry_the_sampling_settings_the_client_asked_for(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/episodes/ep-n/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES, n=2, temperature=0.5)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/episodes/ep-n/feedback", json={"reward": 1}) as r:
            assert r.status == 200
    writer = proxy.state.writer
    [row] = await writer.read(writer.store.episodes_to_push, 10, 0.0)
    episode = episode_proto(row)
    assert [(c.seq, c.choices, c.temperature) for c in episode.calls] == [(0, 2, 0.5), (1, 1, 1.0)]
    assert list(episode.calls[1].completion_token_ids) == [1000, 1001, 1002, 1003]

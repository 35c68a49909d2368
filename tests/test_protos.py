"""The gRPC contract: generated code is current, and the store's column spec maps onto it."""

import filecmp

import pytest
from google.protobuf.descriptor import FieldDescriptor

from protos import flywheel_pb2 as pb
from protos.generate import HERE, generate
from store.schema import TABLES

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
        assert filecmp.cmp(out / name, HERE / name, shallow=False), f"{name} is stale: run python -m protos.generate"


@pytest.mark.parametrize("table", [t for t in TABLES if t.proto_message], ids=lambda t: t.name)
def test_every_proto_column_has_a_matching_field(table):
    message = pb.DESCRIPTOR.message_types_by_name[table.proto_message]
    for column in table.proto_columns:
        field = message.fields_by_name.get(column.name)
        assert field is not None, f"{table.name}.{column.name} has no field in {table.proto_message}"
        kind, repeated = _PROTO_TYPES[column.sql_type]
        assert field.type == kind, f"{table.name}.{column.name}: {column.sql_type} vs proto type {field.type}"
        assert field.is_repeated == repeated

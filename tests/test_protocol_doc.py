"""docs/protocol.md says exactly what the schemas in mpi_imgproc.protocol declare."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpi_imgproc import protocol

DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
COMMON = {"v", "type", "req"}


def _sections(part: str) -> dict[str, list[set[str]]]:
    """For each ``### `name``` section of a part of the document: the field names of each of
    its tables (the first column, where several names may share a row)."""
    body = DOC.split(f"## {part}", 1)[1].split("\n## ", 1)[0]
    sections = {}
    for chunk in re.split(r"^### ", body, flags=re.M)[1:]:
        name = re.match(r"`(\w+)`", chunk).group(1)
        tables, current = [], None
        for line in chunk.splitlines():
            if line.startswith("| `"):
                if current is None:
                    current = set()
                    tables.append(current)
                current |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
            elif not line.startswith("|"):
                current = None
        sections[name] = tables
    return sections


def _fields(struct: type) -> set[str]:
    return set(struct.__struct_fields__) - COMMON


REQUESTS = _sections("Client → server")
REPLIES = _sections("Server → client")


@pytest.mark.parametrize("struct", protocol.AnyRequest.__args__, ids=lambda s: s.__name__)
def test_every_request_is_documented_with_exactly_its_fields(struct):
    tag = struct.__struct_config__.tag
    tables = REQUESTS[tag]
    assert (tables[0] if tables else set()) == _fields(struct)


@pytest.mark.parametrize("struct", protocol.AnyReply.__args__, ids=lambda s: s.__name__)
def test_every_reply_is_documented_with_exactly_its_fields(struct):
    tag = struct.__struct_config__.tag
    tables = REPLIES[tag]
    assert (tables[0] if tables else set()) == _fields(struct)


def test_the_image_descriptor_table_matches_its_schema():
    assert REQUESTS["submit"][1] == _fields(protocol.ImageDesc)


def test_nothing_is_documented_that_the_schemas_do_not_have():
    assert set(REQUESTS) == set(protocol.REQUEST_TYPES)
    assert set(REPLIES) == {s.__struct_config__.tag for s in protocol.AnyReply.__args__}


def test_the_document_states_its_version():
    assert f"version {protocol.VERSION}" in DOC.splitlines()[0]

"""Unit tests for lunsync.target.scsi.registry: lookup, service actions and metadata."""

from __future__ import annotations

import pytest
from lunsync.target.scsi import registry
from lunsync.target.scsi import target as _target  # noqa: F401  (registers every handler)
from lunsync.target.scsi.registry import CommandSpec, Conflict, Dir, command, lookup
from lunsync.target.scsi.sense import CheckCondition


def test_unknown_opcode_is_invalid_command_operation_code() -> None:
    with pytest.raises(CheckCondition) as ei:
        lookup(bytes([0xFF, 0, 0, 0, 0, 0]))
    assert (int(ei.value.key), ei.value.asc, ei.value.ascq, ei.value.field_pointer) == (5, 0x20, 0x00, 0)


def test_unknown_service_action_is_invalid_field_at_byte_1() -> None:
    with pytest.raises(CheckCondition) as ei:
        lookup(bytes([0x9E, 0x1F]) + bytes(14))
    assert (ei.value.asc, ei.value.ascq, ei.value.field_pointer) == (0x24, 0x00, 1)


def test_service_action_dispatch() -> None:
    spec = lookup(bytes([0x9E, 0x10]) + bytes(14))
    assert spec.name == "READ CAPACITY(16)"
    assert spec.data is Dir.IN


def test_metadata_is_consistent() -> None:
    specs = list(registry.all_commands())
    assert len(specs) > 50
    for spec in specs:
        assert len(spec.usage) == spec.cdb_len
        assert spec.usage[0] == spec.opcode
    write10 = registry.find(0x2A)
    assert isinstance(write10, CommandSpec) and write10.conflicts is Conflict.WRITE
    inquiry = registry.find(0x12)
    assert isinstance(inquiry, CommandSpec) and inquiry.allowed_without_lun and not inquiry.reports_ua


def test_duplicate_registration_is_refused() -> None:
    async def dup(req: registry.Request) -> None:
        return None

    with pytest.raises(ValueError):
        command(0x28)(dup)
    with pytest.raises(ValueError):
        command(0x28, 0x01)(dup)  # READ(10) has no service-action field


def test_cdb_length_by_group() -> None:
    assert [registry.cdb_length(op) for op in (0x00, 0x28, 0x5E, 0x88, 0xA0)] == [6, 10, 10, 16, 12]

"""Tests for lunsync.snapshots.model: the bottom layer is importable alone and is the one definition of its types.

The validation rules themselves are exercised through the configuration file's tests (tests/provider/test_config.py),
which parse into these same classes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lunsync.provider import config
from lunsync.snapshots import model
from lunsync.target.scsi import lu


def test_importing_the_model_loads_nothing_else_of_lunsync() -> None:
    code = ("import sys, lunsync.snapshots.model; "
            "print(sorted(m for m in sys.modules if m.startswith('lunsync.') and m != 'lunsync.snapshots.model'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("[]", "['lunsync.snapshots']")


def test_config_and_scsi_layers_share_the_model_types() -> None:
    # One model, not copies: the file format and the SCSI layer hand around the very same classes.
    assert config.LunConfig is model.LunConfig
    assert config.ChapConfig is model.ChapConfig
    assert config.ConfigError is model.ConfigError
    assert lu.LunIdentity is model.LunIdentity


def test_a_model_object_that_exists_is_valid() -> None:
    with pytest.raises(model.ConfigError) as e:
        model.LunConfig(name="x", size_bytes=1000, block_size=512)
    assert e.value.key == "lun['x'].size_bytes"
    lun = model.LunConfig(name="x", size_bytes=model.parse_size("1MiB"))
    assert (lun.path, lun.num_blocks) == ("luns/x.img", 2048)
    assert model.format_size(lun.size_bytes) == "1MiB"

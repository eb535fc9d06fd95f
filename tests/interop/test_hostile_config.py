"""A foreign adapter folder's config is read only when its size is sane, and only as a JSON object."""

from __future__ import annotations

import pytest

from adapterkit.interop.converted import CONFIG_MAX_BYTES, read_json_object
from adapterkit.interop.module_map import InteropError


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"peft_type": "LORA", "pad": "' + b"x" * CONFIG_MAX_BYTES + b'"}')
    with pytest.raises(InteropError, match="more than the"):
        read_json_object(path)


@pytest.mark.parametrize("body, message", [(b"[1, 2]", "not a JSON object"), (b"{nope", "not JSON"), (b"\xff\xfe", "not JSON")])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, body, message):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(body)
    with pytest.raises(InteropError, match=message):
        read_json_object(path)


def test_a_missing_config_is_named(tmp_path):
    with pytest.raises(InteropError, match="not found"):
        read_json_object(tmp_path / "adapter_config.json")

"""GGUF metadata readers: every value type, both byte orders, both readers agree, bad files."""

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from xds_jax.loading.gguf_fields import GGUFFormatError, read_gguf_fields, read_gguf_metadata

T = gguf.GGUFValueType
SCALARS = {
    "t.u8": (255, T.UINT8),
    "t.i8": (-128, T.INT8),
    "t.u16": (65535, T.UINT16),
    "t.i16": (-32768, T.INT16),
    "t.u32": (4_000_000_000, T.UINT32),
    "t.i32": (-2_000_000_000, T.INT32),
    "t.f32": (0.5, T.FLOAT32),
    "t.u64": (2**63 + 5, T.UINT64),
    "t.i64": (-(2**62), T.INT64),
    "t.f64": (1e-300, T.FLOAT64),
    "t.bool": (True, T.BOOL),
    "t.str": ("héllo 😀", T.STRING),
}
ARRAYS = {
    "t.ints": ([1, -2, 3], T.INT32, np.int32),
    "t.floats": ([0.25, -1.5], T.FLOAT32, np.float32),
    "t.bools": ([True, False, True], T.BOOL, np.bool_),
    "t.u64s": ([2**64 - 1, 0], T.UINT64, np.uint64),
}
STRINGS = ["a", "", "Ġthe", "<|im_end|>", "日本"]


def _write(path: Path, endian: gguf.GGUFEndian, nested: bool = True) -> Path:
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    for key, (value, vtype) in SCALARS.items():
        writer.add_key_value(key, value, vtype)
    for key, (values, vtype, _) in ARRAYS.items():
        writer.add_key_value(key, values, T.ARRAY, sub_type=vtype)
    writer.add_array("t.strings", STRINGS)
    if nested:
        writer.add_array("t.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_read_gguf_metadata_decodes_every_type(tmp_path, endian):
    fields = read_gguf_metadata(_write(tmp_path / "m.gguf", endian))
    assert fields["general.architecture"] == "llama"
    for key, (value, _) in SCALARS.items():
        assert fields[key] == pytest.approx(value) and type(fields[key]) is type(value), key
    for key, (values, _, dtype) in ARRAYS.items():
        assert fields[key].dtype == np.dtype(dtype) and fields[key].dtype.isnative
        np.testing.assert_array_equal(fields[key], np.array(values, dtype))
    assert fields["t.strings"] == STRINGS
    nested = fields["t.nested"]
    assert [list(inner) for inner in nested] == [[1, 2], [3]]


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_both_readers_agree(tmp_path, endian):
    path = _write(tmp_path / "m.gguf", endian, nested=False)
    fast = read_gguf_metadata(path)
    slow = read_gguf_fields(gguf.GGUFReader(path, "r"))
    assert fast.keys() == slow.keys()
    for key, value in fast.items():
        if isinstance(value, np.ndarray):
            assert slow[key].dtype == value.dtype, key
            np.testing.assert_array_equal(slow[key], value)
        else:
            assert slow[key] == value and type(slow[key]) is type(value), key


def _raw_gguf(*key_values: bytes, version: int = 3) -> bytes:
    header = b"GGUF" + struct.pack("<IQQ", version, 0, len(key_values))
    return header + b"".join(key_values)


def _raw_key(key: str, value_type: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type) + payload


def test_empty_arrays(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(
        _raw_gguf(
            _raw_key("e.ints", 9, struct.pack("<IQ", 5, 0)),
            _raw_key("e.strings", 9, struct.pack("<IQ", 8, 0)),
        )
    )
    for fields in (read_gguf_metadata(path), read_gguf_fields(gguf.GGUFReader(path))):
        assert fields["e.ints"].dtype == np.int32 and fields["e.ints"].size == 0
        assert fields["e.strings"] == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b"GGUF", "too short"),
        (b"GGML" + bytes(20), "not a GGUF file"),
        (_raw_gguf(version=7), "unsupported GGUF version 7"),
        (_raw_gguf(_raw_key("k", 8, struct.pack("<Q", 99) + b"abc")), "corrupt"),
        (_raw_gguf(_raw_key("k", 9, struct.pack("<IQ", 4, 1000))), "corrupt"),
        (_raw_gguf(_raw_key("k", 8, struct.pack("<Q", 1) + b"\xff")), "corrupt"),
        (_raw_gguf(_raw_key("k", 42, b"")), "unknown type 42"),
        (_raw_gguf(_raw_key("k", 4, b"")), "corrupt"),
    ],
)
def test_bad_files_raise_format_error(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf_metadata(path)

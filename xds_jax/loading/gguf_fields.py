"""GGUF metadata (the key/value section) as plain Python values.

Both readers return the same shapes: scalars as `int`/`float`/`bool`, strings as `str`, arrays of
strings as `list[str]`, numeric and bool arrays as 1-D numpy arrays, arrays of arrays as lists.

`read_gguf_metadata` parses only the header of the file and is the cheap one: `gguf.GGUFReader`
builds a numpy view per array element when it opens a file, which costs seconds for a 49k-token
vocabulary, while this reads the same metadata in about a tenth of a second.
"""

import mmap
import os
import struct
from collections.abc import Callable
from os import PathLike
from typing import Any, NamedTuple

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"
_HEADER_SIZE = 24  # magic, version, tensor count, key/value count
_STRING, _ARRAY, _BOOL = 8, 9, 7
_NUMPY_DTYPE = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_gguf_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Decode every metadata field of an open `gguf.GGUFReader`.

    Args:
        reader: An open reader; its `GGUF.*` pseudo-fields (version, counts) are left out.

    Returns:
        Mapping from metadata key (e.g. `"llama.embedding_length"`) to its value.
    """
    return {
        name: _decode_reader_field(field)
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def _decode_reader_field(field: gguf.ReaderField) -> Any:
    """One field's value from the numpy parts `gguf.GGUFReader` split it into."""
    main_type = int(field.types[0])
    if main_type == _STRING:
        return field.parts[field.data[0]].tobytes().decode("utf-8")
    if main_type != _ARRAY:
        return field.parts[field.data[0]][0].item()
    # parts[3] is the element type; `types` names it only when the array is not empty.
    element_type = int(field.parts[3][0])
    if element_type == _ARRAY:
        raise GGUFFormatError(f"field {field.name!r}: GGUFReader flattens nested arrays")
    if element_type == _STRING:
        return [field.parts[index].tobytes().decode("utf-8") for index in field.data]
    dtype = np.dtype(_NUMPY_DTYPE[element_type])
    if not field.data:
        return np.empty(0, dtype)
    return np.concatenate([field.parts[index] for index in field.data]).astype(dtype)


def read_gguf_metadata(path: str | PathLike[str]) -> dict[str, Any]:
    """Read the metadata of a GGUF file without building a `gguf.GGUFReader`.

    Args:
        path: A GGUF file, version 2 or 3, little- or big-endian.

    Returns:
        Mapping from metadata key to value, shaped as `read_gguf_fields` shapes them.

    Raises:
        GGUFFormatError: The file is not GGUF, has an unknown version or value type, is cut
            short, or has a string that is not UTF-8.
    """
    return _parse_header(path, lambda parser: parser.parse())


class GGUFTensorInfo(NamedTuple):
    """One tensor of a GGUF file: ``shape`` in numpy (row-major) order, data at ``offset``
    bytes after the start of the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


def read_gguf_tensor_infos(
    path: str | PathLike[str],
) -> tuple[dict[str, Any], list[GGUFTensorInfo], int]:
    """Metadata, tensor directory and the byte offset of the data section of a GGUF file.

    Raises:
        GGUFFormatError: as ``read_gguf_metadata``.
    """

    def read(parser: _HeaderParser):
        fields = parser.parse()
        return (fields, *parser.tensor_infos(int(fields.get("general.alignment", 32))))

    return _parse_header(path, read)


def _parse_header(path: str | PathLike[str], read: Callable[["_HeaderParser"], Any]) -> Any:
    """Map ``path``, check it is GGUF, and run ``read`` on a parser at the start of the header."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < _HEADER_SIZE:
            raise GGUFFormatError(f"{path}: too short to be a GGUF file")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != GGUF_MAGIC:
                raise GGUFFormatError(f"{path}: not a GGUF file (magic {data[:4]!r})")
            try:
                return read(_HeaderParser(data, str(path)))
            except (struct.error, UnicodeDecodeError) as error:
                raise GGUFFormatError(f"{path}: corrupt metadata: {error}") from error


class _HeaderParser:
    """Walks the key/value section of a memory-mapped GGUF file.

    Reading past the end raises `struct.error` and a bad string `UnicodeDecodeError`;
    `read_gguf_metadata` turns both into `GGUFFormatError`.
    """

    def __init__(self, data: mmap.mmap, path: str) -> None:
        self._data = data
        self._path = path
        (version,) = struct.unpack_from("<I", data, 4)
        # A big-endian file's version reads as a huge number in little-endian order.
        self._endian = "<" if version < 0x10000 else ">"
        (version,) = struct.unpack_from(self._endian + "I", data, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        self._offset = 8

    def parse(self) -> dict[str, Any]:
        """All key/value pairs, in file order."""
        self.tensor_count, kv_count = self._unpack("QQ")
        fields = {}
        for _ in range(kv_count):
            key = self._strings(1)[0]
            (value_type,) = self._unpack("I")
            fields[key] = self._value(value_type, key)
        return fields

    def tensor_infos(self, alignment: int) -> tuple[list["GGUFTensorInfo"], int]:
        """The tensor directory that follows the metadata, and where tensor data starts."""
        infos = []
        for _ in range(self.tensor_count):
            name = self._strings(1)[0]
            (n_dims,) = self._unpack("I")
            dims = self._unpack("Q" * n_dims)
            ggml_type, offset = self._unpack("IQ")
            infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset))
        start = -(-self._offset // alignment) * alignment
        return infos, start

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        layout = struct.Struct(self._endian + fmt)
        values = layout.unpack_from(self._data, self._offset)
        self._offset += layout.size
        return values

    def _strings(self, count: int) -> list[str]:
        # The hot loop of the whole read (49k tokens and as many merges), so it avoids `_unpack`.
        data, offset, length_of = self._data, self._offset, struct.Struct(self._endian + "Q")
        strings = []
        for _ in range(count):
            (length,) = length_of.unpack_from(data, offset)
            offset += 8 + length
            strings.append(data[offset - length : offset].decode("utf-8"))
        if offset > len(data):
            raise struct.error(f"string ends at byte {offset}, past the end of the file")
        self._offset = offset
        return strings

    def _value(self, value_type: int, key: str) -> Any:
        if value_type == _STRING:
            return self._strings(1)[0]
        if value_type == _ARRAY:
            element_type, count = self._unpack("IQ")
            if element_type == _STRING:
                return self._strings(count)
            if element_type == _ARRAY:
                return [self._value(_ARRAY, key) for _ in range(count)]
            return self._numbers(element_type, count, key)
        return self._numbers(value_type, 1, key)[0].item()

    def _numbers(self, value_type: int, count: int, key: str) -> np.ndarray:
        if value_type not in _NUMPY_DTYPE:
            raise GGUFFormatError(f"{self._path}: field {key!r} has unknown type {value_type}")
        dtype = np.dtype(_NUMPY_DTYPE[value_type]).newbyteorder(self._endian)
        end = self._offset + dtype.itemsize * count
        if end > len(self._data):
            raise struct.error(f"array {key!r} ends at byte {end}, past the end of the file")
        values = np.frombuffer(self._data, dtype, count, self._offset)
        self._offset = end
        return values.astype(dtype.newbyteorder("="))

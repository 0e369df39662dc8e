"""Fixed-width binary records declared as dataclasses: each field's annotation gives its size in bytes.

``Annotated[int, 4]`` is a big-endian unsigned integer of 4 bytes, ``Annotated[bytes, 6]`` 6 raw bytes and
``Annotated[str, 2]`` 2 BCD bytes held as their 4 digits (a city code). Fields are laid out in declaration order,
so one class definition is the layout for the side that encodes and the side that decodes.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Self, get_args, get_origin, get_type_hints

U8 = Annotated[int, 1]
U16 = Annotated[int, 2]
U32 = Annotated[int, 4]


_Field = tuple[str, type, int]


def _fields_of(cls: type) -> tuple[_Field, ...]:
    """(name, int/bytes/str, size) of each instance field of a layout class, in declaration order."""
    out = []
    for name, hint in get_type_hints(cls, include_extras=True).items():
        if get_origin(hint) is ClassVar:
            continue
        if get_origin(hint) is not Annotated:
            raise TypeError(f"{cls.__name__}.{name} has no size (Annotated[type, bytes])")
        kind, size = get_args(hint)
        out.append((name, kind, size))
    return tuple(out)


class Layout:
    """Base of a fixed-width record (a frozen dataclass): ``to_bytes`` and ``from_bytes`` follow its annotated
    fields."""

    _layout: ClassVar[tuple[_Field, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._layout = _fields_of(cls)  # once per class: reading annotations is slow

    @classmethod
    def size(cls) -> int:
        """The record's length in bytes."""
        return sum(size for _, _, size in cls._layout)

    def to_bytes(self) -> bytes:
        """The record, field after field."""
        out = bytearray()
        for name, kind, size in self._layout:
            value = getattr(self, name)
            chunk = value.to_bytes(size) if kind is int else bytes.fromhex(value) if kind is str else value
            if len(chunk) != size:
                raise ValueError(f"{type(self).__name__}.{name} must be {size} bytes, got {len(chunk)}")
            out += chunk
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode a record; ValueError when ``data`` is not exactly its length."""
        if len(data) != cls.size():
            raise ValueError(f"{cls.__name__} of {len(data)} bytes, expected {cls.size()}")
        values: dict[str, object] = {}
        offset = 0
        for name, kind, size in cls._layout:
            chunk = bytes(data[offset : offset + size])
            values[name] = int.from_bytes(chunk) if kind is int else chunk.hex() if kind is str else chunk
            offset += size
        return cls(**values)

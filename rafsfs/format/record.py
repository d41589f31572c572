"""A tiny declarative fixed-size record: a dataclass whose field order *is* the on-disk layout."""
from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, TypeVar

from ..errors import BadImage

R = TypeVar("R", bound="Record")


def field(code: str, default: Any = 0) -> Any:
    """A record field with its ``struct`` code (little-endian implied)."""
    if isinstance(default, (bytes, list, dict)):
        return dataclasses.field(default=default, metadata={"code": code})  # bytes are immutable: fine
    return dataclasses.field(default=default, metadata={"code": code})


class Record:
    """Base for on-disk records.  Subclasses are ``@dataclass`` es declaring fields with :func:`field`.

    ``SIZE`` and the struct are computed once per class (``__init_subclass__`` cannot see dataclass fields yet,
    so it happens lazily on first use).
    """

    _struct: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    NAME: ClassVar[str] = "record"

    @classmethod
    def _layout(cls) -> struct.Struct:
        s = cls.__dict__.get("_struct")
        if s is None:
            codes = "".join(f.metadata["code"] for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            s = struct.Struct("<" + codes)
            cls._struct = s
            cls.SIZE = s.size
        return s

    @classmethod
    def rec_size(cls) -> int:
        return cls._layout().size

    @classmethod
    def unpack_from(cls: type[R], buf: Any, offset: int = 0) -> R:
        s = cls.__dict__.get("_struct") or cls._layout()
        if offset < 0 or offset + s.size > len(buf):
            raise BadImage(f"truncated {cls.NAME} at offset {offset}")
        return cls(*s.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return self._layout().pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]


def round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a

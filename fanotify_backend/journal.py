"""The event journal: pages of shared memory that ``read(2)`` of the group writes into directly.

The supervisor maps it (``MAP_SHARED``, anonymous) before forking workers, so every worker sees the same pages and
the page outlives the worker.  A worker reads events straight into a slot's buffer: the kernel copies the records
(fd numbers and ranges) there before ``read`` returns, so no event is ever handed out without being journaled.  A
worker killed at any moment leaves, in the slots not IDLE, every event it had not answered; its successor fills them
all and only then answers them all, before reading anything new (``../shared/spec/fanotify-precontent.md`` §5, §7.1:
answering number N releases the OLDEST pending event with that number, which must therefore be filled first).

Slot layout (one 4 KiB page each)::

    0    u32 state        IDLE / READING / GOT
    8    64 x u8 answered one byte per event of the buffer (set after the answer was written)
    128  buffer           up to 64 events of 48 bytes, zeroed before each read
"""
from __future__ import annotations

import ctypes
import mmap
import struct

from . import fanotify as fa

SLOT_SIZE = 4096
EVENTS_PER_SLOT = 64
BUF_OFFSET = 128
BUF_SIZE = EVENTS_PER_SLOT * fa.EVENT_SIZE
IDLE, READING, GOT = 0, 1, 2
_STATE = struct.Struct("<I")
assert BUF_OFFSET + BUF_SIZE <= SLOT_SIZE


class Journal:
    """``slots`` pages of anonymous shared memory (inherited across fork)."""

    def __init__(self, slots: int = 16):
        self.slots = slots
        self.mm = mmap.mmap(-1, slots * SLOT_SIZE, flags=mmap.MAP_SHARED)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def state(self, slot: int) -> int:
        return _STATE.unpack_from(self.mm, slot * SLOT_SIZE)[0]

    def set_state(self, slot: int, state: int) -> None:
        _STATE.pack_into(self.mm, slot * SLOT_SIZE, state)

    def begin_read(self, slot: int) -> tuple[int, int]:
        """Clear the slot and mark it READING; returns (address, size) for ``read(2)``."""
        base = slot * SLOT_SIZE
        self.mm[base + 8:base + SLOT_SIZE] = bytes(SLOT_SIZE - 8)
        self.set_state(slot, READING)
        return self._base + base + BUF_OFFSET, BUF_SIZE

    def events(self, slot: int) -> list[fa.Event]:
        base = slot * SLOT_SIZE + BUF_OFFSET
        return fa.parse(self.mm[base:base + BUF_SIZE])

    def answered(self, slot: int, i: int) -> bool:
        return self.mm[slot * SLOT_SIZE + 8 + i] != 0

    def set_answered(self, slot: int, i: int) -> None:
        self.mm[slot * SLOT_SIZE + 8 + i] = 1

    def pending(self) -> list[tuple[int, int, fa.Event]]:
        """(slot, index, event) of every journaled event not answered: a dead worker's orphans."""
        out = []
        for s in range(self.slots):
            if self.state(s) == IDLE:
                continue
            for i, ev in enumerate(self.events(s)):
                if not self.answered(s, i):
                    out.append((s, i, ev))
        return out

    def clear(self, slot: int) -> None:
        self.set_state(slot, IDLE)

#!/usr/bin/env python3
"""Tiny multiboot kernels for disk-less lab guests (stdlib only).

A guest in the lab needs no disk and no OS: QEMU's `-kernel` (libvirt's
`<os><kernel>`) loads a multiboot v1 image, and a few dozen bytes of 32-bit
code are enough to give a guest a known behaviour:

- busy:  a countdown loop (100 % of one vCPU) that writes the next digit
         '0'..'9' to COM1 (port 0x3f8) after each countdown, so a
         `<serial type='file'>` shows that the guest keeps running;
- idle:  writes 'I' to COM1 once, then `hlt` forever (≈0 % CPU; the
         multiboot entry runs with interrupts off, so nothing wakes it).

The image is the 32-byte multiboot header with the "a.out kludge" (flag 16:
the loader takes load and entry addresses from the header, no ELF needed),
followed by the code.

    python3 deploy/lab/guest_kernel.py busy /path/busy.bin
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

LOAD_ADDR = 0x100000  # 1 MiB: the conventional multiboot load address
HEADER_SIZE = 32
MULTIBOOT_MAGIC = 0x1BADB002
FLAG_AOUT_KLUDGE = 0x00010000

# 32-bit protected-mode code, flat segments (what multiboot hands over).
_BUSY = bytes([
    0x66, 0xBA, 0xF8, 0x03,        # mov dx, 0x3f8        ; COM1 data port
    0xB0, 0x30,                    # mov al, '0'
    # loop:
    0xEE,                          # out dx, al
    0xFE, 0xC0,                    # inc al
    0x3C, 0x3A,                    # cmp al, '9'+1
    0x75, 0x02,                    # jne +2
    0xB0, 0x30,                    # mov al, '0'
    0xB9, 0x00, 0x00, 0x00, 0x01,  # mov ecx, 0x01000000  ; ~tens of ms under TCG
    0x49,                          # spin: dec ecx
    0x75, 0xFD,                    # jnz spin
    0xEB, 0xED,                    # jmp loop
])

_IDLE = bytes([
    0x66, 0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
    0xB0, 0x49,                    # mov al, 'I'
    0xEE,                          # out dx, al
    0xF4,                          # halt: hlt
    0xEB, 0xFD,                    # jmp halt
])

CODE = {"busy": _BUSY, "idle": _IDLE}


def image(mode: str) -> bytes:
    """The bytes of a multiboot kernel for `mode` ("busy" or "idle")."""
    try:
        code = CODE[mode]
    except KeyError:
        raise ValueError(f"unknown guest mode {mode!r}; choose one of {', '.join(CODE)}") from None
    checksum = (-(MULTIBOOT_MAGIC + FLAG_AOUT_KLUDGE)) & 0xFFFFFFFF
    header = struct.pack(
        "<8I",
        MULTIBOOT_MAGIC,
        FLAG_AOUT_KLUDGE,
        checksum,
        LOAD_ADDR,  # header_addr: the header sits at the start of the image
        LOAD_ADDR,  # load_addr
        0,  # load_end_addr: 0 = load the whole file
        0,  # bss_end_addr: no bss
        LOAD_ADDR + HEADER_SIZE,  # entry_addr: right after the header
    )
    return header + code


def write(mode: str, path: str | Path) -> Path:
    """Write the kernel for `mode` to `path` (only when the content differs)."""
    p = Path(path)
    data = image(mode)
    if not p.exists() or p.read_bytes() != data:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
    return p


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} busy|idle OUTPUT")
    print(write(sys.argv[1], sys.argv[2]))

#!/usr/bin/env python3
"""Writes the seed corpora of the operation-list targets (virtio_mmio,
announce_learner) in the encoding their sources describe. Run from fuzz/."""
import struct

def w32(off, val):  # a 4-byte register write
    return bytes([0 | (2 << 3)]) + struct.pack("<HI", off, val)

def mem(addr, data):
    out = b""
    for i in range(0, len(data), 255):
        part = data[i:i + 255]
        out += bytes([3]) + struct.pack("<HB", addr + i, len(part)) + part
    return out

def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)

def avail(idx, heads):
    return struct.pack("<HH", 0, idx) + b"".join(struct.pack("<H", h) for h in heads)

RX, TX, CTRL = 4, 12, 20  # process a queue
QUEUES = {0: 0x1000, 1: 0x2000, 2: 0x3000}

def bringup(features=(1 << 32) | (1 << 5) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21)):
    s = w32(0x70, 1) + w32(0x70, 3)
    for sel in (0, 1):
        s += w32(0x24, sel) + w32(0x20, (features >> (32 * sel)) & 0xffffffff)
    s += w32(0x70, 11)
    for q, base in QUEUES.items():
        s += w32(0x30, q) + w32(0x38, 16)
        for reg, addr in ((0x80, base), (0x90, base + 0x100), (0xa0, base + 0x200)):
            s += w32(reg, addr) + w32(reg + 4, 0)
        s += w32(0x44, 1)
    return s + w32(0x70, 15)

eth = bytes.fromhex("ffffffffffff525400123456" "0806") + bytes(46)
vnet = bytes(12)

tx = bringup() + mem(0x8000, vnet + eth) + mem(0x2000, desc(0x8000, len(vnet + eth), 0, 0)) \
    + mem(0x2100, avail(1, [0])) + bytes([TX]) + w32(0x50, 1)
rx = bringup() + mem(0x1000, desc(0x9000, 2048, 2, 0)) + mem(0x1100, avail(1, [0])) + bytes([RX]) \
    + bytes([5]) + struct.pack("<H", len(vnet + eth)) + vnet + eth + w32(0x64, 1)
ctrl = bringup() + mem(0xa000, bytes([1, 1])) + mem(0xa010, bytes.fromhex("525400abcdef")) \
    + mem(0x3000, desc(0xa000, 2, 1, 1) + desc(0xa010, 6, 1, 2) + desc(0xa020, 1, 2, 0)) \
    + mem(0x3100, avail(1, [0])) + bytes([CTRL])
chain = bringup() + mem(0x2000, desc(0x8000, 12, 1, 1) + desc(0x8100, 60, 1, 0)) \
    + mem(0x2100, avail(1, [0])) + bytes([TX])
for name, data in (("tx-frame", tx), ("rx-frame", rx), ("ctrl-mac", ctrl), ("tx-loop", chain),
                   ("reset", bringup() + w32(0x70, 0) + bringup())):
    open(f"corpus/virtio_mmio/{name}", "wb").write(data)

def frame(src, vlan=None):
    h = b"\xff" * 6 + src + ((b"\x81\x00" + struct.pack(">H", vlan)) if vlan is not None else b"") + b"\x08\x06"
    return bytes([0, len(h)]) + h

a, b = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
learn = frame(a) + frame(a, 100) + bytes([2]) + frame(b, 200) \
    + bytes([3, 2, 2, 1]) + bytes.fromhex("525400123456") + a + bytes.fromhex("020000000001") \
    + struct.pack("<HH", 100, 300)
stream = bytes([4, 40]) + b'[[[2,0,0,0,0,10],null],[[2,0,0,0,0,11],7]]'.ljust(40) + bytes([3, 0, 0, 0]) + bytes(6)
for name, data in (("learn-and-plan", learn), ("from-stream", stream)):
    open(f"corpus/announce_learner/{name}", "wb").write(data)

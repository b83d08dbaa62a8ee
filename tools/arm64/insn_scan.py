"""Which int8 multiply instructions ran inside onnxruntime under qemu-aarch64?

    python insn_scan.py QEMU_IN_ASM_LOG PROC_SELF_MAPS > scan.json

QEMU_LOG=in_asm makes qemu-user print every block of guest code it translates (so, every
block that ran at least once) as `0xADDRESS:  ENCODING  mnemonic operands`. With the
process's /proc/self/maps (guest addresses) this counts, per mnemonic, the distinct
instructions inside onnxruntime's native library: SDOT/UDOT mean MLAS's dot-product QGEMM
kernels ran, SMMLA/UMMLA/USMMLA its I8MM kernels, and SMULL/SADALP-style widening multiplies
without either its plain NEON kernels. SVE forms (z registers) are counted separately.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

INTERESTING = ("sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla", "smull", "smull2", "umull", "umull2",
               "sadalp", "uadalp", "smlal", "smlal2", "umlal", "umlal2")
LINE = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\s+(\S+)\s*(.*)$")

# qemu 7.2's disassembler prints the dot-product, I8MM and SVE encodings it does not know as
# `.byte`: recognise those by their encoding (Arm ARM, A64 Advanced SIMD and SVE encodings).
ENCODINGS = [  # (mask, value, name)
    (0xBFE0FC00, 0x0E809400, "sdot"),        # SDOT (vector), 4S <- 16B
    (0xBFE0FC00, 0x2E809400, "udot"),        # UDOT (vector)
    (0xBFC0F400, 0x0F80E000, "sdot"),        # SDOT (by element)
    (0xBFC0F400, 0x2F80E000, "udot"),        # UDOT (by element)
    (0xBFE0FC00, 0x0E809C00, "usdot"),       # USDOT (vector)
    (0xBFC0F400, 0x0F80F000, "usdot"),       # USDOT (by element)
    (0xBFC0F400, 0x0F00F000, "sudot"),       # SUDOT (by element)
    (0xFFE0FC00, 0x4E80A400, "smmla"),       # SMMLA (vector)
    (0xFFE0FC00, 0x6E80A400, "ummla"),       # UMMLA (vector)
    (0xFFE0FC00, 0x4E80AC00, "usmmla"),      # USMMLA (vector)
    (0xFFA0FC00, 0x44800000, "sdot (sve)"),  # SVE SDOT (vectors)
    (0xFFA0FC00, 0x44800400, "udot (sve)"),  # SVE UDOT (vectors)
    (0xFFE0FC00, 0x45009800, "smmla (sve)"),
    (0xFFE0FC00, 0x45C09800, "ummla (sve)"),
    (0xFFE0FC00, 0x45809800, "usmmla (sve)"),
]


def by_encoding(word: int) -> str | None:
    for mask, value, name in ENCODINGS:
        if word & mask == value:
            return name
    return None


def ort_ranges(maps_text: str) -> list[tuple[int, int, str]]:
    ranges = []
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and "onnxruntime" in parts[5] and "x" in parts[1]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi, parts[5]))
    return ranges


def scan(log_path: str, maps_path: str) -> dict:
    with open(maps_path) as f:
        ranges = ort_ranges(f.read())
    seen: dict[str, set[int]] = {}
    total_ort = 0
    undecoded = 0
    addresses: set[int] = set()
    with open(log_path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            addr = int(m.group(1), 16)
            if not any(lo <= addr < hi for lo, hi, _ in ranges):
                continue
            if addr in addresses:
                continue
            addresses.add(addr)
            total_ort += 1
            mnem, ops = m.group(3).lower(), m.group(4).lower()
            if mnem.startswith((".", "unallocated", "unknown", "illegal")):
                name = by_encoding(int(m.group(2), 16))
                if name:
                    seen.setdefault(name, set()).add(addr)
                else:
                    undecoded += 1
                continue
            if mnem in INTERESTING:
                key = f"{mnem} (sve)" if ops.startswith("z") else mnem
                seen.setdefault(key, set()).add(addr)
    counts = Counter({k: len(v) for k, v in seen.items()})
    return {
        "onnxruntime_mappings": sorted({r[2] for r in ranges}),
        "onnxruntime_instructions_translated": total_ort,
        "undecoded_instructions": undecoded,  # .byte lines that are none of ENCODINGS (mostly SVE)
        "onnxruntime_counts": dict(sorted(counts.items())),
        "verdict": verdict(counts),
    }


def verdict(c: Counter) -> str:
    if any(c.get(k) for k in ("smmla", "ummla", "usmmla", "smmla (sve)", "ummla (sve)", "usmmla (sve)")):
        return "I8MM kernels (SMMLA/UMMLA) ran"
    if any(c.get(k) for k in ("sdot", "udot", "usdot", "sudot", "sdot (sve)", "udot (sve)")):
        return "dot-product kernels (SDOT/UDOT) ran"
    if any(c.get(k) for k in ("smull", "smull2", "umull", "umull2", "sadalp", "uadalp", "smlal", "umlal")):
        return "plain NEON widening-multiply kernels ran (no dot-product or I8MM instructions)"
    return "no int8 multiply instructions seen in onnxruntime"


if __name__ == "__main__":
    json.dump(scan(sys.argv[1], sys.argv[2]), sys.stdout, indent=2)
    print()

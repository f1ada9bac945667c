"""Reading compiled Triton kernels without a GPU: the ptxas log (registers, spills), the SASS
(from ``nvdisasm``: tensor-core instructions, the loops and their bodies) and the TTGIR (which
loops the software pipeliner turned into asynchronous copies).

Loops in SASS are found by their backward branches: a ``BRA`` to a label at a lower address
closes a loop whose body is every instruction from the label to the branch (both included).
The kernels' column loops are not nested, so each backward branch is one loop, in source order.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass

# Tensor-core instructions: Hopper warpgroup MMA (HGMMA in SASS, wgmma in PTX), warp-level MMA
# (HMMA for half/tf32, IMMA, DMMA).
TENSOR_CORE_OPS = ("HGMMA", "WGMMA", "HMMA", "IMMA", "DMMA")
# Asynchronous global-to-shared copies: cp.async (LDGSTS), TMA (UTMALDG), bulk copies (UBLKCP).
ASYNC_COPY_OPS = ("LDGSTS", "UTMALDG", "UBLKCP")
# The special-function unit (ex2, lg2, rcp, rsq, sin, cos): 16 lanes per SM on sm_80 and sm_90.
MUFU_OPS = ("MUFU",)

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    """One SASS loop: its instructions (opcode text, predicate stripped), in program order."""

    start: int
    end: int
    instructions: list

    def count(self, ops) -> int:
        return sum(1 for i in self.instructions if _opcode(i).split(".")[0] in ops)

    @property
    def async_copies(self) -> int:
        return self.count(ASYNC_COPY_OPS)

    @property
    def tensor_core(self) -> int:
        return self.count(TENSOR_CORE_OPS)


def _opcode(text: str) -> str:
    text = text.strip()
    if text.startswith("@"):
        text = text.split(None, 1)[1] if " " in text else ""
    return text.split(None, 1)[0] if text else ""


def ptxas_resources(log: str) -> dict:
    """Registers, spill bytes (stores + loads), stack frame from a ``ptxas -v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise ValueError(f"no resource usage in the ptxas log:\n{log}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_bytes": int(frame.group(2)) + int(frame.group(3))}


def tool(name: str) -> str:
    """A CUDA tool shipped inside the triton package (nvdisasm, ptxas)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_with_timeout(folder: str, seconds: float) -> str:
    """A ptxas that gives up after ``seconds`` (for TRITON_PTXAS_PATH): exit code 124."""
    path = os.path.join(folder, "ptxas")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec timeout {int(seconds)} "{tool("ptxas")}" "$@"\n')
    os.chmod(path, 0o755)
    return path


EIATTR_REGCOUNT = 0x2F  # .nv.info attribute: (symbol index u32, registers per thread u32)


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread of the (one) kernel of an ELF ``cubin``, from its ``.nv.info`` section:
    a list of ``(format u8, attribute u8, value)`` entries, where format 4 carries a u16 size and
    that many bytes and the other formats a u16. The number the driver allocates by."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    found = []
    for name_at, _, _, _, offset, size in headers:
        name = cubin[names + name_at:cubin.index(b"\0", names + name_at)]
        if name != b".nv.info":
            continue
        at = offset
        while at + 4 <= offset + size:
            fmt, attr, value = struct.unpack_from("<BBH", cubin, at)
            if fmt == 4:
                if attr == EIATTR_REGCOUNT:
                    found.append(struct.unpack_from("<II", cubin, at + 4)[1])
                at += 4 + value
            else:
                at += 4
    if len(found) != 1:
        raise ValueError(f"expected one register count in the cubin's .nv.info, found {found}")
    return found[0]


def disassemble(cubin: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool("nvdisasm"), "-c", path], check=True, capture_output=True, text=True).stdout
    finally:
        os.remove(path)


def parse_sass(sass: str):
    """``(instructions, loops)``: every instruction ``(address, text)`` and the loops, in order."""
    instructions, labels, branches = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        text = m.group(2)
        target = _BRA.search(text)
        if target:
            branches.append((len(instructions), target.group(1)))
        instructions.append((int(m.group(1), 16), text))
    loops = []
    for at, label in branches:
        start = labels.get(label)
        # a branch to itself after EXIT is ptxas's end-of-code trap, not a loop
        if start is not None and start < at:
            loops.append(Loop(instructions[start][0], instructions[at][0],
                              [t for _, t in instructions[start:at + 1]]))
    loops.sort(key=lambda lp: lp.start)
    return instructions, loops


def tensor_core_count(instructions) -> int:
    return sum(1 for _, t in instructions if _opcode(t).split(".")[0] in TENSOR_CORE_OPS)


def ttgir_loops(ttgir: str):
    """For each ``scf.for`` of the TTGIR, in order: whether its body issues asynchronous copies
    (``ttg.async_copy_global_to_local``, or TMA copies): the pipeliner's multi-buffered loads."""
    lines = ttgir.splitlines()
    result = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body_async = False
        for inner in lines[i + 1:]:
            if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) == indent:
                break
            if "async_copy_global_to_local" in inner or "async_tma_copy" in inner:
                body_async = True
        result.append(body_async)
    return result

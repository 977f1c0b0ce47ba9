"""The innermost loops of an aarch64 assembly listing, and llvm-mca's model of them (for ``arm.py``).

:func:`find_loops` reads the loops of a listing (GCC's or LLVM's) from its back edges: a branch to a label
before it in the same function. :func:`hot_loop` picks the one that does a kernel's work, :func:`trip_count`
reads a loop's iterations per entry when its counter runs between constants, and :func:`mca` runs llvm-mca on
a loop body (steady state) for :data:`MCA_CPU`. :func:`find_llvm_mca` refuses an llvm-mca older than LLVM 17,
whose ``neoverse-n1`` is the Cortex-A57 model.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

#: The llvm-mca CPU: the Cortex-A76's design. LLVM 17 added a Neoverse-N1 model; older llvm-mca use the Cortex-A57
#: tables for it (FMLA latency 10, 3-uop ldp q), and LLVM 19 still does for -mcpu=cortex-a76.
MCA_CPU = "neoverse-n1"
MCA_MIN_LLVM = 17
MCA_INSTALL = "apt-get install llvm-19"
#: A second run at this dispatch width (the A76's decode and rename width) checks that the front end does not bind.
DISPATCH_CHECK = 4


class ToolMissing(RuntimeError):
    """A tool or source the model needs is not here (the message is one sentence)."""


# ---------------------------------------------------------------------------------------------- assembly


@dataclasses.dataclass
class Insn:
    index: int  # position among the parsed items
    mnemonic: str
    operands: str
    text: str


@dataclasses.dataclass
class Loop:
    """A loop of the assembly: a backward branch from ``end`` to the label at ``start`` (item indices)."""

    label: str
    function: str
    start: int
    end: int
    body: list  # the Insn between the label and the back edge, both included
    parent: "Loop | None" = None
    children: list = dataclasses.field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


_BRANCH = re.compile(r"^(b(\.\w+)?|b\w\w|cbn?z|tbn?z)$")  # b, b.ne, bne (GCC writes both), cbz, tbnz


def parse(asm: str) -> tuple[list, dict, dict]:
    """The items of an assembly listing: ``("label", name)`` and :class:`Insn`; directives and comments dropped.

    Returns ``(items, labels, functions)``: label name -> item index, and item index -> function name (the
    last ``.type NAME,@function`` symbol seen).
    """
    items, labels, functions = [], {}, {}
    pending, function = None, ""
    for raw in asm.splitlines():
        line = raw.split("//")[0].strip()
        if not line:
            continue
        typed = re.match(r"\.type\s+([^,\s]+)\s*,\s*[@%]function", line)
        if typed:
            pending = typed.group(1)
            continue
        label = re.match(r"^([.\w$]+):\s*(.*)$", line)
        if label:
            name = label.group(1)
            if name == pending:
                function, pending = name, None
            labels[name] = len(items)
            items.append(("label", name))
            line = label.group(2).strip()
            if not line:
                continue
        if line.startswith(".") or line.startswith("#") or line.startswith("@"):
            continue
        parts = line.split(None, 1)
        functions[len(items)] = function
        items.append(Insn(len(items), parts[0].lower(), parts[1].strip() if len(parts) > 1 else "", line))
    return items, labels, functions


def _target(insn: Insn) -> str | None:
    if not _BRANCH.match(insn.mnemonic) or not insn.operands:
        return None
    return insn.operands.split(",")[-1].strip()


def find_loops(asm: str) -> list[Loop]:
    """Every loop of the listing (a branch back to a label before it, in the same function), with nesting."""
    items, labels, functions = parse(asm)
    loops = []
    for item in items:
        if not isinstance(item, Insn):
            continue
        target = _target(item)
        start = labels.get(target) if target else None
        if start is None or start >= item.index:
            continue
        body = [i for i in items[start:item.index + 1] if isinstance(i, Insn)]
        if functions.get(body[0].index) != functions.get(item.index):
            continue
        loops.append(Loop(target, functions.get(item.index, ""), start, item.index, body))
    for loop in loops:  # the parent: the smallest other loop around it
        around = [other for other in loops if other.contains(loop)]
        loop.parent = min(around, key=lambda o: o.end - o.start) if around else None
        if loop.parent:
            loop.parent.children.append(loop)
    return loops


def innermost(loops: list[Loop]) -> list[Loop]:
    return [loop for loop in loops if not loop.children]


def count(insns: list, mnemonic: str, operand: str = "") -> int:
    """How many of ``insns`` are ``mnemonic`` with ``operand`` (a regular expression) in their operands."""
    return sum(1 for i in insns if i.mnemonic == mnemonic and re.search(operand, i.operands))


def hot_loop(loops: list[Loop], mnemonic: str, function: str = "") -> Loop:
    """The loop that does a kernel's work: among the innermost loops (of functions whose name contains
    ``function``) that hold ``mnemonic``, the one with the most of it, then the most instructions (scalar
    tails, table builds and reductions are smaller and run O(N) or O(K) times, not O(N K))."""
    candidates = [loop for loop in innermost(loops) if function in loop.function and count(loop.body, mnemonic)]
    if not candidates:
        where = f" of {function}" if function else ""
        raise ValueError(f"no innermost loop with {mnemonic!r} in the assembly{where}")
    return max(candidates, key=lambda loop: (count(loop.body, mnemonic), len(loop.body)))


def own_instructions(loop: Loop) -> list:
    """A loop's instructions less those of the loops inside it."""
    inner = [(c.start, c.end) for c in loop.children]
    return [i for i in loop.body if not any(s <= i.index <= e for s, e in inner)]


_IMM = r"#?(-?(?:0x[0-9a-f]+|\d+))"


def _imm(text: str) -> int:
    return int(text, 16) if text.lower().startswith("0x") else int(text)


def trip_count(asm: str, loop: Loop) -> int | None:
    """Iterations per entry of ``loop`` when its counter runs between constants, read from the listing:
    ``mov wN, #a`` before the loop and ``subs xN, xN, #s`` + ``b.ne`` (``a / s``), or a counter from ``mov xN,
    xzr`` / ``#a`` stepped by ``add xN, xN, #s`` and compared with ``cmp xN, #b`` (``(b - a) / s``). None
    otherwise (a bound held in a register: the caller's n)."""
    items, _, _ = parse(asm)
    body = loop.body
    reg = lambda r: r[1:] if r[0] in "wx" else r  # noqa: E731  (w6 and x6 are one register)
    for k in range(len(body) - 2, -1, -1):  # the last flag-setting instruction before the back edge
        insn = body[k]
        m = re.match(rf"([wx]\d+),\s*([wx]\d+),\s*{_IMM}$", insn.operands)
        c = re.match(rf"([wx]\d+),\s*{_IMM}$", insn.operands)
        if insn.mnemonic in ("subs", "adds") and m and reg(m.group(1)) == reg(m.group(2)):
            counter, step, bound = reg(m.group(1)), _imm(m.group(3)), 0
            step = -step if insn.mnemonic == "subs" else step
            break
        if insn.mnemonic == "cmp" and c:
            counter, bound = reg(c.group(1)), _imm(c.group(2))
            steps = [_imm(s.group(2)) for i in body if i.mnemonic == "add"
                     for s in [re.match(rf"([wx]\d+),\s*[wx]\d+,\s*{_IMM}$", i.operands)]
                     if s and reg(s.group(1)) == counter and reg(i.operands.split(",")[1].strip()) == counter]
            if len(steps) != 1:
                return None
            step = steps[0]
            break
        if insn.mnemonic in ("cmp", "subs", "adds", "cmn", "tst", "ands"):
            return None
    else:
        return None
    start = None
    for item in reversed(items[:loop.start]):  # the counter's start: the last write before the loop
        if isinstance(item, Insn) and item.operands and reg(item.operands.split(",")[0].strip()) == counter:
            m = re.match(rf"[wx]\d+,\s*(?:{_IMM}|([wx]zr))$", item.operands)
            if item.mnemonic == "mov" and m:
                start = 0 if m.group(2) else _imm(m.group(1))
            break
    if start is None or step == 0 or (bound - start) % step or (bound - start) // step <= 0:
        return None
    return (bound - start) // step


# ---------------------------------------------------------------------------------------------- llvm-mca


def find_llvm_mca(path: str | None = None) -> tuple[str, str]:
    """An llvm-mca that has the Neoverse-N1 model (LLVM 17 or newer) and its version, or :class:`ToolMissing`."""
    names = [path] if path else ["llvm-mca", *(f"llvm-mca-{v}" for v in range(22, MCA_MIN_LLVM - 1, -1))]
    found = []
    for name in names:
        exe = shutil.which(name) or (name if path and Path(name).exists() else None)
        if not exe:
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"LLVM version (\d+)\.(\d+)\.(\d+)", out)
        if m:
            found.append((int(m.group(1)), exe, ".".join(m.groups())))
    usable = [f for f in found if f[0] >= MCA_MIN_LLVM]
    if usable:
        _, exe, version = max(usable)
        return exe, version
    versions = ", ".join(v for _, _, v in found)
    have = f" (found LLVM {versions}, whose neoverse-n1 is the Cortex-A57 model)" if found else ""
    raise ToolMissing(f"llvm-mca {MCA_MIN_LLVM} or newer is needed to model the Cortex-A76{have}; run: {MCA_INSTALL}")


def mca(exe: str, insns: list, iterations: int = 1000, dispatch: int | None = None) -> dict:
    """llvm-mca's steady state for ``insns`` run back to back ``iterations`` times on :data:`MCA_CPU`
    (``dispatch``: another dispatch width than the model's)."""
    text = "\n".join(i.text for i in insns) + "\n"
    cmd = [exe, "-mtriple=aarch64", f"-mcpu={MCA_CPU}", f"-iterations={iterations}"]
    if dispatch:
        cmd.append(f"-dispatch={dispatch}")
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolMissing(f"llvm-mca failed on a {len(insns)}-instruction loop ({' '.join(cmd)} < loop.s): {tail}")
    field = lambda name: float(re.search(rf"^{name}:\s+([\d.]+)", proc.stdout, re.M).group(1))  # noqa: E731
    cycles = field("Total Cycles") / field("Iterations")
    return {"cycles_per_iteration": cycles, "block_rthroughput": field("Block RThroughput"),
            "instructions": len(insns), "uops_per_iteration": field("Total uOps") / field("Iterations"),
            "ipc": field("IPC"), "busiest": busiest(proc.stdout, cycles)}


def busiest(report: str, cycles: float) -> dict:
    """The execution units an llvm-mca report keeps busiest: ``{unit: busy cycles per iteration}`` for those
    busy at least 90 % of the iteration's cycles (a loop bound by them), else the single busiest."""
    names = dict(re.findall(r"^\[([\d.]+)\]\s+-\s+(\S+)", report.split("Resource pressure per iteration:")[0], re.M))
    m = re.search(r"Resource pressure per iteration:\n(.*)\n(.*)\n", report)
    if not m:
        return {}
    pressure = {}
    for key, value in zip(re.findall(r"\[([\d.]+)\]", m.group(1)), m.group(2).split()):
        unit = names.get(key, key)
        pressure[unit] = max(pressure.get(unit, 0.0), 0.0 if value == "-" else float(value))
    top = {u: p for u, p in pressure.items() if p >= 0.9 * cycles}
    return top or dict([max(pressure.items(), key=lambda kv: kv[1])])

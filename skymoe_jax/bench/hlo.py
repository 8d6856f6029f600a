"""What a compiled program does in one execution, read from its optimized HLO text: matmuls and their FLOPs,
collectives and their bytes, kernels (Pallas's Triton calls, XLA's Triton fusions, cuBLAS), host callbacks, and the
bytes its kernels read from and write to device memory.

XLA prints each computation once; a while loop's body runs `known_trip_count` times (XLA's backend config) and a
condition one more, so every count is weighted by how often its computation runs (a cond's branches each count as
if taken: an upper bound; a loop whose trip count XLA does not know counts once: a lower bound).
`compiled.cost_analysis()` has no numbers for XLA:GPU's compile-only devices, and none that follow loops, so the
FLOPs here are counted from the dots themselves, and the memory traffic from the kernels: each top-level instruction
(a fusion, a library call, a copy, a collective) reads its operands and writes its result, except where a fusion only
slices an operand (it reads the slices) or updates it in place (it writes the update): a layer loop reads one
layer's slice of the stacked weights, not the stack. Values a fusion keeps in registers or shared memory are not
traffic; caches are not modelled, so this is an upper bound on what a kernel must move and a lower bound on time.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
    r"|\b(branch_computations|called_computations)=\{([^}]*)\}"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"(__[a-z_]+)"')
_DIMS = re.compile(r"(lhs|rhs)_(contracting|batch)_dims=\{([0-9,]*)\}")

BYTES = {"pred": 1, "s4": 1, "s8": 1, "s16": 2, "s32": 4, "s64": 8, "u4": 1, "u8": 1, "u16": 2, "u32": 4, "u64": 8}
BYTES.update({"f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8})
COLLECTIVES = {
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-gather": "all-gather",
    "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "all-to-all-start": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
PALLAS_TRITON = "__gpu$xla.gpu.triton"
HOST_OPS = ("send", "recv", "infeed", "outfeed")
# Instructions that launch no kernel: they name, group or alias buffers, or run other computations.
NO_TRAFFIC = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
}
SLICES = ("dynamic-slice", "slice", "gather")


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, shape) of each array in an HLO type (a tuple type has several)."""
    return [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _ARRAY.findall(type_text)]


def nbytes(type_text: str) -> int:
    return sum(BYTES[d] * math.prod(s) for d, s in arrays(type_text))


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str
    op: str
    rest: str  # operands and attributes, as printed

    @property
    def operands(self) -> list[str]:
        head = self.rest.split(")", 1)[0]
        return [o.strip().lstrip("%") for o in head.split(",") if o.strip().startswith("%")]


@dataclasses.dataclass(frozen=True)
class Dot:
    computation: str
    name: str
    lhs: str  # dtype
    rhs: str
    out: str
    shapes: str  # the operands' and the result's types, as printed
    flops: float  # per execution of the program
    op_name: str  # the JAX operation it came from (metadata)


@dataclasses.dataclass
class Summary:
    dots: list[Dot]
    collectives: dict[str, dict[str, float]]  # kind -> {"count": n, "bytes": b}, per execution
    custom_calls: dict[str, float]  # target -> calls per execution
    triton_fusions: dict[str, float]  # XLA's own Triton fusions by kind -> per execution
    host_transfers: list[str]  # host callbacks, sends, receives, infeeds, outfeeds
    memory_bytes: float  # read from and written to device memory by the kernels, per execution

    @property
    def flops(self) -> float:
        return sum(d.flops for d in self.dots)


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations of an HLO module's text, with the entry's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "=" not in line.split("{", 1)[0].split("->", 1)[0].split("(", 1)[0]:
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(Instruction(*match.groups()))
    return computations, entry


def _callees(inst: Instruction) -> list[tuple[str, int]]:
    """(computation, times it runs per execution of `inst`)."""
    trip = _TRIP.search(inst.rest)
    n = int(trip.group(1)) if trip else 1
    out = []
    for single_kind, single, _, many in _CALLEES.findall(inst.rest):
        if single_kind == "to_apply":
            continue  # a reduction's combiner: no dots or collectives of its own
        if single_kind:
            out.append((single, n if single_kind == "body" else n + 1 if single_kind == "condition" else 1))
        else:
            out += [(c.strip().lstrip("%"), 1) for c in many.split(",") if c.strip()]
    return out


def summarize(text: str) -> Summary:
    computations, entry = parse(text)
    runs = runs_per_execution(computations, entry)
    dots, coll = [], collections.defaultdict(lambda: {"count": 0.0, "bytes": 0.0})
    calls, fusions, host = collections.Counter(), collections.Counter(), []
    kernels = kernel_bodies(computations)
    traffic = 0.0
    for comp, instructions in computations.items():
        times = runs.get(comp, 0)
        if not times:
            continue
        types = {i.name: i.type for i in instructions}
        if comp not in kernels:
            traffic += times * sum(_traffic(inst, types, computations) for inst in instructions)
        for inst in instructions:
            if inst.op == "dot":
                dots.append(_dot(comp, inst, types, times))
            elif inst.op in COLLECTIVES:
                kind = COLLECTIVES[inst.op]
                sizes = [BYTES[d] * math.prod(s) for d, s in arrays(inst.type)]
                coll[kind]["count"] += times
                coll[kind]["bytes"] += times * (max(sizes) if inst.op.endswith("-start") else sum(sizes))
            elif inst.op == "custom-call":
                target = _TARGET.search(inst.rest)
                if target:
                    calls[target.group(1)] += times
                    if "callback" in target.group(1).lower():
                        host.append(f"{target.group(1)} ({inst.name})")
            elif inst.op == "fusion":
                kind = _FUSION_KIND.search(inst.rest)
                if kind and kind.group(1).startswith("__triton"):
                    fusions[kind.group(1)] += times
            elif inst.op in HOST_OPS:
                host.append(f"{inst.op} ({inst.name})")
    return Summary(dots, {k: dict(v) for k, v in coll.items()}, dict(calls), dict(fusions), host, traffic)


def kernel_bodies(computations: dict[str, list[Instruction]]) -> set[str]:
    """Computations that run inside a kernel (fusions' bodies, what they call in turn), not as kernels of their own."""
    pending = [
        callee
        for instructions in computations.values()
        for inst in instructions
        if inst.op == "fusion"
        for callee, _ in _callees(inst)
    ]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += [callee for inst in computations.get(name, []) for callee, _ in _callees(inst)]
    return found


def _traffic(inst: Instruction, types: dict[str, str], computations: dict[str, list[Instruction]]) -> float:
    """Bytes one top-level instruction reads and writes in device memory."""
    if inst.op in NO_TRAFFIC or inst.op.endswith("-done"):
        return 0.0
    operands = [nbytes(types.get(o, "")) for o in inst.operands]
    if inst.op in SLICES:
        return 2.0 * nbytes(inst.type)
    if inst.op == "dynamic-update-slice":
        return 2.0 * operands[1]
    if inst.op == "fusion":
        callee = next((c for c, _ in _callees(inst)), "")
        reads, written = _fusion_access(computations.get(callee, []))
        return sum(reads.get(i, b) for i, b in enumerate(operands)) + (
            nbytes(inst.type) if written is None else written
        )
    return sum(operands) + nbytes(inst.type)


def _fusion_access(instructions: list[Instruction]) -> tuple[dict[int, float], float | None]:
    """What a fusion reads of each parameter it only slices or updates in place (by parameter number; the others
    are read whole), and what it writes when its result updates a parameter in place (None: the result whole)."""
    by_name = {i.name: i for i in instructions}
    users: dict[str, list[tuple[Instruction, int]]] = collections.defaultdict(list)
    for inst in instructions:
        for position, operand in enumerate(inst.operands):
            users[operand].append((inst, position))

    def through_bitcasts(name: str) -> list[tuple[Instruction, int]]:
        out = []
        for user, position in users[name]:
            out += through_bitcasts(user.name) if user.op == "bitcast" else [(user, position)]
        return out

    def source(name: str) -> Instruction | None:
        inst = by_name.get(name)
        while inst is not None and inst.op == "bitcast":
            inst = by_name.get(inst.operands[0])
        return inst

    reads: dict[int, float] = {}
    for inst in instructions:
        if inst.op != "parameter":
            continue
        uses = through_bitcasts(inst.name)
        in_place = [u for u, pos in uses if u.op == "dynamic-update-slice" and pos == 0]
        sliced = [u for u, pos in uses if u.op in SLICES and pos == 0]
        if uses and len(in_place) + len(sliced) == len(uses):
            reads[int(inst.rest.split(")", 1)[0])] = float(sum(nbytes(u.type) for u in sliced))
    if not instructions:
        return reads, None
    root = instructions[-1]  # XLA prints a computation's root last
    results = [source(o) for o in root.operands] if root.op == "tuple" else [root]
    if not any(r is not None and r.op == "dynamic-update-slice" for r in results):
        return reads, None
    written = 0.0
    for r in results:
        base = source(r.operands[0]) if r is not None and r.op == "dynamic-update-slice" else None
        if base is not None and base.op == "parameter":
            written += nbytes(by_name[r.operands[1]].type) if r.operands[1] in by_name else 0.0
        elif r is not None:
            written += nbytes(r.type)
    return reads, written


def runs_per_execution(computations: dict[str, list[Instruction]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry: each caller's runs times the trip count,
    summed over callers, iterated to a fixed point (the computations form a DAG under the entry)."""
    runs: dict[str, int] = {entry: 1}
    for _ in range(len(computations)):
        new = collections.Counter({entry: 1})
        for name, times in runs.items():
            for inst in computations.get(name, []):
                for callee, n in _callees(inst):
                    new[callee] += times * n
        if dict(new) == runs:
            break
        runs = dict(new)
    return runs


def _dot(comp: str, inst: Instruction, types: dict[str, str], times: int) -> Dot:
    lhs_name, rhs_name = (inst.operands + ["", ""])[:2]
    lhs = arrays(types.get(lhs_name, ""))
    rhs = arrays(types.get(rhs_name, ""))
    out = arrays(inst.type)
    dims = {(side, kind): [int(d) for d in v.split(",") if d] for side, kind, v in _DIMS.findall(inst.rest)}
    contracted = math.prod(lhs[0][1][d] for d in dims.get(("lhs", "contracting"), [])) if lhs else 0
    op_name = re.search(r'op_name="([^"]*)"', inst.rest)
    return Dot(
        computation=comp,
        name=inst.name,
        lhs=lhs[0][0] if lhs else "?",
        rhs=rhs[0][0] if rhs else "?",
        out=out[0][0] if out else "?",
        shapes=" ".join(t.split("{")[0] for t in (types.get(lhs_name, ""), types.get(rhs_name, ""), inst.type)),
        flops=times * 2.0 * math.prod(out[0][1]) * contracted if out else 0.0,
        op_name=op_name.group(1) if op_name else "",
    )

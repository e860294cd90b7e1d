"""What one device does in a compiled XLA program, read from its optimised HLO text.

``jax.stages.Compiled.cost_analysis()`` counts the body of every loop once (measured on TPU:
a scan of 2, 4 or 8 matmuls reports the FLOPs of one), and the decoder's layers, its chunked
LM head and XLA's own windowed (collective) matmuls are all loops; on GPUs it returns nothing.
``analyse`` therefore walks the program itself: every computation that runs, as often as it
runs (a ``while`` body times its trip count, read from its condition, ``i < N`` with ``i``
starting from a constant), counting

- FLOPs of every ``dot`` and ``convolution`` (XLA's own rule: 2 · output elements ·
  contracted size, and for a convolution only the window positions that meet real input),
  cuBLAS GEMM custom calls on GPUs included;
- bytes that the top-level operations read and write (operands and results of each fusion,
  collective and copy: an upper bound on the memory traffic, as XLA's own estimate is);
- collectives by kind, with the bytes each moves and the devices each group spans; those between
  TPU slices, over the data-centre network, apart (libtpu compiles them as host transfers).

A loop whose trip count cannot be read (nor is annotated by XLA, as the GPU compiler does) counts
once and is listed in ``unknown_loops``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections import Counter, defaultdict
from typing import Iterator

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
# Operations that move no data of their own (views, tuples, control) or whose work is counted in
# the computations they call.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota"}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-_]*)\(")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text, e.g. "bf16[8,512]{1,0}" or a tuple "(f32[], ...)"
    opcode: str
    operands: list[str]
    arguments: str  # the text between the opcode's parentheses (a constant's value)
    attributes: str

    def attribute(self, key: str) -> str | None:
        """The raw text of ``key=...`` (a name, a {...} group or a token), or None."""
        match = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attributes)
        if not match:
            return None
        rest = self.attributes[match.end():]
        if rest.startswith("{"):
            return rest[: _closing(rest, 0, "{", "}") + 1]
        iota = re.match(r"\[[\d,]*\]<=\[[\d,]*\](?:T\([\d,]*\))?", rest)
        if iota:
            return iota.group(0)
        if rest.startswith("mesh["):
            end = rest.index("]") + 1
            groups = re.match(r"\s*\{[^}]*\}", rest[end:])
            return rest[: end + (groups.end() if groups else 0)]
        return re.match(r"[^\s,]+", rest).group(0)


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: float  # per device, per execution: what the device sends or receives
    groups: list[list[int]]  # device ids (positions in the program's device assignment) in each group
    count: float  # executions per run of the program
    # "chip": over the chips' own interconnect (ICI, NVLink); "data-centre": between TPU slices, which
    # libtpu compiles as host transfers to its multi-slice runtime (``send`` with a megascale type).
    network: str = "chip"


@dataclasses.dataclass
class ProgramCost:
    """Per device, per run of the program."""

    flops: float
    bytes_accessed: float
    collectives: list[Collective]
    unknown_loops: list[str]

    def collective_bytes(self, network: str = "chip") -> dict[str, float]:
        """Bytes per device by collective kind, over ``network`` ("chip" or "data-centre")."""
        totals: dict[str, float] = defaultdict(float)
        for collective in self.collectives:
            if collective.network == network:
                totals[collective.kind] += collective.bytes * collective.count
        return dict(totals)


def _closing(text: str, start: int, opening: str, closing: str) -> int:
    depth = 0
    for index in range(start, len(text)):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opening}{closing} in HLO text")


def shape_bytes(shape: str) -> float:
    """Bytes of an array or tuple shape text (layouts and memory spaces ignored)."""
    return sum(DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def array_dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations by name (their instructions in order) and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _parse_instruction(line: str) -> Instruction | None:
    name = _NAME.match(line)
    if not name:
        return None
    rest = line[name.end():]
    # The opcode is the first " word(" after the shape; a shape's layout has no spaces before "(".
    if rest.startswith("("):
        shape_end = _closing(rest, 0, "(", ")") + 1
    else:
        shape_end = 0
    opcode = _OPCODE.search(rest, shape_end)
    if not opcode:
        return None
    shape = rest[: opcode.start()].strip()
    open_paren = opcode.end() - 1
    close_paren = _closing(rest, open_paren, "(", ")")
    arguments = rest[open_paren + 1:close_paren]
    operands = re.findall(r"%([^\s,)]+)", arguments)
    return Instruction(name.group(1), shape, opcode.group(1), operands, arguments, rest[close_paren + 1:])


def _called(instruction: Instruction, key: str) -> list[str]:
    value = instruction.attribute(key)
    return re.findall(r"%([^\s,}]+)", value) if value else []


def _trip_count(loop: Instruction, computations, instructions_by_name) -> int | None:
    """The iterations of a loop whose condition is ``get-tuple-element(param, k) < N`` (or ``<=``)
    with ``N`` a constant, whose body adds a constant step to element ``k`` (XLA's windowed
    matmuls step by 2), and whose initial tuple holds a constant at ``k`` (0 where it cannot be
    read: JAX's scans and XLA's windowed loops count from 0), or the count XLA itself annotated
    (``known_trip_count``, as XLA's GPU compiler does). None for any other loop."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
    if known:
        return int(known.group(1))
    condition = computations.get(_called(loop, "condition")[0], [])
    by_name = {i.name: i for i in condition}
    root = condition[-1] if condition else None
    if root is None or root.opcode != "compare":
        return None
    direction = root.attribute("direction")
    operands = [by_name.get(name) for name in root.operands]
    if len(operands) != 2 or None in operands:
        return None
    counter, limit = operands
    if direction in ("GT", "GE"):
        counter, limit = limit, counter
        direction = "LT" if direction == "GT" else "LE"
    if counter.opcode != "get-tuple-element" or limit.opcode != "constant" or direction not in ("LT", "LE"):
        return None
    bound, index = _constant_value(limit), int(counter.attribute("index"))
    start = 0.0
    initial = instructions_by_name.get(loop.operands[0]) if loop.operands else None
    if initial is not None and initial.opcode == "tuple" and index < len(initial.operands):
        element = instructions_by_name.get(initial.operands[index])
        if element is not None and element.opcode == "constant":
            start = _constant_value(element)
    step = _loop_step(computations.get(_called(loop, "body")[0], []), index)
    if bound is None or start is None or not step:
        return None
    return max(0, math.ceil((bound - start + (direction == "LE")) / step))


def _loop_step(body: list[Instruction], index: int) -> float | None:
    """What the loop body adds to element ``index`` of its state (a constant), or None."""
    by_name = {i.name: i for i in body}
    root = body[-1] if body else None
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
        return None
    parts = [_through_copies(by_name.get(name), by_name) for name in update.operands]
    constants = [p for p in parts if p is not None and p.opcode == "constant"]
    counters = [p for p in parts if p is not None and p.opcode == "get-tuple-element" and p.attribute("index") == str(index)]
    return _constant_value(constants[0]) if constants and counters else None


def _through_copies(instruction: Instruction | None, by_name: dict[str, Instruction]) -> Instruction | None:
    """The instruction that a chain of copies and bitcasts starts from."""
    while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
        instruction = by_name.get(instruction.operands[0])
    return instruction


def _constant_value(instruction: Instruction) -> float | None:
    try:
        return float(instruction.arguments)
    except ValueError:
        return None


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    contracting = instruction.attribute("lhs_contracting_dims")
    lhs = array_dims(shapes.get(instruction.operands[0], ""))
    size = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting or ""))
    return 2.0 * math.prod(array_dims(instruction.shape)) * size


def _gemm_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """A cuBLAS/cuBLASLt GEMM custom call (GPU): its dot dimension numbers are in the backend config."""
    config = instruction.attribute("backend_config")
    match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', config or "")
    lhs = array_dims(shapes.get(instruction.operands[0], ""))
    size = math.prod(lhs[int(d)] for d in re.findall(r"\d+", match.group(1))) if match else 0
    output = instruction.shape[1:] if instruction.shape.startswith("(") else instruction.shape
    return 2.0 * math.prod(array_dims(output)) * size


def _convolution_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """XLA's count (HloCostAnalysis): 2 · (C_in / feature groups) · C_out · (N / batch groups) ·
    Π over spatial dimensions of the (output, kernel) position pairs that meet real input."""
    labels = instruction.attribute("dim_labels")
    lhs_labels, rest = labels.split("_")
    rhs_labels, out_labels = rest.split("->")
    lhs = array_dims(shapes.get(instruction.operands[0], ""))
    rhs = array_dims(shapes.get(instruction.operands[1], ""))
    out = array_dims(instruction.shape)
    feature_groups = int(instruction.attribute("feature_group_count") or 1)
    batch_groups = int(instruction.attribute("batch_group_count") or 1)
    input_features = lhs[lhs_labels.index("f")]
    output_features = out[out_labels.index("f")]
    batch = lhs[lhs_labels.index("b")]
    window = _window(instruction.attribute("window") or "", sum(c.isdigit() for c in lhs_labels))
    positions = 1
    for spatial, dim in enumerate(window):
        key = str(spatial)
        positions *= _valid_positions(lhs[lhs_labels.index(key)], rhs[rhs_labels.index(key)],
                                      out[out_labels.index(key)], dim)
    return 2.0 * (input_features / feature_groups) * output_features * (batch / batch_groups) * positions


def _window(text: str, rank: int) -> list[dict[str, int]]:
    dims = [{"stride": 1, "pad_low": 0, "lhs_dilate": 1, "rhs_dilate": 1} for _ in range(rank)]
    for key, value in re.findall(r"(size|stride|pad|lhs_dilate|rhs_dilate)=([0-9_x\-]+)", text):
        for dim, part in zip(dims, value.split("x")):
            if key == "pad":
                dim["pad_low"] = int(part.split("_")[0])
            elif key != "size":
                dim[key] = int(part)
    return dims


def _valid_positions(input_size: int, kernel_size: int, output_size: int, dim: dict[str, int]) -> int:
    count = 0
    for kernel in range(kernel_size):
        for output in range(output_size):
            position = output * dim["stride"] + kernel * dim["rhs_dilate"] - dim["pad_low"]
            if position % dim["lhs_dilate"] == 0 and 0 <= position // dim["lhs_dilate"] < input_size:
                count += 1
    return count


def replica_groups(instruction: Instruction, num_devices: int) -> list[list[int]]:
    """Device ids of each group of a collective, from any of XLA's three notations: explicit
    ``{{0,1},{2,3}}``, iota ``[2,2]<=[4]`` (optionally transposed, ``T(1,0)``), and mesh
    ``mesh['a'=2,'b'=2] {'b'}`` (groups vary the named axes, ids in row-major mesh order)."""
    pairs = instruction.attribute("source_target_pairs")
    if pairs is not None:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs)]
    text = instruction.attribute("replica_groups")
    if not text or text in ("{}", "{{}}"):
        return [list(range(num_devices))]
    if text.startswith("mesh["):
        axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", text.split("]")[0])]
        grouped = re.findall(r"'([^']+)'", text.split("]", 1)[1]) if "]" in text else []
        names = [name for name, _ in axes]
        sizes = [size for _, size in axes]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for device, coordinates in enumerate(itertools.product(*(range(s) for s in sizes))):
            key = tuple(c for name, c in zip(names, coordinates) if name not in grouped)
            groups[key].append(device)
        return list(groups.values())
    iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        import numpy as np

        group_shape = [int(d) for d in iota.group(1).split(",")]
        ids = np.arange(math.prod(int(d) for d in iota.group(2).split(","))).reshape(
            [int(d) for d in iota.group(2).split(",")])
        if iota.group(3):
            ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
        return ids.reshape(group_shape).tolist()
    return [[int(d) for d in re.findall(r"\d+", group)] for group in re.findall(r"\{([\d,\s]*)\}", text)]


_SLICES = ("slice", "dynamic-slice", "gather")


def _traffic(instruction: Instruction, computations, shapes: dict[str, str]) -> float:
    """Bytes an operation reads and writes in memory. A fusion reads only the slices it takes of an
    operand that it only slices, and writes only the update of an in-place dynamic-update-slice (its
    target is neither read nor written whole); a result that passes an operand through is free."""
    if instruction.opcode == "copy-start":
        return 2 * sum(shape_bytes(shapes.get(o, "")) for o in instruction.operands)
    if instruction.opcode != "fusion":
        result = instruction.shape
        if result.startswith("(") and instruction.opcode.endswith("-start"):
            result = "%s[%s]" % _ARRAY.findall(result)[-1]
        return shape_bytes(result) + sum(shape_bytes(shapes.get(o, "")) for o in instruction.operands)
    body = computations.get(_called(instruction, "calls")[0], [])
    by_name = {i.name: i for i in body}
    users: dict[str, list[Instruction]] = defaultdict(list)
    for inner in body:
        for operand in inner.operands:
            users[operand].append(inner)

    def final_users(name: str) -> list[Instruction]:
        found = []
        for user in users.get(name, []):
            found.extend(final_users(user.name) if user.opcode == "bitcast" else [user])
        return found

    root = body[-1] if body else None
    outputs = [by_name.get(n) for n in root.operands] if root is not None and root.opcode == "tuple" else [root]
    written = 0.0
    in_place = set()
    for output in outputs:
        output = _through_copies(output, by_name) if output is not None and output.opcode == "bitcast" else output
        if output is None or output.opcode == "parameter":
            continue
        if output.opcode == "dynamic-update-slice":
            written += shape_bytes(shapes.get(output.operands[1], ""))
            in_place.add(output.name)
        else:
            written += shape_bytes(output.shape)
    read = 0.0
    for inner in body:
        if inner.opcode != "parameter":
            continue
        consumers = final_users(inner.name)
        if consumers and all(c.opcode in _SLICES for c in consumers):
            read += sum(shape_bytes(c.shape) for c in consumers)
        elif consumers and all(c.name in in_place for c in consumers):
            continue
        else:
            read += shape_bytes(inner.shape)
    return read + written


def _collective_bytes(instruction: Instruction, shapes: dict[str, str]) -> float:
    """What one device moves: an all-gather's result (the last array of a ``-start``'s tuple), the
    operands of the others (reduce-scatter, all-reduce, all-to-all, permutes)."""
    if instruction.opcode.removesuffix("-start") == "all-gather":
        dtype, dims = _ARRAY.findall(instruction.shape)[-1]
        return DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return sum(shape_bytes(shapes.get(name, "")) for name in instruction.operands)


def analyse(text: str, num_devices: int) -> ProgramCost:
    """The per-device cost of one run of the program whose optimised HLO ``text`` is given
    (``compiled.as_text()``), ``num_devices`` taking part."""
    computations, entry = parse_module(text)
    instructions_by_name = {i.name: i for body in computations.values() for i in body}
    shapes = {name: i.shape for name, i in instructions_by_name.items()}
    multiplicity: Counter = Counter()
    unknown: list[str] = []
    flops = traffic = 0.0
    collectives: list[Collective] = []

    def visit(name: str, times: float, top_level: bool) -> None:
        nonlocal flops, traffic
        multiplicity[name] += times
        for instruction in computations.get(name, []):
            op = instruction.opcode
            if op == "dot":
                flops += times * _dot_flops(instruction, shapes)
            elif op == "convolution":
                flops += times * _convolution_flops(instruction, shapes)
            elif op == "custom-call" and "gemm" in (instruction.attribute("custom_call_target") or "").lower():
                flops += times * _gemm_flops(instruction, shapes)
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES and not op.endswith("-done"):
                collectives.append(Collective(kind, _collective_bytes(instruction, shapes),
                                              replica_groups(instruction, num_devices), times))
            transfer = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', instruction.attributes)
            if op == "send" and transfer:
                operand = _ARRAY.findall(instruction.shape)[0]
                size = DTYPE_BYTES.get(operand[0], 0) * math.prod(int(d) for d in operand[1].split(",") if d)
                collectives.append(Collective(transfer.group(1).lower().replace("_", "-"), size, [], times,
                                              "data-centre"))
            if top_level and op not in _NO_TRAFFIC and not op.endswith("-done"):
                traffic += times * _traffic(instruction, computations, shapes)
            if op == "while":
                trips = _trip_count(instruction, computations, instructions_by_name)
                if trips is None:
                    unknown.append(instruction.name)
                    trips = 1
                visit(_called(instruction, "body")[0], times * trips, top_level)
            elif op == "call":
                for callee in _called(instruction, "to_apply"):
                    visit(callee, times, top_level)
            elif op == "conditional":
                branches = _called(instruction, "branch_computations") or (
                    _called(instruction, "true_computation") + _called(instruction, "false_computation"))
                costs = [_costliest(b) for b in branches]
                if costs:
                    visit(branches[costs.index(max(costs))], times, top_level)
            elif op in ("fusion", "async-start") or (op == "custom-call" and instruction.attribute("called_computations")):
                for callee in _called(instruction, "calls") + _called(instruction, "called_computations"):
                    visit(callee, times, False)

    def _costliest(branch: str) -> float:
        return sum(_dot_flops(i, shapes) if i.opcode == "dot" else 0.0 for i in computations.get(branch, []))

    visit(entry, 1.0, True)
    return ProgramCost(flops, traffic, collectives, unknown)


def iterate_instructions(text: str) -> Iterator[Instruction]:
    """Every instruction of the module, for tests and debugging."""
    computations, _ = parse_module(text)
    for body in computations.values():
        yield from body


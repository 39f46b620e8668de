"""Import GPU kernel timings from a torch.profiler (Kineto) Chrome trace.

A Kineto trace (``prof.export_chrome_trace(...)``, ``.json`` or ``.json.gz``) is a JSON
object whose ``traceEvents`` list holds, among others:

- GPU kernels: ``cat`` ``kernel`` (any case), ``ts``/``dur`` in µs, ``args.stream``,
  ``args.grid``, ``args.block`` and ``args.correlation`` (older traces:
  ``"correlation id"``);
- the CPU-side launches: ``cat`` ``cuda_runtime``/``Runtime`` (or ``cuda_driver``/
  ``Driver`` for ``cuLaunchKernel``) with the same correlation id;
- CPU operators: ``cat`` ``cpu_op``/``Operator``, with ``args["Input Dims"]`` and
  ``args["Input type"]`` when the profile was recorded with ``record_shapes=True``, and
  ``user_annotation`` ranges (``record_function``).

Each kernel is linked by its correlation id to its launch, and the launch to the
innermost CPU operator on the same thread (pid, tid) whose ``[ts, ts + dur]`` contains
it; that operator's input shapes are the kernel's. Each kernel is then put into one
class by the name rules of :func:`classify_kernel` (first match wins):

==============  ==============================================================================
class           rule (on the lower-cased kernel name; *base* = function name without
                namespace, template arguments and parameters)
==============  ==============================================================================
ep_control      base contains ``notify_dispatch``, ``notify_combine``, ``cached_notify``,
                ``dispatch_layout`` or ``clean_low_latency_buffer`` (DeepEP's metadata and
                layout kernels, e.g. ``internode::notify_dispatch``,
                ``get_dispatch_layout``)
attention       name contains ``flash``, ``fmha``, ``attn``, ``attention`` or ``sdpa``, or
                ``mla`` as a word (FlashAttention fwd/bwd, FlashMLA, cuDNN/xformers fmha).
                Only attention-score kernels: the QKV/output projections are GEMMs (other)
dispatch        base has ``dispatch`` as an ``_``-separated word (DeepEP
                ``intranode|internode|internode_ll::dispatch``, ``moe_dispatch``)
combine         base has ``combine`` as an ``_``-separated word (DeepEP ``...::combine``)
dispatch /      NCCL all-to-all kernels: name contains ``alltoall``/``all_to_all``, or
combine /       ``nccl`` and ``sendrecv``/``send_recv``. NCCL's names do not say which way
all_to_all      tokens move, so the innermost enclosing CPU op or annotation on the
                launching thread whose name contains ``dispatch`` or ``combine`` decides;
                without one the kernel is ``all_to_all``
grouped_gemm    name contains ``grouped``, ``deep_gemm``, ``fp8_gemm`` or
                ``groupproblemshape`` (CUTLASS grouped GEMM), except helpers in a
                ``::utils::`` namespace (e.g. DeepSeek's ``grouped_gemm::cuda::utils::
                transpose``)
other           everything else
==============  ==============================================================================

A trace without kernel events (e.g. a CPU-only ``torch.profiler`` export) raises
:class:`~moesim.errors.InputError`: an empty table would silently read as "no GPU time",
while the usual cause is a profile recorded without ``ProfilerActivity.CUDA``.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.errors import InputError
from moesim.fileio import atomic_write

__all__ = [
    "KERNEL_CLASSES",
    "KERNEL_COLUMNS",
    "ProfileSummary",
    "classify_kernel",
    "import_profile",
    "kernel_base_name",
    "write_kernel_csv",
]

KERNEL_CLASSES: tuple[str, ...] = (
    "dispatch",
    "combine",
    "all_to_all",
    "ep_control",
    "grouped_gemm",
    "attention",
    "other",
)
"""Kernel classes, in the order summaries list them."""

KERNEL_COLUMNS: tuple[str, ...] = (
    "class",
    "name",
    "stream",
    "dur_us",
    "ts_us",
    "correlation",
    "grid",
    "block",
    "launch",
    "cpu_op",
    "annotation",
    "annotation_ts_us",
    "input_dims",
    "input_types",
)
"""Columns of the per-kernel table (see :class:`ProfileSummary`)."""

_KERNEL_CATS = frozenset({"kernel"})
_LAUNCH_CATS = frozenset({"cuda_runtime", "runtime", "cuda_driver", "driver"})
_OP_CATS = frozenset({"cpu_op", "operator"})
_CONTEXT_CATS = _OP_CATS | {"user_annotation", "python_function"}

_EP_CONTROL = (
    "notify_dispatch",
    "notify_combine",
    "cached_notify",
    "dispatch_layout",
    "clean_low_latency_buffer",
)
_ATTENTION = ("flash", "fmha", "attn", "attention", "sdpa")
_MLA_RE = re.compile(r"(?<![a-z0-9])mla(?![a-z0-9])")
_DISPATCH_RE = re.compile(r"(?:^|_)dispatch(?:_|$)")
_COMBINE_RE = re.compile(r"(?:^|_)combine(?:_|$)")
_GROUPED = ("grouped", "deep_gemm", "fp8_gemm", "groupproblemshape")


def kernel_base_name(name: str) -> str:
    """The kernel's function name without return type, namespaces, templates and parameters.

    ``"void dpsk::ep::internode::dispatch<false, 8>(int4*, ...)"`` → ``"dispatch"``.
    """
    s = name.replace("(anonymous namespace)", "")
    cut = len(s)
    for ch in "<(":
        i = s.find(ch)
        if i >= 0:
            cut = min(cut, i)
    s = s[:cut].strip()
    if not s:
        return ""
    return s.split()[-1].split("::")[-1]


def _a2a_direction(context: Sequence[str]) -> str:
    for ctx in context:
        low = ctx.lower()
        d, c = low.find("dispatch"), low.find("combine")
        if d >= 0 or c >= 0:
            if c < 0 or (d >= 0 and d < c):
                return "dispatch"
            return "combine"
    return "all_to_all"


def classify_kernel(name: str, context: Sequence[str] = ()) -> str:
    """The class of a GPU kernel, by the name rules in this module's docstring.

    ``context`` is the names of the CPU ops and annotations enclosing the kernel's
    launch, innermost first; only NCCL all-to-all kernels use it.
    """
    n = name.lower()
    base = kernel_base_name(n)
    if any(s in base for s in _EP_CONTROL):
        return "ep_control"
    if any(s in n for s in _ATTENTION) or _MLA_RE.search(n):
        return "attention"
    if _DISPATCH_RE.search(base):
        return "dispatch"
    if _COMBINE_RE.search(base):
        return "combine"
    if (
        "alltoall" in n
        or "all_to_all" in n
        or ("nccl" in n and ("sendrecv" in n or "send_recv" in n))
    ):
        return _a2a_direction(context)
    if any(s in n for s in _GROUPED) and "::utils::" not in n:
        return "grouped_gemm"
    return "other"


@dataclass(frozen=True)
class ProfileSummary:
    """Kernel timings of one profiler trace.

    ``kernels`` has one row per GPU kernel, sorted by start time, with the columns of
    :data:`KERNEL_COLUMNS`: ``class``, ``name``, ``stream`` (-1 if absent), ``dur_us``,
    ``ts_us`` (start, the trace's own clock), ``correlation`` (-1 if absent), ``grid``
    and ``block`` (``"x,y,z"`` or ``""``), ``launch`` (the runtime call that launched it,
    ``""`` if not linked), ``cpu_op`` (innermost enclosing CPU operator, preferring one
    with recorded shapes), ``annotation`` (innermost enclosing ``record_function``
    range, e.g. DeepSeek's ``mlp(F)``), ``annotation_ts_us`` (when that range began, which
    tells its instances apart; NaN without one), ``input_dims`` and ``input_types`` (that operator's
    ``Input Dims`` / ``Input type`` as JSON text, ``""`` when not recorded).
    ``classes`` has one row per class present, in :data:`KERNEL_CLASSES` order:
    ``class``, ``count``, ``median_us``, ``total_us``.
    """

    path: Path
    kernels: pd.DataFrame
    classes: pd.DataFrame
    trace_name: str | None = None
    devices: tuple[str, ...] = ()  # distinct names in the trace's deviceProperties
    linked: int = 0
    with_input_dims: int = 0

    @property
    def num_kernels(self) -> int:
        """Number of GPU kernels in the trace."""
        return len(self.kernels)

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON data (what ``moesim kernels import-profile --json`` prints)."""
        classes = [
            {
                "class": str(r["class"]),
                "count": int(r["count"]),
                "median_us": float(r["median_us"]),
                "total_us": float(r["total_us"]),
            }
            for r in self.classes.to_dict("records")
        ]
        return {
            "classes": classes,
            "kernels": self.num_kernels,
            "trace": str(self.path),
            "trace_name": self.trace_name,
            "devices": list(self.devices),
            "linked_to_launch": self.linked,
            "with_input_dims": self.with_input_dims,
        }


# ----- reading ------------------------------------------------------------------------------
def _read_trace(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InputError("file not found", file=path)
    if not path.is_file():
        raise InputError("not a file", file=path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", file=path) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"corrupt gzip data: {err}", file=path) from None
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise InputError("not a JSON text file (and not gzip)", file=path) from None
    except RecursionError:
        raise InputError("not valid JSON: nested too deeply", file=path) from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}", file=path
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        if not isinstance(data, dict):
            got = f"top level is a JSON {type(data).__name__}"
        elif "traceEvents" not in data:
            got = "(missing)"
        else:
            got = f"a JSON {type(data['traceEvents']).__name__}"
        raise InputError(
            "not a torch.profiler (Kineto) trace: expected a JSON object with a 'traceEvents' list",
            file=path,
            field="traceEvents",
            value=got,
        )
    return data


def _number(ev: dict[str, Any], key: str, index: int, path: Path) -> float:
    val = ev.get(key)
    try:
        num = float(val)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        num = math.nan
    if not math.isfinite(num) or (key == "dur" and num < 0):
        raise InputError(
            "kernel event needs a finite, non-negative number",
            file=path,
            field=f"traceEvents[{index}].{key}",
            value=val,
        )
    return num


def _args(ev: dict[str, Any]) -> dict[str, Any]:
    args = ev.get("args")
    return args if isinstance(args, dict) else {}


def _correlation(args: dict[str, Any]) -> int | None:
    """The event's correlation id; None when absent, not a number or not finite (the
    kernel is then not linked to its launch)."""
    for key in ("correlation", "correlation id", "correlationId"):
        if key in args:
            try:
                return int(args[key])
            except (TypeError, ValueError, OverflowError):
                return None
    return None


def _stream(args: dict[str, Any], index: int, path: Path) -> int:
    """The kernel's stream id (-1 when absent); a number that is not a finite integer is
    an :class:`InputError` naming the event."""
    val = args.get("stream")
    if val is None:
        return -1
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        raise InputError(
            "a kernel's stream must be a finite number",
            file=path,
            field=f"traceEvents[{index}].args.stream",
            value=val,
        )
    return int(val)


def _xyz(val: object) -> str:
    if isinstance(val, list | tuple):
        return ",".join(str(v) for v in val)
    return "" if val is None else str(val)


@dataclass
class _Op:
    ts: float
    end: float
    name: str
    cat: str
    dims: object
    types: object


@dataclass
class _Link:
    context: list[str]  # names of the enclosing ops and annotations, innermost first
    op: _Op | None  # innermost enclosing CPU operator, preferring one with shapes
    annotation: str  # innermost enclosing user annotation
    annotation_ts: float  # when that annotation began (which instance of it); NaN: none


def _link(launches: dict[int, dict[str, Any]], events: list[dict[str, Any]]) -> dict[int, _Link]:
    """For each launch (by correlation id): what encloses it on its CPU thread."""
    threads: dict[tuple[str, str], list[_Op]] = defaultdict(list)
    for ev in events:
        cat = str(ev.get("cat", "")).lower()
        if cat not in _CONTEXT_CATS or ev.get("ph") != "X":
            continue
        try:
            ts, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        args = _args(ev)
        name = str(ev.get("name", ""))
        if cat == "python_function":  # "path/to/file.py(123): func": keep the function
            name = name.rsplit("): ", 1)[-1]
        threads[(str(ev.get("pid")), str(ev.get("tid")))].append(
            _Op(
                ts,
                ts + dur,
                name,
                cat,
                args.get("Input Dims"),
                args.get("Input type"),
            )
        )
    by_thread: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for corr, ev in launches.items():
        try:
            by_thread[(str(ev.get("pid")), str(ev.get("tid")))].append((float(ev["ts"]), corr))
        except (KeyError, TypeError, ValueError):
            continue
    out: dict[int, _Link] = {}
    for key, starts in by_thread.items():
        ops = sorted(threads.get(key, []), key=lambda o: (o.ts, -o.end))
        starts.sort()
        stack: list[_Op] = []
        i = 0
        for t, corr in starts:
            while i < len(ops) and ops[i].ts <= t:
                while stack and stack[-1].end < ops[i].ts:
                    stack.pop()
                stack.append(ops[i])
                i += 1
            while stack and stack[-1].end < t:
                stack.pop()
            chain = [o for o in reversed(stack) if o.ts <= t <= o.end]
            op_chain = [o for o in chain if o.cat in _OP_CATS]
            best = next((o for o in op_chain if o.dims), None)
            ann = next((o for o in chain if o.cat == "user_annotation"), None)
            op = best or (op_chain[0] if op_chain else None)
            out[corr] = _Link(
                [o.name for o in chain],
                op,
                ann.name if ann is not None else "",
                ann.ts if ann is not None else math.nan,
            )
    return out


def import_profile(path: str | Path) -> ProfileSummary:
    """Read a torch.profiler (Kineto) Chrome trace, ``.json`` or gzip-compressed.

    Returns every GPU kernel with its class, duration, stream, grid/block and the input
    shapes of the CPU operator that launched it, and a per-class summary (count, median
    and total duration in µs). Raises :class:`~moesim.errors.InputError` naming the file
    (and field/value) for a missing, unreadable or corrupt file, JSON that is not a
    Kineto trace, a trace without kernel events, or a kernel without a valid ts/dur.
    """
    path = Path(path)
    data = _read_trace(path)
    events = [e for e in data["traceEvents"] if isinstance(e, dict)]
    kernels: list[tuple[int, dict[str, Any]]] = []
    launches: dict[int, dict[str, Any]] = {}
    for index, ev in enumerate(data["traceEvents"]):
        if not isinstance(ev, dict):
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat in _KERNEL_CATS:
            kernels.append((index, ev))
        elif cat in _LAUNCH_CATS:
            corr = _correlation(_args(ev))
            if corr is not None:
                launches[corr] = ev
    if not kernels:
        cpu_ops = sum(1 for e in events if str(e.get("cat", "")).lower() in _OP_CATS)
        raise InputError(
            "no GPU kernel events (cat 'kernel'); was the profile recorded with "
            "ProfilerActivity.CUDA on a GPU?",
            file=path,
            field="traceEvents",
            value=f"{len(events)} events, {cpu_ops} cpu_op, 0 kernel",
        )
    kernel_corrs = set()
    for _, ev in kernels:
        corr = _correlation(_args(ev))
        if corr is not None:
            kernel_corrs.add(corr)
    links = _link({c: e for c, e in launches.items() if c in kernel_corrs}, events)

    rows: list[dict[str, Any]] = []
    for index, ev in kernels:
        ts = _number(ev, "ts", index, path)
        dur = _number(ev, "dur", index, path)
        args = _args(ev)
        corr = _correlation(args)
        link = links.get(corr) if corr is not None else None
        op = link.op if link is not None else None
        name = str(ev.get("name", ""))
        launch = launches.get(corr) if corr is not None else None
        rows.append(
            {
                "class": classify_kernel(name, link.context if link is not None else ()),
                "name": name,
                "stream": _stream(args, index, path),
                "dur_us": dur,
                "ts_us": ts,
                "correlation": corr if corr is not None else -1,
                "grid": _xyz(args.get("grid")),
                "block": _xyz(args.get("block")),
                "launch": str(launch.get("name", "")) if launch is not None else "",
                "cpu_op": op.name if op is not None else "",
                "annotation": link.annotation if link is not None else "",
                "annotation_ts_us": link.annotation_ts if link is not None else math.nan,
                "input_dims": json.dumps(op.dims) if op is not None and op.dims is not None else "",
                "input_types": (
                    json.dumps(op.types) if op is not None and op.types is not None else ""
                ),
            }
        )
    table = pd.DataFrame(rows, columns=list(KERNEL_COLUMNS))
    table = table.sort_values(["ts_us", "stream"], kind="stable").reset_index(drop=True)
    grouped = table.groupby("class", sort=False)["dur_us"]
    classes = pd.DataFrame(
        [
            {
                "class": c,
                "count": int(grouped.get_group(c).size),
                "median_us": float(grouped.get_group(c).median()),
                "total_us": float(grouped.get_group(c).sum()),
            }
            for c in KERNEL_CLASSES
            if c in grouped.groups
        ],
        columns=["class", "count", "median_us", "total_us"],
    )
    devices: dict[str, None] = {}  # distinct GPU names, in trace order
    props = data.get("deviceProperties")
    for p in props if isinstance(props, list) else []:
        if isinstance(p, dict) and p.get("name") is not None:
            devices[str(p["name"])] = None
    trace_name = data.get("traceName")
    return ProfileSummary(
        path=path,
        kernels=table,
        classes=classes,
        trace_name=str(trace_name) if trace_name is not None else None,
        devices=tuple(devices),
        linked=int((table["launch"] != "").sum()),
        with_input_dims=int((table["input_dims"] != "").sum()),
    )


def write_kernel_csv(summary: ProfileSummary, path: str | Path) -> Path:
    """Write the per-kernel table as CSV, atomically (temporary name, then rename)."""

    def write(tmp: Path) -> None:
        summary.kernels.to_csv(tmp, index=False)

    return atomic_write(path, write)

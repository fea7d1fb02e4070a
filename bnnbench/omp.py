"""numba kernels run on torch's own OpenMP threads: the element-wise kernels' share of a multi-threaded step.

torch runs its CPU ops on a pool of OpenMP threads (``torch.get_num_threads()``); a numba kernel called from
Python runs on one.  numba's own parallel loops are no way out: its OpenMP layer loads the system libgomp, a
second pool whose idle threads spin against torch's after every region (each libgomp spins some 10^5 pauses
before it sleeps), which slowed every op of a training step.  :func:`run` instead enters torch's pool
itself: it calls ``GOMP_parallel`` of the libgomp that torch loaded, the entry point a ``#pragma omp
parallel`` compiles to, with a numba ``cfunc`` that takes thread t's share of the work (a contiguous range
of items, as ``at::parallel_for`` splits one) and calls the kernel on views of it.  The same threads, the
same spinning, no contention.

A kernel is split only along items that are independent of each other (elements of an element-wise
formula, samples of a per-sample reduction), so its results do not depend on the thread count, bit for
bit.  Where this process has no such pool (torch built without OpenMP, with another runtime, a platform
without ``/proc/self/maps``), or one thread, or little work, :func:`run` calls the kernel directly.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

PARALLEL_WORK = 1 << 16
"""Elements below which :func:`run` stays on the calling thread (a region costs some 2 us to enter)."""


@dataclass(frozen=True)
class Split:
    """An array :func:`run` splits along its first axis, ``array.shape[0] // items`` rows per item."""

    array: np.ndarray


def _torch_libgomp() -> ctypes.CDLL | None:
    """The libgomp torch's ATen runs on, when this process maps one: the one in torch's own lib folder, else
    the only one mapped."""
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1].splitlines()[0]:
        return None
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    own = [path for path in mapped if os.path.dirname(path) == os.path.join(os.path.dirname(torch.__file__), "lib")]
    candidates = own or (sorted(mapped) if len(mapped) == 1 else [])
    return ctypes.CDLL(candidates[0]) if candidates else None


_LIB = _torch_libgomp()
if _LIB is not None:
    _GOMP_PARALLEL = _LIB.GOMP_parallel
    _GOMP_PARALLEL.argtypes, _GOMP_PARALLEL.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint], None
    _THREAD_NUM, _NUM_THREADS = _LIB.omp_get_thread_num, _LIB.omp_get_num_threads
    for _f in (_THREAD_NUM, _NUM_THREADS):
        _f.argtypes, _f.restype = [], ctypes.c_int


@intrinsic
def _pointer(typingctx, address, dtype):
    """The int64 ``address`` as a pointer to elements of ``dtype`` (a numba number class)."""
    element = dtype.instance_type
    signature = types.CPointer(element)(types.int64, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(element)))

    return signature, codegen


def available() -> bool:
    """True when :func:`run` can enter torch's OpenMP pool in this process."""
    return _LIB is not None


def _describe(args: tuple) -> tuple[tuple, list[int], list[float]]:
    """(a key of the argument kinds, the int64 words, the float64 words) that a trampoline reads back."""
    kinds: list[Any] = []
    words: list[int] = []
    floats: list[float] = []
    for arg in args:
        if isinstance(arg, tuple):
            inner, w, f = _describe(arg)
            kinds.append(("tuple", inner))
            words += w
            floats += f
            continue
        array = arg.array if isinstance(arg, Split) else arg
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous:
                raise ValueError("omp.run takes C-contiguous arrays")
            kinds.append(("split" if isinstance(arg, Split) else "whole", array.dtype.str, array.ndim))
            words += [array.ctypes.data, *array.shape]
        elif isinstance(array, (bool, np.bool_)):
            kinds.append(("int", "|b1"))
            words.append(int(array))
        elif isinstance(array, (np.floating, float)):
            kinds.append(("float", np.dtype(type(array)).str if isinstance(array, np.floating) else "<f8"))
            floats.append(float(array))
        else:
            kinds.append(("int", np.dtype(type(array)).str if isinstance(array, np.integer) else "<i8"))
            words.append(int(array))
    return tuple(kinds), words, floats


def _unpacking(kinds: tuple, counter: list[int], lines: list[str]) -> list[str]:
    """Source lines that rebuild the arguments from the words (``d``: int64, ``f``: float64) and the names they bind."""
    names = []
    for kind in kinds:
        name = f"v{len(lines)}_{len(names)}"
        if kind[0] == "tuple":
            parts = _unpacking(kind[1], counter, lines)
            lines.append(f"    {name} = ({', '.join(parts)},)" if parts else f"    {name} = ()")
        elif kind[0] in ("split", "whole"):
            _, dtype, ndim = kind
            address, shape = f"d[{counter[0]}]", [f"d[{counter[0] + 1 + k}]" for k in range(ndim)]
            counter[0] += 1 + ndim
            element = f"np.{np.dtype(dtype).name}"
            if kind[0] == "split":  # rows per item = shape[0] // items; thread t's rows lo..hi
                per = f"({shape[0]} // items)"
                inner = " * ".join(shape[1:]) or "1"
                lines.append(f"    {name} = carray(_pointer({address} + lo * {per} * {inner} * {np.dtype(dtype).itemsize}, {element}), ((hi - lo) * {per}, {', '.join(shape[1:])}))")
            else:
                lines.append(f"    {name} = carray(_pointer({address}, {element}), ({', '.join(shape)},))")
        elif kind[0] == "float":
            lines.append(f"    {name} = np.{np.dtype(kind[1]).name}(f[{counter[1]}])")
            counter[1] += 1
        else:
            lines.append(f"    {name} = np.{np.dtype(kind[1]).name}(d[{counter[0]}])")
            counter[0] += 1
        names.append(name)
    return names


_TRAMPOLINES: dict[tuple, Any] = {}


def _trampoline(kernel: Callable, kinds: tuple, words: int, floats: int):
    """A cfunc ``body(data)`` that takes its thread's range of items (``grain`` a multiple of each range's
    length but the last) and calls ``kernel`` on views of the arguments."""
    key = (kernel, kinds)
    if key not in _TRAMPOLINES:
        lines = [
            "def body(data):",
            f"    d = carray(data, {2 + words + floats}, dtype=np.int64)",
            f"    f = carray(data, {2 + words + floats}, dtype=np.float64)[{2 + words}:]",
            "    items, grain = d[0], d[1]",
            "    threads, thread = _num_threads(), _thread_num()",
            "    share = (items + threads - 1) // threads",
            "    share = (share + grain - 1) // grain * grain",
            "    lo = min(thread * share, items)",
            "    hi = min(lo + share, items)",
            "    if lo >= hi:",
            "        return",
        ]
        counter = [2, 0]
        names = _unpacking(kinds, counter, lines)
        lines.append(f"    kernel({', '.join(names)})")
        # the kernel's own copy, compiled for the views: the cfunc then reads no shared dispatcher's table of
        # compiled signatures, which a full test run left inconsistent for a kernel cached on disk (numba's
        # KeyError on reading it; numba keeps no flag of the caching in the options to single those out)
        private = njit(**{k: v for k, v in kernel.targetoptions.items() if k != "nopython"})(kernel.py_func)
        scope = {"np": np, "carray": carray, "_pointer": _pointer, "kernel": private, "_num_threads": _NUM_THREADS, "_thread_num": _THREAD_NUM}
        exec("\n".join(lines) + "\n", scope)  # noqa: S102
        _TRAMPOLINES[key] = cfunc(types.void(types.voidptr), error_model="numpy")(scope["body"])
    return _TRAMPOLINES[key]


def threads_for(work: int) -> int:
    """The threads :func:`run` would use for ``work`` elements: torch's count, or 1."""
    if _LIB is None or work < PARALLEL_WORK:
        return 1
    return torch.get_num_threads()


def run(kernel: Callable, items: int, *args: Any, work: int | None = None, grain: int = 1) -> None:
    """``kernel(*args)`` with each :class:`Split` argument's items split between torch's OpenMP threads, each
    thread calling ``kernel`` on its contiguous range (a multiple of ``grain`` items), the other arguments (arrays,
    numbers, tuples of them) whole; on the calling thread where :func:`threads_for` ``work`` (default ``items``)
    gives 1.  The kernel must write each item's results from that item's inputs alone, and return nothing."""
    threads = threads_for(items if work is None else work)
    if threads == 1 or items <= grain:
        kernel(*(a.array if isinstance(a, Split) else a for a in args))
        return
    kinds, words, floats = _describe(args)
    for a in args:
        if isinstance(a, Split) and a.array.shape[0] % items:
            raise ValueError(f"a split array's first axis ({a.array.shape[0]}) is no multiple of the items ({items})")
    body = _trampoline(kernel, kinds, len(words), len(floats))
    data = np.array([items, grain, *words, *np.array(floats, dtype=np.float64).view(np.int64)], dtype=np.int64)
    _GOMP_PARALLEL(body.address, data.ctypes.data, threads, 0)


__all__ = ["PARALLEL_WORK", "Split", "available", "run", "threads_for"]

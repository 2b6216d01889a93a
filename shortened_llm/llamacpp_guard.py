"""llama.cpp where a crash cannot take the caller down: the CPU check, the AMX switch, child processes.

llama.cpp is native code compiled for the CPU that built it. When it runs an instruction that
this CPU or its OS will not execute, the process dies with SIGILL, and no Python ``except``
can catch that: in a notebook it is a dead kernel, in the tests a dead pytest-xdist worker.
Seen on Intel Xeons with AMX (4th generation and newer): a native build of llama-cpp-python
0.3.36 compiles in ggml's AMX int8 kernels, the "extra" AMX buffer type that q4_0, q4_1, q8_0,
q4_K, q5_K, q6_K and iq4_xs weights are repacked into, and the process dies in ``tileloadd``
on every quantised GGUF. f16 files never take that path and run. ggml loads the tile
configuration once per thread (a ``thread_local`` flag in ``amx/mmq.cpp``) and assumes it
stays loaded, which nothing guarantees: another AMX user on the same thread that releases its
tiles (oneDNN inside torch does, after its bf16 kernels) leaves ggml's next ``tileloadd``
without a configuration, and that is an illegal instruction. Which trigger fired on the
machine where the crash was seen is not confirmed: this guard was written on an AMD EPYC.

Three defences, from the deepest:
1. ``make install`` builds llama.cpp without AMX (the Makefile's ``LLAMA_CPP_NO_AMX``).
2. A build that has AMX anyway (installed by hand) is loaded without llama.cpp's extra buffer
   types on a CPU with AMX (``open_llama``): the switch that keeps ggml off its AMX kernels.
3. Each GGUF file is loaded and run on a few tokens in a child process before its first use in
   this process (``check_gguf_runs``), and quantisation always runs in a child
   (``quantize_in_child``). A child killed by a signal becomes ``LlamaCppCrash``: one line
   with the file, the signal, the CPU and the command that rebuilds llama.cpp.

This file imports only the standard library (and ``llama_cpp`` when asked to), and it runs as
a script (``python llamacpp_guard.py probe FILE THREADS``): a child starts in a fraction of a
second, without torch or the rest of the package.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["LlamaCppCrash", "LLAMACPP_REBUILD", "cpu_model", "cpu_has_amx", "amx_compiled_in",
           "open_llama", "check_gguf_runs", "quantize_in_child"]

LLAMACPP_REBUILD = ("rebuild llama.cpp without AMX: `make llamacpp` in the shortened-llm checkout, or "
                    "CMAKE_ARGS=-DGGML_NATIVE=ON CFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
                    "CXXFLAGS=\"$CFLAGS\" pip install --force-reinstall --no-deps --no-cache-dir "
                    "--no-binary llama-cpp-python llama-cpp-python")
_CHECKED: set[tuple] = set()  # (path, size, mtime) of the files a child has run without crashing


class LlamaCppCrash(RuntimeError):
    """llama.cpp killed its process (SIGILL, SIGSEGV, ...): raised in the parent, which lives on."""


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of Linux's /proc/cpuinfo (None elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's marketing name (``lscpu``'s "Model name"), for error messages and timing reports."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has_amx() -> bool:
    """Does the CPU have Intel AMX tiles (``lscpu`` flag ``amx_tile``)? False where it cannot tell."""
    return "amx_tile" in (_cpuinfo("flags") or "").split()


def amx_compiled_in(llama_cpp) -> bool:
    """Was the installed llama.cpp compiled with ggml's AMX int8 kernels (``AMX_INT8 = 1`` in its system info)?"""
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def _extra_buffers_off(llama_cpp):
    """``Llama(...)`` with ``use_extra_bufts=False``: the binding has the field but no argument for it.

    ``llama_cpp.Llama`` builds its model parameters from ``llama_model_default_params()`` of
    the ``llama_cpp.llama_cpp`` module; for the duration of the block that function returns
    them with the extra (repacked, AMX) buffer types switched off.
    """
    low_level = llama_cpp.llama_cpp
    default = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        low_level.llama_model_default_params = default


def open_llama(path: str | os.PathLike, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, off ggml's AMX kernels where they are compiled in and the CPU has AMX.

    On every other CPU (AMD, AVX2-only laptops) the extra buffer types stay on: there they are
    llama.cpp's repacked q4_0/q4_K layouts, which make prompt evaluation faster.
    """
    import llama_cpp

    switch = _extra_buffers_off(llama_cpp) if cpu_has_amx() and amx_compiled_in(llama_cpp) else contextlib.nullcontext()
    with switch:
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def _child_command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _run_child(what: str, *args: str) -> subprocess.CompletedProcess:
    """Run this file as a child with ``args``; a death by signal becomes ``LlamaCppCrash``, an error its last line."""
    proc = subprocess.run(_child_command(*args), capture_output=True, text=True)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode)
        kind = {signal.SIGILL: "an instruction this CPU cannot run (illegal instruction)"}.get(sig, sig.name)
        raise LlamaCppCrash(f"llama.cpp crashed with {sig.name} while {what}, on {cpu_model()}: its build uses "
                            f"{kind}; {LLAMACPP_REBUILD}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"llama.cpp failed while {what} (exit code {proc.returncode}): "
                           f"{lines[-1] if lines else 'no message'}")
    return proc


def check_gguf_runs(path: str | os.PathLike, n_threads: int = 1) -> None:
    """Load ``path`` and evaluate a prompt and one more token in a child, once per file and process.

    Both paths of llama.cpp's matrix products run: the batched one of a prompt (what PPL uses)
    and the one-row one of generation. A crash there raises ``LlamaCppCrash`` here instead of
    killing this process; a file already checked costs nothing.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    _run_child(f"evaluating {path.name}", "probe", str(path), str(n_threads))
    _CHECKED.add(key)


def quantize_in_child(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, nthread: int,
                      verbose: bool = False, imatrix: str | os.PathLike | None = None) -> None:
    """llama.cpp's ``llama_model_quantize(src, dst)`` to the ``llama_cpp`` constant named ``ftype``, in a child.

    ``imatrix``: an importance matrix in llama-imatrix's GGUF format, read in the child by ggml's
    own GGUF parser and handed over as llama-quantize hands it (mean = in_sum2 / counts per weight),
    with its ``quantize.imatrix.*`` keys in the output's metadata.
    llama.cpp's log (its per-tensor choices) is printed when ``verbose``; its last line is in the error otherwise.
    """
    extra = () if imatrix is None else (str(imatrix),)
    try:
        proc = _run_child(f"quantising {Path(src).name} to {ftype}", "quantize", str(src), str(dst), ftype,
                          str(nthread), *extra)
    except RuntimeError as err:
        _name_a_full_disk(src, dst, err)
        raise
    if verbose:
        print(proc.stdout + proc.stderr, end="")


def _name_a_full_disk(src: str | os.PathLike, dst: str | os.PathLike, err: RuntimeError) -> None:
    """Raise ``DiskFullError`` when llama.cpp failed with less room beside ``dst`` than ``src`` takes.

    llama.cpp reports a full disk as a C++ stream error ("basic_ios::clear: iostream error"), which
    says nothing of the disk; a quantised file is never larger than its f16/f32 source, so with less
    free space than that, the disk is the likely cause and the message should say so.
    """
    from .errors import DiskFullError  # here, not at the top: the child runs this file as a plain script

    free, size = shutil.disk_usage(Path(dst).parent).free, Path(src).stat().st_size
    if free < size:
        raise DiskFullError(dst, f"llama.cpp could not write it ({err}) with {free / 2**20:.0f} MiB free beside it, "
                                 f"less than its {size / 2**20:.0f} MiB source", f"free space on the disk of "
                                 f"{str(Path(dst).parent)!r} (or write elsewhere) and run again") from None


def _probe(path: str, n_threads: str) -> None:
    threads = int(n_threads)
    llm = open_llama(path, n_ctx=64, n_batch=64, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = [1 + i % (llm.n_vocab() - 1) for i in range(32)]
    llm.eval(ids[:31])  # a prompt: the batched matrix product
    llm.eval(ids[31:])  # one more token: the one-row product of generation


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml_gguf_api():
    """ggml's GGUF reader (in libggml-base, which llama_cpp loads), declared for the calls below."""
    from llama_cpp._ggml import libggml as lib

    p, i64, s = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    for name, args, res in (("gguf_init_from_file", [s, _GgufInitParams], p), ("gguf_free", [p], None),
                            ("ggml_free", [p], None), ("gguf_get_n_tensors", [p], i64),
                            ("gguf_get_tensor_name", [p, i64], s), ("gguf_get_tensor_type", [p, i64], ctypes.c_int),
                            ("gguf_find_key", [p, s], i64), ("gguf_get_val_u32", [p, i64], ctypes.c_uint32),
                            ("gguf_get_arr_n", [p, i64], ctypes.c_size_t),
                            ("gguf_get_arr_str", [p, i64, ctypes.c_size_t], s),
                            ("ggml_get_tensor", [p, s], p), ("ggml_nelements", [p], i64),
                            ("ggml_get_data_f32", [p], ctypes.POINTER(ctypes.c_float))):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _read_imatrix(path: str) -> tuple[dict[str, list[float]], str, int]:
    """llama-quantize's ``load_imatrix``: per weight in_sum2 / counts, the first dataset and the chunk count.

    Read as llama.cpp's ``common_imatrix_load`` reads it: ggml's GGUF parser, F32 tensors named
    ``<weight>.in_sum2`` and ``<weight>.counts``, and the three ``imatrix.*`` keys it requires.
    """
    lib = _ggml_gguf_api()
    ctx = ctypes.c_void_p()
    gguf_ctx = lib.gguf_init_from_file(path.encode(), _GgufInitParams(False, ctypes.pointer(ctx)))
    if not gguf_ctx:
        raise SystemExit(f"imatrix {path!r} is not a GGUF file ggml can read")
    try:
        keys = {k: lib.gguf_find_key(gguf_ctx, k.encode())
                for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")}
        if min(keys.values()) < 0:
            raise SystemExit(f"imatrix {path!r} lacks {', '.join(k for k, v in keys.items() if v < 0)}")
        n_sets = lib.gguf_get_arr_n(gguf_ctx, keys["imatrix.datasets"])
        dataset = lib.gguf_get_arr_str(gguf_ctx, keys["imatrix.datasets"], 0).decode() if n_sets else ""
        chunks = int(lib.gguf_get_val_u32(gguf_ctx, keys["imatrix.chunk_count"]))
        names = [lib.gguf_get_tensor_name(gguf_ctx, i).decode() for i in range(lib.gguf_get_n_tensors(gguf_ctx))]
        if any(lib.gguf_get_tensor_type(gguf_ctx, i) != 0 for i in range(len(names))):  # GGML_TYPE_F32
            raise SystemExit(f"imatrix {path!r}: sums and counts must be F32")

        def values(name: str) -> list[float]:
            t = lib.ggml_get_tensor(ctx, name.encode())
            return lib.ggml_get_data_f32(t)[: lib.ggml_nelements(t)]

        means = {}
        for name in (n.removesuffix(".in_sum2") for n in names if n.endswith(".in_sum2")):
            if f"{name}.counts" not in names:
                raise SystemExit(f"imatrix {path!r}: {name}.in_sum2 has no {name}.counts")
            sums, counts = values(f"{name}.in_sum2"), [round(c) for c in values(f"{name}.counts")]
            width = len(sums) // len(counts)
            means[name] = [sums[j * width + i] / counts[j] if counts[j] > 0 else 1.0
                           for j in range(len(counts)) for i in range(width)]
        return means, dataset, chunks
    finally:
        lib.gguf_free(gguf_ctx)
        lib.ggml_free(ctx)


def _kv_overrides(llama_cpp, values: dict) -> ctypes.Array:
    """``llama_model_kv_override`` entries (str or int), terminated by an empty key, as llama-quantize builds them."""
    out = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for o, (key, value) in zip(out, values.items()):
        o.key = key.encode()
        if isinstance(value, str):
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
        else:
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
    return out


def _quantize(src: str, dst: str, ftype: str, nthread: str, imatrix: str | None = None) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = int(nthread)
    if imatrix is not None:
        means, dataset, chunks = _read_imatrix(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()  # the last, all NULL, ends the array
        arrays = []  # the float arrays must outlive the call
        for entry, (name, mean) in zip(entries, means.items()):
            arrays.append((ctypes.c_float * len(mean))(*mean))
            entry.name, entry.data, entry.size = name.encode(), arrays[-1], len(mean)
        params.imatrix = entries
        kv = {"quantize.imatrix.file": Path(imatrix).name, "quantize.imatrix.entries_count": len(means)}
        if dataset:
            kv["quantize.imatrix.dataset"] = dataset
        if chunks > 0:
            kv["quantize.imatrix.chunks_count"] = chunks
        params.kv_overrides = overrides = _kv_overrides(llama_cpp, kv)  # noqa: F841 (kept alive for the call)
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "probe":
        _probe(*arguments)
    elif command == "quantize":
        sys.exit(_quantize(*arguments))
    else:
        sys.exit(f"unknown command {command!r}: probe or quantize")

"""The CPU top-k kernel (topk_rows.c), compiled on first use with the machine's C compiler and
loaded through ctypes: no torch headers, so a build takes about half a second. The shared
library is kept under PIPELINE_HOME/kernels, named by a hash of the source, the compiler and its
flags and the CPU's feature flags (it is built with -march=native), and written under a temporary
name first, so processes that build it at once do not clash. Where no compiler works, or with
PIPELINE_NATIVE=0 in the environment, `topk_rows` is unavailable and callers use torch."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("topk_rows.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-fopenmp", "-shared", "-fPIC")

_libs: dict[tuple[str, ...], ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("PIPELINE_NATIVE", "1") != "0"


def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel (built once per process and flag set), or None where it cannot be
    built (a warning says why, once)."""
    if extra_flags not in _libs:
        try:
            _libs[extra_flags] = _load(_build(FLAGS + extra_flags))
        except (OSError, subprocess.CalledProcessError, FileNotFoundError) as e:
            detail = getattr(e, "stderr", None) or e
            warnings.warn(f"the CPU top-k kernel could not be built, so torch's top-k is used "
                          f"(slower): {detail}", RuntimeWarning, stacklevel=2)
            _libs[extra_flags] = None
    return _libs[extra_flags]


def usable(t: torch.Tensor) -> bool:
    """Whether topk_rows takes this tensor (CPU float32) and the kernel is built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and enabled() and \
        library() is not None


def topk_rows(pre: torch.Tensor, k: int, bias: torch.Tensor | None = None,
              lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of pre + bias, unordered, as
    torch.topk(pre + bias, k, sorted=False) gives them (ties may pick other indices of equal
    value), without forming pre + bias. pre: [rows, width] float32 on CPU; bias: [width] or
    None. Rows are split across torch's intra-op threads (ctypes lets go of the GIL)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the CPU top-k kernel is not built")
    rows, width = pre.shape
    if not 1 <= k <= width or width >= 1 << 31:
        raise ValueError(f"k {k} out of range for width {width}")
    pre = pre.contiguous()
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
        if bias.shape != (width,):
            raise ValueError(f"bias shape {tuple(bias.shape)} is not ({width},)")
    vals = torch.empty(rows, k, dtype=torch.float32)
    idx = torch.empty(rows, k, dtype=torch.int64)
    status = lib.topk_rows(pre.data_ptr(), bias.data_ptr() if bias is not None else None,
                           width, k, rows, vals.data_ptr(), idx.data_ptr())
    if status:
        raise MemoryError("the CPU top-k kernel could not allocate its scratch buffers")
    return vals, idx


def _build(flags: tuple[str, ...]) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler ({cc}) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, _cpu()]).encode())
    from pipeline.extract.model import cache_home

    out = cache_home() / "kernels" / f"topk_rows-{key.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                           check=True)
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.topk_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.topk_rows.restype = ctypes.c_int
    return lib


def _cpu() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"

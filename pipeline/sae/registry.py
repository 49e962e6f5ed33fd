"""The architectures: name -> (SAE class, config class), in the manner of SAELens's
`register_sae_class`. Training, inference, eval, audit and features look an architecture up here;
nothing else branches on its name."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.options import field_docs
from pipeline.sae.base import SAE, SAEConfig

# Fields every config has that are not settings of their own: the trainer fills them in.
_RESOLVED = ("arch", "d_in", "d_sae")


@dataclass(frozen=True)
class Architecture:
    name: str
    sae: type[SAE]
    config: type[SAEConfig]


ARCHITECTURES: dict[str, Architecture] = {}


def register_sae_class(name: str, sae_cls: type[SAE], cfg_cls: type[SAEConfig]) -> None:
    """Make `name` trainable and readable: `--arch name`, its config fields as flags."""
    ARCHITECTURES[name] = Architecture(name, sae_cls, cfg_cls)


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def sae_config(arch: str, d_in: int, d_sae: int, **settings) -> SAEConfig:
    """The config of `arch`; settings that belong to other architectures are ignored, so one
    set of flags serves every architecture."""
    cls = architecture(arch).config
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(arch=arch, d_in=d_in, d_sae=d_sae,
               **{k: v for k, v in settings.items() if k in own})


def build_sae(cfg: SAEConfig, generator=None) -> SAE:
    """A freshly initialised SAE of cfg.arch (deterministic given the generator)."""
    return architecture(cfg.arch).sae(cfg, generator)


@dataclass(frozen=True)
class Setting:
    """One architecture setting as the CLI and train_config.json show it (a flat flag)."""

    name: str
    hint: type
    default: object
    doc: str
    limits: tuple | None  # (lowest, highest, highest included); None: any value


def settings() -> list[Setting]:
    """The flag-visible settings of every registered architecture, each once (the first
    architecture to define a name owns it), those common to all (SAEConfig's) last."""
    out: dict[str, Setting] = {}
    classes = [a.config for a in ARCHITECTURES.values()] + [SAEConfig]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _RESOLVED or not f.metadata.get("flag", True):
                continue
            if f.name in out or (cls is not SAEConfig and _defined_in_base(f.name)):
                continue
            owner = next(c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
            out[f.name] = Setting(f.name, hints[f.name], f.default,
                                  field_docs(owner).get(f.name, ""), owner.RANGES.get(f.name))
    return list(out.values())


def _defined_in_base(name: str) -> bool:
    return name in SAEConfig.__annotations__


def inference_class(cfg: dict) -> type[SAE]:
    """The class that encodes a saved SAE: the architecture it was trained as, when this tool
    knows it, else the first one saved under cfg.json's SAELens architecture."""
    saved_as = cfg.get("architecture")
    trained = ARCHITECTURES.get(cfg.get("metadata", {}).get("trained_arch", ""))
    if trained is not None and trained.sae.saelens_architecture == saved_as:
        return trained.sae
    for a in ARCHITECTURES.values():
        if a.sae.saelens_architecture == saved_as:
            return a.sae
    known = dict.fromkeys(a.sae.saelens_architecture for a in ARCHITECTURES.values())
    raise PipelineError(f"architecture {saved_as!r} is not one this tool reads "
                        f"({', '.join(known)})")

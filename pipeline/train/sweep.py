"""`pipeline sweep`: K SAE configurations from a grid, trained from one read of the cache
(pipeline.train.trainer.train_many), each in its own folder under the sweep folder."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
import typing
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import SHARED, train_many

SWEEP_FILE = "sweep.json"


def parse_value(name: str, text: str):
    """A command-line value for TrainConfig field `name`, in that field's type."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise PipelineError(f"--set {name}=...: {name} is not a training setting")
    kind = typing.get_args(hints[name])[0] if typing.get_args(hints[name]) else hints[name]
    try:
        if kind is bool:
            return text.lower() in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError as e:
        raise PipelineError(f"--set {name}={text}: expected {kind.__name__}") from e


def read_grid(grid_file: str | None, sets: list[str]) -> tuple[dict, dict[str, list]]:
    """(base settings, grid) from a JSON/TOML file ({"grid": {name: [values]}, other keys are
    base settings}) and --set name=v1,v2 options (which win)."""
    base: dict = {}
    grid: dict[str, list] = {}
    if grid_file:
        path = Path(grid_file)
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise PipelineError(f"cannot read the sweep grid {path}: {e}") from e
        grid = {k: list(v) for k, v in data.pop("grid", {}).items()}
        base = data
    for item in sets:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise PipelineError(f"--set {item!r}: expected name=value1,value2,...")
        grid[name] = [parse_value(name, v) for v in values.split(",")]
    shared = sorted(set(grid) & set(SHARED))
    if shared:
        raise PipelineError(f"the SAEs of one sweep share {', '.join(shared)}: set it once, "
                            "not in the grid")
    if not grid:
        raise PipelineError("the sweep has no grid: pass --grid FILE or --set name=v1,v2")
    return base, grid


def expand(base: TrainConfig, overrides: dict, grid: dict[str, list]) -> list[TrainConfig]:
    """One TrainConfig per point of the grid, each with its own folder under base.out."""
    names = list(grid)
    configs = []
    for i, values in enumerate(itertools.product(*(grid[n] for n in names))):
        point = dict(zip(names, values, strict=True))
        label = "-".join(f"{n}={v}" for n, v in point.items()).replace("/", "_")
        fields = {**dataclasses.asdict(base), **overrides, **point,
                  "out": str(Path(base.out) / f"{i:02d}-{label}")}
        configs.append(TrainConfig(**fields))
    return configs


def sweep(base: TrainConfig, grid_file: str | None = None, sets: list[str] | None = None,
          ) -> list[dict]:
    overrides, grid = read_grid(grid_file, sets or [])
    configs = expand(base, overrides, grid)
    root = Path(base.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / SWEEP_FILE).write_text(json.dumps(
        {"grid": grid, "base": {**dataclasses.asdict(base), **overrides},
         "runs": [c.out for c in configs]}, indent=1, default=str))
    return train_many(configs)

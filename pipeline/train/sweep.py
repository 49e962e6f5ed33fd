"""`pipeline sweep`: K SAE configurations from a grid, trained from one read of the cache
(pipeline.train.trainer.train_many), each in its own folder under the sweep folder."""

from __future__ import annotations

import itertools
import json
import time
import tomllib
import typing
from pathlib import Path

from cache_schema import open_cache
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.processes import check_launch, workers
from pipeline.remote import local_cache
from pipeline.run import SWEEP_FILE, RunDir, sweep_point_dir
from pipeline.train.config import TrainConfig, flat_hints
from pipeline.train.trainer import SWEEP_COMMON, train_many


def parse_value(name: str, text: str):
    """A command-line value for TrainConfig field `name`, in that field's type."""
    hints = flat_hints()
    if name not in hints:
        raise PipelineError(f"--set {name}=...: {name} is not a training setting")
    kind = typing.get_args(hints[name])[0] if typing.get_args(hints[name]) else hints[name]
    try:
        if kind is bool:
            return text.lower() in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError as e:
        raise PipelineError(f"--set {name}={text}: expected {kind.__name__}") from e


# Settings a grid point cannot set: the sweep names each point's folder (under -o), and it
# resumes or shows progress as a whole.
NOT_PER_POINT = ("out", "resume", "progress")


def read_grid(grid_file: str | None, sets: list[str]) -> tuple[dict, dict[str, list]]:
    """(base settings, grid) from a JSON/TOML file ({"grid": {name: [values]}, other keys are
    base settings}) and --set name=v1,v2 options (which win)."""
    base: dict = {}
    grid: dict[str, list] = {}
    if grid_file:
        base, grid = _read_grid_file(Path(grid_file))
    for item in sets:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise PipelineError(f"--set {item!r}: expected name=value1,value2,...")
        grid[name] = [parse_value(name, v) for v in values.split(",")]
    fixed = sorted(set(grid) & set(NOT_PER_POINT))
    if fixed:
        raise PipelineError(f"a sweep cannot vary {', '.join(fixed)} per point: use -o for the "
                            "sweep's folder (each point gets a subfolder) and set --resume / "
                            "--progress once for the whole sweep")
    shared = sorted(set(grid) & set(SWEEP_COMMON))
    if shared:
        raise PipelineError(f"the SAEs of one sweep share {', '.join(shared)}: set it once, "
                            "not in the grid")
    if not grid:
        raise PipelineError("the sweep has no grid: pass --grid FILE or --set name=v1,v2")
    return base, grid


def _read_grid_file(path: Path) -> tuple[dict, dict[str, list]]:
    """(base settings, grid) of a grid file, with its shape and names checked (the values'
    types are checked by TrainConfig, naming the flag)."""
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read the sweep grid {path}: {e}") from e
    if not isinstance(data, dict):
        raise PipelineError(f"the sweep grid {path} must be a table/object of settings with a "
                            f"'grid' table, not a {type(data).__name__}")
    grid = data.pop("grid", {})
    if not isinstance(grid, dict):
        raise PipelineError(f"'grid' in {path} must be a table of name = [values], not a "
                            f"{type(grid).__name__}")
    known = set(flat_hints())
    unknown = sorted(set(data) - known) + sorted(f"grid.{k}" for k in set(grid) - known)
    if unknown:
        raise PipelineError(f"the sweep grid {path} has unknown settings {', '.join(unknown)}: "
                            "use the names of `pipeline train --help` with _ for -")
    if "out" in data:
        raise PipelineError(f"the sweep grid {path} sets out: give the sweep's folder with -o")
    lists = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if lists:
        raise PipelineError(f"grid.{lists[0]} in {path} must be a non-empty list of values, got "
                            f"{grid[lists[0]]!r}")
    return data, grid


def expand(base: TrainConfig, overrides: dict, grid: dict[str, list]) -> list[TrainConfig]:
    """One TrainConfig per point of the grid, each with its own folder under base.out."""
    names = list(grid)
    configs = []
    for i, values in enumerate(itertools.product(*(grid[n] for n in names))):
        point = dict(zip(names, values, strict=True))
        fields = {**base.to_dict(), **overrides, **point,
                  "out": str(sweep_point_dir(Path(base.out), i, point))}
        configs.append(TrainConfig.from_flat(**fields))
    return configs


def sweep(base: TrainConfig, grid_file: str | None = None, sets: list[str] | None = None,
          ) -> list[dict]:
    """Validate every point of the grid (settings, cache, loaders, folders), then write
    sweep.json and train them all. Under a launcher (torchrun, accelerate launch) the points are
    dealt to the processes, each on its own device; every rank checks its points before any
    writes, rank 0 writes sweep.json and returns every point's summary, the others []."""
    check_launch(base.device)
    team = workers(resolve_device(base.device))
    overrides, grid = team.together(lambda: read_grid(grid_file, sets or []))
    configs = team.together(lambda: expand(base, overrides, grid))
    root = Path(base.out)
    if team.world > 1:
        cache_id = team.together(lambda: open_cache(local_cache(base.cache)).cache_id)
        team.same("sweep", {"cache id": cache_id, "grid": grid,
                            **{k: v for k, v in {**base.identity(), **overrides}.items()
                               if k != "cache"}})

    def write_listing() -> None:  # called once every point has passed every check
        root.mkdir(parents=True, exist_ok=True)
        (root / SWEEP_FILE).write_text(json.dumps(
            {"grid": grid, "base": {**base.to_dict(), **overrides},
             "runs": [c.out for c in configs]}, indent=1, default=str))

    def work(ready) -> list[dict]:
        def before_writing() -> None:
            ready()
            if team.is_main:
                write_listing()
        if not mine:  # more processes than points
            before_writing()
            return []
        return train_many(mine, before_writing=before_writing,
                          device=team.device(resolve_device(base.device)))

    mine = team.dealt(configs)
    summaries = team.checked(work)
    if team.world == 1:
        return summaries
    return [read_summary(Path(c.out)) for c in configs] if team.is_main else []


def read_summary(run: Path, poll_s: float = 0.5) -> dict:
    """A point's summary.json once its process has written it (ranks finish at their own pace;
    a rank that dies is reported by the launcher, which stops this one)."""
    path = RunDir(run).summary
    while True:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not there yet, or being written
            time.sleep(poll_s)

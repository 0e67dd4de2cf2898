"""Continuing a run: its saved config with the overrides a resume may change, and where each data-parallel
rank picks up the training stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gradus.config import ConfigError, TrainConfig, fixed_on_resume, get_key, load_config, to_dict
from gradus.config_checks import validate
from gradus.parallel import planned_world
from gradus.train.durable import replace_text


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The saved config of a run, with `overrides` (e.g. a larger run.steps). Overrides that would change
    what the run is (`gradus.config.fixed_on_resume`) are refused."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist (is {run_dir} a gradus run folder?)")
    saved, cfg = load_config(path), load_config(path, overrides)
    changed = [f"{key} (saved {get_key(saved, key)!r}, given {get_key(cfg, key)!r})" for key in fixed_on_resume()
               if _comparable(key, get_key(saved, key)) != _comparable(key, get_key(cfg, key))]
    if changed:
        raise ConfigError(f"--resume: {'; '.join(changed)} cannot change when a run is resumed; start a new run "
                          "for that (only keys such as run.steps, run.device or optim.lr may change)")
    validate(cfg, world=planned_world())
    return cfg


def _comparable(key: str, value: Any) -> Any:
    """Paths compare as absolute paths (a relative and an absolute spelling of one folder are equal)."""
    if value is not None and key in ("model.path", "task.data_file", "run.out_dir"):
        return Path(value).expanduser().resolve()
    return value


def save_config_atomically(cfg: TrainConfig, path: Path) -> None:
    """config.yaml is what --resume reads: a kill while writing it must leave the old one."""
    replace_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), what="config.yaml")


def data_position(positions: list[int], rank: int, world: int) -> int:
    """This rank's position in the training stream on resume, from every saving rank's: its own on the same
    world size; on another one, every rank continues after the furthest example any rank had used (none is
    used twice)."""
    if len(positions) == world:
        return positions[rank]
    used = max((p - 1) * len(positions) + r + 1 if p else 0 for r, p in enumerate(positions))  # examples used
    return -(-used // world)  # ceil: the first global index this rank takes is >= used

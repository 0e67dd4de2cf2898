"""gradus: RL post-training of language models, PPO -> GRPO -> DAPO -> GSPO -> SAPO."""

from importlib import metadata


def _version() -> str:
    """The version in pyproject.toml, as installed into the package metadata; a source tree that was never
    installed reads pyproject.toml itself."""
    try:
        return metadata.version("gradus")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
            return pyproject["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


__version__ = _version()

"""gradus: RL post-training of language models, PPO -> GRPO -> DAPO -> GSPO -> SAPO."""

import os
from importlib import metadata

# Results must not depend on the number of CPU threads (gradus changes it with the machine's load, see
# gradus.threads): on Intel CPUs MKL's sgemm splits long reductions (a weight gradient sums over every
# token) across threads, so 1 and 2 threads round differently (measured on an Intel Xeon: 1e-4 apart in a
# [384, 2560] x [2560, 128] product; identical on AMD EPYC). MKL's strict conditional numerical
# reproducibility makes them bit-identical. MKL reads this at its first call, so it is set before any torch
# work; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


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

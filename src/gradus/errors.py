"""The errors gradus raises on purpose, in one table: what a user can fix (a config value, a model folder,
a data file) and a run that stopped on its own terms. The command line prints each as one line,
`gradus: <kind>: <message>`, and exits with its code. Any other exception is a bug in gradus and keeps
its traceback, so this table lists classes gradus defines, never built-in ones such as ValueError.

A new error class that users are meant to read gets one entry here.
"""

from __future__ import annotations

from gradus.config import ConfigError
from gradus.models.loading import ModelLoadError
from gradus.parallel import CollectiveFailed
from gradus.rewards.pool import RewardError, RewardTimeout
from gradus.rollout.engine import EngineError
from gradus.tasks.files import DatasetError
from gradus.train.export import ExportError
from gradus.train.tally import NothingLearned
from gradus.train.update import NonFiniteUpdate

# (class, kind as printed, exit code): 2 = refused before or while reading the inputs; 1 = the run stopped
USER_ERRORS: tuple[tuple[type[Exception], str, int], ...] = (
    (ConfigError, "config error", 2),
    (ModelLoadError, "model error", 2),
    (DatasetError, "data error", 2),
    (ExportError, "export error", 2),
    (EngineError, "rollout engine error", 2),
    (NonFiniteUpdate, "run stopped", 1),
    (NothingLearned, "run stopped", 1),
    (CollectiveFailed, "data-parallel job stopped", 1),
    (RewardTimeout, "reward timed out (task.strict_rewards)", 1),
    (RewardError, "reward failed (task.strict_rewards)", 1),
)


def user_error(err: BaseException) -> tuple[str, int] | None:
    """(kind, exit code) of a user-facing error, or None for anything else (a bug: let it raise)."""
    for cls, kind, code in USER_ERRORS:
        if isinstance(err, cls):
            return kind, code
    return None

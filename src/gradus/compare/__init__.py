"""Train several algorithms side by side on one task and report how they differ."""

from gradus.compare.report import write_report
from gradus.compare.runner import COMPARE_DEFAULTS, DEFAULT_ALGOS, ComparePlan, RunStatus, load_plan, run_compare

__all__ = ["COMPARE_DEFAULTS", "DEFAULT_ALGOS", "ComparePlan", "RunStatus", "load_plan", "run_compare", "write_report"]

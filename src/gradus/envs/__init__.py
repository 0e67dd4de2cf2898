"""Multi-turn environments: the protocol (`base`), tool calls (`tools`), how observations become tokens
(`render`), the calls run in worker processes (`calls`) and the episode loop over an engine (`episodes`)."""

from gradus.envs.base import BadStep, BaseEnvironment, Environment, Observation, Step, check_step
from gradus.envs.render import TemplateSplitError, TurnRenderer
from gradus.envs.tools import Malformed, ToolCall, format_result, parse_tool_call, style_for

__all__ = ["BadStep", "BaseEnvironment", "Environment", "Malformed", "Observation", "Step", "TemplateSplitError",
           "ToolCall", "TurnRenderer", "check_step", "format_result", "parse_tool_call", "style_for"]

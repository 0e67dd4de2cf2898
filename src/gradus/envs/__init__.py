"""Multi-turn environments: the protocol (`base`), tool calls (`tools`), how observations become tokens
(`render`), the calls run in worker processes (`calls`) and the episode loop over an engine (`episodes`)."""

from gradus.envs.base import BadStep, BaseEnvironment, Environment, Observation, Step, check_step

__all__ = ["BadStep", "BaseEnvironment", "Environment", "Observation", "Step", "check_step"]

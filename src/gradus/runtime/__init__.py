"""How the models of a run are held and trained: the policy runtime (wrapping for `run.parallel`, LoRA, the
reference, optimizer, weight export, checkpoint state) and the critic, as parts the trainer calls."""

from gradus.runtime.policy import (
    Models,
    PolicyRuntime,
    build_models,
    load_plain,
    new_plain,
    parameter_names,
    plain_source,
)
from gradus.runtime.trained import Optim, TrainedModel, Writer, build_optim, hf_writer, lr_factor, save_model

__all__ = [
    "Models",
    "Optim",
    "PolicyRuntime",
    "TrainedModel",
    "Writer",
    "build_models",
    "build_optim",
    "load_plain",
    "hf_writer",
    "lr_factor",
    "new_plain",
    "parameter_names",
    "plain_source",
    "save_model",
]

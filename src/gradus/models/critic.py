"""The PPO critic: a value per token position, as a stock HF token-classification model.

`build_critic` makes `AutoModelForTokenClassification` (Qwen2ForTokenClassification,
LlamaForTokenClassification, ...) with one label from the policy's config, copies the policy's backbone
weights into it (the critic starts from the policy's features, as in InstructGPT-style PPO), and zeroes
the score head, so every initial value is exactly 0 and the first updates only fit the head's scale
instead of undoing a random one. Being a plain HF class, it saves with `save_pretrained` and loads with
`AutoModelForTokenClassification.from_pretrained` (see `loading.load_critic`).

Departures from the HF defaults: the classifier dropout (0.1 when the config names none) is set to 0, so
values are deterministic in train mode, as PPO's clipped value loss assumes.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForTokenClassification, PreTrainedModel

from gradus.logprobs import base_model, position_ids_from_mask


def build_critic(policy: PreTrainedModel) -> PreTrainedModel:
    """A value model with the policy's architecture and backbone weights and a zero score head."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    config.architectures = None  # filled in with the token-classification class on save
    critic = AutoModelForTokenClassification.from_config(config)
    policy_backbone = base_model(policy).get_decoder()
    critic_backbone = getattr(critic, critic.base_model_prefix)
    # strict=True: the two backbones must be the same module tree, or this is not the policy's network.
    critic_backbone.load_state_dict(policy_backbone.state_dict(), strict=True)
    with torch.no_grad():
        critic.score.weight.zero_()
        if critic.score.bias is not None:
            critic.score.bias.zero_()
    parameter = next(policy.parameters())
    return critic.to(device=parameter.device, dtype=parameter.dtype)


def critic_values(
    critic: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Value estimates per position, [B, S] float32, with gradients when grad is enabled.

    Calls the critic module itself (bare or wrapped by DDP / FSDP2), with gradus' position ids
    (`position_ids_from_mask`), the same as the policy's log-probs, so left-padded rows see the same
    positions as unpadded ones. Values at padded positions are computed but meaningless; callers mask them.
    """
    output = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return output.logits.squeeze(-1).float()  # [B, S]


def completion_values(
    critic: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int
) -> torch.Tensor:
    """V(state before completion token t) for t = 0 .. S - completion_start - 1: the critic's output at
    the position that predicts each completion token (the same positions as the policy's log-probs).
    -> [B, S - completion_start] float32"""
    values = critic_values(critic, input_ids, attention_mask)  # [B, S]
    return values[:, completion_start - 1 : input_ids.shape[1] - 1]

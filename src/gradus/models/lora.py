"""LoRA through PEFT: the policy as a `peft.PeftModel` whose own weights stay frozen.

1. `apply_lora(model, cfg)` injects adapters (`peft.LoraConfig` + `get_peft_model`) into the modules named
   by `cfg.lora_targets`. PEFT starts every adapter's B matrix at zero, so the adapted model starts
   exactly equal to the base model.
2. The reference model of the KL term is the same `PeftModel` with its adapter switched off
   (`reference_mode`, i.e. `model.disable_adapter()`), never a second copy in memory: under LoRA the base
   weights never change, so they are the initial policy.
3. A checkpoint's `policy/` is a standard PEFT adapter folder (`adapter_config.json`,
   `adapter_model.safetensors`, the tokenizer); `adapter_config.json` names the base model folder.
   `load_lora` puts it back on its base for training (resume); `load_merged` loads base + adapter merged
   into a plain HF model (`gradus export`, `gradus eval`, a new run that starts from a LoRA run).
4. With `model.dtype=bfloat16` the adapters are float32 (PEFT's `autocast_adapter_dtype`), so their
   optimizer steps are not rounded away; the frozen base stays bfloat16.
5. What the targets adapt is found before any work (`plan_lora`, called from the model's config by
   `gradus.train.bootstrap.preflight`, and again by `apply_lora`): PEFT itself injects them into a copy of
   the model on the meta device, where adapters of any rank take no memory. A name that matches nothing, a
   rank at or above an adapted matrix's width and an adapted MoE router are refused; the run's log gets one
   line saying what is adapted, and on an MoE model what becomes of its routed experts and routers.

Scope: the policy only. PPO's critic is a full copy of the backbone trained in full (see
`gradus.models.critic`); LoRA does not shrink it. The adapters are plain `nn.Linear` pairs inside the
decoder, so everything that calls the module (log-probs, the rollout engine's HF forward) computes the
adapted model; a fast path that reads `q_proj.weight` itself would compute the base model, which is why the
rollout's `DirectDecoder` refuses anything but a plain `nn.Linear`: the local engine samples a LoRA policy from
a merged copy instead (`merged_tensors`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gradus.config import ConfigError, ModelConfig
from gradus.models.loading import ModelLoadError, check_finite, check_model_dir, load_pretrained

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"


# Module names (the last part of a dotted name) that LoRA must not adapt, and why.
_HEAD_NAMES = ("lm_head", "embed_out")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")
HEAD_REASON = ("gradus computes log-probs from the lm head's weight as a plain linear layer (in chunks, never the "
               "whole [B, T, V] logits), so an adapter there would not be applied")
EMBEDDING_REASON = ("an embedding adapter merges into the embedding matrix, which small Qwen2 and Llama models (and "
                    "gradus' built-in ones) share with the lm head, so the exported model would not be the trained one")


def lora_targets(text: str) -> list[str]:
    """model.lora_targets as a list of module names (empty entries dropped)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def check_lora_config(m: ModelConfig) -> None:
    """The LoRA fields of a config: only with a rank, at least one target, never the lm head or the embeddings."""
    defaults = ModelConfig()
    if m.lora_r == 0:
        for key in ("lora_alpha", "lora_dropout", "lora_targets"):
            if getattr(m, key) != getattr(defaults, key):
                raise ConfigError(f"model.{key} is only used with LoRA (model.lora_r > 0), got {getattr(m, key)!r} "
                                  "with model.lora_r=0; set model.lora_r (e.g. 16) or leave it out")
        return
    targets = lora_targets(m.lora_targets)
    if not targets:
        raise ConfigError(f"model.lora_targets must name at least one module with model.lora_r={m.lora_r} "
                          f"(e.g. {defaults.lora_targets})")
    for name in targets:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _HEAD_NAMES:
            raise ConfigError(f"model.lora_targets: {name!r} is the lm head, which cannot take an adapter: "
                              f"{HEAD_REASON}")
        if leaf in _EMBEDDING_NAMES:
            raise ConfigError(f"model.lora_targets: {name!r} is the token embedding, which cannot take an adapter: "
                              f"{EMBEDDING_REASON}")


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (its trainable weights are adapters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_lora(model: PreTrainedModel, cfg: ModelConfig) -> PeftModel:
    """Inject LoRA adapters into `model` (in place) per cfg.lora_r, lora_alpha, lora_dropout, lora_targets; freeze
    everything else. The result computes exactly what `model` computed until the adapters are trained."""
    from peft import LoraConfig, get_peft_model

    names = lora_targets(cfg.lora_targets)
    plan_lora(model, cfg)  # refuses before PEFT allocates anything (preflight did it from the config already)
    targets: str | list[str] = "all-linear" if names == ["all-linear"] else names  # PEFT's keyword
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    linear = _linear_names(model)
    try:
        with _quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r}: {err} (the model's linear layers are named: "
                          f"{', '.join(linear)})") from err
    _check_head_and_embeddings(peft_model)
    return peft_model


@dataclass(frozen=True)
class LoraPlan:
    """What a LoRA config adapts in one model, as PEFT does it (found on a copy on the meta device)."""

    rank: int
    shapes: dict[str, tuple[int, int]]
    """Adapted module (full name; a fused MoE tensor by its module and parameter, "mlp.experts.down_proj") ->
    (in, out) features of the matrix it adapts (of each expert's, for fused experts), in the model's order."""
    missing: str | None
    """The default targets this model does not have (e.g. an MoE model's MLP names), or None."""
    moe: str | None
    """For a mixture-of-experts model: what happens to its routed experts, routers and shared experts."""

    def describe(self) -> str:
        """One line for the run's log: how many modules, which (by their name within a decoder layer)."""
        kinds: dict[str, int] = {}
        for name in self.shapes:
            kinds[_within_layer(name)] = kinds.get(_within_layer(name), 0) + 1
        listed = ", ".join(f"{kind} x{count}" if count > 1 else kind for kind, count in kinds.items())
        line = f"LoRA r={self.rank} adapts {len(self.shapes)} weight matrices: {listed}"
        return "; ".join(part for part in (line, self.missing, self.moe) if part)


def plan_lora(model: nn.Module, cfg: ModelConfig) -> LoraPlan | None:
    """What `cfg` adapts in `model` (a plain HF model, loaded or on the meta device), found by PEFT itself on a
    copy on the meta device, where no adapter takes memory whatever the rank; None when the model's config cannot
    be built there (custom code). PEFT is the judge of what matches: a listed name matches a module whose name is
    it or ends in "." + it, and on MoE models PEFT maps some names onto fused expert tensors (Qwen3-MoE's
    gate_proj/up_proj/down_proj; Mixtral's w1/w2/w3) and the router (`gate`); `all-linear` adds those too.

    ConfigError before any real adapter exists: a listed name that adds nothing and matches nothing on its own
    (a typo, dropped silently by PEFT when another name matched; allowed for the default list, whose MLP names
    an MoE model may lack), a name PEFT refuses, and a rank at or above the width min(in, out) of the narrowest
    adapted matrix: a rank-w adapter on it can already make any change, a larger one only costs memory and time
    (model.lora_r=100000 on the nano model trained 50 s and wrote a 2.8 GB checkpoint)."""
    meta = model if _on_meta(model) else _meta_model(getattr(model, "config", None))
    if meta is None:
        return None
    names = list(dict.fromkeys(lora_targets(cfg.lora_targets)))  # a name given twice is one name
    try:
        shapes = _adapted_shapes(meta, cfg, names)
        unmatched = [] if names == ["all-linear"] else _unmatched(meta, cfg, names, shapes)
    except _NoMatch:
        shapes, unmatched = {}, names
    default = cfg.lora_targets == ModelConfig().lora_targets
    if unmatched and not (default and shapes):
        raise ConfigError(f"model.lora_targets: {unmatched[0]!r} matches no module of the model; name linear layers, "
                          f"which are here: {', '.join(_linear_names(meta))}")
    _check_routers(meta, cfg, shapes)
    narrowest = min(shapes, key=lambda name: min(shapes[name]))
    width = min(shapes[narrowest])
    if cfg.lora_r >= width:
        fan_in, fan_out = shapes[narrowest]
        raise ConfigError(f"model.lora_r={cfg.lora_r} is at or above the width of {narrowest} ({fan_in} -> {fan_out} "
                          f"features: width {width}), the narrowest matrix model.lora_targets adapts; a rank-{width} "
                          f"adapter can already make any change to it, a larger one only costs memory and time: set "
                          f"model.lora_r below {width}, or leave that layer out of model.lora_targets")
    missing = f"the default targets {', '.join(unmatched)} are not in this model" if unmatched else None
    return LoraPlan(cfg.lora_r, shapes, missing, _moe_note(meta, shapes))


def _check_routers(model: nn.Module, cfg: ModelConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """ConfigError when the targets adapt an MoE router (`gate`, or `all-linear`, on Mixtral and Qwen3-MoE): PEFT
    wraps the router in a module of its own, and gradus' routing records (taken at every sampling of an MoE
    policy) and replays then find the wrapper where the MoE block should be; sampling failed with a traceback."""
    from gradus.models.routing import moe_layout_or_none

    layout = moe_layout_or_none(model)
    routers = [name for name in shapes if layout is not None and name in layout.names]
    if routers:
        name = _within_layer(routers[0])
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r} adapts the MoE routers ({name}), which gradus' "
                          "routing record and replay cannot see through yet; list the targets without "
                          f"{name.rsplit('.', 1)[-1]!r} (all-linear includes it)")


def plan_from_config(cfg: ModelConfig) -> LoraPlan | None:
    """`plan_lora` for the model `cfg` names, before it is loaded or warm-started: from its config.json (a LoRA
    folder's: its base's) or the built-in model's sizes. None when that cannot be built on the meta device
    (e.g. custom code): `apply_lora` then checks the loaded model."""
    from transformers import AutoConfig

    from gradus.models.tiny import tiny_config
    from gradus.models.tokenizer import build_char_tokenizer

    try:
        if cfg.path:
            path = Path(cfg.path)
            while (base := adapter_base(path)) is not None:
                path = base
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        else:
            config = tiny_config(cfg.tiny_size, tokenizer=build_char_tokenizer(), arch=cfg.arch)
    except (OSError, ValueError, KeyError):
        return None  # the model loader says what is wrong with the folder
    model = _meta_model(config)
    return None if model is None else plan_lora(model, cfg)


class _NoMatch(Exception):
    """PEFT found no module for the targets tried (its NoMatchingPeftModuleError)."""


def _meta_model(config: Any) -> nn.Module | None:
    """The causal LM of `config` on the meta device (modules and shapes, no memory); None if it cannot be built."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _adapted_shapes(meta: nn.Module, cfg: ModelConfig, names: list[str]) -> dict[str, tuple[int, int]]:
    """The matrices PEFT adapts in a copy of `meta` with target_modules `names` -> their (in, out) features;
    ConfigError with PEFT's reason when it refuses the targets."""
    from peft import LoraConfig, NoMatchingPeftModuleError, get_peft_model
    from peft.tuners.lora import LoraLayer

    targets: str | list[str] = "all-linear" if names == ["all-linear"] else names  # PEFT's keyword
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    try:
        with torch.device("meta"), _quiet_peft(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PEFT's notes on the fused experts' rank patterns
            peft_model = get_peft_model(copy.deepcopy(meta), config)
    except NoMatchingPeftModuleError as err:
        raise _NoMatch from err
    except ValueError as err:  # PEFT's own words: a module type it cannot adapt, half of a fused pair, ...
        reason = re.sub(r"Target module (\w+)\(.*?\) is not supported", r"Target module \1 is not supported",
                        " ".join(str(err).split()))  # the module's repr spans lines: its class name is enough
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r}: PEFT refuses it: {reason} (the model's linear "
                          f"layers are named: {', '.join(_linear_names(meta))})") from err
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):  # a fused tensor's adapters nest: experts, experts.base_layer, ...
            module_name = re.sub(r"(\.base_layer)+$", "", name)
            parameter = getattr(module, "parameter_name", None)
            key = f"{module_name}.{parameter}" if parameter and parameter != "weight" else module_name
            shapes[key] = (int(module.in_features), int(module.out_features))
    return shapes


def _unmatched(meta: nn.Module, cfg: ModelConfig, names: list[str], shapes: dict[str, tuple[int, int]]) -> list[str]:
    """The names among `names` that PEFT matched nothing with: leaving one out adapts the same matrices, and on
    its own it matches nothing (a name that only repeats another's modules is kept; a name of a fused pair
    such as Mixtral's w1 changes what the others adapt)."""
    found = []
    for name in names:
        others = [other for other in names if other != name]
        try:
            if others and _adapted_shapes(meta, cfg, others) != shapes:
                continue
        except (ConfigError, _NoMatch):
            continue  # the others alone are refused: this name is part of what makes them work
        try:
            _adapted_shapes(meta, cfg, [name])
        except _NoMatch:
            found.append(name)
        except ConfigError:
            pass  # alone it is half of a fused pair: not a name that matches nothing
    return found


def _within_layer(name: str) -> str:
    """A module's name within its decoder layer ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj")."""
    return re.sub(r"^(.*\.)?layers\.\d+\.", "", name)


def _moe_note(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> str | None:
    """What LoRA does to a mixture-of-experts model's routed experts, routers and shared experts (None for a dense
    model). In transformers 5 the routed experts are fused [experts, out, in] tensors and the routers are not
    linear layers; PEFT adapts them only where it maps the target names onto them (`plan_lora`)."""
    from gradus.models.routing import moe_layout_or_none

    layout = moe_layout_or_none(model)
    if layout is None:
        return None
    blocks = [name.rpartition(".")[0] for name in layout.names]
    experts = [n for n in shapes if any(n.startswith(f"{block}.experts") for block in blocks)]
    shared = [n for n in shapes if ".shared_expert" in n]
    routed = (f"the routed experts get adapters on {', '.join(sorted({_within_layer(n) for n in experts}))} (one "
              f"per expert, {layout.num_experts} per MoE layer)" if experts else
              f"the routed experts ({layout.num_experts} per MoE layer) get no adapter")
    router = f"the routers ({_within_layer(layout.names[0])}) get none"  # _check_routers refuses them
    return f"MoE: {routed}; {router}" + (f"; the shared experts' {len(shared)} matrices are adapted" if shared else "")


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT asks transformers 5 a deprecated question (`is_gradient_checkpointing`) on every wrap: a
    FutureWarning a user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


# The linear layers PEFT adapts (GPT-2-style models build theirs as transformers' Conv1D).
_LINEAR = (nn.Linear, Conv1D)


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last parts of the names of `model`'s linear layers but the lm head (which no adapter may
    take), e.g. ['down_proj', ..., 'v_proj']."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, _LINEAR) and module is not head})


def _check_head_and_embeddings(model: nn.Module) -> None:
    """The lm head and the token embedding must be left plain, whatever names matched (see config_checks)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and type(head) is not nn.Linear:
        raise ConfigError(f"model.lora_targets adapted the lm head ({type(head).__name__}): {HEAD_REASON}")
    if type(embedding) is not nn.Embedding:
        raise ConfigError(f"model.lora_targets adapted the token embedding ({type(embedding).__name__}): "
                          f"{EMBEDDING_REASON}")


def reference_mode(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A context in which `model` computes the reference: a PEFT model's base weights (adapter off);
    any other model unchanged (its reference is a separate copy)."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def save_adapter(model: PeftModel, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter (adapter_config.json, adapter_model.safetensors) to `path`; `state_dict`: the model's
    gathered weights when it is sharded. save_embedding_layers=False: embeddings are never adapted
    (check_lora_config), and PEFT's "auto" would look the base model up, perhaps online."""
    model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)


def adapter_base(path: str | Path) -> Path | None:
    """The base model folder of a PEFT adapter folder (its adapter_config.json's base_model_name_or_path);
    None when `path` is not an adapter folder (it holds a config.json, or no adapter_config.json)."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG} is unreadable or names no base model ({err})") from err
    if not base:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path is empty)")
    return Path(base)


def plain_model_dir(path: str | Path) -> Path:
    """The folder of the plain model that `path` is built on: `path` itself, or, for a LoRA adapter folder, its
    base (the base's base, for an adapter trained on a LoRA run's policy). Same architecture and tokenizer."""
    path = Path(path)
    while (base := adapter_base(path)) is not None:
        path = base
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """Raise ModelLoadError unless `path` is an adapter folder with weights whose base model folder is
    complete (or itself such an adapter folder); return the base folder."""
    path = Path(path)
    base = adapter_base(path)
    if base is None:
        raise ModelLoadError(f"{path} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{path}: no adapter_model.safetensors next to its {ADAPTER_CONFIG}")
    if not base.exists():
        raise ModelLoadError(f"{path} is a LoRA adapter on the base model {base}, which does not exist (moved or "
                             f"deleted?); put the base model back there, or set base_model_name_or_path in "
                             f"{path / ADAPTER_CONFIG}")
    if adapter_base(base) is not None:
        check_adapter_dir(base)
    else:
        check_model_dir(base, need_tokenizer=False)
    return base


def load_lora(base: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """The adapter saved in `adapter_dir` on `base` (in place), trainable: how a LoRA run resumes."""
    from peft import PeftModel

    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the LoRA adapter {adapter_dir} ({err})") from err


def load_merged(
    adapter_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, Any]:
    """A plain HF model: the base named by `adapter_dir` with the adapter merged in, and the tokenizer saved
    with the adapter. A base that is itself an adapter folder (a LoRA run started from a LoRA run) is merged
    first. The model's name_or_path is `adapter_dir`, so an adapter trained on top names this as its base."""
    adapter_dir = Path(adapter_dir)
    base_dir = check_adapter_dir(adapter_dir)
    if adapter_base(base_dir) is not None:
        base, tokenizer = load_merged(base_dir, dtype=dtype)
    else:
        base, tokenizer = load_pretrained(base_dir, dtype=dtype)
    if any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
    from peft import PeftModel

    try:
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the LoRA adapter {adapter_dir} onto {base_dir} ({err})") from err
    check_finite(model, adapter_dir)
    model.name_or_path = model.config._name_or_path = str(adapter_dir)
    return (model if device is None else model.to(device)), tokenizer


def merged_tensors(model: PeftModel, named: Iterator[tuple[str, torch.Tensor]]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy as one plain model: (HF name, tensor) with every adapter merged into its base weight, from
    `named`, the PEFT model's own (name, full tensor) pairs in its parameter order (`parallel.full_tensors`:
    gathered one at a time under FSDP2). `model` itself is left as it is.

    A LoRA layer's merged weight is W + transpose(B @ A, fan_in_fan_out) * scaling, in float32 and rounded to
    W's dtype: PEFT's own `get_delta_weight` and `merge`, computed out of place, so the result equals
    `merge_and_unload` bit for bit (tests/test_lora.py). Names lose PEFT's `base_model.model.` prefix and the
    `.base_layer` of adapted modules, so they are the base model's HF names (what vLLM's `load_weights` and
    a plain copy of the base architecture take).
    """
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    pending: dict[str, dict[str, torch.Tensor]] = {}  # an adapted module's parts until all three are there
    for name, tensor in named:
        plain = name.removeprefix(prefix)
        module_name, _, leaf = plain.rpartition(".")
        if ".lora_" not in plain and ".base_layer." not in f".{plain}":
            yield plain, tensor
            continue
        if ".base_layer" in module_name and leaf == "bias":
            yield plain.replace(".base_layer", ""), tensor  # a bias is not changed by LoRA
            continue
        owner = module_name.split(".base_layer")[0].split(".lora_A")[0].split(".lora_B")[0]
        layer = model.get_submodule(prefix + owner)
        if not isinstance(layer, LoraLayer):
            raise ValueError(f"{name}: {owner} is not a LoRA layer")
        part = "A" if ".lora_A." in plain else "B" if ".lora_B." in plain else "W"
        parts = pending.setdefault(owner, {})
        parts[part] = tensor
        if len(parts) < 3:
            continue
        del pending[owner]
        adapter = layer.active_adapters[0]
        delta = parts["B"].float() @ parts["A"].float()  # [out, in]
        if layer.fan_in_fan_out:
            delta = delta.T
        delta = delta * layer.scaling[adapter]
        weight = parts["W"]
        yield f"{owner}.weight", (weight.float() + delta).to(weight.dtype)
    if pending:
        raise ValueError(f"LoRA layers with missing parts: {', '.join(sorted(pending))}")


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain HF model equal to `model` with its adapter merged in; `model` itself is left as it is."""
    return copy.deepcopy(model).merge_and_unload()


def load_model(path: str | Path, dtype_name: str, device: torch.device | str | None) -> tuple[Any, Any]:
    """Model and tokenizer of a model folder, or of a LoRA adapter folder (a LoRA run's policy: its base with
    the adapter merged in), as a plain HF model in `dtype_name` (model.dtype); ConfigError naming model.path."""
    from gradus.models.loading import DTYPES, check_special_tokens

    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    try:
        load = load_merged if adapter_base(path) is not None else load_pretrained
        model, tokenizer = load(path, dtype=dtype, device=device)
        check_special_tokens(model, tokenizer, path)  # and gives a tokenizer without PAD its EOS as PAD
    except ModelLoadError as err:
        raise ConfigError(f"model.path: {err}") from err
    return model, tokenizer

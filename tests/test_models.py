"""Tokenizer, tiny models, save/load and the critic, checked against plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from gradus.logprobs import position_ids_from_mask
from gradus.models import (
    DEFAULT_ALPHABET,
    TINY_SIZES,
    ModelLoadError,
    build_char_tokenizer,
    build_critic,
    build_tiny_model,
    critic_values,
    load_critic,
    load_pretrained,
    save_pretrained,
)

TEXT = "Q: 12 + 30 =\t?\n  A: 42.  (done) ~{}|\\\"'`"
UNICODE = "héllo — 世界 \r\n\x00\x7f"  # bytes outside the alphabet still get ids


# Weights must round-trip bit for bit (checked with torch.equal). Outputs are compared at 1e-6: loaded
# safetensors weights live in memory with another alignment, and CPU matmul kernels then pick other
# vectorised paths, which moves the last bit or two (seen: 1e-6 on values of size ~5).
KERNEL_TOL = {"rtol": 1e-6, "atol": 1e-6}


def assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_tokenizer_ids_are_characters_and_round_trip(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT)  # one id per character, no bos/eos added
    assert ids == [4 + DEFAULT_ALPHABET.index(ch) for ch in TEXT]  # ids in alphabet order after specials
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens(4 + DEFAULT_ALPHABET.index("a")) == "a"
    assert len(tokenizer) == 4 + 256  # every byte has an id
    assert tokenizer.decode(tokenizer.encode("a</s>"), skip_special_tokens=True) == "a"
    assert len(tokenizer.encode(UNICODE)) == len(UNICODE.encode()) and tokenizer.decode(
        tokenizer.encode(UNICODE)) == UNICODE


def test_tokenizer_custom_alphabet_and_bad_alphabets():
    small = build_char_tokenizer("ab\n")
    assert small.encode("ba\na") == [5, 4, 6, 4]
    assert small.decode([5, 4, 6, 4]) == "ba\na"
    with pytest.raises(ValueError, match="repeated"):
        build_char_tokenizer("abca")
    with pytest.raises(ValueError, match="at least one"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="ASCII"):
        build_char_tokenizer("aé")


@pytest.mark.parametrize("beside", [None, "qwen2", "llama"])
def test_tokenizer_save_and_plain_autotokenizer_load(tokenizer, tmp_path, beside):
    # Next to a qwen2 config.json, transformers 5 loads Qwen2Tokenizer with its own pipeline: the ids
    # must still be the same (the reason the tokenizer is byte-level, see its module docstring).
    if beside is not None:
        save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, arch=beside), None, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in (TEXT, UNICODE, "a</s>b<pad>"):
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.chat_template is None


def expected_params(size: str, vocab: int, arch: str) -> int:
    """Parameter count worked out from the architecture, independently of transformers."""
    s = TINY_SIZES[size]
    head_dim = s.hidden_size // s.num_heads
    q_out, kv_out = s.num_heads * head_dim, s.num_kv_heads * head_dim
    attention = s.hidden_size * q_out + 2 * s.hidden_size * kv_out + q_out * s.hidden_size  # q, k, v, o
    if arch == "qwen2":
        attention += q_out + 2 * kv_out  # Qwen2 has biases on q, k, v
    mlp = 3 * s.hidden_size * s.intermediate_size  # gate, up, down
    per_layer = attention + mlp + 2 * s.hidden_size  # two RMSNorm weights
    return vocab * s.hidden_size + s.num_layers * per_layer + s.hidden_size  # tied embedding + final norm


@pytest.mark.parametrize("size", sorted(TINY_SIZES))
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_sizes_parameter_counts(tokenizer, size, arch):
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        model = build_tiny_model(size, tokenizer=tokenizer, arch=arch)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_params(size, len(tokenizer), arch)
    if arch == "qwen2":
        assert count == TINY_SIZES[size].num_params
    bounds = {"nano": (0.08e6, 0.15e6), "micro": (0.5e6, 1e6), "small": (3e6, 5e6)}[size]
    assert bounds[0] <= count <= bounds[1]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_config_and_seeded_init(tokenizer, arch):
    rng_before = torch.random.get_rng_state()
    model = build_tiny_model("nano", tokenizer=tokenizer, arch=arch, seed=5, max_positions=128)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer) and model.config.max_position_embeddings == 128
    for config in (model.config, model.generation_config):
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    same = build_tiny_model("nano", tokenizer=tokenizer, arch=arch, seed=5, max_positions=128)
    other = build_tiny_model("nano", tokenizer=tokenizer, arch=arch, seed=6, max_positions=128)
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(model.get_input_embeddings().weight, other.get_input_embeddings().weight)


def test_unknown_size_or_arch_lists_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="micro.*nano.*small"):
        build_tiny_model("huge", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="llama.*qwen2"):
        build_tiny_model("nano", tokenizer=tokenizer, arch="gpt2")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_load_round_trip_with_plain_transformers(tokenizer, tmp_path, arch):
    model = build_tiny_model("nano", tokenizer=tokenizer, arch=arch, seed=2).eval()
    save_pretrained(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    plain_model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ours_model, ours_tok = load_pretrained(tmp_path)
    ids = torch.tensor([tokenizer.encode(TEXT)])  # [1, S]
    assert plain_tok.encode(TEXT) == ours_tok.encode(TEXT) == ids[0].tolist()
    assert_same_weights(model, plain_model)
    assert_same_weights(model, ours_model)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(plain_model(ids).logits, want, **KERNEL_TOL)
        torch.testing.assert_close(ours_model.eval()(ids).logits, want, **KERNEL_TOL)
    assert ours_model.generation_config.pad_token_id == 0
    half, _ = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_errors_say_what_is_expected_and_found(tokenizer, tmp_path):
    assert issubclass(ModelLoadError, ValueError)
    with pytest.raises(ModelLoadError, match="does not exist.*config.json.*safetensors.*tokenizer"):
        load_pretrained(tmp_path / "nowhere")
    model = build_tiny_model("nano", tokenizer=tokenizer)

    no_weights = tmp_path / "no_weights"
    save_pretrained(model, tokenizer, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights.*found: config\.json"):
        load_pretrained(no_weights)

    no_tokenizer = tmp_path / "no_tokenizer"
    save_pretrained(model, None, no_tokenizer)
    with pytest.raises(ModelLoadError, match="no tokenizer files.*found: config.json"):
        load_pretrained(no_tokenizer)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json.*empty directory"):
        load_pretrained(empty)

    broken = tmp_path / "broken"
    save_pretrained(model, tokenizer, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_pretrained(broken)


def _batch(tokenizer):
    enc = tokenizer(["1+1=2", "123+456=579", "9"], padding=True, padding_side="left", return_tensors="pt")
    return enc.input_ids, enc.attention_mask  # [B, S] each


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_critic_starts_from_policy_backbone_with_zero_values(tokenizer, arch):
    policy = build_tiny_model("nano", tokenizer=tokenizer, arch=arch, seed=4)
    critic = build_critic(policy)
    assert type(critic).__name__ == {"qwen2": "Qwen2", "llama": "Llama"}[arch] + "ForTokenClassification"
    policy_state = policy.get_decoder().state_dict()
    critic_state = critic.model.state_dict()
    assert policy_state.keys() == critic_state.keys()
    for name, tensor in policy_state.items():
        assert torch.equal(critic_state[name], tensor), name
        assert critic_state[name].data_ptr() != tensor.data_ptr(), "critic must not share policy storage"
    input_ids, attention_mask = _batch(tokenizer)
    values = critic_values(critic.train(), input_ids, attention_mask)
    assert values.shape == input_ids.shape and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros_like(values))  # zero score head


def test_critic_values_are_head_of_policy_features_and_padding_invisible(tokenizer):
    policy = build_tiny_model("nano", tokenizer=tokenizer, seed=4)
    critic = build_critic(policy).train()  # train mode: dropout must be off
    with torch.no_grad():
        critic.score.weight.normal_(generator=torch.Generator().manual_seed(0))
        critic.score.bias.fill_(0.25)
    input_ids, attention_mask = _batch(tokenizer)
    values = critic_values(critic, input_ids, attention_mask)
    # Expected another way: the policy's final hidden states times the head.
    hidden = policy.get_decoder()(input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
    want = hidden @ critic.score.weight[0] + 0.25  # [B, S]
    torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(critic_values(critic, input_ids, attention_mask), values, rtol=0, atol=0)
    row = 2  # "9": the most left-padded row
    n_pad = int((attention_mask[row] == 0).sum())
    alone = critic_values(critic, input_ids[row:, n_pad:][:1], attention_mask[row:, n_pad:][:1])
    torch.testing.assert_close(values[row, n_pad:], alone[0], rtol=1e-5, atol=1e-5)
    values.sum().backward()
    assert critic.model.embed_tokens.weight.grad.abs().sum() > 0  # gradients reach the backbone


def test_critic_save_load_round_trip(tokenizer, tmp_path):
    critic = build_critic(build_tiny_model("nano", tokenizer=tokenizer, seed=1))
    with torch.no_grad():
        critic.score.weight.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    save_pretrained(critic, None, tmp_path)
    input_ids, attention_mask = _batch(tokenizer)
    want = critic_values(critic, input_ids, attention_mask)
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path, local_files_only=True)
    loaded = load_critic(tmp_path)
    assert_same_weights(critic, plain)
    assert_same_weights(critic, loaded)
    torch.testing.assert_close(critic_values(plain, input_ids, attention_mask), want, **KERNEL_TOL)
    torch.testing.assert_close(critic_values(loaded, input_ids, attention_mask), want, **KERNEL_TOL)


def test_completion_values_are_the_values_at_the_predicting_positions():
    import torch

    from gradus.models import build_char_tokenizer, build_critic, build_tiny_model, completion_values, critic_values

    tok = build_char_tokenizer()
    critic = build_critic(build_tiny_model("nano", tokenizer=tok, seed=0))
    with torch.no_grad():
        critic.score.weight.normal_()  # a non-zero head, so the values differ by position
    ids = torch.randint(4, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    start = 4
    got = completion_values(critic, ids, mask, start)  # [2, 3]
    full = critic_values(critic, ids, mask)  # [2, 7]
    # completion token t sits at column start + t; the state before it ends at column start + t - 1
    expected = torch.stack([full[:, start + t - 1] for t in range(7 - start)], dim=1)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got[:, 0], got[:, 1])

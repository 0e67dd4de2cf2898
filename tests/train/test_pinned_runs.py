"""The trainer's results are pinned: short runs through every path a restructuring touches (old log-prob pass,
reference and KL, critic and GAE, LoRA, the bf16 sampling copy, MoE routing replay) log the metrics
recorded in `pinned_metrics.json`, made on the code before the policy runtime and the named stages
(`pinned_runs.py` says how to record them again).

On a machine like the one that recorded them (same CPU model and instruction sets, same torch and
transformers) every value must be bit-identical. Another CPU rounds float32 matrix products differently
(AVX2 against AVX-512 kernels; simulated here with ATEN_CPU_CAPABILITY=avx2), which three steps keep far
below a relative 1e-4, while a change to what is computed (a minibatch order, a KL term, a mask) moves the
metrics by far more. Diagnostics added since (`ADDED`) may be logged beside them. Two kinds of value measure
rounding itself and are then only required to be logged:
the share of tokens past a threshold (clip fractions: a value a rounding apart from the bound flips), and
everything of the bf16-sampling case (bf16 matrix products differ in their third digit between CPUs with
and without native bf16, enough to flip sampled tokens)."""

import json
import math

import pytest

from .pinned_runs import CASES, FIXTURE, machine, run_all

REL = 1e-4
ABS = 1e-6
THRESHOLD_SHARES = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "value_clip_frac")
# diagnostics added since the recording, logged beside the pinned ones (they change no result)
ADDED = ("actor/cov_", "actor/tokens_trained")
ROUNDING_CASES = ("gspo_bf16_rollout",)


@pytest.fixture(scope="module")
def pinned():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("pinned"))


def _differences(expected: list[dict], got: list[dict], *, exact: bool, case: str) -> list[str]:
    found = []
    if len(expected) != len(got):
        return [f"{len(got)} metric records, pinned {len(expected)}"]
    for old, new in zip(expected, got, strict=True):
        where = f"step {old.get('step')}"
        added = {k for k in set(new) - set(old) if k.startswith(ADDED)}
        if set(old) != set(new) - added:
            found.append(f"{where}: keys missing {sorted(set(old) - set(new))}, new {sorted(set(new) - set(old))}")
            continue
        for key, value in old.items():
            if exact:
                same = new[key] == value
            elif case in ROUNDING_CASES or key.rsplit("/", 1)[-1] in THRESHOLD_SHARES:
                same = True  # logged, which the key check above asks
            else:
                same = math.isclose(new[key], value, rel_tol=REL, abs_tol=ABS)
            if not same:
                found.append(f"{where}: {key} = {new[key]!r}, pinned {value!r}")
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_short_run_logs_the_pinned_metrics(case, runs, pinned):
    exact = pinned["machine"] == machine()
    problems = _differences(pinned["runs"][case], runs[case], exact=exact, case=case)
    how = "bit-identical (the recording machine's kind)" if exact else f"to rel {REL} (another machine)"
    assert not problems, f"{case}, compared {how}:\n" + "\n".join(problems[:20])

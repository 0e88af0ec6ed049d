"""The host optimizer of ECSS: DeepSpeedCPUAdam's update in slices (pangu_model/host_adam.py)."""
from __future__ import annotations

import pytest
import torch

from pangu_model.host_adam import SIMD_BLOCK, SlicedCPUAdam

pytest.importorskip("deepspeed")


def _params(sizes: list[int]) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in sizes]


def test_sliced_updates_equal_whole_tensor_updates_with_lazy_steps() -> None:
    """Rows of odd lengths (vector blocks and a scalar tail), stepped on different steps as ECSS's experts
    are: the sliced optimizer gives DeepSpeedCPUAdam's values and per-parameter step counts, bit for bit,
    with slices of one SIMD block or one slice per row (on these steps DeepSpeed's β^t is pow's)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    sizes = [3 * SIMD_BLOCK + 37, 2 * SIMD_BLOCK, 5, 7 * SIMD_BLOCK + 1]
    options = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adamw_mode=True)
    runs = {"whole": (_params(sizes), DeepSpeedCPUAdam), "sliced": (_params(sizes), SlicedCPUAdam),
            "one slice": (_params(sizes), SlicedCPUAdam)}
    optimizers = {
        "whole": DeepSpeedCPUAdam(runs["whole"][0], **options),
        "sliced": SlicedCPUAdam(runs["sliced"][0], slice_elements=SIMD_BLOCK, **options),
        "one slice": SlicedCPUAdam(runs["one slice"][0], slice_elements=8 * SIMD_BLOCK, **options),
    }
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        stepped = [i for i in range(len(sizes)) if (i + step) % 3]  # each row skips every third step
        grads = [torch.randn(size, generator=generator) for size in sizes]
        for name, optimizer in optimizers.items():
            params = runs[name][0]
            for i, p in enumerate(params):
                p.grad = grads[i].clone() if i in stepped else None
            optimizer.step()
    whole, sliced, single = (runs[name][0] for name in ("whole", "sliced", "one slice"))
    for i, p in enumerate(whole):
        assert torch.equal(single[i], p) and torch.equal(sliced[i], p)
        states = [optimizers[name].state[runs[name][0][i]] for name in ("whole", "sliced")]
        assert states[0]["step"] == states[1]["step"] == 4  # lazy: only the steps the row took part in
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(states[1][key], states[0][key])
    assert not torch.equal(whole[0], _params(sizes)[0])  # the rows did move


def test_a_slice_that_is_not_whole_simd_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match=f"a positive multiple of {SIMD_BLOCK}"):
        SlicedCPUAdam(_params([4]), slice_elements=100)


def test_a_resumed_optimizer_continues_bit_for_bit() -> None:
    """A resume builds a new optimizer from the checkpoint's states. DeepSpeed's kernel carried β^t over from
    its previous call (one multiply when the step follows it, `pow` otherwise), so the resumed run's first
    steps rounded β^t differently from the uninterrupted one: losses after a `kill -9` differed by 5e-7."""
    options = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adamw_mode=True)
    sizes = [1 << 16, 5]  # enough values that a β^t one float ulp apart moves some of them
    generator = torch.Generator().manual_seed(3)
    grads = [[torch.randn(size, generator=generator) for size in sizes] for _ in range(16)]

    def train(params, optimizer, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            optimizer.step()

    whole = _params(sizes)
    train(whole, SlicedCPUAdam(whole, **options), range(16))
    first = _params(sizes)
    before = SlicedCPUAdam(first, **options)
    train(first, before, range(5))
    resumed = _params(sizes)
    for p, q in zip(resumed, first):
        p.data.copy_(q.data)
    after = SlicedCPUAdam(resumed, **options)
    after.load_state_dict(before.state_dict())
    train(resumed, after, range(5, 16))
    for p, q in zip(resumed, whole):
        assert torch.equal(p, q), (p - q).abs().max()

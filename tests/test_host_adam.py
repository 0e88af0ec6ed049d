"""ECSS's host optimizer: DeepSpeed's CPU Adam kernel behind a binding that releases the GIL
(pangu_model/host_adam.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from pangu_model.host_adam import HostAdam  # noqa: E402

OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(sizes: list[int]) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in sizes]


def test_host_adam_is_adamw_with_lazy_per_parameter_steps() -> None:
    """Rows of odd lengths (the kernel's vector blocks and a scalar tail), stepped on different steps as ECSS's
    experts are: torch's AdamW gives the same weights, and each row counts only the steps it took part in."""
    sizes = [3 * 128 + 37, 256, 5, 7 * 128 + 1]
    ours, reference = _params(sizes), _params(sizes)
    host = HostAdam(ours, **OPTIONS)
    adamw = torch.optim.AdamW(reference, foreach=False, **OPTIONS)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(size, generator=generator) for size in sizes]
        for params, optimizer in ((ours, host), (reference, adamw)):
            for i, p in enumerate(params):
                p.grad = grads[i].clone() if (i + step) % 3 else None  # each row skips every third step
            optimizer.step()
    for i, (p, q) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert host.state[p]["step"] == 4
        torch.testing.assert_close(host.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert not torch.equal(ours[0], _params(sizes)[0])  # the rows did move


def test_a_resumed_optimizer_continues_bit_for_bit() -> None:
    """A resume builds a new optimizer from the checkpoint's states. DeepSpeed's kernel carried β^t over from
    its previous call (one multiply when the step follows it, `pow` otherwise), so the resumed run's first
    steps rounded β^t differently from the uninterrupted one: losses after a `kill -9` differed by 5e-7."""
    sizes = [1 << 16, 5]  # enough values that a β^t one float ulp apart moves some of them
    generator = torch.Generator().manual_seed(3)
    grads = [[torch.randn(size, generator=generator) for size in sizes] for _ in range(16)]

    def train(params, optimizer, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            optimizer.step()

    whole = _params(sizes)
    train(whole, HostAdam(whole, **OPTIONS), range(16))
    first = _params(sizes)
    before = HostAdam(first, **OPTIONS)
    train(first, before, range(5))  # the resumed run starts at step 6, where the two roundings of β2^t part
    resumed = _params(sizes)
    for p, q in zip(resumed, first):
        p.data.copy_(q.data)
    after = HostAdam(resumed, **OPTIONS)
    after.load_state_dict(before.state_dict())
    train(resumed, after, range(5, 16))
    for p, q in zip(resumed, whole):
        assert torch.equal(p, q), (p - q).abs().max()


def test_every_checkout_of_the_same_source_builds_the_op_from_one_path(tmp_path, monkeypatch) -> None:
    """torch's JIT build writes the source's absolute path into its ninja file: the op built from one checkout
    was built again (40-60 s on 2 cores) by the first run from another (a CI clone, the end-to-end test's copy
    of the repository), and again on the way back. The build now reads a copy that its content names."""
    from pangu_model import host_adam

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    built_from = host_adam.HostAdamBuilder().sources()[0]
    other = tmp_path / "checkout" / "pangu_model" / "csrc" / "host_adam.cpp"
    other.parent.mkdir(parents=True)
    other.write_bytes(host_adam.SOURCE.read_bytes())
    monkeypatch.setattr(host_adam, "SOURCE", other)
    assert host_adam.HostAdamBuilder().sources()[0] == built_from
    assert open(built_from, "rb").read() == other.read_bytes()
    other.write_bytes(other.read_bytes() + b"\n// changed\n")
    changed = host_adam.HostAdamBuilder().sources()[0]
    assert changed != built_from and open(changed, "rb").read().endswith(b"// changed\n")

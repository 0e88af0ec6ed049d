"""Start-up that scales: ranks build the model module by module on their device (no full fp32 copy on
the host) and get exactly the weights of the eager construction."""
from __future__ import annotations

import pytest
import torch

from pangu_model.config import get_config
from pangu_model.materialize import build_model_on
from pangu_model.model import PanguModel
from pangu_model.moe import ExpertBank

CASES = {
    "tiny": (get_config("tiny"), None),
    "sigma-tiny": (get_config("sigma-tiny"), None),
    "sigma-tiny-shard-1-of-2": (get_config("sigma-tiny"), (1, 2)),
    "topk": (get_config("tiny", router="topk", moe_layers=2, num_experts=4, topk_k=2), None),
    "moge": (get_config("tiny", router="moge", moe_layers=1, num_experts=8, moge_groups=4,
                        moge_shared_experts=1), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_built_on_its_device_equals_the_eager_construction(case: str) -> None:
    config, shard = CASES[case]
    torch.manual_seed(11)
    eager = PanguModel(config, shard)
    eager_next_draw = torch.rand(4)  # the stream after construction is the same too
    lazy = build_model_on(config, "cpu", seed=11, expert_shard=shard, host_modules=(ExpertBank,))
    assert torch.equal(torch.rand(4), eager_next_draw)
    want, got = eager.state_dict(), lazy.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    for (name, p), (_, q) in zip(eager.named_parameters(), lazy.named_parameters()):
        assert q.requires_grad == p.requires_grad, name


def test_a_rank_materialises_only_what_it_keeps_on_the_host() -> None:
    """With the compute device elsewhere (meta here), the host holds the experts that ECSS keeps there
    and nothing else; those experts are the eager construction's."""
    config = get_config("sigma-tiny")
    model = build_model_on(config, "meta", seed=3, expert_shard=(0, 2), host_modules=(ExpertBank,))
    on_host = {n for n, p in model.named_parameters() if p.device.type == "cpu"}
    assert on_host and all(".experts." in n for n in on_host)
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if n not in on_host)
    torch.manual_seed(3)
    eager = PanguModel(config, (0, 2)).state_dict()
    for name in on_host:
        assert torch.equal(dict(model.named_parameters())[name], eager[name]), name


def test_ecss_owned_block_is_cut_layer_by_layer_with_the_eager_weights() -> None:
    """Sharded ECSS host state: each layer's shard is cut to the rank's block as soon as it is made (so
    start-up never holds every layer's shard); the block's weights are the eager model's rows."""
    from pangu_model.ecss import keep_block
    from pangu_model.moe import RandomRoutedExperts

    config = get_config("sigma-tiny")
    seen: list[ExpertBank] = []

    def cut(bank: ExpertBank) -> None:
        assert bank.num_experts == 8 and all(b.num_experts == 3 for b in seen)  # earlier layers already cut
        keep_block(bank, 1, 3)
        seen.append(bank)

    cut_model = build_model_on(config, "cpu", seed=3, host_modules=(ExpertBank,), on_host_module=cut)
    torch.manual_seed(3)
    eager = PanguModel(config)
    assert len(seen) == 2
    for (name, layer), (_, ref) in zip(cut_model.named_modules(), eager.named_modules()):
        if isinstance(layer, RandomRoutedExperts):
            bank = layer.experts
            assert (bank.first_expert, bank.num_experts) == (2, 3)  # bounds 0, 2, 5, 8: replica 1 owns 2..4
            for weight in ("w_in", "b_in", "w_out", "b_out"):
                assert torch.equal(getattr(bank, weight), getattr(ref.experts, weight)[2:5]), (name, weight)


_BUILD_ON_META = """
import sys
import torch
from pangu_model.config import get_config
from pangu_model.materialize import build_model_on, on_meta
from pangu_model.model import PanguModel
from pangu_model.plan import parameter_layout

config = get_config("sigma-tiny")
eager = PanguModel(get_config("tiny"))  # on the CPU: its draws have kernels
assert "torch._dynamo" not in sys.modules
layout = parameter_layout(config)  # the planner, at every rank's start
with on_meta():
    model = PanguModel(config)
build_model_on(config, "meta", seed=1)
assert all(p.is_meta for p in model.parameters())
assert sum(p.numel() for p in model.parameters()) == layout.total
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_building_on_the_meta_device_does_not_import_dynamo() -> None:
    """torch has no meta kernel for normal_: drawing into a meta tensor runs a Python decomposition that
    imports Dynamo (2-4 s). Planning a run and building a model on the meta device draw nothing."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _BUILD_ON_META], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "dynamo imported: False"

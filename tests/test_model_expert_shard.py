"""Expert shards: a rank builds, inherits and loads only its experts of a PanGu-Σ model, with exactly the
rows the whole model would have (so sigma-1t never needs all 1.07T expert parameters on one host)."""
from __future__ import annotations

import pytest
import torch

from pangu_model import PanguModel, get_config, load_checkpoint, save_checkpoint
from pangu_model.inherit import sigma_from_dense

EXPERT_KEYS = (".experts.w_in", ".experts.b_in", ".experts.w_out", ".experts.b_out")


def _config():
    return get_config("sigma-tiny", vocab_size=300, max_seq_len=32)  # 4 domains × 2 experts = 8


def _assert_shard_of(part: PanguModel, whole: PanguModel, rank: int, size: int) -> None:
    rows = 8 // size
    whole_state = whole.state_dict()
    expert_keys = 0
    for key, tensor in part.state_dict().items():
        if key.endswith(EXPERT_KEYS):
            expert_keys += 1
            assert tensor.shape[0] == rows, key
            assert torch.equal(tensor, whole_state[key][rank * rows:(rank + 1) * rows]), key
        else:
            assert torch.equal(tensor, whole_state[key]), key
    assert expert_keys == 4 * 2  # two RRE layers


@pytest.mark.parametrize("size", [2, 4])
def test_a_shard_initialises_its_rows_of_the_whole_model(size: int) -> None:
    torch.manual_seed(11)
    whole = PanguModel(_config())
    for rank in range(size):
        torch.manual_seed(11)
        _assert_shard_of(PanguModel(_config(), expert_shard=(rank, size)), whole, rank, size)


def test_a_shard_refuses_to_run_as_a_plain_model_and_bad_shards_are_refused() -> None:
    part = PanguModel(_config(), expert_shard=(1, 2))
    ids = torch.randint(0, 300, (1, 8))
    with pytest.raises(RuntimeError, match="expert shard"):
        part(ids, domain_ids=0)
    with pytest.raises(ValueError, match="does not split"):
        PanguModel(_config(), expert_shard=(0, 3))
    with pytest.raises(ValueError, match="RRE"):
        PanguModel(get_config("tiny", router="topk", moe_layers=1, num_experts=4), expert_shard=(0, 2))


def test_load_checkpoint_reads_only_the_shard_rows(tmp_path) -> None:
    torch.manual_seed(5)
    whole = PanguModel(_config()).eval()
    directory = save_checkpoint(whole, tmp_path / "sigma")
    for rank in range(4):
        _assert_shard_of(load_checkpoint(directory, expert_shard=(rank, 4)), whole, rank, 4)


def test_inheritance_into_a_shard_matches_the_whole_inherited_model() -> None:
    torch.manual_seed(2)
    dense = PanguModel(get_config("tiny", vocab_size=300, max_seq_len=32))
    whole = sigma_from_dense(dense, _config())
    for rank in range(2):
        _assert_shard_of(sigma_from_dense(dense, _config(), expert_shard=(rank, 2)), whole, rank, 2)

"""safetensors + config.json round trips."""

import json
import random
import re

import pytest
import torch
from safetensors import safe_open

from pangu_model import PanguModel, get_config, load_checkpoint, save_checkpoint
from pangu_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def small(**overrides):
    return get_config(
        "tiny", vocab_size=64, max_seq_len=32, d_model=32, num_heads=4, d_ff=64, num_layers=3, **overrides
    )


def test_round_trip_is_bit_identical(tmp_path) -> None:
    for config in (small(), small(router="rre", moe_layers=1, num_domains=2, experts_per_domain=2),
                   small(router="moge", moe_layers=1, num_experts=4, moge_groups=2, moge_shared_experts=1)):
        torch.manual_seed(0)
        model = PanguModel(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # not just the init values
        directory = save_checkpoint(model, tmp_path / config.router)
        restored = load_checkpoint(directory)
        assert restored.config == config
        original_state, restored_state = model.state_dict(), restored.state_dict()
        assert original_state.keys() == restored_state.keys()
        for key in original_state:
            assert original_state[key].dtype == restored_state[key].dtype
            assert torch.equal(original_state[key], restored_state[key]), key
        ids = torch.randint(10, 64, (2, 7))
        with torch.no_grad():
            assert torch.equal(model(ids, domain_ids=1).logits, restored(ids, domain_ids=1).logits)
        assert not list(tmp_path.glob(f"{config.router}/.*.tmp"))
        # config.json names only the fields its router reads: an RRE file said `num_experts: 8` beside its
        # num_domains × experts_per_domain, which a reader takes for the model's expert count
        saved = json.loads((directory / CONFIG_NAME).read_text())
        absent = {"dense": {"num_experts", "num_domains", "moe_layers", "topk_k", "aux_loss_coef"},
                  "rre": {"num_experts", "moge_groups", "topk_k", "capacity_factor", "aux_loss_coef"},
                  "moge": {"num_domains", "experts_per_domain", "routing_seed", "topk_k", "capacity_factor"}}
        present = {"dense": {"d_model", "router"}, "rre": {"num_domains", "experts_per_domain", "moe_layers"},
                   "moge": {"num_experts", "moge_groups", "moge_shared_experts", "aux_loss_coef"}}
        assert not absent[config.router] & set(saved), sorted(absent[config.router] & set(saved))
        assert present[config.router] <= set(saved)


def test_tied_head_is_stored_once_and_stays_tied(tmp_path) -> None:
    model = PanguModel(small(dropout=0.0)).eval()
    directory = save_checkpoint(model, tmp_path / "ckpt")
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        keys = list(handle.keys())
    assert "word_embedding.weight" in keys and not any("head" in key for key in keys)
    assert json.loads((directory / CONFIG_NAME).read_text())["model_type"] == "pangu"

    restored = load_checkpoint(directory)
    ids = torch.randint(10, 64, (1, 5))
    with torch.no_grad():
        before = restored(ids).logits
        restored.word_embedding.weight[20] += 1.0  # the output row of token 20 must move with it
        after = restored(ids).logits
    assert (after[..., 20] - before[..., 20]).abs().min() > 0


def test_bfloat16_round_trip(tmp_path) -> None:
    model = PanguModel(small()).to(torch.bfloat16)
    restored = load_checkpoint(save_checkpoint(model, tmp_path / "bf16"))
    assert restored.word_embedding.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_equal_weights_give_equal_bytes_across_processes(tmp_path):
    """Content hashes identify checkpoints (lineage, evaluation cache): saving must be byte-stable."""
    import subprocess
    import sys

    script = ("import sys, torch; from pangu_model import PanguModel, get_config, save_checkpoint; "
              "torch.manual_seed(0); save_checkpoint(PanguModel(get_config('sigma-tiny')), sys.argv[1])")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_file_written_in_pieces_equals_the_file_written_whole(tmp_path) -> None:
    """What a sharded export relies on: rows written in any order by separate writers give the same
    bytes as one writer, and safetensors reads the file back (its own validation of the layout)."""
    from safetensors.torch import load_file

    from pangu_model.checkpoint import SafetensorsWriter, TensorSpec

    torch.manual_seed(0)
    tensors = {"experts.w_in": torch.randn(8, 3, 5), "norm.bias": torch.randn(5).to(torch.bfloat16),
               "table": torch.randperm(11), "scale": torch.tensor(2.5)}
    specs = {k: TensorSpec.of(t) for k, t in tensors.items()}
    whole = SafetensorsWriter(tmp_path / "whole.safetensors", specs)
    whole.create()
    for name, tensor in tensors.items():
        whole.write(name, tensor)
    whole.close()

    pieces = SafetensorsWriter(tmp_path / "pieces.safetensors", specs)
    pieces.create()
    for shard in (3, 1, 0, 2):  # four "ranks", two experts each, out of order
        writer = SafetensorsWriter(tmp_path / "pieces.safetensors", specs)
        writer.write("experts.w_in", tensors["experts.w_in"][2 * shard: 2 * shard + 2], first_row=2 * shard)
        writer.close()
    for name in ("norm.bias", "table", "scale"):
        pieces.write(name, tensors[name])
    pieces.close()

    assert (tmp_path / "pieces.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "pieces.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with pytest.raises(ValueError, match="do not fit"):
        pieces.write("experts.w_in", torch.zeros(2, 3, 5), first_row=7)


# A damaged export is a user's problem, not a bug: one ValueError (the CLI prints it as one `error:` line)
# that names the file and says what is wrong, not safetensors' or load_state_dict's own error.
def _export(tmp_path, **overrides):
    torch.manual_seed(0)
    return save_checkpoint(PanguModel(small(**overrides)), tmp_path / "export")


def _sharded(directory):
    return load_checkpoint(directory, expert_shard=(0, 2))  # reads through read_parts


@pytest.mark.parametrize("load", [load_checkpoint, _sharded], ids=["whole", "expert_shard"])
def test_a_truncated_weights_file_is_one_clear_error(tmp_path, load) -> None:
    directory = _export(tmp_path, router="rre", moe_layers=1, num_domains=2, experts_per_domain=2)
    weights = directory / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file (incomplete "
                                                   "metadata")) as caught:
        load(directory)
    assert "cut off" in str(caught.value) and "\n" not in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "SafetensorError"


def test_random_bytes_as_weights_file_are_one_clear_error(tmp_path) -> None:
    directory = _export(tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file (header too large)")):
        load_checkpoint(directory)


@pytest.mark.parametrize("load", [load_checkpoint, _sharded], ids=["whole", "expert_shard"])
def test_a_config_that_does_not_match_the_weights_is_one_clear_error(tmp_path, load) -> None:
    directory = _export(tmp_path, router="rre", moe_layers=1, num_domains=2, experts_per_domain=2)
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "d_ff": 128}))
    with pytest.raises(ValueError, match=re.escape(f"{directory}: the weights do not match config.json (")) as caught:
        load(directory)
    message = str(caught.value)
    assert "64 in the file, 128 in the config" in message and "more tensor(s) differ" in message
    assert "\n" not in message


def test_an_empty_config_is_one_clear_error(tmp_path) -> None:
    directory = _export(tmp_path)
    (directory / CONFIG_NAME).write_text("{}")  # every field at its default: a far larger model
    with pytest.raises(ValueError, match=re.escape(f"{directory}: the weights do not match config.json (")):
        load_checkpoint(directory)


def test_a_config_that_is_not_json_names_the_file(tmp_path) -> None:
    directory = _export(tmp_path)
    (directory / CONFIG_NAME).write_text("not json")
    with pytest.raises(ValueError, match=re.escape(f"{directory / CONFIG_NAME}: not JSON (expecting value at "
                                                   "line 1, column 1)")) as caught:
        load_checkpoint(directory)
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)
    (directory / CONFIG_NAME).write_text("[1, 2]")  # JSON, but not a config
    with pytest.raises(ValueError, match=re.escape(f"{directory / CONFIG_NAME}: not a model config")):
        load_checkpoint(directory)


def test_a_config_whose_fields_fail_validation_names_the_file_in_one_line(tmp_path) -> None:
    directory = _export(tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "num_layers": "many"}))
    with pytest.raises(ValueError) as caught:
        load_checkpoint(directory)
    message = str(caught.value)
    assert message.startswith(f"{directory / CONFIG_NAME}: invalid PanguConfig: num_layers: ")
    assert "(got 'many')" in message and "\n" not in message


def test_a_transformers_directory_given_as_an_export_says_so(tmp_path) -> None:
    """The directory `pangu model export-hf` writes has a config.json too: its fields used to come out as a
    long list of 'Extra inputs are not permitted'."""
    directory = _export(tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "architectures": ["PanguForCausalLM"],
                                                     "transformers_version": "4.57.1"}))
    with pytest.raises(ValueError, match=re.escape(f"{directory / CONFIG_NAME}: a transformers config (pangu model "
                                                   "export-hf writes one), not an export's")):
        load_checkpoint(directory)


def test_other_runtime_errors_of_loading_are_not_disguised(tmp_path, monkeypatch) -> None:
    directory = _export(tmp_path)

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug, not a damaged export")

    monkeypatch.setattr(PanguModel, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        load_checkpoint(directory)

"""Generation: KV cache, stopping at <eot>, seeded sampling, logits filtering."""

import torch

from pangu_model import PanguModel, generate, get_config
from pangu_model.generate import filter_logits


def model_for(router: str = "dense") -> PanguModel:
    torch.manual_seed(0)
    sparse = {} if router == "dense" else dict(router="rre", moe_layers=2, num_domains=2, experts_per_domain=2)
    config = get_config(
        "tiny", vocab_size=64, max_seq_len=40, d_model=32, num_heads=4, d_ff=64, num_layers=3, **sparse
    )
    model = PanguModel(config)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are well separated
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()


def test_cached_greedy_equals_uncached_greedy() -> None:
    prompt = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    for router in ("dense", "rre"):
        model = model_for(router)
        cached = generate(model, prompt, 20, domain_ids=torch.tensor([0, 1]), stop_token_id=-1)
        uncached = generate(model, prompt, 20, domain_ids=torch.tensor([0, 1]), stop_token_id=-1, use_cache=False)
        assert cached.shape == (2, 24)
        assert torch.equal(cached, uncached)
        assert len(set(cached[0, 4:].tolist())) > 1  # not a degenerate constant continuation


def test_cached_logits_match_full_forward() -> None:
    model = model_for()
    ids = torch.tensor([[20, 21, 22, 23, 24, 25]])
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :4], cache=cache).logits
        rest = torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in (4, 5)], dim=1)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full)


def test_generation_stops_at_the_stop_token_and_pads_finished_rows() -> None:
    model = model_for()
    prompt = torch.tensor([[20, 21, 22, 23], [40, 41, 42, 43]])
    free = generate(model, prompt, 10, stop_token_id=-1)
    stop = int(free[0, 5])  # pretend the second generated token of row 0 were <eot>
    out = generate(model, prompt, 10, stop_token_id=stop)
    ends = []
    for row in range(2):
        hits = (free[row, 4:] == stop).nonzero()
        ends.append(4 + int(hits[0]) if hits.numel() else free.shape[1] - 1)
        assert torch.equal(out[row, : ends[-1] + 1], free[row, : ends[-1] + 1])
        assert (out[row, ends[-1] + 1 :] == model.config.pad_token_id).all()
    assert out.shape[1] == max(ends) + 1  # generation ends once every row has stopped


def test_eot_is_the_default_stop_token() -> None:
    model = model_for()
    with torch.no_grad():
        model.word_embedding.weight[9] *= 50.0  # make <eot> the obvious next token everywhere
    out = generate(model, torch.tensor([[20, 21, 22]]), 10)
    assert out[0, -1].item() == 9 and out.shape[1] < 13


def test_seeded_sampling_is_reproducible() -> None:
    model = model_for()
    prompt = torch.tensor([[20, 21, 22, 23]])
    kwargs = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.95, stop_token_id=-1)
    a = generate(model, prompt, 15, seed=1, **kwargs)
    b = generate(model, prompt, 15, seed=1, **kwargs)
    c = generate(model, prompt, 15, seed=2, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, 15, stop_token_id=-1)
    top1 = generate(model, prompt, 15, do_sample=True, top_k=1, seed=3, stop_token_id=-1)
    assert torch.equal(greedy, top1)


def test_filter_logits() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_pangu_model_generate_continues_each_prompt_as_the_domain_s_sub_model_does(tmp_path, capsys) -> None:
    """`pangu model generate EXPORT PROMPT...`: each prompt after an <eot>, continued by the sub-model of the
    domain asked for (by name); greedy text equal to generating with that sub-model here; sampling seeded."""
    import json
    import shutil

    from evaluation.scoring import EOT_ID
    from flows.cli import main
    from pangu_model import load_checkpoint, save_checkpoint
    from pangu_model.inherit import extract_domain
    from tests.test_eval_common import VOCAB, tokenizer_dir
    from tokenizer.pangu import PanguTokenizer

    torch.manual_seed(0)
    export = save_checkpoint(PanguModel(get_config("sigma-tiny", vocab_size=VOCAB, dropout=0.0)), tmp_path / "sigma")
    shutil.copytree(tokenizer_dir(), export / "tokenizer")
    names = ["ebooks", "news", "public_datasets", "web"]
    (export / "domains.json").write_text(json.dumps({
        "id_to_name": {str(i): name for i, name in enumerate(names)},
        "domains": {name: {"id": i, "tokens": 100 * (i + 1)} for i, name in enumerate(names)},
    }), encoding="utf-8")
    prompts = ["中国的首都是", "今天天气很好，我们"]

    assert main(["model", "generate", str(export), *prompts, "--greedy", "--max-new-tokens", "8", "--domain", "news",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["domain"] == {"id": 1, "name": "news", "chosen_by": "given"}
    model = extract_domain(load_checkpoint(export), 1).eval()
    tok = PanguTokenizer.load(export / "tokenizer")
    for sample, prompt in zip(result["samples"], prompts, strict=True):
        ids = [EOT_ID, *tok.encode(prompt)]
        out = generate(model, torch.tensor([ids]), 8)
        assert out.shape[1] > len(ids)
        assert sample == {"prompt": prompt, "text": tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)}

    def sampled(*extra: str) -> list[str]:
        assert main(["model", "generate", str(export), *prompts, "--max-new-tokens", "12", *extra]) == 0
        captured = capsys.readouterr()
        assert "domain 3 web (most training tokens)" in captured.err  # the default: the most trained domain
        return captured.out.splitlines()

    first = sampled()
    assert main(["model", "generate", str(export), *prompts, "--max-new-tokens", "12", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)["samples"]
    assert first == [f"{s['prompt']}│{s['text']}".replace("\n", "\\n") for s in raw]  # one line per prompt
    assert sampled() == first and sampled("--seed", "7") != first

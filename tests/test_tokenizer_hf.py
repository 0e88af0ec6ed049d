"""The transformers wrapper gives PanguTokenizer's ids and text, and survives save/load."""
from __future__ import annotations

from tests.test_tokenizer_common import clue_documents, edge_texts, trained_model_dir
from tokenizer.hf import PanguHFTokenizer, load_hf
from tokenizer.pangu import PanguTokenizer


def test_same_ids_and_round_trip_through_save_pretrained(tmp_path) -> None:
    tok = PanguTokenizer.load(trained_model_dir())
    hf = load_hf(trained_model_dir())
    texts = [t for _, t in clue_documents()[::50]] + [t for t in edge_texts() if t]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), text[:60]
    assert hf.eos_token_id == 9 and hf.pad_token_id == 6 and hf.unk_token_id == 0 and len(hf) == tok.vocab_size

    hf.save_pretrained(str(tmp_path / "hf"))
    again = PanguHFTokenizer.from_pretrained(str(tmp_path / "hf"))
    batch = again(texts[:4], padding=True)
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts[:4]):
        n = sum(mask)
        assert ids[:n] == tok.encode(text) and set(ids[n:]) <= {6}
    assert again.decode(again("你好 世界\n再见")["input_ids"]) == "你好 世界\n再见"
    assert again.decode(tok.encode("你好") + [9], skip_special_tokens=True) == "你好"
    # The saved directory is also a PanguTokenizer directory.
    assert PanguTokenizer.load(tmp_path / "hf").encode(texts[0]) == tok.encode(texts[0])

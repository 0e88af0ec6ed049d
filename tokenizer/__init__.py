"""jieba + sentencepiece tokenizer of PanGu-α: trainer, encoder, packer, training-row dataset.

Modules: `specials` (ids 0–9), `segment` (jieba scheme, fast exact replica), `pangu`
(`PanguTokenizer`, `reference_encode`), `parallel` (worker pool), `train`, `artifacts` (the
tokenizer dir), `corpus` (reading corpus shards), `indexed` (Megatron MMIDIDX), `pack`, `dataset`
(torch), `hf` (transformers wrapper), `config` (pydantic configs). Nothing here imports Prefect;
import the submodules directly (this package imports none of them, so torch and transformers load
only when asked for).
"""

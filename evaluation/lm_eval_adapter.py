"""An lm-evaluation-harness (0.4.x) `LM` for our checkpoints: run lm-eval task YAMLs on PanGu models.

    from evaluation.lm_eval_adapter import PanguLM
    lm = PanguLM(checkpoint="runs/model/final")          # tokenizer found next to it, or tokenizer=DIR
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(include_path="my_tasks"))

or on the command line, once this module is imported (it registers the name `pangu`):
`python -c "import evaluation.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" --model pangu
--model_args checkpoint=DIR --include_path my_tasks --tasks my_task`.

Requests are scored with the same code as our harness (evaluation.scoring): `<eot>` opens every row,
context and continuation are encoded separately, requests that share a context share its forward pass
(KV cache). Chinese task YAMLs should set `target_delimiter: ""` (no space between context and answer).
Needs `lm-eval` (not a dependency of the pipeline: `pip install lm-eval==0.4.13`).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval discovers its own models only while its registry is empty:
from lm_eval import utils as lm_utils  # registering "pangu" first used to hide "hf" & co. in this process
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .scoring import EOT_ID, generate_ids, score_candidates, truncate_left


@register_model("pangu")
class PanguLM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: Any = None,
        model: Any = None,
        device: str = "cpu",
        dtype: str | None = None,
        share_prefix: bool = True,
        max_gen_toks: int = 64,
        seed: int = 1234,
        **_: Any,  # batch_size, max_batch_size … passed by lm-eval; requests are grouped by context instead
    ) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("PanguLM needs checkpoint=DIR or model=")
            import torch

            from .model_io import load_for_eval

            model, tokenizer = load_for_eval(checkpoint, tokenizer if isinstance(tokenizer, str) else None, device,
                                             getattr(torch, dtype) if dtype else None)
        elif isinstance(tokenizer, str) or tokenizer is None:
            from tokenizer.pangu import PanguTokenizer

            if tokenizer is None:
                raise ValueError("with model=, pass tokenizer= (a PanguTokenizer or a directory)")
            tokenizer = PanguTokenizer.load(tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.share_prefix = share_prefix if not isinstance(share_prefix, str) else share_prefix.lower() == "true"
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = str(next(model.parameters()).device)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- LM API -------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_context[request.args[0]].append(index)
        for context, indices in by_context.items():
            continuations = [requests[i].args[1] for i in indices]
            scores = score_candidates(
                self.model, [EOT_ID, *self.tok_encode(context)], [self.tok_encode(c) for c in continuations],
                share_prefix=self.share_prefix,
            )
            for i, continuation, score in zip(indices, continuations, scores):
                answer = (-score.loss, score.greedy)
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", (context, continuation), answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=EOT_ID, max_seq_len=self.max_length, context_len=1))
            total = 0.0
            for context, continuation in windows:
                (score,) = score_candidates(self.model, list(context), [list(continuation)], share_prefix=self.share_prefix)
                total -= score.loss
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0))
            if temperature == 0.0:
                do_sample = False
            settings = {"do_sample": do_sample, "temperature": temperature or 1.0,
                        "top_k": kwargs.pop("top_k", None), "top_p": kwargs.pop("top_p", None)}
            room = max(self.max_length - max_new, 1)
            prompt = truncate_left([EOT_ID, *self.tok_encode(context)], room)

            def stop(ids: list[int]) -> bool:
                return bool(until) and any(u in self.tok_decode(ids) for u in until)

            new = generate_ids(self.model, prompt, max_new, seed=zlib.crc32(f"{self.seed}\x1f{context}".encode()),
                               stop_ids=(EOT_ID,), stop_check=stop, **settings)
            text = self.tok_decode(new)
            for u in until:
                if u:
                    text = text.split(u)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return out


__all__ = ["PanguLM"]

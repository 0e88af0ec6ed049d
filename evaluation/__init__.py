"""Zero-, one- and few-shot evaluation on the PanGu-α tasks (SPEC §6).

Entry point for the CLI and the flow: `evaluation.harness.run_evaluation(EvalConfig(...))`, which writes
`results.json`, `report.md` and `predictions/<task>.jsonl`. Modules: `tasks` (registry), `loaders`
(public formats), `scoring` (perplexity ranking, generation), `metrics`, `harness`, `resume` (finished
tasks kept for a rerun), `report`, `model_io`, `lm_eval_adapter` (needs lm-eval).
"""

"""The held-out evaluation on the local backend: eval losses and replies of the base, fine-tuned and
production models (batched greedy generation, one progress line per batch)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from automation.evaluation import model_eval, perplexity
from automation.record import EvalPrompt, ModelEval
from automation.spec import Experiment

log = logging.getLogger(__name__)


@dataclass
class Baseline:
    """The production model to compare with: its registry name and version, and its folder."""

    uri: str
    version: str
    model_dir: Path


def generate_replies(model, tokenizer, prompts: list[EvalPrompt], *, max_new_tokens: int, label: str,
                     batch_size: int = 8) -> list[str]:
    """One greedy reply per prompt (left-padded batches of `batch_size`), decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    # A whole config, not kwargs over the model's own: its sampling settings would warn with do_sample off.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, use_cache=True)  # whatever training set
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    replies: list[str] = []
    started = time.monotonic()
    try:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
                     for p in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            with torch.no_grad():
                out = model.generate(**inputs, generation_config=config)
            width = inputs["input_ids"].shape[1]
            replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            log.info("evaluation: %s replied to %d/%d prompts (%.0f s)", label, len(replies), len(prompts),
                     time.monotonic() - started)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def final_eval_loss(trainer) -> float | None:
    """The eval loss after the last step: the one the trainer measured at the end when its eval
    strategy did (epoch end or an eval step), else measured once here."""
    if trainer.eval_dataset is None:
        return None
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return float(entry["eval_loss"])
    log.info("evaluation: eval loss of the fine-tuned model on %d conversations", len(trainer.eval_dataset))
    return float(trainer.evaluate(metric_key_prefix="eval")["eval_loss"])


def base_evaluation(trainer, tokenizer, job_dir: Path, prompts: list[EvalPrompt], experiment: Experiment, *,
                     resuming: bool) -> tuple[float | None, list[str]]:
    """Eval loss and replies of the untrained model (LoRA starts as the identity), measured once and
    kept, so a resumed run reports the same."""
    import mlflow

    kept = job_dir / "base_eval.json"
    if resuming and kept.is_file():
        data = json.loads(kept.read_text())
        if len(data.get("replies", [])) == len(prompts):
            return data["eval_loss"], data["replies"]
    loss = None
    if trainer.eval_dataset is not None:
        log.info("evaluation: eval loss of the base model on %d conversations of the test split",
                 len(trainer.eval_dataset))
        loss = float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
        log.info("evaluation: base model eval loss %.4f", loss)
        mlflow.log_metrics({"base_eval_loss": loss, "base_perplexity": perplexity(loss)})
    replies = generate_replies(trainer.model, tokenizer, prompts, max_new_tokens=experiment.evaluation.max_new_tokens,
                               label="base model")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"eval_loss": loss, "replies": replies}))
    return loss, replies


def evaluate_baseline(trainer, baseline: Baseline, prompts: list[EvalPrompt], experiment: Experiment) -> ModelEval:
    """The production model on the same eval batches (the trainer's own collator and masks) and prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automation.backends.local.chat_template import apply_training_template

    log.info("evaluation: production model %s", baseline.uri)
    model = AutoModelForCausalLM.from_pretrained(baseline.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(baseline.model_dir)
    apply_training_template(tokenizer)
    loss = None
    if trainer.eval_dataset is not None:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                batch = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                size = batch["input_ids"].shape[0]
                total += float(model(**batch, use_cache=False).loss) * size  # as Trainer.evaluation_loop
                count += size
        loss = total / count if count else None
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=experiment.evaluation.max_new_tokens,
                               label="production")
    return model_eval(baseline.uri, prompts, replies, loss)

"""The held-out evaluation on the local backend: eval losses and replies of the base, fine-tuned and
production models (batched greedy generation, one progress line per batch)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from automation.backends.local.precision import prepack_linears
from automation.evaluation import model_eval, perplexity
from automation.record import EvalPrompt, ModelEval
from automation.spec import Experiment
from automation.workspace import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Baseline:
    """The production model to compare with: its registry name and version, and its folder."""

    uri: str
    version: str
    model_dir: Path


def generate_replies(model, tokenizer, prompts: list[EvalPrompt], *, max_new_tokens: int, label: str,
                     batch_size: int = 8) -> list[str]:
    """One greedy reply per prompt (left-padded batches of `batch_size`), decoded without special tokens,
    in the prompts' order. The batches take the prompts by length, so a batch pads its rows to a
    similar length: at 32 held-out prompts of the sample split (20 to 836 tokens) that is 42 % fewer
    padded tokens to process than batches in file order (bench/RESULTS.md, issue 24)."""
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
    replies: list[str] = [""] * len(prompts)
    started, done = time.monotonic(), 0
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    by_length = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    restore = prepack_linears(model)  # on a CPU: the served weights (LoRA merged), prepacked for oneDNN
    try:
        for first in range(0, len(prompts), batch_size):
            batch = by_length[first:first + batch_size]
            inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            with torch.no_grad():
                out = model.generate(**inputs, generation_config=config)
            width = inputs["input_ids"].shape[1]
            for i, row in zip(batch, out, strict=True):
                replies[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
            done += len(batch)
            log.info("evaluation: %s replied to %d/%d prompts (%.0f s)", label, done, len(prompts),
                     time.monotonic() - started)
    finally:
        restore()
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def conversation_losses(model, dataloader) -> list[float]:
    """The eval loss of each conversation of the test split: the mean cross-entropy over its
    assistant tokens (the tokens the trainer's labels keep), in dataloader order, so two models
    evaluated on the same dataloader give pairs for a paired interval (automation/stats.py).

    Works on both batch layouts of TRL's collator: padded rows (one conversation per row) and
    padding-free rows, where conversations sit end to end and each starts where `position_ids` is 0
    (its first label is -100, so no token is predicted across a boundary)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    losses: list[float] = []
    restore = prepack_linears(model)  # on a CPU: the served weights (LoRA merged), prepacked for oneDNN
    try:
        with torch.no_grad():
            for batch in dataloader:
                batch = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                labels = batch.pop("labels")
                logits = model(**batch, use_cache=False).logits
                target = labels[:, 1:]
                # Row by row: the fp32 copy of one row's logits (and its log-softmax) at a time, not the
                # whole batch's (4 x 256 x 49,152 floats is 200 MB per copy); the same numbers.
                token_loss = torch.stack([
                    F.cross_entropy(logits[row, :-1].float(), target[row], ignore_index=-100, reduction="none")
                    for row in range(target.shape[0])])
                del logits
                kept = target != -100
                positions = batch.get("position_ids")
                for row in range(target.shape[0]):
                    if positions is None:
                        segment = torch.zeros_like(target[row])
                    else:  # conversations end to end: a new one wherever the position restarts at 0
                        segment = (positions[row] == 0).cumsum(0)[1:] - 1
                    count = torch.zeros(int(segment.max()) + 1, device=token_loss.device).index_add_(
                        0, segment, kept[row].float())
                    total = torch.zeros_like(count).index_add_(0, segment, token_loss[row] * kept[row])
                    losses += [float(t / c) for t, c in zip(total, count, strict=True) if c > 0]
    finally:
        restore()
        model.train(was_training)
    return losses


def eval_losses(model, trainer) -> tuple[float | None, list[float]]:
    """The eval loss of `model` on the trainer's test split, as the mean over conversations of each
    one's loss (every conversation counts once, whatever the eval batch size), with the per-
    conversation losses behind it; (None, []) when the run has no test split."""
    if trainer.eval_dataset is None:
        return None, []
    each = conversation_losses(model, trainer.get_eval_dataloader())
    return (sum(each) / len(each) if each else None), each


@dataclass
class BaseEval:
    """The untrained model's figures: eval loss (and per conversation) and replies; `reused` says
    from which earlier run they were taken, when they were."""

    eval_loss: float | None
    eval_loss_each: list[float]
    replies: list[str]
    reused: str | None = None


CACHE_VERSION = 3  # bump when what is measured changes (the loss definition, the decoding, the template;
#                   2: replies batched by prompt length; 3: linears prepacked, fp32's oneDNN kernel)


def base_cache_key(base_model: Path | str, test_file: Path | None, prompts: list[EvalPrompt], experiment: Experiment,
                   precision: str, max_length: int) -> str:
    """What the base model's figures depend on: the model's weights, the test split, the held-out
    prompts, the decoding settings, the precision and the truncation, and the library versions
    whose numerics they come from. Equal keys give equal figures, so a rerun, another PR or another
    experiment on the same base model reuses them."""
    import hashlib
    from importlib.metadata import version

    from automation.data import file_sha256

    parts = {
        "version": CACHE_VERSION,
        "model": model_digest(Path(base_model)),
        "test_split": file_sha256(test_file) if test_file and Path(test_file).is_file() else None,
        "prompts": [p.messages for p in prompts],
        "max_new_tokens": experiment.evaluation.max_new_tokens,
        "precision": precision,
        "max_length": max_length,
        "eval_batch_size": experiment.training.per_device_eval_batch_size,
        "libraries": {name: version(name) for name in ("torch", "transformers", "trl", "peft")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def model_digest(folder: Path) -> str:
    """The SHA-256 of a model folder's files (names and contents), kept in the workspace's cache by
    (path, size, mtime) so the ~1 s per 500 MB is paid once per model folder, not per run."""
    import hashlib

    from automation.data import file_sha256
    from automation.workspace import home

    files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
    if not files:
        return f"unreadable:{folder}"
    stamp = json.dumps([[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    memo_file = home() / "cache" / "model-digests.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    key = f"{folder.resolve()}:{hashlib.sha256(stamp.encode()).hexdigest()}"
    if key not in memo:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.relative_to(folder)}\0{file_sha256(f)}\n".encode())
        memo[key] = digest.hexdigest()
        write_text_atomic(memo_file, json.dumps(memo, indent=1))
    return memo[key]


def base_evaluation(trainer, tokenizer, job_dir: Path, prompts: list[EvalPrompt], experiment: Experiment, *,
                    resuming: bool, cache_key: str | None = None) -> BaseEval:
    """Eval loss (with the per-conversation losses) and replies of the untrained model (LoRA starts
    as the identity). Kept with the job, so a resumed run reports the same, and in the workspace's
    cache under `cache_key` (base_cache_key), so any run with the same key reuses them."""
    import mlflow

    from automation.workspace import home

    kept = job_dir / "base_eval.json"
    cached = home() / "cache" / "base-eval" / f"{cache_key}.json" if cache_key else None
    for source in ([kept] if resuming else []) + ([cached] if cached else []):
        if source.is_file():
            data = json.loads(source.read_text())
            if len(data.get("replies", [])) == len(prompts) and "eval_loss_each" in data:
                reused = None if source == kept else data.get("measured_by", "an earlier run")
                if reused:
                    log.info("evaluation: the base model's figures reused from %s (cache %s)", reused, cache_key)
                    write_text_atomic(kept, json.dumps(data))
                return BaseEval(data["eval_loss"], data["eval_loss_each"], data["replies"], reused)
    if trainer.eval_dataset is not None:
        log.info("evaluation: eval loss of the base model on %d conversations of the test split",
                 len(trainer.eval_dataset))
    loss, each = eval_losses(trainer.model, trainer)
    if loss is not None:
        log.info("evaluation: base model eval loss %.4f", loss)
        mlflow.log_metrics({"base_eval_loss": loss, "base_perplexity": perplexity(loss)})
    replies = generate_replies(trainer.model, tokenizer, prompts, max_new_tokens=experiment.evaluation.max_new_tokens,
                               label="base model")
    from datetime import UTC, datetime

    data = {"eval_loss": loss, "eval_loss_each": each, "replies": replies,
            "measured_by": f"job {job_dir.name} at {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"}
    write_text_atomic(kept, json.dumps(data))
    if cached:
        write_text_atomic(cached, json.dumps(data))
    return BaseEval(loss, each, replies)


def evaluate_baseline(trainer, baseline: Baseline, prompts: list[EvalPrompt], experiment: Experiment) -> ModelEval:
    """The production model on the same eval batches (the trainer's own collator and masks) and prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automation.backends.local.chat_template import apply_training_template

    log.info("evaluation: production model %s", baseline.uri)
    model = AutoModelForCausalLM.from_pretrained(baseline.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(baseline.model_dir)
    apply_training_template(tokenizer)
    loss, each = eval_losses(model, trainer)
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=experiment.evaluation.max_new_tokens,
                               label="production")
    return model_eval(baseline.uri, prompts, replies, loss, each)

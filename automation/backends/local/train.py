"""Local fine-tuning: TRL `SFTTrainer` + PEFT LoRA, tracked in MLflow, resumable.

The experiment drives every knob the chat_completion_pipeline exposes that makes sense on one
machine. Choices made here on purpose:

- bf16 mixed precision where the hardware does bf16 natively (AMX-BF16 or AVX512-BF16 on a CPU; see
  precision.py), fp32 elsewhere (there TRL's default `bf16=True` is emulated and makes a CPU step
  about 20x slower); no gradient checkpointing on a CPU (it recomputes what memory can hold);
- the loss is on assistant tokens only (`assistant_only_loss`), through a ChatML template with
  `{% generation %}` markers (see chat_template.py);
- conversations are packed into rows of `max_length` tokens (TRL's best-fit-decreasing packing,
  padding-free, with per-conversation position ids so attention never crosses conversations):
  no pad tokens are trained on. On a CPU each micro-batch is one packed row (attention over one
  flattened row of several is quadratic in its length), and gradient accumulation keeps the
  experiment's effective batch; the loss is the model's own cross-entropy over full logits, which
  on a CPU is ~17 % faster per step than TRL's chunked LM head (bench/RESULTS.md, item 2). The eval
  split is not packed, so the eval loss is over the same truncated conversations as always;
- the base model is evaluated on the test split before training (LoRA starts as the identity),
  so the report can compare base and fine-tuned eval loss on the same tokens;
- checkpoints every `logging_steps` steps: a run killed part-way resumes from the last one, in
  the same MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation.backends.local.chat_template import apply_training_template
from automation.backends.local.evaluate import (
    Baseline,
    base_cache_key,
    base_evaluation,
    eval_losses,
    evaluate_baseline,
    generate_replies,
)
from automation.backends.local.precision import choose as choose_precision
from automation.errors import BackendError
from automation.record import EvalPrompt, EvaluationPart
from automation.spec import Experiment

log = logging.getLogger(__name__)

# The trainer's own end-of-run speed figures: the project logs one tokens/s of its own instead.
_TRAINER_SUMMARY_KEYS = {"train_tokens_per_second", "train_samples_per_second", "train_steps_per_second"}
# The loss curves under one `loss/` prefix: MLflow's run page charts a prefix as a section of its
# own, placed before the unprefixed "Model metrics" (each section's charts sorted by name), so
# the training and eval loss are the first charts a reviewer sees, not the 21st of 28.
CURVE_KEYS = {"loss": "loss/train", "eval_loss": "loss/eval"}


@dataclass
class TrainResult:
    base_eval_loss: float | None
    eval_loss: float | None
    train_loss: float | None
    loss_curve: list[tuple[int, float]]
    train_tokens: int
    tokens_per_second: float
    wall_seconds: float
    model_dir: Path
    resumed_from: str | None
    params: dict[str, Any]
    last_train_loss: float | None = None
    max_steps: int | None = None
    evaluation: EvaluationPart | None = None


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendError("compute.device is cuda but no CUDA device is available; use device: auto or cpu")
    return requested


def _max_length(experiment: Experiment, tokenizer) -> int:
    if experiment.training.max_seq_length > 0:
        return experiment.training.max_seq_length
    return min(int(getattr(tokenizer, "model_max_length", 2048) or 2048), 2048)


def sft_config(experiment: Experiment, output_dir: Path, device: str, max_length: int, *, bf16: bool = False):
    """The SFTConfig of an experiment; a pure function so tests can check the mapping. `bf16`:
    mixed precision (fp32 master weights, bf16 autocast), as precision.choose decided."""
    from trl import SFTConfig

    t = experiment.training
    on_gpu = device == "cuda"
    micro_batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    if not on_gpu:
        micro_batch, accumulation = 1, micro_batch * accumulation
    evaluation = {"disable": "no"}.get(t.evaluation_strategy, t.evaluation_strategy)
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        auto_find_batch_size=t.auto_find_batch_size,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        full_determinism=t.enable_full_determinism,
        dataloader_num_workers=t.dataloader_num_workers,
        eval_strategy=evaluation,
        eval_steps=t.eval_steps if evaluation == "steps" else None,
        eval_accumulation_steps=t.eval_accumulation_steps if t.eval_accumulation_steps > 0 else None,
        logging_strategy=t.logging_strategy,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.logging_steps,
        save_total_limit=None if t.save_total_limit == -1 else t.save_total_limit,
        load_best_model_at_end=t.apply_early_stopping,
        metric_for_best_model="eval_loss" if t.apply_early_stopping else None,
        max_length=max_length,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        eval_packing=False,
        assistant_only_loss=True,
        bf16=bf16,  # on a CPU, torch.autocast(cpu, bfloat16) around each forward; fp32 master weights
        fp16=False,
        activation_checkpointing=False,  # the new name; gradient_checkpointing is a deprecated alias
        use_cpu=not on_gpu,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,  # one labelled log line per logging step instead (_ProgressLog)
        save_only_model=False,
    )


def lora_config(experiment: Experiment):
    from peft import LoraConfig

    o = experiment.optimization
    return LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _chat_dataset(path: Path):
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    return dataset.select_columns(["messages"])


class _MlflowLossCallback:
    """Sends every logged train/eval value to the active MLflow run, at its global step; logs the
    last step too (so the curve and the last train loss reach `max_steps`), and writes one labelled
    progress line per logging step instead of the trainer's progress bar and raw dicts."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                if state.max_steps and state.global_step >= state.max_steps:
                    control.should_log = True
                    outer.skip_final_eval(args, control)

            def on_epoch_end(self, args, state, control, **kwargs):
                if state.max_steps and state.global_step >= state.max_steps:
                    outer.skip_final_eval(args, control)

            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.on_log(state, logs or {})

        self.callback = Callback()
        self.curve: list[tuple[int, float]] = []
        self.started = time.monotonic()

    @staticmethod
    def skip_final_eval(args, control) -> None:
        """The trainer's own evaluation at the last step is the one `train` makes next, per
        conversation and in the run's precision: measured once, not twice. Kept where early
        stopping picks the best checkpoint by it."""
        if not args.load_best_model_at_end:
            control.should_evaluate = False

    def on_log(self, state, logs: dict[str, float]) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)
                   and k not in _TRAINER_SUMMARY_KEYS}
        if "loss" in numeric:
            if not self.curve or self.curve[-1][0] != state.global_step:
                self.curve.append((state.global_step, numeric["loss"]))
            log.info("training: step %d/%d · loss %.4f · learning rate %.2g · %.0f s", state.global_step,
                     state.max_steps, numeric["loss"], numeric.get("learning_rate", 0.0),
                     time.monotonic() - self.started)
        elif "eval_loss" in numeric:
            log.info("evaluation: eval loss %.4f at step %d", numeric["eval_loss"], state.global_step)
        if numeric:
            mlflow.log_metrics({CURVE_KEYS.get(k, k.replace("/", "_")): v for k, v in numeric.items()},
                               step=state.global_step)


def build_trainer(experiment: Experiment, *, base_model: Path | str, train_file: Path, test_file: Path,
                  output_dir: Path, callbacks: list | None = None):
    """The SFTTrainer the local fine-tune runs (also what bench/bench_finetune.py measures).

    Returns (trainer, tokenizer, device, max_length).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback

    device = pick_device(experiment.compute.device)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    precision = choose_precision(experiment.compute.precision, device)
    # bf16 with LoRA: the frozen base model is held in bf16 (nothing to update, so no fp32 master
    # copy) and the adapters in fp32 (PEFT's default), with no autocast recasting the frozen weights
    # at every forward and backward; a full fine-tune keeps fp32 weights under bf16 autocast.
    frozen_bf16 = precision.bf16 and experiment.optimization.apply_lora
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    apply_training_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    max_length = _max_length(experiment, tokenizer)
    args = sft_config(experiment, output_dir, device, max_length, bf16=precision.bf16 and not frozen_bf16)
    extra = []
    if experiment.training.apply_early_stopping:
        extra.append(EarlyStoppingCallback(experiment.training.early_stopping_patience,
                                           experiment.training.early_stopping_threshold))
    trainer = _trainer_class(device)(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=_chat_dataset(train_file),
        eval_dataset=_chat_dataset(test_file) if args.eval_strategy != "no" else None,
        peft_config=lora_config(experiment) if experiment.optimization.apply_lora else None,
        callbacks=[*(callbacks or []), *extra],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.bf16_adapters = frozen_bf16 and device == "cpu"
    trainer.remove_callback(PrinterCallback)  # it prints every log as a raw dict
    return trainer, tokenizer, device, max_length


def _trainer_class(device: str):
    """TRL's SFTTrainer; on a CPU, with the loss computed by the model from full logits.

    TRL's fused, chunked LM head saves memory on a GPU; on a CPU its tiled matmuls and per-chunk
    log-softmax cost ~17 % of a step more than one logits matmul and PyTorch's cross-entropy
    (bench/RESULTS.md, item 2). The model's own loss honours `num_items_in_batch`, so gradient
    accumulation normalises over the whole effective batch exactly as TRL's loss does.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    if device == "cuda":
        return SFTTrainer

    class CpuSFTTrainer(SFTTrainer):
        bf16_adapters = False  # set by build_trainer: LoRA on a bf16-held base (see _bf16_adapters)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            with _bf16_adapters(model, self.bf16_adapters):
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

    return CpuSFTTrainer


def _bf16_adapters(model, active: bool):
    """LoRA's matmuls in bf16 too, over fp32 master adapters: the forward under bf16 autocast (which
    casts each fp32 adapter weight once per forward, and leaves the bf16 base weights alone) with
    PEFT's casting of every adapter's input to fp32 turned off. Otherwise each of the 210 LoRA
    layers casts its bf16 input to fp32, multiplies in fp32, and adds an fp32 result to the bf16
    base output (type promotion) before casting back: copies of every activation, forward and
    backward. The gradients still land in the fp32 adapters. ~5 % of a demo step's CPU time
    (bench/RESULTS.md, issue 23); the loss is the same to 5 digits."""
    if not active:
        return contextlib.nullcontext()
    import torch
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(disable_input_dtype_casting(model))
    return stack


def train(experiment: Experiment, *, base_model: Path | str, train_file: Path, test_file: Path,
          job_dir: Path, prompts: list[EvalPrompt] | None = None, baseline: Baseline | None = None) -> TrainResult:
    """Fine-tune in the active MLflow run; returns the metrics, the held-out evaluation (base,
    fine-tuned and `baseline` models on the test split and `prompts`) and the saved model folder."""
    import mlflow
    from transformers.trainer_utils import get_last_checkpoint

    from automation.evaluation import mlflow_metrics, model_eval

    started = time.monotonic()
    prompts = prompts or []
    checkpoints = job_dir / "checkpoints"
    callbacks = _MlflowLossCallback()
    trainer, tokenizer, device, max_length = build_trainer(
        experiment, base_model=base_model, train_file=train_file, test_file=test_file,
        output_dir=checkpoints, callbacks=[callbacks.callback])
    precision = choose_precision(experiment.compute.precision, device)
    log.info("precision: %s (%s)", precision.name, precision.reason)
    params = {"device": device, **precision.params(), "max_length": max_length,
              "trainable_parameters": _trainable(trainer.model), "train_rows": len(trainer.train_dataset)}
    mlflow.log_params({f"system.{k}": v for k, v in params.items()})

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    key = base_cache_key(base_model, test_file, prompts, experiment, precision.name, max_length)
    with precision.autocast(device):  # evaluation in the precision the run trains in
        base = base_evaluation(trainer, tokenizer, job_dir, prompts, experiment, resuming=last is not None,
                               cache_key=key)
    if base.reused and base.eval_loss is not None:  # the metric the run page charts, as if measured here
        mlflow.log_metrics({"base_eval_loss": base.eval_loss, "base_perplexity": _ppl(base.eval_loss)})
    if base.eval_loss is not None and last is None:  # the eval loss curve starts at the base model
        mlflow.log_metric(CURVE_KEYS["eval_loss"], base.eval_loss, step=0)
    if last:
        log.info("resuming from %s", last)
    log.info("training: %s steps on %d packed rows of up to %d tokens (%s)",
             trainer.args.max_steps if trainer.args.max_steps > 0 else f"{trainer.args.num_train_epochs} epoch(s) of",
             len(trainer.train_dataset), max_length, device)
    output = trainer.train(resume_from_checkpoint=last)
    with precision.autocast(device):
        eval_loss, candidate_losses = eval_losses(trainer.model, trainer)
    if eval_loss is not None:
        mlflow.log_metrics({"finetuned_eval_loss": eval_loss, "finetuned_perplexity": _ppl(eval_loss)})
        mlflow.log_metric(CURVE_KEYS["eval_loss"], eval_loss, step=trainer.state.global_step)
    eval_started = time.monotonic()
    with precision.autocast(device):
        candidate_replies = generate_replies(trainer.model, tokenizer, prompts,
                                             max_new_tokens=experiment.evaluation.max_new_tokens, label="fine-tuned")

    model_dir = job_dir / "model"
    _save_model(trainer, tokenizer, model_dir, merge=experiment.optimization.apply_lora
                and experiment.optimization.merge_lora_weights)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    runtime = float(output.metrics.get("train_runtime") or 0.0)
    tps = tokens / runtime if runtime else 0.0

    evaluation = EvaluationPart(test_split=test_file.stem, prompt_split=experiment.data.sample_split,
                                max_new_tokens=experiment.evaluation.max_new_tokens, prompts=prompts)
    evaluation.models["base"] = model_eval(experiment.model.name, prompts, base.replies, base.eval_loss,
                                           base.eval_loss_each)
    if base.reused:
        evaluation.notes.append(f"The base model's eval loss and replies were reused from {base.reused}: same "
                                "weights, data, prompts, decoding, precision and libraries (cache key "
                                f"`{key[:12]}`), so not measured again.")
    evaluation.models["candidate"] = model_eval(f"fine-tuned ({job_dir.name})", prompts, candidate_replies, eval_loss,
                                                candidate_losses)
    if baseline is not None:
        with precision.autocast(device):
            evaluation.models["production"] = evaluate_baseline(trainer, baseline, prompts, experiment)
        evaluation.production_version = baseline.version
    evaluation.seconds = round(time.monotonic() - eval_started, 1)
    mlflow.log_metrics(mlflow_metrics(evaluation))
    mlflow.log_dict(evaluation.model_dump(mode="json"), "evaluation/evaluation.json")

    wall = time.monotonic() - started
    mlflow.log_metrics({"train_tokens": tokens, "tokens_per_second": tps, "wall_seconds": wall})
    curve = callbacks.curve or _curve_from_state(trainer.state)
    return TrainResult(
        base_eval_loss=base.eval_loss, eval_loss=eval_loss, train_loss=output.training_loss,
        loss_curve=curve, train_tokens=tokens,
        tokens_per_second=tps, wall_seconds=wall, model_dir=model_dir, resumed_from=last, params=params,
        last_train_loss=curve[-1][1] if curve else None, max_steps=int(trainer.state.max_steps or 0) or None,
        evaluation=evaluation,
    )


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _curve_from_state(state) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e]


def _save_model(trainer, tokenizer, model_dir: Path, *, merge: bool) -> None:
    """Save a folder the endpoint can load with transformers alone (LoRA merged when asked)."""
    import shutil

    model = trainer.model
    if merge and hasattr(model, "merge_and_unload"):
        # merged in fp32 (a bf16-held base would round the adapters' small deltas away), saved fp32
        model = model.float().merge_and_unload()
    tmp = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)

"""Precision per machine: bf16 where the hardware does it natively, fp32 elsewhere, forced either
way from the experiment; both paths run for real on the tiny model where this CPU allows."""

from __future__ import annotations

import logging

import pytest

from automation.backends.local import precision
from automation.backends.local.precision import Precision, choose, cpu_flags
from automation.cli import main
from automation.record import RunRecord

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
OLDER = {"avx2", "fma", "avx512f"}  # e.g. Ice Lake, Zen 3: bf16 only emulated
NATIVE_HERE = bool({"amx_bf16", "avx512_bf16"} & cpu_flags()) and precision.onednn_bf16()


def test_auto_takes_bf16_only_where_the_cpu_has_it_natively():
    for flags in (SAPPHIRE_RAPIDS, ZEN4):
        chosen = choose("auto", "cpu", flags=flags, onednn=True)
        assert chosen.bf16 and "native bf16" in chosen.reason and "avx512_bf16" in chosen.reason
    fallback = choose("auto", "cpu", flags=OLDER, onednn=False)
    assert fallback == Precision("fp32", "no native bf16 on this CPU, so fp32 (CPU flags with no amx_bf16 or "
                                         "avx512_bf16; oneDNN bf16 no)")
    # the flag alone is not enough: oneDNN must agree it will use it (and the other way round)
    assert choose("auto", "cpu", flags=ZEN4, onednn=False).name == "fp32"
    assert choose("auto", "cpu", flags=OLDER, onednn=True).name == "fp32"


def test_the_experiment_forces_either(caplog):
    assert choose("fp32", "cpu", flags=SAPPHIRE_RAPIDS, onednn=True).name == "fp32"
    with caplog.at_level(logging.WARNING):
        forced = choose("bf16", "cpu", flags=OLDER, onednn=False)
    assert forced.name == "bf16" and "forced" in forced.reason and "100x slower" in caplog.text
    assert choose("auto", "cuda", cuda_bf16=True).name == "bf16"
    assert choose("auto", "cuda", cuda_bf16=False).name == "fp32"
    assert forced.params() == {"precision": "bf16", "precision_reason": forced.reason}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def _finetune(workspace, tiny_experiment, setting: str) -> RunRecord:
    assert main(["finetune", str(tiny_experiment), "--set", f"compute.precision={setting}"]) == 0
    return RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")


def test_forced_fp32_trains_and_says_why(workspace, tiny_experiment):
    ft = _finetune(workspace, tiny_experiment, "fp32").finetune
    assert ft.params["precision"] == "fp32" and ft.params["precision_reason"].startswith("forced by compute.precision")
    assert ft.eval_loss < ft.base_eval_loss


@pytest.mark.skipif(not NATIVE_HERE, reason="this CPU has no native bf16: the fallback is what runs here")
def test_bf16_trains_where_the_cpu_has_it(workspace, tiny_experiment):
    import mlflow

    ft = _finetune(workspace, tiny_experiment, "auto").finetune
    assert ft.params["precision"] == "bf16" and "native bf16" in ft.params["precision_reason"]
    assert ft.eval_loss < ft.base_eval_loss, "the loss falls in bf16 too"
    curve = [p.loss for p in ft.train_loss_curve]
    assert curve[-1] < curve[0]
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    params = mlflow.MlflowClient().get_run(ft.run_id).data.params
    reason = params["system.precision_reason"]
    assert params["system.precision"] == "bf16" and ("avx512_bf16" in reason or "amx_bf16" in reason)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_batched_greedy_replies_equal_one_at_a_time(tiny_model_dir, name):
    """The held-out prompts generated in batches (left-padded) give exactly the replies of one
    prompt at a time, in the same precision."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automation.backends.local.chat_template import apply_training_template
    from automation.backends.local.evaluate import generate_replies
    from automation.record import EvalPrompt
    from tests.conftest import REPO

    if name == "bf16" and not NATIVE_HERE:
        pytest.skip("no native bf16 on this CPU")
    rows = [json.loads(line) for line in (REPO / "data" / "ultrachat-sample" / "test_gen.jsonl").open()][:6]
    prompts = [EvalPrompt(messages=[m for m in r["messages"] if m["role"] == "user"][:1]) for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    apply_training_template(tokenizer)
    import torch

    # As training holds it: bf16 weights in bf16 (their linears prepacked while generating), fp32 in fp32.
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16 if name == "bf16" else torch.float32).eval()
    with Precision(name, "test").autocast("cpu"):
        batched = generate_replies(model, tokenizer, prompts, max_new_tokens=12, label="t", batch_size=6)
        alone = [generate_replies(model, tokenizer, [p], max_new_tokens=12, label="t", batch_size=1)[0]
                 for p in prompts]
    assert len({len(tokenizer(p.messages[0]["content"])["input_ids"]) for p in prompts}) > 1, "padding happens"
    assert batched == alone


@pytest.mark.skipif(not NATIVE_HERE, reason="this CPU has no native bf16")
def test_bf16_lora_multiplies_its_adapters_in_bf16_and_keeps_fp32_masters(tiny_experiment, tmp_path):
    """LoRA on a bf16-held base: the adapters' matmuls run in bf16 under autocast (PEFT's cast of
    their input to fp32 off) inside compute_loss only; the adapters and their gradients stay fp32.
    Forced fp32 has none of it."""
    import itertools

    import torch

    from automation.backends.local.train import build_trainer
    from automation.spec import load_experiment
    from tests.conftest import REPO

    data = tmp_path / "data"
    data.mkdir()
    sample = REPO / "data" / "ultrachat-sample"
    for name in ("train_sft", "test_sft"):
        (data / f"{name}.jsonl").write_text((sample / f"{name}.jsonl").read_text())
    experiment = load_experiment(tiny_experiment)
    seen = {}
    for forced in ("bf16", "fp32"):
        exp = experiment.model_copy(update={"compute": experiment.compute.model_copy(update={"precision": forced})})
        trainer, *_ = build_trainer(exp, base_model=exp.model.path, train_file=data / "train_sft.jsonl",
                                    test_file=data / "test_sft.jsonl", output_dir=tmp_path / forced)
        lora_a = next(m for n, m in trainer.model.named_modules() if n.endswith("lora_A.default"))
        dtypes = []
        hook = lora_a.register_forward_hook(
            lambda module, args, out, into=dtypes: into.append((args[0].dtype, out.dtype)))
        batch = next(iter(itertools.islice(trainer.get_train_dataloader(), 1)))
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        hook.remove()
        seen[forced] = (trainer.bf16_adapters, dtypes[0], lora_a.weight.dtype, lora_a.weight.grad.dtype)
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in trainer.model.modules())  # restored
    assert seen["bf16"] == (True, (torch.bfloat16, torch.bfloat16), torch.float32, torch.float32)
    assert seen["fp32"] == (False, (torch.float32, torch.float32), torch.float32, torch.float32)


@pytest.mark.skipif(not NATIVE_HERE, reason="this CPU has no native bf16")
def test_prepacked_bf16_linears_answer_bit_for_bit_and_step_aside_for_autograd(tiny_model_dir):
    """The oneDNN-prepacked linears give exactly the plain bf16 logits, for one row and a batch;
    with autograd on they fall back to the plain forward (a backward works); restore undoes them."""
    import torch
    from transformers import AutoModelForCausalLM

    from automation.backends.local.precision import prepack_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = [model(ids).logits, model(ids[:1, :1]).logits]
    restore = prepack_linears(model)
    assert linears and all("forward" in vars(m) for m in linears)
    with torch.inference_mode():
        packed = [model(ids).logits, model(ids[:1, :1]).logits]
    assert all(torch.equal(a, b) for a, b in zip(plain, packed, strict=True))
    model.lm_head.weight.requires_grad_(True)
    model(ids).logits.float().sum().backward()  # the plain forward ran: the packed one has no backward
    assert model.lm_head.weight.grad is not None
    restore()
    assert not any("forward" in vars(m) for m in linears)


def test_prepacked_fp32_linears_answer_as_plain_and_a_row_as_in_its_batch(tiny_model_dir):
    """fp32 is packed too (oneDNN's fp32 kernel instead of MKL's sgemm: the same sums in another
    order, so close, not equal); a row computes the same alone as in a batch; release drops the
    plain weights of the layers that own theirs and keeps a tied LM head's."""
    import torch
    from transformers import AutoModelForCausalLM

    from automation.backends.local.precision import prepack_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = model(ids).logits
        restore = prepack_linears(model)
        packed, alone = model(ids).logits, model(ids[1:2]).logits
    restore()
    assert torch.allclose(plain, packed, atol=1e-4) and torch.equal(packed[1:2], alone)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    prepack_linears(model, release=True)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert all(m.weight.numel() == 0 for m in linears if m is not model.lm_head)
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.lm_head.weight.numel() > 0
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, packed)


@pytest.mark.skipif(not NATIVE_HERE, reason="this CPU has no native bf16")
def test_a_prepacked_lora_model_computes_what_its_merged_model_serves_in_bf16(tiny_model_dir, tmp_path):
    """A LoRA layer is packed with its adapters merged as `merge_and_unload` merges them (in fp32),
    rounded to bf16: the logits are bit for bit those of the saved merged model loaded in bf16, as
    the endpoint loads it; restore gives the unmerged LoRA forward back."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from automation.backends.local.precision import prepack_linears

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    seeded = torch.Generator().manual_seed(5)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05, generator=seeded)
    model.eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=seeded)
    with torch.inference_mode():
        unmerged = model(ids).logits
        restore = prepack_linears(model)
        packed = model(ids).logits
        restore()
        assert torch.equal(model(ids).logits, unmerged)
    copy.deepcopy(model).float().merge_and_unload().save_pretrained(tmp_path)  # as the job saves it
    served = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()  # as the endpoint loads it
    prepack_linears(served)
    with torch.inference_mode():
        assert torch.equal(served(ids).logits, packed)
    assert not torch.equal(packed, unmerged)  # the adapters were not zero: merging rounds differently


def test_a_build_that_cannot_prepack_leaves_the_model_as_it_was(tiny_model_dir, monkeypatch):
    """Where oneDNN lacks the kernel (say, another CPU architecture's build), nothing is packed and the
    model computes as before, instead of an endpoint failing at its first request."""
    import torch
    from transformers import AutoModelForCausalLM

    from automation.backends.local.precision import prepack_linears

    def unsupported(*args, **kwargs):
        raise RuntimeError("mkldnn_linear_pointwise: not supported on this build")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", unsupported)
    restore = prepack_linears(model, release=True)
    restore()
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(m.weight.numel() > 0 for m in model.modules() if type(m) is torch.nn.Linear)
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size

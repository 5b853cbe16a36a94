"""The continuous-batching engine in process, against the model's own greedy decoding.

Requests that join a running batch at different steps, prompts prefilled together (left-padded),
and prompts above the per-step prefill budget (prefilled in chunks into their own cache, then
merged) must all give exactly the tokens that plain greedy decoding of each prompt alone gives.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from automation.serving.generator import Generator, Settings
from automation.serving.sampling import Sampling

NEW_TOKENS = 10


def reference(model, torch, prompt: list[int], eos: set[int]) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            token = int(torch.argmax(logits))
            if token in eos:
                break
            tokens.append(token)
    return tokens


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its attention made to matter: at the random init's scale (0.02) attention
    is nearly uniform and small next to the residual stream, so the model repeats its last token
    whatever came before, and wrong positions or a misaligned cache would not change a token.
    Scaled up, its greedy replies vary and depend on where every earlier token is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16)
            layer.self_attn.k_proj.weight.mul_(16)
            layer.self_attn.v_proj.weight.mul_(10)  # and its output weighs against the residual stream
            layer.self_attn.o_proj.weight.mul_(10)
    folder = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(sharp_model):
    # A budget of 48 prompt tokens a step: the 120- and 300-token prompts go in chunks.
    generator = Generator(Settings(model_dir=str(sharp_model), api_key="k", threads=1, prefill_threads=1,
                                   max_prefill_tokens=48, max_prompt_tokens=1000))
    generator.start()
    assert generator.ready.wait(120) and not generator.failed
    yield generator
    generator.stop()


async def _generate(generator: Generator, prompt: list[int], delay_s: float) -> list[int]:
    await asyncio.sleep(delay_s)
    job = generator.submit(prompt, NEW_TOKENS, Sampling(), None)
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return list(job.tokens)
        if kind == "error":
            raise AssertionError(value.message)


def _prompts(engine, lengths: list[int], seed: int) -> list[list[int]]:
    vocab = engine._model.config.vocab_size
    special = set(engine.tokenizer.all_special_ids) | engine._eos_ids
    rng = random.Random(seed)
    return [[t for t in (rng.randrange(vocab) for _ in range(n * 2)) if t not in special][:n] for n in lengths]


def _run(engine, prompts: list[list[int]], delays: list[float]) -> list[list[int]]:
    async def all_of_them():
        return await asyncio.gather(*(_generate(engine, p, d) for p, d in zip(prompts, delays, strict=True)))

    return asyncio.run(all_of_them())


def test_batched_chunked_and_late_requests_decode_exactly_as_greedy_alone(engine):
    prompts = _prompts(engine, [5, 300, 17, 120, 40, 9, 48, 49], seed=7)
    # Arrivals: together, then while the first ones decode, then while a chunked prompt is in progress.
    got = _run(engine, prompts, [0, 0, 0, 0.05, 0.05, 0.1, 0.2, 0.2])
    stats = engine.snapshot()
    assert stats["prefill_chunks"] >= 300 // 48 + 120 // 48  # both long prompts went in chunks
    assert stats["largest_batch"] > 1
    assert stats["tokens_in_flight"] == 0 and stats["queued"] == 0
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(engine._model, engine._torch, prompt, engine._eos_ids), len(prompt)


def test_a_shared_prompt_prefix_is_computed_once_and_decodes_the_same(engine):
    """A system prompt many requests share: its cache is computed once and reused (in the same
    prefill, by later arrivals, in part, and by a chunked prompt), with exactly the same tokens."""
    system = _prompts(engine, [30], seed=11)[0]
    rests = _prompts(engine, [3, 12, 25, 1, 7, 200, 9], seed=12)
    prompts = [system + rest for rest in rests[:5]]
    prompts.append(system + rests[5])  # above the budget: chunked, starting from the stored prefix
    prompts.append(system[:20] + rests[6])  # shares only the first 20 tokens of the stored prefix
    before = engine.snapshot()["prefix_tokens_reused"]
    got = _run(engine, prompts, [0, 0, 0, 0.05, 0.1, 0.1, 0.15])
    # How the arrivals group varies from run to run; at least two prompts reuse all 30 and one 20.
    assert engine.snapshot()["prefix_tokens_reused"] - before >= 30 * 2 + 20
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(engine._model, engine._torch, prompt, engine._eos_ids), len(prompt)


def test_stats_match_their_published_schema_before_and_after_loading(engine, tiny_model_dir):
    from automation.serving.contract import Stats

    loading = Generator(Settings(model_dir=str(tiny_model_dir), api_key="k", threads=1, prefill_threads=2))
    before = Stats.model_validate(loading.snapshot())  # /stats while the model loads: no 5xx
    assert not before.ready and (before.threads, before.prefill_threads) == (1, 2)
    after = Stats.model_validate(engine.snapshot())  # extra="forbid": a new counter must be described
    assert after.ready and after.steps > 0


# -- precision: bf16 weights where the CPU does bf16 natively, fp32 elsewhere -------------------------

def _native_bf16() -> bool:
    from automation.backends.local.precision import choose

    return choose("auto", "cpu").bf16


def _engine(model_dir, precision: str) -> Generator:
    generator = Generator(Settings(model_dir=str(model_dir), api_key="k", threads=1, prefill_threads=1,
                                   max_prefill_tokens=48, max_prompt_tokens=1000, precision=precision))
    generator.start()
    assert generator.ready.wait(120) and not generator.failed
    return generator


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_each_precision_answers_and_batched_greedy_equals_one_at_a_time(sharp_model, precision):
    """Both precisions serve; in either, replies decoded together (left-padded, joining mid-batch,
    chunked) are exactly the replies each prompt gets alone through the same engine."""
    generator = _engine(sharp_model, precision)
    try:
        expected_dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
        assert generator.info()["precision"] == precision and generator.info()["dtype"] == expected_dtype
        assert str(generator._model.dtype) == f"torch.{expected_dtype}"  # the weights, not autocast
        linears = [m for m in generator._model.modules() if type(m).__name__ == "Linear"]
        # Every linear's weight prepacked for oneDNN once (precision.prepack_linears), in either
        # precision, and the plain copies dropped where not shared
        assert linears and all("forward" in vars(m) for m in linears)
        assert any(m.weight.numel() == 0 for m in linears)
        assert "forced" in generator.info()["precision_reason"]
        prompts = _prompts(generator, [5, 120, 17, 40, 9, 60], seed=21)
        together = _run(generator, prompts, [0, 0, 0, 0.05, 0.05, 0.1])
        alone = [_run(generator, [prompt], [0])[0] for prompt in prompts]
        assert together == alone
        assert generator.snapshot()["largest_batch"] > 1
        assert any(len(tokens) == NEW_TOKENS for tokens in alone)  # they answered, not stopped at once
        twice = _run(generator, prompts, [0] * len(prompts))  # and the same again: deterministic
        assert twice == alone
    finally:
        generator.stop()


def test_auto_serves_bf16_on_a_native_cpu_and_fp32_when_forced(tiny_model_dir):
    if not _native_bf16():
        pytest.skip("this CPU has no native bf16 (no amx_bf16 / avx512_bf16 or oneDNN says no)")
    auto = _engine(tiny_model_dir, "auto")
    try:
        info = auto.info()
        assert (info["precision"], info["dtype"]) == ("bf16", "bfloat16")
        assert info["precision_reason"].startswith("native bf16 on this CPU")
    finally:
        auto.stop()
    forced = _engine(tiny_model_dir, "fp32")
    try:
        info = forced.info()
        assert (info["precision"], info["dtype"]) == ("fp32", "float32")
        assert info["precision_reason"].startswith("forced by compute.precision: fp32")
    finally:
        forced.stop()


def test_auto_falls_back_to_fp32_on_a_cpu_without_native_bf16(tiny_model_dir, monkeypatch):
    from automation.backends.local import precision
    from automation.serving.generator import serving_precision

    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=precision.CPUINFO: {"avx2", "avx512f"})
    chosen, dtype = serving_precision("auto", "cpu")
    assert (chosen.name, str(dtype)) == ("fp32", "torch.float32")
    assert "no native bf16" in chosen.reason
    # oneDNN saying no is enough too, even with the flag present
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=precision.CPUINFO: {"avx512_bf16"})
    monkeypatch.setattr(precision, "onednn_bf16", lambda: False)
    assert serving_precision("auto", "cpu")[0].name == "fp32"
    generator = _engine(tiny_model_dir, "auto")  # the engine itself, on the "old" CPU
    try:
        assert generator.info()["precision"] == "fp32" and str(generator._model.dtype) == "torch.float32"
        assert _run(generator, _prompts(generator, [7], seed=3), [0])[0] is not None
    finally:
        generator.stop()


def test_info_is_empty_while_loading_and_the_option_reaches_the_settings(tiny_model_dir):
    from automation.serving.__main__ import parse_args

    assert Generator(Settings(model_dir=str(tiny_model_dir), api_key="k")).info() == {}
    assert parse_args(["--model-dir", "m", "--key-file", "k"]).precision in ("auto", "bf16", "fp32")
    assert parse_args(["--model-dir", "m", "--key-file", "k", "--precision", "fp32"]).precision == "fp32"


def test_a_few_rows_decode_on_every_cpu_unless_the_threads_are_pinned(tiny_model_dir, monkeypatch):
    """Unpinned, up to FEW_ROWS rows decode on the prefill threads (every usable CPU) and more rows
    on one CPU less; --threads or OMP_NUM_THREADS pins decoding to one count for any batch."""
    from automation.serving import generator as engine_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 3)
    settings = {"model_dir": str(tiny_model_dir), "api_key": "k", "max_prompt_tokens": 1000}
    pinned = Generator(Settings(**settings, threads=1))
    assert (pinned._threads, pinned._few_rows_threads, pinned._prefill_threads) == (1, 1, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    from_env = Generator(Settings(**settings))
    assert (from_env._threads, from_env._few_rows_threads, from_env._prefill_threads) == (2, 2, 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    generator = Generator(Settings(**settings))
    assert (generator._threads, generator._few_rows_threads) == (2, 3)
    seen: list[tuple[int, int]] = []
    decode = generator._decode

    def watched():  # (rows decoded, threads they were decoded with)
        rows = len(generator._running)
        decode()
        seen.append((rows, generator._current_threads))

    generator._decode = watched
    generator.start()
    try:
        assert generator.ready.wait(120) and not generator.failed
        prompts = _prompts(generator, [7] * (engine_module.FEW_ROWS + 2), seed=4)
        _run(generator, prompts[:1], [0])  # one row
        _run(generator, prompts, [0] * len(prompts))  # more than FEW_ROWS
        snapshot = generator.snapshot()
        assert (snapshot["threads"], snapshot["few_rows_threads"], snapshot["prefill_threads"]) == (2, 3, 3)
    finally:
        generator.stop()
    assert snapshot["largest_batch"] > engine_module.FEW_ROWS
    assert all(threads == (3 if rows <= engine_module.FEW_ROWS else 2) for rows, threads in seen)
    assert {threads for _, threads in seen} == {2, 3}

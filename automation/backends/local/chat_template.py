"""The chat template used for training and serving on the local backend.

ChatML, as SmolLM2-135M-Instruct's own template, with `{% generation %}` markers around each
assistant reply: TRL's `assistant_only_loss` needs them to compute the loss on assistant tokens
only, and SmolLM2's template has none. The fine-tuned model is saved with this template, so the
endpoint formats prompts exactly as training did.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def apply_training_template(tokenizer) -> None:
    """Install the template (and an end-of-turn token) on a tokenizer in place."""
    tokenizer.chat_template = CHATML_WITH_GENERATION
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token; the local backend needs a "
                         "ChatML tokenizer (SmolLM2, Qwen, ...) or a model folder whose tokenizer has them")
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None or tokenizer.pad_token == IM_END:
        tokenizer.pad_token = tokenizer.eos_token

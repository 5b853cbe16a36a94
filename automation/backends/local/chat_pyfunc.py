"""The MLflow flavour of a locally fine-tuned chat model.

The model is logged as a pyfunc whose only artifact is the transformers folder; the local endpoint
reads that folder in place, and `mlflow.pyfunc.load_model(...).predict(...)` works too (for
notebooks and batch scoring), taking the same request as the endpoint's `/score` route.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc


class ChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a schema
        """`model_input`: the `/score` body's `input_data` (or a list of them); one reply each."""
        import torch

        items = model_input if isinstance(model_input, list) else [model_input]
        replies = []
        for item in items:
            messages = item["input_string"]
            settings = {"max_new_tokens": 200, **(item.get("parameters") or {}), **(params or {})}
            inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = self.model.generate(**inputs, **settings, pad_token_id=self.tokenizer.pad_token_id)
            replies.append(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


# Models from code: MLflow logs this file, not a pickle of the object.
mlflow.models.set_model(ChatModel())

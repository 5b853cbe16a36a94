"""The MLflow flavour of a locally fine-tuned chat model.

The model is logged as a pyfunc whose only artifact is the transformers folder; the local endpoint
reads that folder in place. The logged model has a signature (`SIGNATURE`): one column `messages`
(a conversation: a list of `{"role", "content"}`), one string reply per row, and the generation
settings as params. So `mlflow models serve -m models:/<name>/<version> --env-manager local`
takes its documented request:

    {"inputs": [{"messages": [{"role": "user", "content": "Hi"}]}], "params": {"max_new_tokens": 40}}

(one record per conversation; `dataframe_records` works the same), and
`mlflow.pyfunc.load_model(uri).predict([{"messages": conversation}, ...], params={...})` answers
the same way in a notebook.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd  # already imported by mlflow.pyfunc; named here for predict's type hint

GENERATION_PARAMS = {"max_new_tokens": 200, "temperature": 0.6, "top_p": 0.9, "do_sample": False}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    kinds = {int: "long", float: "double", bool: "boolean"}
    return ModelSignature(
        inputs=Schema([ColSpec(Array(message), "messages")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in GENERATION_PARAMS.items()]),
    )


def _conversations(model_input) -> list[list[dict[str, str]]]:
    """The `messages` column as plain lists of dicts, whatever container MLflow handed over."""
    column = model_input["messages"]
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    return [[{"role": str(m["role"]), "content": str(m["content"])} for m in conversation] for conversation in values]


class ChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One reply per row of `model_input["messages"]`.

        The hint says what MLflow hands over: with a signature of columns, pyfunc checks the input
        against it and passes a DataFrame. MLflow infers no schema from a DataFrame hint (see
        mlflow/types/type_hints.py `type_hints_no_signature_inference`), so `signature()` stays the
        model's signature, and its "Add type hints to the `predict` method" warning, given for a
        predict without hints, does not apply."""
        import torch
        from transformers import GenerationConfig

        settings = {**GENERATION_PARAMS, **(params or {})}
        if not settings["do_sample"]:
            settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_p")}
        config = GenerationConfig(**settings, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id)
        replies = []
        for messages in _conversations(model_input):
            inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=config)
            replies.append(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


# Models from code: MLflow logs this file, not a pickle of the object.
mlflow.models.set_model(ChatModel())

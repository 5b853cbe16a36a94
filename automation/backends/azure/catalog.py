"""`automation models`: the chat models a registry offers for fine-tuning, with compute and dates.

A model qualifies when its fine-tuning tasks include chat-completion and it has a fine-tune
compute allow-list (tags or system metadata, see lifecycle.py). `models.list()` on a registry
returns containers (name and latest version) of the active models only; `--all` asks for the
archived ones too, which is where retired models go.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from automation.backends.azure import lifecycle, retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    status: str  # current | deprecated | retired
    finetune_sizes: list[str] = field(default_factory=list)
    inference_sizes: list[str] = field(default_factory=list)
    life: lifecycle.Lifecycle = lifecycle.Lifecycle()


def finetunable_chat_models(registry_client, *, include_archived: bool = False, name_contains: str = "",
                            today: date | None = None, call: Callable = retry.call) -> list[CatalogEntry]:
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    from automation.backends.azure.compute import today_utc

    view = ListViewType.ALL if include_archived else ListViewType.ACTIVE_ONLY
    containers = call("listing the registry's models", lambda: list(registry_client.models.list(list_view_type=view)))
    wanted = [c for c in containers if name_contains.lower() in str(c.name).lower()]
    log.info("reading %d model(s)", len(wanted))
    entries = []
    for container in wanted:
        version = str(getattr(container, "latest_version", None) or "")
        if not version:
            continue
        try:
            model = call(f"reading model {container.name}:{version}",
                         lambda n=container.name, v=version: registry_client.models.get(n, version=v))
        except ResourceNotFoundError:
            continue  # removed between the listing and the read
        archived = lifecycle.read_registry_metadata(registry_client, model)
        allow = lifecycle.finetune_allow_list(model)
        if allow is None or lifecycle.CHAT_TASK not in lifecycle.finetuning_tasks(model):
            continue
        life = lifecycle.lifecycle_of(model)
        inference = lifecycle.inference_allow_list(model)
        status = life.finetune_status(today or today_utc())
        entries.append(CatalogEntry(name=str(model.name), version=str(model.version),
                                    status="retired" if archived else status, finetune_sizes=allow[1],
                                    inference_sizes=inference[1] if inference else [], life=life))
    return sorted(entries, key=lambda e: (e.status != "current", e.name.lower()))


def cmd_models(args: argparse.Namespace, client_for: Callable | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from automation.backends.azure.connection import registry_client

    entries = finetunable_chat_models((client_for or registry_client)(args.registry), include_archived=args.all,
                                      name_contains=args.name or "")
    if not entries:
        print(f"no chat models for fine-tuning in registry {args.registry}" + ("" if args.all else " (try --all)"))
        return 0
    table = Table(title=f"chat models for fine-tuning in registry {args.registry}")
    for column in ("model", "version", "status", "fine-tune sizes", "inference sizes", "fine-tune deprecation",
                   "fine-tune retirement"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.name, e.version, e.status, "\n".join(e.finetune_sizes), "\n".join(e.inference_sizes),
                      str(e.life.finetune_deprecation or "–"), str(e.life.finetune_retirement or "–"))
    Console(width=160).print(table)
    return 0


def add_commands(commands) -> None:
    p = commands.add_parser("models", help="the registry's chat models that can be fine-tuned, with compute and dates")
    p.add_argument("--registry", default="azureml", help="Azure ML registry (default azureml)")
    p.add_argument("--name", help="only models whose name contains this text")
    p.add_argument("--all", action="store_true", help="include archived (retired) models")
    p.set_defaults(handler=cmd_models)

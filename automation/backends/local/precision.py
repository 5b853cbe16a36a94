"""Which precision the local backend computes in, per machine: bf16 where the hardware does it
natively, fp32 elsewhere.

On a CPU, bf16 pays only where the cores have bf16 instructions: AMX-BF16 (Intel Sapphire Rapids
and later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later). There a bf16 matmul runs ~2.5x
(AVX512-BF16) to ~6x (AMX) the fp32 one; elsewhere PyTorch emulates it, up to ~100x slower. So the
choice reads the CPU's flags (Linux: /proc/cpuinfo) and asks oneDNN whether it will use them
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`): both must agree. On a GPU, bf16 where CUDA
supports it. `compute.precision` in the experiment forces either; forcing bf16 on a CPU without
native support is allowed (to measure it) and warns.

Training in bf16 is mixed precision: fp32 master weights and optimizer state, matmuls under
`torch.autocast(..., dtype=torch.bfloat16)` (Trainer's `bf16=True`); evaluation runs under the
same autocast, so base, fine-tuned and production models are compared in one precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" or "fp32"
    reason: str  # why, in words, with the CPU flags seen

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def params(self) -> dict[str, str]:
        """What MLflow's params and the run record keep of the choice."""
        return {"precision": self.name, "precision_reason": self.reason[:500]}

    def autocast(self, device: str):
        """The context the model's forward passes run in: bf16 autocast, or nothing for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        import torch

        return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags (the `flags` line of /proc/cpuinfo); empty where it cannot be read."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def onednn_bf16() -> bool:
    """Whether PyTorch's oneDNN says this CPU runs bf16 natively."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def choose(requested: str, device: str, *, flags: set[str] | None = None, onednn: bool | None = None,
           cuda_bf16: bool | None = None) -> Precision:
    """The precision for `requested` ("auto", "bf16", "fp32") on `device` ("cpu" or "cuda").
    `flags`, `onednn` and `cuda_bf16` are read from the machine unless given (tests give them)."""
    if device == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported()
        if requested == "fp32":
            return Precision("fp32", "forced by compute.precision: fp32")
        if cuda_bf16:
            return Precision("bf16", "forced by compute.precision: bf16" if requested == "bf16"
                             else "the GPU supports bf16")
        return Precision("fp32", "the GPU has no bf16")
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    onednn = onednn_bf16() if onednn is None else onednn
    seen = f"CPU flags {', '.join(native) if native else 'with no amx_bf16 or avx512_bf16'}; " \
           f"oneDNN bf16 {'yes' if onednn else 'no'}"
    if requested == "fp32":
        return Precision("fp32", f"forced by compute.precision: fp32 ({seen})")
    if requested == "bf16":
        if not (native and onednn):
            log.warning("compute.precision: bf16 on a CPU without native bf16 (%s): PyTorch emulates it, "
                        "which can be ~100x slower than fp32", seen)
        return Precision("bf16", f"forced by compute.precision: bf16 ({seen})")
    if native and onednn:
        return Precision("bf16", f"native bf16 on this CPU ({seen})")
    return Precision("fp32", f"no native bf16 on this CPU, so fp32 ({seen})")


def prepack_linears(model, *, release: bool = False) -> Callable[[], None]:
    """Give every bf16 or fp32 linear layer of `model` on the CPU its weight prepacked for oneDNN,
    for inference; returns the function that puts the plain layers back.

    A plain `F.linear` on the CPU hands its weight to the matmul library in its stored layout at
    every call (oneDNN reorders a bf16 weight each time). For one decoding row that is half the
    call: SmolLM2's bf16 `Linear(576, 1536)` takes 84 µs plain and 45 µs prepacked on one thread,
    with bit-identical outputs (the same kernel on the same layout). A whole decoding step of
    SmolLM2 (bench/RESULTS.md, issue 23): bf16 58 -> 37 ms on one thread, 39 -> 31 on two; fp32
    58 -> 52 on one, 54 -> 39 on two (oneDNN's fp32 kernel on a packed weight scales to the second
    thread, MKL's sgemm on the plain one does not). What `torch.compile(freezing=True)` does to a
    CPU model's linears, without the compile.

    A PEFT LoRA layer (plain LoRA, no bias on B) is packed with its adapters merged into the
    weight as `merge_and_unload` merges them, in fp32, then rounded to the base's dtype: the
    weight the endpoint serves once the merged model is loaded, so the held-out replies and eval
    loss are the served model's (tested bit for bit), and each of the 210 LoRA layers of SmolLM2
    costs one matmul instead of five operators and two dtype casts.

    Only for inference: the packed call has no backward, so a layer falls back to its own forward
    whenever autograd is on, its input has another dtype, or it is called with more than its input.
    The packed copies cost one more copy of the linear weights while packed, unless `release`
    (the endpoint): then each packed `nn.Linear` whose weight no other module shares (a tied LM
    head keeps it) drops its plain weight, and the layer can neither fall back nor be restored.
    """
    import torch

    if not isinstance(model, torch.nn.Module) or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return lambda: None
    dtypes = (torch.bfloat16, torch.float32)
    packed, inside_lora, checked = [], set(), set()

    def restore() -> None:
        for layer in packed:
            vars(layer).pop("forward", None)

    try:
        for layer in model.modules():
            if id(layer) in inside_lora:
                continue
            weight, bias = _inference_weight(layer)
            if weight is None or weight.dtype not in dtypes or weight.device.type != "cpu" \
                    or "forward" in vars(layer) or (bias is not None and bias.dtype != weight.dtype):
                continue
            if type(layer) is not torch.nn.Linear:
                inside_lora.add(id(layer.base_layer))
            packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
            if weight.dtype not in checked:  # a build whose oneDNN lacks the kernel says so here, not mid-request
                torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, weight.shape[1]), packed_weight, bias,
                                                   "none", [], "")
                checked.add(weight.dtype)
            layer.forward = _packed_forward(layer, packed_weight, bias, weight.shape[0], fallback=not release)
            packed.append(layer)
    except (RuntimeError, NotImplementedError) as err:
        restore()
        log.info("linear weights left unpacked: this PyTorch build cannot prepack them for oneDNN (%s)", err)
        return lambda: None
    if release:
        counts: dict[int, int] = {}
        for _, parameter in model.named_parameters(remove_duplicate=False):
            counts[id(parameter)] = counts.get(id(parameter), 0) + 1
        for layer in packed:
            if type(layer) is torch.nn.Linear and counts.get(id(layer.weight)) == 1:
                layer.weight = torch.nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
    return restore


def _inference_weight(layer):
    """(weight, bias) a layer computes with in inference: an `nn.Linear`'s own, or a plain PEFT LoRA
    layer's with its active adapters merged; (None, None) for anything else."""
    import torch

    if type(layer) is torch.nn.Linear:
        return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None, None
    base = getattr(layer, "base_layer", None)
    if type(layer) is not LoraLinear or type(base) is not torch.nn.Linear:
        return None, None
    weight = base.weight.detach()
    if layer.merged or layer.disable_adapters:
        return weight, None if base.bias is None else base.bias.detach()
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if any(name in layer.lora_variant or layer.lora_B[name].bias is not None for name in adapters):
        return None, None  # DoRA and other variants, or a bias on B: their own forward
    if adapters:
        merged = weight.float()
        for name in adapters:
            merged = merged + layer.get_delta_weight(name).detach().float()
        weight = merged.to(weight.dtype)
    return weight, None if base.bias is None else base.bias.detach()


def _packed_forward(layer, packed_weight, bias, out_features: int, *, fallback: bool = True):
    import torch

    plain = type(layer).forward.__get__(layer)
    linear = torch.ops.mkldnn._linear_pointwise
    dtype = packed_weight.dtype

    def forward(x, *args, **kwargs):
        if fallback and (args or kwargs or layer.training or x.dtype != dtype or torch.is_grad_enabled()
                         or x.device.type != "cpu"):
            return plain(x, *args, **kwargs)
        return linear(x.reshape(-1, x.shape[-1]), packed_weight, bias, "none", [], "").reshape(
            *x.shape[:-1], out_features)

    return forward

"""Azure VM sizes that no longer exist, so an experiment naming one fails in `validate`, offline.

Facts, with their dates: the K80 NC sizes (the reference flow refuses them for fine-tuning) and
the NCv3 sizes retired on 2025-09-30, among them Standard_NC6s_v3, the reference flow's old
default inference instance type, and Standard_NC24rs_v3, chat_completion_pipeline's default
`instance_type_finetune`. A model's allow-list tags may still name retired sizes (the
Phi-3 tags do); the allow-lists are checked in the workspace, these facts before it.
"""

from __future__ import annotations

RETIRED_VM_SIZES = {
    "standard_nc6": "2023-08-31", "standard_nc12": "2023-08-31", "standard_nc24": "2023-08-31",
    "standard_nc24r": "2023-08-31",
    "standard_nc6s_v3": "2025-09-30", "standard_nc12s_v3": "2025-09-30", "standard_nc24s_v3": "2025-09-30",
    "standard_nc24rs_v3": "2025-09-30",  # NCv3 too; chat_completion_pipeline's default instance_type_finetune
}
# GPUs per node of the sizes this project knows (Azure's size pages; `compute.list_sizes()` is the
# authority in the workspace): the dry-run plan's GPU count before any network call.
GPUS_PER_SIZE = {
    "standard_nc6s_v3": 1, "standard_nc12s_v3": 2, "standard_nc24s_v3": 4, "standard_nc24rs_v3": 4,
    "standard_nc24ads_a100_v4": 1, "standard_nc48ads_a100_v4": 2, "standard_nc96ads_a100_v4": 4,
    "standard_nd40rs_v2": 8, "standard_nd96asr_v4": 8, "standard_nd96amsr_a100_v4": 8,
    "standard_nc40ads_h100_v5": 1, "standard_nc80adis_h100_v5": 2,
    "standard_nd96isr_h100_v5": 8,  # 8x H100 80 GB; in Phi-4's fine-tune allow-list
}
# A current GPU size that every chat model in the azureml registry accepts for serving (the
# inference allow-lists of Phi-3 and Phi-4 both hold it): one A100 80 GB.
DEFAULT_INFERENCE_SIZE = "Standard_NC24ads_A100_v4"


def retirement_of(size: str | None) -> str | None:
    """The retirement date of a VM size (ISO date), or None when it is not known to be retired."""
    return RETIRED_VM_SIZES.get((size or "").lower())

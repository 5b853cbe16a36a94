"""The Azure ML backend: the reference flow (REFERENCE.md steps 1-10) through azure-ai-ml.

Nothing here imports azure.ai.ml at module import time; the SDK is loaded by the functions that
use it, so `automation validate` stays fast.
"""

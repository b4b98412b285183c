"""Model kinds: what a checkpoint's `model_spec` can describe, and how each kind is rebuilt.

Importing this package registers every kind: each kind module registers its builders into
`compress.models.registry` when imported.
"""
from compress.models import compact_clip, pruning, quantized, registry, students, text_students  # noqa: F401

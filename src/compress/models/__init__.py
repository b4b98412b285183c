"""Model kinds: what a checkpoint's `model_spec` can describe, and how each kind is rebuilt.

Importing this package registers every kind (the registry comes first: the kind modules register into it).
"""
from compress.models import registry  # noqa: F401  (first: the kind modules below register into it)
from compress.models import compact_clip, pruning, students, text_students  # noqa: F401

"""The bottom layer: what every other package may use and that uses none of them.

errors (the user-error classes), checkpoint (atomic checkpoint IO and names), model_configs (the project's
small open_clip configs), logs (quieting open_clip's chatter).
"""

"""Output quality under the tier policy: the grid of HBM ratio x eviction ratio, against eviction baselines.

Every cell is compared with the full cache on the same prompts (greedy decoding), so a cell's
numbers measure what the policy changed, not the model's own accuracy.
"""

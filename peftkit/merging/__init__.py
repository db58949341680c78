"""Offline operations on saved weights (docs/merge.md): LoRA adapters as deltas and their combinations (`deltas`),
the streaming merge into a checkpoint (`stream`, `plan`, `check`), full fine-tune -> LoRA by SVD (`compress`,
`svd`). Nothing here needs the model in memory."""

"""Evaluation, one place for the trainer and `peftkit eval`: held-out loss / perplexity and exact match
(`heldout`), exact match's greedy answers with the references as drafts (`generation`), and the library behind
`peftkit eval` (`command`: load a model and adapter, then the same figures)."""

"""The training step: the loop itself (`fit`: micro-batches, accumulation, clipping, schedule, NaN stop), the
SFT loss and its three paths (`loss`, `linear_ce`: the chunked head + cross-entropy), shared prompt prefixes
computed once (`shared_prefix`), and the optimizer with its schedule and LoRA+ groups (`optim`)."""

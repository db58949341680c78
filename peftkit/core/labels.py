"""The label value that takes no loss: -100, the `ignore_index` of torch's cross-entropy and of every HF model's
loss. Data (prompt tokens, padding), the trainer's loss and prompt tuning (its virtual positions) all use this one
definition."""

IGNORE_INDEX = -100

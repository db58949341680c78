"""From the config's data options to what the loop and the evaluation consume, through `peftkit.data`.

Which data is used:
- no `--data`: the objective's bundled task (`Objective.bundled`; SFT's: peftkit/data/task_train.jsonl) with its
  disjoint eval split (task_eval.jsonl);
- `--eval-data FILE`: that file is the eval set;
- `--eval-split NAME`: that split of a hub / `datasets` source; `--eval-split 0.1` (a number): a seeded random
  share of the training rows (an integer >= 1: that many rows);
- neither: 5% of the training rows, at most `eval_examples`, are held out (none when fewer than 20 rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from peftkit.errors import PeftkitError
from peftkit.train.loop.shared_prefix import KEY as SHARED_KEY
from peftkit.train.loop.shared_prefix import shared_length

if TYPE_CHECKING:
    from peftkit.train.config import TrainConfig


class TrainSplit(Protocol):
    """What a run asks of any objective's split (`Objective.load_splits`: a `Split`, preference `Pairs`, KTO's
    `Unpaired`, a plugin's own): its rows' lengths, the (messages, reference) pairs for exact match, its size."""

    @property
    def lengths(self) -> list[int]: ...

    @property
    def references(self) -> list[tuple[list[dict], str]]: ...

    def __len__(self) -> int: ...


@dataclass
class Split:
    """A tokenized split as plain lists (fast indexing), plus the raw rows' (messages, reference) for exact match."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    lengths: list[int]
    references: list[tuple[list[dict], str]]

    def __len__(self) -> int:
        return len(self.lengths)


def tokenized(rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict, fmt: str, what: str) -> Split:
    from peftkit import data

    if len(rows) == 0:
        raise PeftkitError(f"the {what} data has no rows")
    assert cfg.max_length is not None, "a resolved config (resolve_defaults fills max_length)"
    ds = data.tokenize(rows, tokenizer, fmt=fmt, max_length=cfg.max_length, prompt_format=prompt_format,
                       train_on_prompt=cfg.train_on_prompt)
    if len(ds) == 0:
        raise PeftkitError(f"no {what} example has a target token left after truncation to --max-length "
                           f"{cfg.max_length}; raise --max-length")
    from peftkit.train.evaluation.heldout import references

    refs = references(rows, fmt)
    # [:] makes lists: indexing a datasets Column reads Arrow each time (~40 us), which the batch planner's sorts feel
    return Split(ds["input_ids"][:], ds["labels"][:], ds["length"][:], refs)


def load_splits(cfg: TrainConfig, tokenizer: Any, prompt_format: dict) -> tuple[Any, Any | None, str]:
    """(train split, eval split or None, detected format); every data error is raised here, before any write.
    The rows are chosen here (the objective's bundled task when there is no --data); the objective tokenizes them
    (`Objective.load_splits`: a `Split` for sft, `Pairs` for a pair objective, ...)."""
    from peftkit import data
    from peftkit.train.objectives.base import get_objective, names_of, objective_names

    objective = get_objective(cfg.objective)
    bundled_train, bundled_eval = objective.bundled()
    source = cfg.data or bundled_train
    rows = data.load_mixture(source, cfg.columns, cfg.seed)  # one source, or several mixed by weight (mixing.py)
    if len(rows) == 0:
        raise PeftkitError(f"the data {source!r} has no rows")
    others = [o for o in map(get_objective, objective_names()) if o is not objective and o.accepts(rows.column_names)]
    if others and not objective.accepts(rows.column_names):
        raise PeftkitError(f"the data has {others[0].row_shape}; train on them with --objective {names_of(others)}")
    eval_rows = None
    if cfg.eval_data or (cfg.data is None and cfg.eval_split is None):
        eval_rows = data.load_mixture(cfg.eval_data or bundled_eval, cfg.columns, cfg.seed)
    elif isinstance(cfg.eval_split, str) and not _is_number(cfg.eval_split):
        eval_rows = data.load_mixture(source, cfg.columns, cfg.seed, split=cfg.eval_split)
    else:
        size = float(cfg.eval_split) if cfg.eval_split is not None else _default_holdout(len(rows), cfg)
        if size >= 1 and size >= len(rows) or 0 < size < 1 and round(size * len(rows)) < 1:
            raise PeftkitError(f"--eval-split {cfg.eval_split} holds out {'all' if size >= 1 else 'none'} of the "
                               f"{len(rows)} training rows; give a share in (0, 1) or fewer than {len(rows)} rows")
        if size:
            parts = rows.train_test_split(test_size=int(size) if size >= 1 else size, seed=cfg.seed)
            rows, eval_rows = parts["train"], parts["test"]
    return objective.load_splits(rows, eval_rows, tokenizer, cfg, prompt_format)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _default_holdout(n_rows: int, cfg: TrainConfig) -> int:
    return 0 if n_rows < 20 else min(cfg.eval_examples, max(1, n_rows // 20))


def plan_fn(split: Any, cfg: TrainConfig, shuffle: bool = True) -> Callable[[int], list[list[int]]]:
    """epoch -> that epoch's micro-batches (deterministic in seed and epoch, identical on every process)."""
    from peftkit import data

    assert cfg.batch_size is not None and cfg.max_length is not None, "a resolved config (resolve_defaults)"
    batch_size, max_length = cfg.batch_size, cfg.max_length
    cache: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = data.batches(split.lengths, batch_size=batch_size, max_length=max_length,
                                        packing=cfg.packing, shuffle=shuffle, seed=cfg.seed, epoch=epoch,
                                        batch_tokens=cfg.batch_tokens)
        return cache[epoch]

    return plan


def collate_fn(split: Split, pad_token_id: int, packing: bool, device: Any,
               share_prefix: bool = False) -> Callable[[list[int]], dict]:
    """indices -> a model batch (input_ids, labels, attention_mask or position_ids) on `device`; with share_prefix,
    also the length of the prompt prefix the rows share (`shared_prefix`, when long enough to compute once)."""
    from peftkit import data

    def collate(indices: list[int]) -> dict[str, Any]:
        examples = [{"input_ids": split.input_ids[i], "labels": split.labels[i]} for i in indices]
        batch: dict[str, Any] = {k: v.to(device) for k, v in data.collate(examples, pad_token_id, packing).items()
                                 if isinstance(v, torch.Tensor)}
        if share_prefix and (prefix := shared_length([e["input_ids"] for e in examples],
                                                     [e["labels"] for e in examples])):
            batch[SHARED_KEY] = prefix
        return batch

    return collate

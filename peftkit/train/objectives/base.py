"""The `Objective` interface and the registry of objectives (no torch here: `peftkit train --help` builds its flags
from the objectives' declared options, and `TrainConfig` validates with them before anything loads).

An objective is one module that subclasses `Objective` and is registered (the built-ins by this package's
`__init__`; plugins through the `peftkit.objectives` entry-point group, or `register_objective`). It declares:

- `name`, `options` (`core.options.Option`: type, default, bounds, help, flags, other tools' aliases);
- what its rows look like and how they load (`accepts`, `load_splits`, `bundled`: the data with no `--data`,
  `bundled_defaults`: that task's step count and batch size);
- `rows_per_example` (a DPO pair is two model rows: the memory report and `--batch-tokens` count them);
- `shares_prefix` (whether `speed.should_share_prefix` may mark shared prompt prefixes in its batches),
  `needs_generation` (online objectives sample from the model while training), and `rollout`: how, for the
  memory estimate;
- `check(cfg, method)`: the combinations it refuses;
- `start(session, loss_path) -> ObjectiveRun`: the per-run part the loop talks to (see `ObjectiveRun`).

Nothing outside an objective's own module compares objective names (tests/train/test_objective_names.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from peftkit.core.options import Option
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.memory.generation import Rollout
# `cfg` (a TrainConfig) and `session` (a run.Session) stay Any here: config.py and run.py import this module (a
# TYPE_CHECKING import back is a cycle, tests/core/test_import_graph.py); objectives' modules annotate them.

ENTRY_POINT_GROUP = "peftkit.objectives"


class ObjectiveRun:
    """An objective inside one training run, built by `Objective.start`. The loop calls, per optimizer step:

        batches = run.step_batches(model, indices_per_micro)   # this process's micro-batches of the step
        n = sum(run.count(b) for b in batches)                 # summed over processes: the step's normaliser
        loss = run.loss(model, batch, loss_path)               # per micro-batch: the SUM of its losses
        record.update(run.stats(accelerator))                  # per-step metrics (means over all processes)

    and the evaluation `run.evaluate(model, loss_path)` (held-out score) / `run.describe(result)` (one line).
    An online objective (e.g. GRPO) generates in `step_batches`: it samples completions of the step's prompts from
    the step's model, scores them and returns the micro-batches to train on (maybe again for later steps).
    """

    def step_batches(self, model: Any, indices_per_micro: list[list[int]]) -> list[dict[str, Any]]:
        """This process's micro-batches of one optimizer step, on the run's device."""
        raise NotImplementedError

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> Any:
        """The SUM of the micro-batch's losses (0-d fp32 tensor); the loop divides by the step's `count`."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> int:
        """What the step's summed loss is normalised by: this micro-batch's share (targets, pairs, rows)."""
        raise NotImplementedError

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        """Metrics of the steps since the last call, over every process (merged into each train record)."""
        return {}

    def evaluate(self, model: Any, loss_path: str) -> dict[str, Any]:
        """Held-out score on the eval split (the same figures before and after training); with `exact_match`
        when it derives that from its own generations (run.py adds it otherwise)."""
        raise NotImplementedError

    def describe(self, result: dict[str, Any]) -> str:
        """One line for `eval before` / `eval after`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What each checkpoint keeps for an exact `--resume` beyond model, optimizer, schedule and RNGs ({}: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned when the checkpoint was written ({}: nothing saved)."""


class CollatedRun(ObjectiveRun):
    """The run of an offline objective (SFT, the pair objectives, KTO), whose data is tokenised before training:
    each micro-batch is `collate(indices)`, and the held-out score runs over `eval_plan` with `eval_collate`."""

    def __init__(self, collate: Callable[[list[int]], dict[str, Any]],
                 eval_collate: Callable[[list[int]], dict[str, Any]] | None = None,
                 eval_plan: list[list[int]] | None = None) -> None:
        self.collate, self.eval_collate, self.eval_plan = collate, eval_collate, eval_plan or []

    def step_batches(self, model: Any, indices_per_micro: list[list[int]]) -> list[dict[str, Any]]:
        return [self.collate(indices) for indices in indices_per_micro]

    def score_held_out(self, model: Any, score: Callable[[Any, dict[str, Any], str], Any], loss_path: str) -> None:
        """`score(model, batch, loss_path)` on each held-out micro-batch, in eval mode (restored after), no grad."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for indices in self.eval_plan:
                    assert self.eval_collate is not None  # start() gives an eval plan only with its collate
                    score(model, self.eval_collate(indices), loss_path)
        finally:
            model.train(was_training)


def exact_match_text(result: dict[str, Any]) -> str:
    """', exact match 84% of 50' when the evaluation has one (run.py adds it where the split has references)."""
    em = result.get("exact_match")
    return f", exact match {em:.0%} of {result['n']}" if em is not None else ""


class Objective:
    """A training objective (see the module docstring). Subclasses set the class attributes and implement
    `load_splits` and `start`; `check` and `defaults` have working defaults."""

    name: str = ""
    options: tuple[Option, ...] = ()
    rows_per_example: int = 1          # model rows per example (a preference pair: 2)
    shares_prefix: bool = False        # batches may mark a prompt prefix all rows share (shared_prefix.py)
    needs_generation: bool = False     # samples from the model while training (online objectives)
    row_shape: str = ""                # the rows it trains on, for messages: "{prompt, chosen, rejected} rows"
    bundled_defaults: dict[str, Any] = {}  # the bundled task's max_steps / batch_size (no --data)

    def bundled(self) -> tuple[str, str]:
        """(train file, eval file) of the task used when there is no --data."""
        raise NotImplementedError

    def accepts(self, column_names: list[str]) -> bool:
        """Whether rows with these columns are this objective's (for "train on them with --objective ...")."""
        return False

    def load_splits(self, rows: Any, eval_rows: Any, tokenizer: Any, cfg: Any, prompt_format: dict) -> tuple:
        """(train split, eval split or None, a description of the format) from `datasets` rows; raise
        PeftkitError for rows of another shape. A split has `lengths`, `references` and `len`."""
        raise NotImplementedError

    def tokenized_splits(self, rows: Any, eval_rows: Any, eval_examples: int, kind: str, columns: str,
                         tokenize: Callable[[Any, str], Any]) -> tuple[Any, Any]:
        """(train, held-out or None) for an objective with its own rows: rows it does not `accept` are refused
        (`kind` `columns`: "preference rows", "{prompt, chosen, rejected}"), the first `eval_examples` eval rows
        are kept, and each part is `tokenize(rows, "training" | "eval")`."""
        if not self.accepts(rows.column_names):
            raise PeftkitError(f"--objective {self.name} needs {kind} {columns}; the data has the columns "
                               f"{rows.column_names}")
        train = tokenize(rows, "training")
        if eval_rows is None or not len(eval_rows):
            return train, None
        if not self.accepts(eval_rows.column_names):
            raise PeftkitError(f"the eval data needs {kind} too; it has the columns {eval_rows.column_names}")
        return train, tokenize(eval_rows.select(range(min(len(eval_rows), eval_examples))), "eval")

    def check(self, cfg: Any, method: Method) -> None:
        """Refuse option combinations that cannot work (cfg: a TrainConfig, method: its Method)."""

    def defaults(self, cfg: Any) -> dict[str, Any]:
        """TrainConfig fields left unset that this objective fills: the bundled task's step count and batch size
        when there is no --data (an explicit --epochs wins over the step count)."""
        if cfg.data is not None:
            return {}
        fill = {k: v for k, v in self.bundled_defaults.items() if getattr(cfg, k) is None}
        if cfg.epochs != 1.0:
            fill.pop("max_steps", None)
        return fill

    def rows(self, cfg: Any) -> int:
        """Model rows each example of a resolved config `cfg` becomes in training (the memory report's rows per
        micro-batch): `rows_per_example`, unless the count depends on an option (GRPO: its num_generations)."""
        return self.rows_per_example

    def rollout(self, cfg: Any) -> Rollout | None:
        """How an objective that samples (`needs_generation`) samples before each step of a resolved config
        `cfg`, for the memory estimate (peftkit.memory.generation.Rollout: prompts at once, completions each, new
        tokens, reference pass); None for an objective that does not sample."""
        return None

    def option_defaults(self) -> dict[str, Any]:
        """{option name: its declared default}."""
        return {option.name: option.default for option in self.options}

    def start(self, session: Any, loss_path: str) -> ObjectiveRun:
        """The per-run part (session: run.Session, model on its device, before accelerate prepares it)."""
        raise NotImplementedError


_REGISTRY: dict[str, Objective] = {}
_loaded = False


def register_objective(objective: Objective | type[Objective]) -> Objective:
    """Add an objective (an instance or a class) under its `name`; a second one with the same name replaces it."""
    if isinstance(objective, type):
        objective = objective()
    if not isinstance(objective, Objective) or not objective.name:
        raise PeftkitError(f"an objective must be a named peftkit Objective, got {objective!r:.80}")
    _REGISTRY[objective.name] = objective
    return objective


def _load() -> None:
    """Register the `peftkit.objectives` entry points, once. The built-ins are already registered: Python runs
    this package's `__init__` (which imports them) before this module, however it is imported."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_objective(point.load())
        except Exception as exc:  # noqa: BLE001  (a plugin may raise anything; say which one failed)
            raise PeftkitError(f"the objective plugin {point.name!r} ({point.value}) failed to load: {exc}") from None


def get_objective(name: str) -> Objective:
    """The registered objective `name`; PeftkitError listing the registered ones otherwise."""
    _load()
    if name not in _REGISTRY:
        raise PeftkitError(f"objective must be one of {', '.join(objective_names())}; got {name!r}")
    return _REGISTRY[name]


def objective_names() -> list[str]:
    """Registered objective names, in registration order."""
    _load()
    return list(_REGISTRY)


def declared_options() -> list[Option]:
    """Every registered objective's options, a name several objectives declare (e.g. `beta`) listed once: the
    first declaration, its help naming each declaring objective with its default (the flag's help), unset by
    default (each objective fills its own default in `resolve_defaults`)."""
    _load()
    declared: dict[str, list[tuple[str, Option]]] = {}
    for objective in _REGISTRY.values():
        for option in objective.options:
            declared.setdefault(option.name, []).append((objective.name, option))
    return [replace(_widest([o for _, o in pairs]), default=None, help=_help(pairs)) for pairs in declared.values()]


def _widest(options: list[Option]) -> Option:
    """The first declaration with bounds that admit every declaration's values (DPO's beta > 0, GRPO's beta >= 0:
    the flag takes 0 and each objective checks its own bounds in `resolve_options`)."""
    first = options[0]
    lows = [o for o in options if o.low is not None]
    highs = [o for o in options if o.high is not None]
    if len(lows) < len(options) or len(highs) < len(options):
        return replace(first, low=None, high=None) if len(options) > 1 else first
    low = min(o.low for o in lows if o.low is not None)
    high = max(o.high for o in highs if o.high is not None)
    return replace(first, low=low, high=high, low_open=all(o.low_open for o in lows if o.low == low),
                   high_open=all(o.high_open for o in highs if o.high == high))


def _help(pairs: list[tuple[str, Option]]) -> str:
    """One help text for an option several objectives declare: theirs, each with its objective and default."""
    if len({option.help for _, option in pairs}) == 1:
        names = ", ".join(name for name, _ in pairs)
        return f"{pairs[0][1].help.rstrip('.')} (--objective {names}; default {pairs[0][1].default})."
    return " ".join(f"{name}: {option.help.rstrip('.')}{_default(option)}." for name, option in pairs)


def _default(option: Option) -> str:
    """' (default X)' unless the help already names it."""
    return "" if "default" in option.help else f" (default {option.default})"


def declaring(name: str) -> list[str]:
    """The objectives that declare the option `name`."""
    _load()
    return [o.name for o in _REGISTRY.values() if any(opt.name == name for opt in o.options)]


def option_aliases() -> dict[str, str]:
    """{other tools' recipe key: option name} over every objective (LLaMA-Factory's `pref_beta` -> `beta`)."""
    return {alias: option.name for option in declared_options() for alias in option.aliases}


def resolve_options(objective: Objective, given: dict[str, Any]) -> dict[str, Any]:
    """The objective's option values: `given` checked by each declaration, the rest its defaults. A value for an
    option it does not declare is refused, naming the objectives that do."""
    own = {option.name: option for option in objective.options}
    for key in given:
        if key not in own:
            users = declaring(key)
            where = f"an option of {', '.join(sorted(users))}; add --objective {users[0]}" if users else \
                "not an option of any objective"
            raise PeftkitError(f"--{key.replace('_', '-')} is {where} (the objective is {objective.name})")
    return {name: option.check(given[name]) if name in given else option.default for name, option in own.items()}


def names_of(objectives: Iterable[Objective]) -> str:
    """'dpo, orpo or simpo' for a message."""
    names = [o.name for o in objectives]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

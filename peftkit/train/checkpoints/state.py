"""Nested state dicts (optimizer, scheduler, RNG) as safetensors + JSON: nothing to unpickle, nothing that runs code.

`flatten_state` splits a nested value into its tensors, keyed by their path joined with dots (the AdamW moment of
parameter 0 is `state.0.exp_avg`), and a JSON skeleton: the same structure with each tensor replaced by
`{"__tensor__": "<key>"}`, each tuple by `{"__tuple__": [...]}` and each dict whose keys are not all plain strings
(the optimizer's int parameter indices) by `{"__items__": [[key, value], ...]}`. `unflatten_state` rebuilds the
exact value (tuples stay tuples, int keys stay ints), so `load_state_dict` of what `save_state_dict` wrote
round-trips torch's state dicts. A state file `<stem>.json` is `{"format": 1, "state": <skeleton>}`; its tensors
are in `<stem>.safetensors`.

Reading never trusts a file: a missing file, one that is not safetensors / JSON, or a skeleton that does not fit its
tensors is a one-line PeftkitError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object, save_tensors

FORMAT = 1
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
SCALARS = (bool, int, float, str, type(None))


def flatten_state(value: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """({dotted path: CPU tensor}, JSON skeleton) of a nested dict / list / tuple of tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(value, "", tensors)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "value"
        if key in tensors:
            raise PeftkitError(f"two tensors of the state would be saved as {key!r}")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {TENSOR: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, list | tuple):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, _join(path, k), tensors) for k, v in value.items()}
        if not all(isinstance(k, SCALARS) for k in value):
            raise PeftkitError(f"the state at {path or 'top level'!r} has keys that JSON cannot hold")
        return {ITEMS: [[k, _encode(v, _join(path, k), tensors)] for k, v in value.items()]}
    raise PeftkitError(f"the state at {path or 'top level'!r} is a {type(value).__name__}, which a checkpoint "
                       "cannot hold (only tensors, numbers, strings, lists and dicts)")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    """The value `flatten_state` split into `skeleton` and `tensors`; a skeleton that does not fit is an error."""
    used: set[str] = set()
    value = _decode(skeleton, tensors, used, file)
    unused = sorted(set(tensors) - used)
    if unused:
        raise PeftkitError(f"{file} does not match {file.with_suffix('.safetensors')}: its tensors {unused[:3]} "
                           "belong to no entry")
    return value


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str], file: Path) -> Any:
    if isinstance(node, list):
        return [_decode(n, tensors, used, file) for n in node]
    if not isinstance(node, dict):
        return node
    marker = next((k for k in node if k.startswith("__")), None)
    if marker is None:
        return {k: _decode(v, tensors, used, file) for k, v in node.items()}
    inner = node[marker]
    if len(node) == 1 and marker == TENSOR and isinstance(inner, str):
        if inner not in tensors:
            raise PeftkitError(f"{file} names tensor {inner!r}, which {file.with_suffix('.safetensors')} does not hold")
        used.add(inner)
        return tensors[inner]
    if len(node) == 1 and marker == TUPLE and isinstance(inner, list):
        return tuple(_decode(n, tensors, used, file) for n in inner)
    if len(node) == 1 and marker == ITEMS and isinstance(inner, list) and all(
            isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], SCALARS) for kv in inner):
        return {k: _decode(v, tensors, used, file) for k, v in inner}
    raise PeftkitError(f"{file} holds an entry {marker!r} that is not a valid tensor, tuple or items entry")


def save_state_dict(folder: Path, stem: str, state: Any, with_tensors: bool = True) -> None:
    """Write `state` as `<stem>.json` (+ `<stem>.safetensors` when `with_tensors`; otherwise it must hold none)."""
    tensors, skeleton = flatten_state(state)
    if with_tensors:
        save_tensors(tensors, folder / f"{stem}.safetensors")
    elif tensors:
        raise PeftkitError(f"the {stem} state holds tensors ({sorted(tensors)[:3]}), which {stem}.json cannot hold")
    (folder / f"{stem}.json").write_text(json.dumps({"format": FORMAT, "state": skeleton}, indent=2) + "\n")


def load_state_dict(folder: Path, stem: str, what: str, with_tensors: bool = True) -> Any:
    """The state `save_state_dict` wrote (never unpickled); `what` says what the files should hold."""
    tensors = read_tensors(folder / f"{stem}.safetensors", what) if with_tensors else {}
    file = folder / f"{stem}.json"
    saved = read_json(file, what)
    if saved.get("format") != FORMAT or "state" not in saved:
        raise PeftkitError(f"{file} is not a peftkit state file of format {FORMAT} (it should hold {what})")
    return unflatten_state(saved["state"], tensors, file)


def read_tensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `file` (CPU); missing or unreadable: a PeftkitError naming it."""
    if not file.is_file():
        raise PeftkitError(f"{file} is missing; it should hold {what}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise PeftkitError(f"{file} is not a valid safetensors file ({one_line(exc)}); it should hold {what}") from None


def read_json(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in `file`; missing or unreadable: a PeftkitError naming it."""
    if not file.is_file():
        raise PeftkitError(f"{file} is missing; it should hold {what}")
    try:
        return read_json_object(file, what)
    except OSError as exc:
        raise PeftkitError(f"{file} cannot be read ({one_line(exc)}); it should hold {what}") from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__

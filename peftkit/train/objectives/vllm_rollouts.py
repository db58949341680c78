"""GRPO's rollouts on a running vLLM server (`--use-vllm`): the same `Rollouts` as rollouts.sample, sampled there.

The trainer keeps the model and its adapter; the server (a stock `vllm serve BASE --enable-lora` with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) serves the same base. Per rollout batch (`VllmSampler.__call__`):

1. the current adapter is written in PEFT's format (`io.adapters.save_adapter`) to a fresh folder under
   `--vllm-adapter-dir` (default RUN/vllm-adapters), which the server must be able to read at the same path;
2. POST /v1/load_lora_adapter {lora_name, lora_path} loads it under a fresh name (vLLM refuses a name it holds, and
   a new name is a new adapter id, so nothing stale is served from its cache);
3. POST /v1/completions with that name as `model`, the prompts as token ids, `n` = num_generations, temperature,
   top_p, max_tokens = max_completion_length, a seed drawn from the run's generator (none when greedy), top_k /
   min_p / repetition_penalty at their neutral values (else the server's generation-config defaults apply), the end
   tokens as `stop_token_ids`, and `return_token_ids` (vLLM >= 0.10.2): each choice's `token_ids` are the sampled
   ids, the end token included;
4. POST /v1/unload_lora_adapter drops the name (vLLM's engine keeps at most --max-cpu-loras adapters cached, the
   least recently used evicted) and the folder is deleted: nothing accumulates on the server or disk.

The completions are laid out exactly as rollouts.sample lays them out (the prompts by evaluation/generation.layout,
the completion cut after its first end token, padded with the pad id, the mask 1 up to and including the end), so
the loss code is unchanged. Why not TRL's way: TRL's GRPOTrainer (vllm_mode="server") talks to its own `trl
vllm-serve` and pushes the merged weights over NCCL (a CUDA device on both sides); a LoRA adapter folder works with
a stock server and a trainer on any device. `start` checks the server and the adapter before the first step.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.io.adapters import save_adapter
from peftkit.train.evaluation.generation import layout
from peftkit.train.objectives.rollouts import Rollouts, Sampling

log = logging.getLogger(__name__)
VLLM_OPTIONS = ("vllm_server_base_url", "vllm_server_timeout", "vllm_adapter_dir")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts (vllm/config/lora.py)
NEUTRAL = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}  # -1: no top-k in every vLLM version
SEED_HIGH = 2 ** 62
DEFAULT_URL, DEFAULT_TIMEOUT = "http://localhost:8000", 240.0  # the options' defaults (TRL's timeout)


def check_options(options: dict[str, Any], trains_base: bool, sharding: str | None) -> None:
    """The refusals that need no model (Grpo.check): vLLM options without --use-vllm, a URL that is not http(s),
    a method with no adapter to serve, sharded training (`sharding`: "--fsdp" or "--deepspeed"; each process would
    write and load its own adapter)."""
    if not options.get("use_vllm"):
        given = [name for name in VLLM_OPTIONS if options.get(name) is not None]
        if given:
            raise PeftkitError(f"--{given[0].replace('_', '-')} sets up rollouts on a vLLM server; add --use-vllm "
                               "or drop it")
        return
    url = options.get("vllm_server_base_url") or DEFAULT_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PeftkitError(f"--vllm-server-base-url {url!r} is not an http(s) URL; give the server's address, e.g. "
                           "http://localhost:8000")
    if trains_base:
        raise PeftkitError("--use-vllm loads the trained adapter into the server as a LoRA; this method trains the "
                           "model's own weights (no adapter); use an adapter method")
    if sharding:
        raise PeftkitError(f"--use-vllm with {sharding}: every process would write and load its own adapter; drop "
                           f"--use-vllm (rollouts are then sampled by the sharded model itself) or {sharding}")


class VllmSampler:
    """rollouts.sample's signature and result, sampled on a vLLM server (see the module docstring)."""

    def __init__(self, base_url: str, timeout: float, folder: Path, model_path: str) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout, self.folder, self.model_path = timeout, folder, model_path
        self.run_id, self.count, self.rank = uuid.uuid4().hex[:8], 0, 16

    # -- before the first step --------------------------------------------------------------------------------
    def start(self, model: torch.nn.Module) -> VllmSampler:
        """Check that vLLM can serve this adapter (export/portability's vLLM verdict), wait (up to the timeout) for
        the server to answer, and load and unload the adapter once: the endpoints and the folder work."""
        name, path = self._write(model)
        try:
            self._portable(path)
            self._wait()
            self._load(name, path)
            self._unload(name)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        log.info("GRPO rollouts on the vLLM server at %s (adapters written under %s)", self.url, self.folder)
        return self

    def _wait(self) -> None:
        """Ask /v1/models once a second until the server answers (it may still be loading) or the timeout ends."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                status, body = self._send("GET", "/v1/models", None, max(deadline - time.monotonic(), 0.1))
                break
            except _Unreachable as exc:
                if time.monotonic() + 1 > deadline:
                    raise PeftkitError(f"no vLLM server answered at {self.url} within {self.timeout:g} s "
                                       f"({exc}); start one serving the same base model: `{self.serve_command()}` "
                                       "(or point --vllm-server-base-url at yours)") from None
                time.sleep(1)
        self._check("/v1/models", status, body)

    def _portable(self, path: Path) -> None:
        from peftkit.export.portability import check_portability

        verdict = next(v for v in check_portability(path).verdicts if v.consumer == "vLLM")
        if verdict.status == "no":
            raise PeftkitError(f"--use-vllm: vLLM cannot serve this adapter ({'; '.join(verdict.reasons)}); train a "
                               "plain LoRA (no DoRA, no modules_to_save) or sample in process (drop --use-vllm)")
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        rank = max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])
        self.rank = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])

    def serve_command(self) -> str:
        """The `vllm serve` line this run needs (runtime LoRA updating, LoRA on, the rank, this URL's port)."""
        port = urllib.parse.urlsplit(self.url).port or 8000
        return (f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve {shlex.quote(self.model_path)} --enable-lora "
                f"--max-lora-rank {self.rank} --port {port}")

    # -- one rollout batch --------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, prompts: list[list[int]], s: Sampling, pad_id: int,
                 end_ids: list[int], generator: torch.Generator | None = None) -> Rollouts:
        """`s.num_generations` completions of each prompt, sampled by the server with the model's current adapter."""
        started = time.perf_counter()
        seed = None
        if generator is not None and s.temperature > 0:
            seed = int(torch.randint(0, SEED_HIGH, (1,), generator=generator, device=generator.device))
        name, path = self._write(model)
        try:
            self._load(name, path)
            try:
                choices = self._complete(name, prompts, s, end_ids, seed)
            finally:
                self._unload(name)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # as rollouts.sample lays the prompts out (its prefix forward without dropout)
        try:
            inputs, _ = layout(model, prompts, [], pad_id, device)  # its prompt rows; the prefix cache is unused
        finally:
            model.train(was_training)
        completion, mask = _completion_rows(choices, end_ids, s.max_completion_length, pad_id, device)
        group = s.num_generations
        return Rollouts(inputs["input_ids"].repeat_interleave(group, 0),
                        inputs["attention_mask"].repeat_interleave(group, 0), completion, mask,
                        time.perf_counter() - started, int(mask.sum()))

    def _write(self, model: torch.nn.Module) -> tuple[str, Path]:
        """A fresh adapter name, and the active adapter written under it (absolute: the server reads this path)."""
        self.count += 1
        name = f"peftkit-{self.run_id}-{self.count}"
        return name, save_adapter(model, self.folder.resolve() / name)

    def _load(self, name: str, path: Path) -> None:
        status, body = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                                  check=False)
        if status == 404 and "error" not in body and "message" not in body:  # FastAPI's own 404: no such route
            raise PeftkitError(f"the vLLM server at {self.url} has no /v1/load_lora_adapter: runtime LoRA updating "
                               f"is off; restart it as `{self.serve_command()}`")
        if status != 200:
            raise PeftkitError(f"the vLLM server at {self.url} could not load the adapter {str(path)!r} (HTTP "
                               f"{status}: {_message(body)}); it must read that folder (--vllm-adapter-dir on a "
                               f"shared filesystem) and run as `{self.serve_command()}`")

    def _unload(self, name: str) -> None:
        status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, check=False)
        if status != 200:  # housekeeping: the next batch loads under another name anyway
            log.warning("the vLLM server at %s did not unload adapter %s (HTTP %s: %s)", self.url, name, status,
                        _message(body))

    def _complete(self, name: str, prompts: list[list[int]], s: Sampling, end_ids: list[int],
                  seed: int | None) -> list[list[int]]:
        """The token ids of every completion, prompt after prompt, num_generations each."""
        request: dict[str, Any] = {"model": name, "prompt": prompts, "n": s.num_generations,
                                   "max_tokens": s.max_completion_length, "temperature": s.temperature,
                                   "top_p": s.top_p, **NEUTRAL, "stop_token_ids": end_ids, "return_token_ids": True}
        if seed is not None:
            request["seed"] = seed
        _, body = self._call("POST", "/v1/completions", request)
        choices = body.get("choices") if isinstance(body, dict) else None
        want = len(prompts) * s.num_generations
        if not isinstance(choices, list) or len(choices) != want:
            got = len(choices) if isinstance(choices, list) else "no"
            raise PeftkitError(f"the vLLM server at {self.url} returned {got} completions for {len(prompts)} prompts "
                               f"x {s.num_generations} generations; expected {want}")
        ids: list[list[int]] = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            tokens = choice.get("token_ids") if isinstance(choice, dict) else None
            if not (isinstance(tokens, list) and all(isinstance(i, int) for i in tokens)):
                raise PeftkitError(f"the vLLM server at {self.url} returned completions without token_ids; it "
                                   "needs vLLM 0.10.2 or newer (the return_token_ids field)")
            ids.append(tokens)
        return ids

    def _call(self, method: str, path: str, payload: dict | None, check: bool = True) -> tuple[int, Any]:
        """(HTTP status, the JSON body or its text) of one request; PeftkitError when there is no answer within
        the timeout or, with `check`, the status is not 200."""
        try:
            status, body = self._send(method, path, payload, self.timeout)
        except _Unreachable as exc:
            raise PeftkitError(f"the vLLM server at {self.url} did not answer {path} within {self.timeout:g} s "
                               f"({exc}); raise --vllm-server-timeout or check the server") from None
        if check:
            self._check(path, status, body)
        return status, body

    def _send(self, method: str, path: str, payload: dict | None, timeout: float) -> tuple[int, Any]:
        """One JSON request; `_Unreachable` when nothing answers (refused, unresolved, timed out)."""
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise _Unreachable(str(getattr(exc, "reason", exc))) from None
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def _check(self, path: str, status: int, body: Any) -> None:
        """One line naming the request and vLLM's message, for an answer that is not 200."""
        if status != 200:
            raise PeftkitError(f"the vLLM server at {self.url} answered {path} with HTTP {status}: {_message(body)}")


class _Unreachable(Exception):
    """No answer at all (refused, unresolved, timed out): the server may still be starting."""


def _message(body: Any) -> str:
    """vLLM's error message ({"error": {"message"}}, or {"message"} before 0.10), else the body, on one line."""
    found = body
    if isinstance(body, dict):
        inner = body.get("error")
        found = inner.get("message") if isinstance(inner, dict) else body.get("message") or body.get("detail") or body
    return " ".join(str(found).split())[:300]


def _completion_rows(choices: list[list[int]], end_ids: list[int], longest: int, pad_id: int,
                     device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """completion_ids [N, C] and completion_mask [N, C] as rollouts.sample builds them: each row cut after its first
    end token (kept, mask 1), pad after; C is the longest row (at most `longest`)."""
    ends = set(end_ids)
    rows = []
    for ids in choices:
        cut = next((i + 1 for i, token in enumerate(ids) if token in ends), len(ids))
        rows.append(ids[:min(cut, longest)])
    width = max(max(len(r) for r in rows), 1)
    completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        completion[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids, dtype=torch.long), 1
    return completion.to(device), mask.to(device)


def connect(session: Any, options: dict[str, Any]) -> VllmSampler:
    """The sampler of a run with --use-vllm, checked against its server (grpo_run.start_run)."""
    folder = options.get("vllm_adapter_dir")
    model_path = str(getattr(session.model, "name_or_path", "") or session.cfg.model or "MODEL")
    sampler = VllmSampler(options.get("vllm_server_base_url") or DEFAULT_URL,
                          options.get("vllm_server_timeout") or DEFAULT_TIMEOUT,
                          Path(folder) if folder else session.folder.vllm_adapters, model_path)
    return sampler.start(session.model)

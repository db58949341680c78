"""GRPO's rollouts on a vLLM server (--use-vllm), against a stub server in a thread: vLLM's endpoints and JSON
shapes (/v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/completions with return_token_ids), served
by a tiny model with the loaded adapter applied by peftkit and decoded by HF generate. No network, no vLLM."""

from __future__ import annotations

import copy
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.errors import PeftkitError
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora.config import LoraConfig
from peftkit.train.config import load_train_config
from peftkit.train.objectives.rollouts import Sampling, sample
from peftkit.train.objectives.vllm_rollouts import VllmSampler
from peftkit.train.run import train
from tests.cli_errors import cli_error_line
from tests.tiny import perturb_adapter, save_tiny_checkpoint, tiny_model

PROMPTS = [[5] * 18 + [7, 8, 9], [5] * 18 + [11, 12]]  # a shared prefix: rollouts.sample lays it out once


class Stub:
    """vLLM's OpenAI-compatible server, as far as --use-vllm uses it. `mode`: "ok", "no_runtime_lora" (the routes
    absent, FastAPI's 404), "unreadable" (loads after the first fail: vLLM cannot read the folder), "few" (one
    completion short), "error" (HTTP 500, vLLM's error JSON), "no_ids" (a vLLM before return_token_ids)."""

    def __init__(self, base: torch.nn.Module, mode: str = "ok") -> None:
        self.base, self.mode = base, mode
        self.adapters: dict[str, torch.nn.Module] = {}
        self.loaded: list[tuple[str, str, dict[str, torch.Tensor]]] = []   # name, path, tensors read at load
        self.unloaded: list[str] = []
        self.completions: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model", "root": "tiny"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*stub.answer(self.path, body))

            def _send(self, status: int, payload: Any) -> None:
                raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, Any]:
        lora = path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
        if lora and self.mode == "no_runtime_lora":
            return 404, {"detail": "Not Found"}
        if path == "/v1/load_lora_adapter" and self.mode == "unreadable" and self.loaded:  # vLLM 0.34's answer
            return 404, {"error": {"message": f"Loading lora {body['lora_name']} failed: No adapter found for "
                                              f"{body['lora_path']}", "type": "NotFoundError", "param": None,
                                   "code": 404}}
        if path == "/v1/load_lora_adapter":
            tensors = load_file(Path(body["lora_path"]) / "adapter_model.safetensors")
            self.loaded.append((body["lora_name"], body["lora_path"], tensors))
            self.adapters[body["lora_name"]] = peftkit.load_adapter(copy.deepcopy(self.base), body["lora_path"])
            return 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully."
        if path == "/v1/unload_lora_adapter":
            self.unloaded.append(body["lora_name"])
            del self.adapters[body["lora_name"]]
            return 200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
        self.completions.append(body)
        if self.mode == "error":
            return 500, {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "param": None,
                                   "code": 500}}
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop", "stop_reason": None,
                    "prompt_token_ids": None, "token_ids": None if self.mode == "no_ids" else ids}
                   for i, ids in enumerate(self.generate(body))]
        return 200, {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": choices[:-1] if self.mode == "few" else choices,
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def generate(self, body: dict) -> list[list[int]]:
        """n completions of each prompt by HF generate, each up to and including its first stop token (vLLM's
        token_ids)."""
        model, ends = self.adapters[body["model"]], body["stop_token_ids"]
        greedy = body["temperature"] == 0
        if not greedy:
            torch.manual_seed(body["seed"])
        out = []
        for prompt in body["prompt"]:
            ids = torch.tensor([prompt] * body["n"])
            rows = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                  max_new_tokens=body["max_tokens"], eos_token_id=ends, pad_token_id=0, top_k=None,
                                  **({} if greedy else {"temperature": body["temperature"], "top_p": body["top_p"]}))
            for row in rows[:, ids.shape[1]:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
                out.append(row[:cut])
        return out


@pytest.fixture
def adapted():
    """(a tiny Llama with a perturbed LoRA adapter, its base before the adapter)."""
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    peftkit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapter(model)
    return model, base


def test_greedy_rollouts_equal_the_in_process_sampler_and_the_protocol(adapted, tmp_path):
    model, base = adapted
    stub = Stub(base)
    sampler = VllmSampler(stub.url + "/v1/", 30, tmp_path / "shared", "tiny").start(model)
    end = int(sample(model, PROMPTS, Sampling(1, 6, 0.0), 0, [1]).completion_ids[0, 2])  # greedy's third token
    greedy = Sampling(num_generations=2, max_completion_length=6, temperature=0.0)
    got, want = sampler(model, PROMPTS, greedy, 0, [end]), sample(model, PROMPTS, greedy, 0, [end])
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    assert got.tokens == want.tokens and (got.completion_mask == 0).any()  # a row ended at `end`, padded after
    reference = load_file(peftkit.save_adapter(model, tmp_path / "ref") / "adapter_model.safetensors")
    (probe, _, _), (name, path, tensors) = stub.loaded  # the start's probe, then this batch's adapter
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert Path(path).is_absolute() and Path(path).parent == (tmp_path / "shared").resolve()
    request = stub.completions[0]
    assert request["model"] == name != probe and request["prompt"] == PROMPTS and "seed" not in request
    assert {k: request[k] for k in ("n", "max_tokens", "temperature", "top_p", "return_token_ids")} == \
        {"n": 2, "max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "return_token_ids": True}
    assert request["stop_token_ids"] == [end] and request["top_k"] == -1 and request["repetition_penalty"] == 1.0
    assert stub.unloaded == [probe, name] and not stub.adapters and not list((tmp_path / "shared").iterdir())
    sampled = Sampling(num_generations=3, max_completion_length=4, temperature=0.7, top_p=0.9)
    seeds = []
    for _ in range(2):
        sampler(model, PROMPTS, sampled, 0, [end], torch.Generator().manual_seed(3))
        seeds.append(stub.completions[-1]["seed"])
    assert seeds[0] == seeds[1] and isinstance(seeds[0], int)  # drawn from the run's generator
    assert stub.completions[-1]["temperature"] == 0.7 and stub.completions[-1]["top_p"] == 0.9


@pytest.mark.parametrize(("mode", "message"), [
    ("no_runtime_lora", r"has no /v1/load_lora_adapter: runtime LoRA updating is off; restart it as "
                        r"`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve tiny --enable-lora --max-lora-rank 8"),
    ("unreadable", r"could not load the adapter .* \(HTTP 404: Loading lora peftkit-\w+-2 failed: No adapter found "
                   r"for .*\); it must read that folder \(--vllm-adapter-dir on a shared filesystem\)"),
    ("gone", r"did not answer /v1/load_lora_adapter within 30 s \(.*\); raise --vllm-server-timeout"),
    ("few", "returned 3 completions for 2 prompts x 2 generations; expected 4"),
    ("error", "answered /v1/completions with HTTP 500: CUDA out of memory"),
    ("no_ids", "returned completions without token_ids; it needs vLLM 0.10.2 or newer")])
def test_server_errors_are_one_line(adapted, tmp_path, mode, message):
    model, base = adapted
    stub = Stub(base, mode)
    sampler = VllmSampler(stub.url, 30, tmp_path, "tiny")
    with pytest.raises(PeftkitError, match=message):
        sampler.start(model)
        if mode == "gone":  # the server stopped after the start
            stub.server.shutdown()
            stub.server.server_close()
        sampler(model, PROMPTS, Sampling(2, 3, 0.0), 0, [1])
    assert not list(tmp_path.iterdir())  # the adapter folder is deleted whatever failed


def test_adapters_vllm_cannot_serve_are_refused(tmp_path):
    model = tiny_model("llama")
    stub = Stub(copy.deepcopy(model))
    peftkit.inject(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(PeftkitError, match="vLLM cannot serve this adapter .*it loads only LoRA adapters, not IA3"):
        VllmSampler(stub.url, 30, tmp_path, "tiny").start(model)
    assert not stub.loaded and not list(tmp_path.iterdir())


def _rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say {i % 3}."}],
                                        "answer": str(i % 3)}) + "\n" for i in range(n)))
    return path


def test_grpo_trains_through_the_server(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_checkpoint(tmp_path / "tiny")
    stub = Stub(AutoModelForCausalLM.from_pretrained(folder).eval())
    (tmp_path / "parity.py").write_text("def odd(prompts, completions, completion_ids, **kw):\n"
                                        "    return [float(ids[0] % 2) for ids in completion_ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    options = dict(model=str(folder), data=str(_rows(tmp_path / "t.jsonl", 4)), eval_split=0, objective="grpo",
                   reward="parity:odd", num_generations=4, max_completion_length=3, max_steps=2, batch_size=2,
                   max_length=64, lr=5e-2, precision="fp32", output=str(tmp_path / "run"), seed=0,
                   use_vllm=True, vllm_server_base_url=stub.url)
    result = train(load_train_config(None, options), progress=False)
    steps = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines() if '"train"' in line]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) and "rollout_s" in s for s in steps)
    probe, first, second = (tensors for _, _, tensors in stub.loaded)
    assert all(torch.equal(probe[k], first[k]) for k in probe)            # step 1 samples the initial adapter
    assert any(not torch.equal(first[k], second[k]) for k in first)       # step 2 samples the trained one
    assert [len(c["prompt"]) * c["n"] for c in stub.completions] == [8, 8]
    assert stub.completions[0]["seed"] != stub.completions[1]["seed"] and not stub.adapters
    assert not list(result.run_dir.vllm_adapters.iterdir())


def test_refusals_before_the_model_loads(tmp_path, capsys):
    base = {"objective": "grpo", "use_vllm": True}
    for options, message in [({"vllm_server_base_url": "ftp://host:8000"}, "is not an http\\(s\\) URL"),
                             ({"vllm_server_base_url": "localhost:8000"}, "is not an http\\(s\\) URL"),
                             ({"method": "full"}, "this method trains the model's own weights"),
                             ({"fsdp": True}, "--use-vllm with --fsdp: every process would write and load"),
                             ({"vllm_server_timeout": 0}, "vllm_server_timeout"),
                             ({"use_vllm": False, "vllm_adapter_dir": "x"}, "--vllm-adapter-dir sets up rollouts "
                                                                             "on a vLLM server; add --use-vllm")]:
        with pytest.raises(PeftkitError, match=message):
            load_train_config(None, {**base, **options})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    line = cli_error_line(["train", "--objective", "grpo", "--model", str(folder), "--data",
                           str(_rows(tmp_path / "t.jsonl", 4)), "--eval-split", "0", "--reward", "exact_match",
                           "--max-steps", "1", "--batch-size", "2", "--num-generations", "2", "--precision", "fp32",
                           "--output", str(tmp_path / "run"), "--use-vllm", "--vllm-server-base-url",
                           f"http://127.0.0.1:{port}", "--vllm-server-timeout", "0.5"], capsys)
    assert f"no vLLM server answered at http://127.0.0.1:{port} within 0.5 s" in line
    assert f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve {folder} --enable-lora --max-lora-rank" in line

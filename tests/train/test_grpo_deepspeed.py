"""GRPO under DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo): two steps finish, log
GRPO's metrics and save a whole adapter.

ZeRO-3 partitions every parameter, so each forward of the token-by-token sampler gathers them (a collective), like
FSDP: the model of sharded_grpo.py ends its completions early and at random, so the two processes' loops end at
different steps and must stop together (rollouts._all_done). The reference pass (beta > 0) and the held-out
evaluation run under ZeRO-3 too, and the save gathers the adapter through the engine. ZeRO-1/2 keep whole
parameters in every process (no collective in a forward); measured: the same two steps run under each preset.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from tests.train.sharded_grpo import check_two_steps, grpo_options
from tests.train.test_fsdp import _torchrun

# find_spec, not importorskip: importing deepspeed takes ~1.5 s, in every worker that collects this file
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def test_two_grpo_steps_under_deepspeed_zero3(tmp_path):
    from safetensors.torch import load_file

    options = {**grpo_options(tmp_path), "deepspeed": "zero3"}
    script = tmp_path / "run_grpo.py"
    script.write_text(textwrap.dedent(f"""
        from accelerate.state import AcceleratorState
        from peftkit.train.config import load_train_config
        from peftkit.train.run import train
        train(load_train_config(None, {options!r}), progress=False)
        state = AcceleratorState()
        if state.is_main_process:  # what really ran: accelerate's DeepSpeed path, the ZeRO stage asked for
            with open("ran.txt", "w") as out:
                out.write(f"{{state.distributed_type.value}} {{state.deepspeed_plugin.zero_stage}} {{state.num_processes}}")
    """))
    proc = _torchrun([str(script)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "ran.txt").read_text() == "DEEPSPEED 3 2"
    check_two_steps(options, ["grad_norm"])
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: t for k, t in adapter.items() if "lora_B" in k}
    assert lora_b and all(t.dim() == 2 and bool((t.abs().sum(dim=1) > 0).all()) for t in lora_b.values())  # whole, trained

"""The HF Trainer path: an injected model trains with `transformers.Trainer`, and what the Trainer saves
(`trainer.save_model`, its checkpoint-N folders) is the adapter, which peftkit and HF PEFT load back to the trained
model's logits. Also TRL's SFTTrainer end to end, when trl is installed."""

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import peftkit
from peftkit import LoraConfig
from tests.tiny import logits, tiny_input, tiny_model

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "peftkit.json"}


def _dataset(n: int = 8, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Token ids with labels (next-token loss on the whole row), as a tokenized dataset holds them."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _args(out, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                   use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                   dataloader_num_workers=0)
    return TrainingArguments(**{**options, **overrides})


def _trained(tmp_path, **overrides):
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, args=_args(tmp_path / "run", **overrides), train_dataset=_dataset())
    trainer.train()
    model.eval()
    return model, trainer


def _assert_loads_to(folder, expected, ids):
    ours = peftkit.load_adapter(tiny_model("llama"), folder)
    assert (logits(ours, ids) - expected).abs().max() <= 1e-4
    theirs = PeftModel.from_pretrained(tiny_model("llama"), folder)
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-4


def test_trainer_save_model_writes_the_adapter(tmp_path):
    ids = tiny_input()
    model, trainer = _trained(tmp_path)
    expected = logits(model, ids)
    assert (expected - logits(tiny_model("llama"), ids)).abs().max() > 1e-3  # the 2 steps changed the model
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert files >= ADAPTER_FILES and "model.safetensors" not in files and "config.json" not in files
    _assert_loads_to(tmp_path / "final", expected, ids)


def test_trainer_checkpoints_are_adapter_folders(tmp_path):
    ids = tiny_input()
    model, trainer = _trained(tmp_path, save_strategy="steps", save_steps=1)
    run = tmp_path / "run"
    for step in (1, 2):
        files = {p.name for p in (run / f"checkpoint-{step}").iterdir()}
        assert ADAPTER_FILES | {"trainer_state.json", "optimizer.pt"} <= files, files
        assert "model.safetensors" not in files
    expected = logits(model, ids)
    _assert_loads_to(run / "checkpoint-2", expected, ids)
    trainer.save_model()  # into the output folder, which holds the checkpoints: they stay
    assert {p.name for p in run.iterdir()} >= ADAPTER_FILES
    assert (run / "checkpoint-1" / "adapter_model.safetensors").is_file()
    _assert_loads_to(run, expected, ids)


def test_sft_trainer_end_to_end(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    peftkit.inject(model, LoraConfig(r=4, lora_alpha=8))
    data = Dataset.from_list([{"text": f"The word number {i} is {w}."} for i, w in enumerate(["alpha", "beta"] * 4)])
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                           learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                           disable_tqdm=True, max_length=32, dataloader_num_workers=0,
                           bf16=False)  # TRL's default bf16 leaves the model's forward under autocast after training
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    ids = tokenizer("The word number 3 is", return_tensors="pt").input_ids
    expected = logits(model, ids)
    assert {p.name for p in (tmp_path / "final").iterdir()} >= ADAPTER_FILES
    for loaded in (peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "final"),
                   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "final")):
        assert (logits(loaded, ids) - expected).abs().max() <= 1e-4

"""LoRA+ (`loraplus_lr_ratio`): the optimizer's parameter groups (B and 1-D parameters at R x lr, as PEFT's
create_loraplus_optimizer), the option's bounds and recipe key, and the groups' learning rates after --resume."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer

import peftkit
from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig, load_train_config
from peftkit.train.loop.optim import optimizer_and_schedule, parameter_groups
from tests.tiny import save_tiny_checkpoint, tiny_model, write_rows


def _groups_by_name(model: torch.nn.Module, groups: list[dict]) -> list[tuple[float, set[str]]]:
    names = {id(p): n.replace("base_model.model.", "").replace(".default", "") for n, p in model.named_parameters()}
    return sorted((g["lr"], {names[id(p)] for p in g["params"]}) for g in groups if g["params"])


def test_groups_equal_peft_create_loraplus_optimizer():
    """B matrices and DoRA's magnitudes at 16 x lr, A matrices at lr: the same split as PEFT's."""
    ours = tiny_model("llama")
    peftkit.inject(ours, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=16)
    got = _groups_by_name(ours, parameter_groups(ours, cfg))
    theirs = get_peft_model(tiny_model("llama"), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    want = _groups_by_name(theirs, opt.param_groups)
    assert [lr for lr, _ in got] == pytest.approx([1e-3, 16e-3])
    assert got[0][1] == want[0][1] and all(".lora_A." in n for n in got[0][1])
    # PEFT names the magnitude "<path>.lora_magnitude_vector.weight", peftkit "<path>.lora_magnitude_vector"
    assert got[1][1] == {n.removesuffix(".weight") if "magnitude" in n else n for n in want[1][1]}
    assert any("magnitude" in n for n in got[1][1]) and any(".lora_B." in n for n in got[1][1])


def test_without_ratio_one_group_and_the_schedule_scales_both():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    assert len(parameter_groups(model, TrainConfig(lr=1e-3))) == 1
    optimizer, scheduler = optimizer_and_schedule(model, TrainConfig(lr=1e-3, loraplus_lr_ratio=4, warmup=0,
                                                                     scheduler="linear"), steps=4)
    scheduler.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5e-3, 2e-3])


def test_ratio_without_lora_b_is_refused():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.PromptConfig(num_virtual_tokens=2))
    with pytest.raises(PeftkitError, match="loraplus-lr-ratio sets the learning rate of LoRA's B matrices"):
        parameter_groups(model, TrainConfig(method="prompt", lr=1e-3, loraplus_lr_ratio=4))


@pytest.mark.parametrize("value", [0, -2, "fast", float("inf")])
def test_bounds(value):
    with pytest.raises(PeftkitError, match="loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=value)


def test_recipe_key_as_llamafactory_writes_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loraplus_lr_ratio: 16.0\nlearning_rate: 1.0e-4\n")
    cfg = load_train_config(recipe)
    assert cfg.loraplus_lr_ratio == 16.0 and cfg.lr == 1e-4


def test_groups_learning_rates_survive_resume(tmp_path, monkeypatch):
    """Saved in run_config.yaml; a resumed run's optimizer has the two groups at lr and R x lr (at the resumed
    step of the schedule); resuming with another ratio is refused."""
    import peftkit.train.run as run_module
    from peftkit.train.run import train

    model = save_tiny_checkpoint(tmp_path / "tiny")
    write_rows(tmp_path / "train.jsonl", 12)
    options = dict(model=str(model), data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "train.jsonl"),
                   max_steps=4, batch_size=3, max_length=48, lr=1e-3, warmup=0, scheduler="constant", rank=2,
                   precision="fp32", save_steps=2, seed=1, output=str(tmp_path / "run"), eval_examples=1,
                   loraplus_lr_ratio=8.0)
    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        raise Stop  # the run stops right after its checkpoint at step 2, as a killed run would

    with pytest.raises(Stop):
        train(load_train_config(None, options), progress=False, on_checkpoint=stop)
    assert yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())["loraplus_lr_ratio"] == 8.0
    seen = []
    real = run_module.load_checkpoint

    def spy(folder, model, optimizer, scheduler, *rest):
        pos = real(folder, model, optimizer, scheduler, *rest)
        seen.append([(g["lr"], len(g["params"])) for g in optimizer.param_groups])
        return pos

    monkeypatch.setattr(run_module, "load_checkpoint", spy)
    train(load_train_config(None, {**options, "resume": True}), progress=False)
    (slow, n_slow), (fast, n_fast) = seen[0]
    assert (slow, fast) == pytest.approx((1e-3, 8e-3)) and n_slow == n_fast > 0
    with pytest.raises(PeftkitError, match="loraplus_lr_ratio"):
        train(load_train_config(None, {**options, "resume": True, "loraplus_lr_ratio": 2.0}),
              progress=False)

"""Bad input to merge / combine: one-line error, exit code 2, nothing left in --output."""

import json

import pytest

from peftkit.cli import main
from tests.merging.fixtures import save_base, save_lora


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    return {
        "base": save_base("llama", tmp / "base", "20KB"),
        "gpt2": save_base("gpt2", tmp / "gpt2"),
        "adapter": save_lora("llama", tmp / "adapter"),
        "tmp": tmp,
    }


def test_missing_shard(files, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in files["base"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    (broken / shard).unlink()
    code, err = run(["merge", "--base", str(broken), "-a", str(files["adapter"]), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and shard in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--base", str(files["base"]), "-a", str(files["adapter"]), "--out", str(out)]
    code, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    code, err = run([*args, "--overwrite"], capsys)  # --overwrite never deletes what peftkit did not write
    assert code == 2 and "did not write" in err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    main([*args, "--overwrite", "--json", "--check-logits"])
    report = json.loads(capsys.readouterr().out)
    assert report["logits_max_abs_diff"] is not None and report["logits_max_abs_diff"] <= 1e-4
    assert (out / "config.json").is_file()
    main([*args, "--overwrite", "--json"])  # and so may peftkit's own output
    assert json.loads(capsys.readouterr().out)["changed"] > 0 and (out / "config.json").is_file()


def test_adapter_for_another_model(files, tmp_path, capsys):
    code, err = run(["merge", "--base", str(files["gpt2"]), "-a", str(files["adapter"]), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "another model" in err and "model.layers.0." in err
    assert not (tmp_path / "o").exists()


def test_adapter_with_other_shapes(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "wide")
    code, err = run(["merge", "--base", str(tmp_path / "wide"), "-a", str(files["adapter"]), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "shape" in err and "model.layers.0" in err
    assert not (tmp_path / "o").exists()


def test_non_lora_adapter_is_explained(files, tmp_path, capsys):
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    (prefix / "adapter_model.safetensors").write_bytes((files["adapter"] / "adapter_model.safetensors").read_bytes())
    code, err = run(["merge", "--base", str(files["base"]), "-a", str(prefix), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "PREFIX_TUNING" in err and "not LoRA" in err and "no weight delta" in err


@pytest.mark.parametrize("extra,needle", [(["--combination", "svd", "--rank", "0"], "positive --rank"),
                                          (["--weights", "1,2,3"], "one per --adapter"),
                                          (["--combination", "sum"], "unknown combination")])
def test_bad_combination_flags(files, tmp_path, capsys, extra, needle):
    args = ["combine", "-a", str(files["adapter"]), "-a", str(files["adapter"]), "-o", str(tmp_path / "c"), *extra]
    code, err = run(args, capsys)
    assert code == 2 and needle in err and not (tmp_path / "c").exists()

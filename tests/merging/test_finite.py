"""Non-finite values never pass as success: NaN / inf weights, NaN adapters, overflow of the output dtype and broken
fine-tunes are refused with one line, nothing left behind; the self-check fails on NaN; an interrupt or a full disk
while a shard is written surfaces as itself."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit.merging.stream as ms
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.io.finite import cast_checked, check_finite
from peftkit.io.shards import ShardWriter
from peftkit.merging.compress import compress
from peftkit.merging.deltas import combine, parse_weights, read_lora
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import save_base, save_lora
from tests.tiny import tiny_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def run(args, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test's own setup printed (transformers' progress bars)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def nothing_left(output: Path) -> bool:
    """Neither the output folder nor a temporary folder of atomic_dir beside it."""
    return not output.exists() and not list(output.parent.glob(f".{output.name}.tmp-*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finite")
    adapter = save_lora("llama", tmp / "adapter")
    nan_adapter = tmp / "nan-adapter"
    nan_adapter.mkdir()
    for f in adapter.iterdir():
        (nan_adapter / f.name).write_bytes(f.read_bytes())
    tensors = load_file(nan_adapter / "adapter_model.safetensors")
    bad_key = next(k for k in sorted(tensors) if "q_proj.lora_B" in k)
    tensors[bad_key][0, 0] = float("nan")
    save_file(tensors, nan_adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"base": save_base("llama", tmp / "base", "20KB"), "adapter": adapter, "nan_adapter": nan_adapter,
            "bad_key": bad_key}


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1,NaN", "Infinity,1"])
def test_parse_weights_refuses_non_finite(text):
    bad = next(w for w in text.split(",") if not math.isfinite(float(w)))
    with pytest.raises(PeftkitError, match=f"finite numbers, got '{bad}'"):
        parse_weights(text, len(text.split(",")))
    assert parse_weights("0.5,1e3", 2) == [0.5, 1000.0]


@pytest.mark.parametrize("weights,dtype,needle", [("nan", "bf16", "'nan'"), ("inf", "bf16", "'inf'"),
                                                  ("1e39", "bf16", "overflows float32"),
                                                  ("1e8", "fp16", "beyond float16's range")])
def test_merge_refuses_non_finite_weights(files, tmp_path, capsys, weights, dtype, needle):
    out = tmp_path / "merged"
    args = ["merge", "--base", str(files["base"]), "-a", str(files["adapter"]), "-o", str(out), "--weights", weights,
            "--dtype", dtype]
    code, err = run(args, capsys)
    assert one_line_error(code, err) and needle in err, err
    assert nothing_left(out)


def test_overflow_names_the_tensor(files, tmp_path):
    with pytest.raises(PeftkitError, match=r"merged tensor 'model\.layers\.\d\.[a-z_.]+\.weight' has values up to "
                                           r"[0-9.e+]+, beyond float16's range \(max 6\.55e\+04\)"):
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "m"), weights=[1e8], dtype="fp16")
    with pytest.raises(PeftkitError, match="adapter weight nan is not a finite number"):
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "m"), weights=[float("nan")])
    assert nothing_left(tmp_path / "m")


def test_nan_adapter_is_refused_by_merge_and_combine(files, tmp_path, capsys):
    needle = f"tensor '{files['bad_key']}' has 1 NaN value"
    where = str(files["nan_adapter"] / "adapter_model.safetensors")
    out = tmp_path / "out"
    runs = [["merge", "--base", str(files["base"]), "-a", str(files["nan_adapter"]), "-o", str(out)],
            ["combine", "-a", str(files["adapter"]), "-a", str(files["nan_adapter"]), "-o", str(out)],
            ["combine", "-a", str(files["nan_adapter"]), "-a", str(files["adapter"]), "-o", str(out),
             "--combination", "svd", "--rank", "4"]]
    for args in runs:
        code, err = run(args, capsys)
        assert one_line_error(code, err) and needle in err and where in err and "LinAlgError" not in err, (args, err)
        assert nothing_left(out)


def test_reading_a_nan_adapter_names_file_and_tensor(files):
    with pytest.raises(PeftkitError, match=r"adapter file '.*nan-adapter/adapter_model\.safetensors': tensor "
                                           r"'.*q_proj\.lora_B\.weight' has 1 NaN value \(of \d+\); the adapter is broken"):
        read_lora(files["nan_adapter"])
    read_lora(files["adapter"])  # the healthy one still reads


def test_svd_combination_of_overflowing_deltas_is_a_one_line_error(files):
    big = read_lora(files["adapter"], 1e30)
    big.deltas = {m: type(d)(d.a * 1e30, d.b, d.bias) for m, d in big.deltas.items()}  # finite, but B A overflows
    with pytest.raises(PeftkitError, match="combined delta of module"):
        combine([big, read_lora(files["adapter"])], "svd", 2)


def test_nan_in_the_base_is_refused(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    model.save_pretrained(tmp_path / "base")
    adapter = save_lora("llama", tmp_path / "adapter")
    with pytest.raises(PeftkitError, match=r"base tensor 'model\.norm\.weight' has 1 infinite value \(of 32\)"):
        merge_to_disk(str(tmp_path / "base"), [str(adapter)], str(tmp_path / "merged"))
    assert nothing_left(tmp_path / "merged")


def test_self_check_refuses_nan(files, tmp_path, monkeypatch):
    """A NaN probe error fails the self-check even when a later tensor's error is fine (NaN compares False)."""
    real, calls = ms._apply, []

    def nan_first_probe(target, tensor, deltas, seed):
        merged, (x, expected, transpose) = real(target, tensor, deltas, seed)
        calls.append(target.key)
        return merged, (x, expected * float("nan") if len(calls) == 1 else expected, transpose)

    monkeypatch.setattr(ms, "_apply", nan_first_probe)
    with pytest.raises(PeftkitError, match="self-check failed: .* by nan"):
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "merged"))
    assert len(calls) > 1 and nothing_left(tmp_path / "merged")


def test_nan_merged_tensor_is_never_written(files, tmp_path, monkeypatch):
    real = ms._apply
    monkeypatch.setattr(ms, "_apply", lambda t, w, d, s: (lambda m, p: (m * float("nan"), p))(*real(t, w, d, s)))
    with pytest.raises(PeftkitError, match=r"merged tensor '.*' has \d+ NaN values .*nothing was written"):
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "merged"))
    assert nothing_left(tmp_path / "merged")


def test_interrupt_while_writing_a_shard_surfaces_as_itself(files, tmp_path, monkeypatch):
    real, calls = ms._apply, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ms, "_apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "merged"))
    assert nothing_left(tmp_path / "merged")


def test_full_disk_while_writing_a_shard_surfaces_as_itself(files, tmp_path, monkeypatch):
    real, calls = ShardWriter.write, []

    def full_disk(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        merge_to_disk(str(files["base"]), [str(files["adapter"])], str(tmp_path / "merged"))
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, RuntimeError)
    assert nothing_left(tmp_path / "merged")


@pytest.fixture(scope="module")
def compress_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress-finite")
    tiny_model("llama").save_pretrained(tmp / "base")
    return tmp / "base"


def _finetune(folder: Path, change) -> Path:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.05)
        change(model)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("value,what", [(float("nan"), "1 NaN value"), (float("-inf"), "1 infinite value")])
@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_compress_refuses_a_non_finite_finetune(compress_base, tmp_path, capsys, value, what, where):
    ft = _finetune(tmp_path / "ft", lambda m: m.get_parameter(where).view(-1)[1].fill_(value))
    out = tmp_path / "adapter"
    code, err = run(["compress", "--base", str(compress_base), "--finetuned", str(ft), "-o", str(out), "--rank", "2"],
                    capsys)
    assert one_line_error(code, err) and f"the fine-tune's tensor '{where}'" in err and what in err, err
    assert nothing_left(out)


def test_compress_refuses_factors_beyond_the_output_dtype(compress_base, tmp_path):
    ft = _finetune(tmp_path / "ft", lambda m: m.model.layers[1].self_attn.v_proj.weight[0, 0].add_(1e12))
    with pytest.raises(PeftkitError, match=r"adapter tensor '.*v_proj\.lora_[AB]\.weight' has values up to .* "
                                           r"beyond float16's range"):
        compress(str(compress_base), str(ft), str(tmp_path / "adapter"), rank=2, dtype="fp16")
    assert nothing_left(tmp_path / "adapter")
    compress(str(compress_base), str(ft), str(tmp_path / "adapter"), rank=2)  # fp32 holds them


def test_finite_helpers():
    check_finite(torch.arange(3), "ints")  # integer tensors are always finite
    with pytest.raises(PeftkitError, match=r"^t has 2 NaN and 1 infinite values \(of 4\); hint$"):
        check_finite(torch.tensor([float("nan"), 1.0, float("nan"), float("inf")]), "t", "hint")
    assert cast_checked(torch.tensor([65504.0]), torch.float16, "t").dtype == torch.float16
    with pytest.raises(PeftkitError, match=r"t has values up to 7e\+04, beyond float16's range"):
        cast_checked(torch.tensor([70000.0]), torch.float16, "t")

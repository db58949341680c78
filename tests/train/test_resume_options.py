"""Which options a resumed run may change: speed and reporting yes, what is trained and on what no."""

from __future__ import annotations

import pytest

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import load_train_config, resolve_defaults, save_config


def _cfg(**options):
    return resolve_defaults(load_train_config(None, {"output": "run", **options}))


def test_resume_may_change_speed_and_reporting_options(tmp_path):
    save_config(_cfg(), RunDir(tmp_path).config)
    RunDir(tmp_path).check_same_run(_cfg(attention="sdpa", compile=True, report_to="none", max_steps=60, resume=True))


@pytest.mark.parametrize("changed", [{"lr": 1e-3}, {"batch_tokens": 1024}, {"rank": 4}, {"precision": "fp32"}])
def test_resume_refuses_options_that_change_what_is_trained(tmp_path, changed):
    save_config(_cfg(), RunDir(tmp_path).config)
    key = next(iter(changed))
    with pytest.raises(PeftkitError, match=f"options differ.*{key}"):
        RunDir(tmp_path).check_same_run(_cfg(resume=True, **changed))

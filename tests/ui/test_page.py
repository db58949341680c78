"""The web page in a real browser (Debian's chromium driven by Playwright), against a real `peftkit ui` server.

One journey, as a user would take it, on the embedded model: fill the form, check the plan (command, estimate,
trained tokens), launch, watch the loss curve gain points, close the tab and come back to find the run still
running, stop it, resume it, chat with the result beside the base, merge it and export it, and run the command the
page showed from the CLI to get the same adapter. Each step saves a screenshot (in the test's folder, or in
$PEFTKIT_SCREENSHOTS when set: docs/images/ui-*.png come from there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main
from tests.train.test_distributed import REPO, _free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium here (.ci/run installs Debian's chromium for CI)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.embedded
# Long enough to stop mid-run: the stop is clicked at the 5th point (one per step), leaving 7 steps of margin, and
# short enough for the suite: every step is trained twice (the page's run, then the CLI's; 24 steps made this test
# 66 s of the suite on 2 cores, 12 cut its CPU time by ~30%).
STEPS = 12
BATCH = 2  # examples per step: cheap steps (the default 8 made this the suite's slowest test)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "ui", "--root", str(root), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.25)
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("PEFTKIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(page, name: str) -> Path:
        path = folder / f"ui-{name}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one
        return path

    return shoot


def _page(browser):
    """A new tab (its own context: nothing shared with an earlier tab); generous timeouts, as CI is busy."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.set_default_timeout(120_000)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page


errors: list[str] = []  # uncaught errors of the page's script (none expected)


def _points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def test_launch_watch_reattach_stop_resume_chat_ship_and_reproduce(server, browser, shots):
    url, root = server
    page = _page(browser)
    page.goto(url)
    page.wait_for_selector("#f-rank")  # the form is built from the server's declarations
    page.fill("#run-name", "page-run")
    page.fill("#f-max_steps", str(STEPS))
    page.fill("#f-batch_size", str(BATCH))
    page.fill("#f-save_steps", "4")
    page.fill("#f-eval_split", "0")
    page.fill("#f-rank", "4")
    page.click("#check")
    page.wait_for_selector("#preview .example .trained", timeout=600_000)
    command = page.text_content("#command")
    assert command == f"peftkit train --rank 4 --eval-split 0 --max-steps {STEPS} --batch-size {BATCH} --save-steps 4"
    assert "MB" in page.text_content("#estimate") and "fits on one" in page.text_content("#estimate")
    shots(page, "new-run")

    page.click("#launch")
    page.wait_for_selector("#run-detail:not([hidden])")
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points || 0) >= 2", timeout=600_000)
    first = _points(page)
    page.wait_for_function(f"Number(document.querySelector('#chart-loss').dataset.points || 0) > {first}",
                           timeout=300_000)  # the curve gains points live
    shots(page, "runs")
    page.close()  # the tab closes; the run goes on

    page = _page(browser)
    page.goto(url + "#runs")
    row = page.wait_for_selector('tr[data-run="page-run"]')
    assert "running" in row.text_content()
    page.click('tr[data-run="page-run"] button')
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points || 0) >= 5", timeout=300_000)
    page.click("#stop")
    page.wait_for_selector("#detail-status.status-stopped", timeout=300_000)
    stopped_at = _points(page)
    assert stopped_at < STEPS
    page.wait_for_selector("#resume:not([disabled])")
    page.click("#resume")
    page.wait_for_selector("#detail-status.status-finished", timeout=900_000)
    assert (root / "page-run" / "adapter" / "adapter_model.safetensors").is_file()
    shots(page, "finished")

    page.click("#tab-try")
    page.wait_for_selector('#try-run option[value="page-run"]', state="attached")
    page.fill("#prompt", "Extract name, city and date as name=...; city=...; date=YYYY-MM-DD\n\n"
                         "Anna Berg moved to Oslo on 3 May 2011.")
    page.click("#ask")
    page.wait_for_selector('#answer-base[data-done="1"]', timeout=600_000)
    adapter_answer, base_answer = page.text_content("#answer-adapter"), page.text_content("#answer-base")
    assert adapter_answer.strip() and base_answer.strip() and adapter_answer != base_answer
    shots(page, "try")

    page.click("#tab-ship")
    page.wait_for_selector('#ship-run option[value="page-run"]', state="attached")
    for action, made in (("merge", root / "page-run-merged" / "config.json"), ("export", root / "page-run.gguf")):
        page.click(f'#ship [data-action="{action}"]')
        page.wait_for_selector("#ship-log[data-code]", timeout=900_000)
        assert page.get_attribute("#ship-log", "data-code") == "0", page.text_content("#ship-log")
        assert made.is_file(), page.text_content("#ship-log")
        assert page.text_content("#ship-command").startswith(f"peftkit {action} ")
        shots(page, f"ship-{action}")
        page.evaluate("document.querySelector('#ship-log').removeAttribute('data-code')")

    # The command the page showed, run from a shell, trains the same adapter (the page's run was stopped and
    # resumed on the way: resume continues exactly).
    # In this process (a subprocess would add its imports), on one thread as the page's run had (the server's
    # OMP_NUM_THREADS=1), so that the sums match.
    assert command.startswith("peftkit train ")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(command.split()[1:] + ["--output", str(root / "cli-run"), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    want = load_file(str(root / "cli-run" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(root / "page-run" / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-4
    for key in want:
        assert float((want[key] - got[key]).abs().max()) <= 1e-5, key
    assert errors == []


def test_unrecognised_columns_are_mapped_on_the_page(server, browser, shots, tmp_path):
    """A file whose columns peftkit does not know: the CLI's error next to the columns field (the one it names),
    the file's columns to map there, and once mapped the plan shows the examples and the command carries
    --columns."""
    url, _ = server
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(f'{{"question": "What is {i} + {i}?", "answer": "{2 * i}"}}\n' for i in range(30)))
    page = _page(browser)
    page.goto(url)
    page.wait_for_selector("#f-rank")
    page.set_input_files("#upload", str(rows))
    page.wait_for_function("document.querySelector('#f-data').value === 'uploads/qa.jsonl'")
    page.click("#check")
    page.wait_for_selector('#mapping select[data-column="question"]')
    assert "cannot tell the data format" in page.text_content('[data-error="columns"]')
    page.select_option('#mapping select[data-column="question"]', "instruction")
    page.select_option('#mapping select[data-column="answer"]', "output")
    assert page.input_value("#f-columns") == "instruction=question,output=answer"
    page.click("#check")
    page.wait_for_selector("#preview .example .trained")
    assert "--columns instruction=question,output=answer" in page.text_content("#command")
    assert re.search(r"What is (\d+) \+ \1\?<\|im_end\|>", page.text_content("#preview"))  # a row of the file
    shots(page, "columns")

"""`vidlora webui` in a real browser: headless Chromium (the system's) driven by Playwright.

The web UI runs as `vidlora webui` in its own process on a tiny LoRA checkpoint (conftest.py); the
test uploads a synthetic mp4, asks, reads the streamed answer from the page and compares it with
what `Generator` gives for the same input (greedy), then starts a 5-step training from the Train
tab and waits for the page to show it finished. Screenshots go to ``$VIDLORA_ARTIFACTS`` (else the
test's tmp dir); ``VIDLORA_UPDATE_DOCS=1`` also writes them to docs/webui.png and docs/webui-train.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vidlora.data.records import Turn
from vidlora.infer.chat import first_message
from vidlora.training.run_dir import TRAINER_STATE, scan_checkpoints
from vidlora.webui.train_job import TrainJob

REPO = Path(__file__).resolve().parents[2]
INSTALL = (
    "the browser test needs Chromium: `apt-get install -y chromium chromium-driver` (Debian/Ubuntu; "
    "`make setup` does it), and Playwright: pip install -e '.[dev]'"
)
QUESTION = "What is moving in the video?"
VIDEO = "videos/eval_00001.mp4"
MAX_NEW_TOKENS = 12


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(INSTALL)
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail(INSTALL)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(webui_checkpoint, webui_synth, tmp_path_factory):
    """`vidlora webui` on the checkpoint, on a free port: yields its URL and the reference answer
    (computed here while the server starts)."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("webui")
    with open(workdir / "webui.log", "w") as log:
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "vidlora", "webui", "--model_path", str(webui_checkpoint)]
        command += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        expected = _reference_answer(webui_checkpoint, webui_synth / VIDEO)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"vidlora webui exited with {process.returncode}:\n{(workdir / 'webui.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (workdir / "webui.log").read_text()
            time.sleep(0.3)
        yield url, expected
        process.terminate()
        process.wait(30)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    root = os.environ.get("VIDLORA_ARTIFACTS")
    out = Path(root) / "webui" if root else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def _reference_answer(checkpoint: Path, video: Path) -> str:
    """What the one generation path answers for the page's conversation (greedy)."""
    from vidlora.infer.adapters import ModelSet
    from vidlora.infer.generate import Request, Sampling

    models = ModelSet.load(str(checkpoint), device="cpu", dtype="float32")
    turns = [Turn("human", first_message(QUESTION, video, []))]
    with models.use(models.names[0]) as generator:
        return generator.complete(
            [Request("ref", turns, video, [])], Sampling(max_new_tokens=MAX_NEW_TOKENS)
        )[0].text


def _fold(page, section: str) -> None:
    """Open or close a section of the Train form."""
    page.locator(f"#train-section-{section.lower()}").get_by_text(section, exact=True).first.click()


def _words(text: str) -> str:
    return " ".join(text.split())


# Records every text the last answer of the chat shows, as it changes.
WATCH_ANSWER = """() => {
  window.seenAnswers = [];
  const root = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.seenAnswers.push(bots[bots.length - 1].innerText);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_and_train_in_the_browser(server, webui_synth, artifacts, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    url, expected = server
    synth = webui_synth
    video = synth / VIDEO
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)

        # -- Train: the seed's form, pointed at the tiny model and the synthetic data; it runs meanwhile ----
        out = tmp_path / "run"
        page.get_by_role("tab", name="Train").click()
        # The page's load event fills the form (and the command) first; then it is ours.
        expect(page.locator("#train-command textarea")).to_have_value(re.compile("^vidlora train"))
        _fold(page, "Training")
        for name, value in {
            "model_name_or_path": "tiny", "video_tower": "", "image_tower": "", "cache_dir": str(tmp_path / "cache"),
            "data_path": str(synth / "train.json"), "video_folder": str(synth), "image_folder": str(synth),
            "output_dir": str(out), "deepspeed": "",
        }.items():  # fmt: skip
            page.fill(f"#train-{name} textarea", value)
        page.fill(
            "#train-extra textarea",
            "--max_steps 5 --gradient_accumulation_steps 1 --evaluation_strategy no --report_to none "
            "--dataloader_num_workers 0",
        )
        expect(page.locator("#train-command textarea")).to_have_value(re.compile("--max_steps 5"))
        command = page.locator("#train-command textarea").input_value()
        assert "--lora_r 128 --lora_alpha 256" in _words(command)
        page.click("#train-start")
        expect(page.locator("#train-status")).to_contain_text("running", timeout=30_000)
        # -- Chat: upload, see the model's frames, ask, read the streamed answer ---------------------
        page.get_by_role("tab", name="Chat").click()
        page.set_input_files("#chat-video input[type=file]", str(video))
        expect(page.locator("#chat-frames img")).to_have_count(8, timeout=30_000)
        page.get_by_text("sampling").click()
        # The accordion opens with an animation: set the budget once its box is there, then commit it.
        budget = page.locator("#chat-max-new-tokens input[type=number]")
        expect(budget).to_be_visible()
        budget.fill(str(MAX_NEW_TOKENS))
        budget.press("Enter")
        expect(page.locator("#chat-max-new-tokens input[type=range]")).to_have_value(str(MAX_NEW_TOKENS))
        page.evaluate(WATCH_ANSWER)
        page.fill("#chat-question textarea", QUESTION)
        page.click("#chat-send")
        expect(page.locator("#chat-usage")).to_contain_text(f"{MAX_NEW_TOKENS} generated", timeout=60_000)
        answers = page.locator("#chatbot [data-testid='bot']")
        shown = answers.last.inner_text()
        assert _words(shown) == _words(expected)
        seen = [_words(s) for s in page.evaluate("window.seenAnswers") if s.strip()]
        partial = [s for s in dict.fromkeys(seen) if s != _words(expected)]
        assert partial, "the answer appeared at once, not streamed"
        assert all(_words(expected).startswith(s) for s in partial)
        shots.append(artifacts / "webui.png")
        page.screenshot(path=shots[-1], full_page=True)

        # A follow-up sees the conversation; Clear empties it.
        page.fill("#chat-question textarea", "And its colour?")
        page.click("#chat-send")
        expect(page.locator("#chatbot [data-testid='user']")).to_have_count(2)
        expect(answers).to_have_count(2, timeout=60_000)
        page.click("#chat-clear")
        expect(answers).to_have_count(0)
        expect(page.locator("#chat-frames img")).to_have_count(0)

        # -- Data: vidlora check, then one sample's tokens with the trained ones highlighted ----------
        page.get_by_role("tab", name="Data").click()
        page.fill("#data-path textarea", str(synth / "train.json"))
        page.fill("#data-video-folder textarea", str(synth))
        page.fill("#data-image-folder textarea", str(synth))
        page.click("#data-check")
        expect(page.locator("#data-report")).to_contain_text("8 valid record(s)", timeout=30_000)
        page.click("#data-show")
        expect(page.locator("#data-summary")).to_contain_text("trained", timeout=30_000)
        expect(page.locator("#data-tokens")).to_contain_text("ASSISTANT:")

        # The job is the server's and the output dir's, not the page's: a reload finds it again.
        page.reload()
        page.get_by_role("tab", name="Train").click()
        _fold(page, "Training")
        expect(page.locator("#train-output_dir textarea")).to_have_value(str(out))
        expect(page.locator("#train-command textarea")).to_have_value(command)  # the job's, not the seed's
        expect(page.locator("#train-status")).to_contain_text("finished", timeout=120_000)
        expect(page.locator("#train-loss img")).to_be_visible()
        expect(page.locator("#train-status")).to_contain_text("step 5")
        _fold(page, "Model")  # folded for the screenshot
        _fold(page, "Data")
        expect(page.locator("#train-log")).to_contain_text("train_runtime")
        shots.append(artifacts / "webui-train.png")
        page.screenshot(path=shots[-1], full_page=True)
        browser.close()

    latest = scan_checkpoints(out).latest
    assert latest is not None and latest.name == "checkpoint-5"
    history = json.loads((latest / TRAINER_STATE).read_text())["log_history"]
    job = TrainJob.find(out)
    assert job is not None and job.state() == "finished"
    assert job.loss_points() == [(e["step"], e["loss"]) for e in history if "loss" in e]
    if os.environ.get("VIDLORA_UPDATE_DOCS") == "1":
        for shot in shots:
            shutil.copyfile(shot, REPO / "docs" / shot.name)

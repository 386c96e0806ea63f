"""`peftko studio`: the guards over plain HTTP (fast), and the whole loop in a real headless Chromium
(Debian's chromium + chromedriver, driven by selenium): corpus, memory plan, a training that is
watched, stopped, resumed and outlives a killed studio, the runs, generation, and the refusals.

The browser test writes a screenshot of every page (Korean) into $PEFTKO_SCREENSHOTS (default: a
temporary folder); `PEFTKO_SCREENSHOTS=docs/images pytest tests/test_studio.py` refreshes the docs'.
Without chromium the browser test is skipped, and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from peftko.core.errors import UserError  # noqa: E402
from peftko.core.lock import hold  # noqa: E402
from peftko.core.paths import sample_corpus_dir  # noqa: E402
from peftko.studio.sandbox import Root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(root: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "peftko", "studio", "--root", str(root), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the studio ended: " + proc.stdout.read())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the studio did not listen within 60 s")


def stop_studio(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    shutil.copytree(sample_corpus_dir(), folder / "corpus")
    return folder


# --- fast: the guards
def test_paths_outside_the_root_are_refused(root, tmp_path):
    r = Root(root)
    assert r.inside("corpus") == root.resolve() / "corpus"
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    for bad in ("..", "../secret", str(tmp_path / "secret"), "escape", "corpus/../../secret"):
        with pytest.raises(UserError, match="outside the studio's root"):
            r.inside(bad)
    with pytest.raises(UserError, match="no such file or folder"):
        r.inside("no/such/folder")
    assert r.corpus("builtin:sample") == sample_corpus_dir()


def test_the_token_and_the_root_are_checked_on_every_request(root):
    port = free_port()
    (root / "typo").mkdir()
    (root / "typo" / "a.txt").write_text("|START_OF_BOOK|>\n|START_OF_TITLE|>제목|END_OF_TITEL|>\n본문.\n|END_OF_BOOK|>\n",
                                         encoding="utf-8")
    studio = start_studio(root, port, "--token", "s3cret-token")
    base = f"http://127.0.0.1:{port}"
    try:
        assert http(base + "/api/runs")[0] == 401
        assert http(base + "/api/corpus?path=corpus&token=wrong")[0] == 401
        status, answer = http(base + "/api/corpus?path=corpus", headers={"X-Peftko-Token": "s3cret-token"})
        assert status == 200 and len(answer["markers"]) == 7 and answer["problems"] == []
        ok = {"X-Peftko-Token": "s3cret-token"}
        status, answer = http(base + "/api/corpus?path=../", headers=ok)
        assert status == 400 and "outside the studio's root" in answer["error"]
        status, answer = http(base + "/api/corpus?path=no-such-corpus", headers=ok)
        assert status == 400 and "no-such-corpus: no such file or folder" in answer["error"]
        # a marker typo: in the report with FILE:LINE, and on its line of the book (which the page underlines)
        status, answer = http(base + "/api/corpus?path=typo", headers=ok)
        assert status == 200 and [(p["name"], p["line"]) for p in answer["problems"]][:1] == [("a.txt", 2)]
        status, answer = http(base + "/api/book?corpus=typo&file=a.txt", headers=ok)
        assert [line["n"] for line in answer["lines"] if line["problems"]] == [2]
        assert answer["lines"][1]["parts"][0] == ["m", "|START_OF_TITLE|>"]
        status, answer = http(base + "/api/book?corpus=typo&file=../corpus/01_moonlight_postman.txt", headers=ok)
        assert status == 400 and "not a file of the corpus typo" in answer["error"]
        # a POST needs the page's own header (a form of another site has none), and an output under the root
        assert http(base + "/api/train", {"output": "runs/x"}, ok)[0] == 403
        post = {**ok, "X-Peftko": "1"}
        status, answer = http(base + "/api/train", {"output": "/tmp/elsewhere", "action": "preview"}, post)
        assert status == 400 and "outside the studio's root" in answer["error"]
        status, answer = http(base + "/api/train", {"preset": "tiny-demo.yaml", "data": "corpus", "output": "runs/x",
                                                    "max_steps": "5", "action": "preview"}, post)
        assert status == 200 and answer["command"].endswith("--data corpus --output runs/x --max-steps 5")
        status, answer = http(base + "/api/train", {"output": "runs/x", "max_steps": "five", "action": "preview"}, post)
        assert status == 400 and "max_steps: 'five' is not an integer" in answer["error"]
        status, answer = http(base + "/api/merge", {"run": "corpus"}, post)
        assert status == 400 and "corpus: not a finished run" in answer["error"]
        # another site's name for this address (DNS rebinding) is refused even with the token
        assert http(base + "/api/runs", headers={**ok, "Host": "evil.example:80"})[0] == 403
    finally:
        stop_studio(studio)
    assert not (root / "runs").exists()  # previews write nothing


def test_off_the_loopback_a_token_is_made_up_and_printed_once(root):
    """Bound to every address (0.0.0.0), the studio refuses requests without the token it printed."""
    port = free_port()
    studio = start_studio(root, port, "--host", "0.0.0.0")
    try:
        stop_studio(studio)
        out = studio.stdout.read()
    finally:
        stop_studio(studio)
    url = next(line for line in out.splitlines() if line.startswith("peftko studio: "))
    assert "?token=" in url and len(url.split("?token=")[1]) >= 20
    studio = start_studio(root, port, "--host", "0.0.0.0", "--token", "tok-123")
    try:
        assert http(f"http://127.0.0.1:{port}/api/runs")[0] == 401
        assert http(f"http://127.0.0.1:{port}/api/runs", headers={"X-Peftko-Token": "tok-123"})[0] == 200
    finally:
        stop_studio(studio)


def test_a_job_runs_the_studios_peftko_and_its_children_may_import_beside_their_scripts(root, monkeypatch):
    """The child runs with -P: a folder named peftko in the root (its cwd) cannot shadow peftko. And no
    PYTHONSAFEPATH in its environment, which its own children (llama.cpp's converter, a script that
    imports the modules beside it) would inherit."""
    from peftko.studio.jobs import Jobs, child_argv, child_env

    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    assert "PYTHONSAFEPATH" not in child_env() and child_argv(["markers"])[1:4] == ["-P", "-m", "peftko"]
    (root / "peftko").mkdir()
    (root / "peftko" / "__init__.py").write_text("raise SystemExit('the root shadowed peftko')\n", encoding="utf-8")
    (root / "peftko" / "__main__.py").write_text("raise SystemExit('the root shadowed peftko')\n", encoding="utf-8")
    jobs = Jobs(root)
    job = jobs.start("markers", ["markers", "corpus"])
    deadline = time.time() + 60
    while jobs.state(job.id)["status"] == "running" and time.time() < deadline:
        time.sleep(0.2)
    state = jobs.state(job.id)
    assert state["status"] == "finished", state["stderr"]
    assert "markers" in state["results"] and "shadowed" not in state["stderr"]
    script = root / "tool" / "convert.py"  # what a grandchild script does: import a module beside it
    script.parent.mkdir()
    (script.parent / "helper.py").write_text("X = 1\n", encoding="utf-8")
    script.write_text("import helper\nprint(helper.X)\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], env=child_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


# --- slow: the whole loop in a browser
def _browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("needs selenium: pip install -e '.[test]'")
        pytest.skip("needs selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--lang=ko-KR", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(driver, what, timeout=120, every=0.3, message=""):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = what(driver)
            if last:
                return last
        except Exception as e:  # noqa: BLE001: an element not there yet
            last = e
        time.sleep(every)
    if callable(message):  # what the page shows now
        message = message(driver)
    raise AssertionError(f"timed out waiting: {message} (last: {last!r})")


def _shot(driver, name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    height = max(800, driver.execute_script("return Math.min(document.documentElement.scrollHeight, 2400)"))
    driver.set_window_size(1280, height)
    # the window's size includes the browser's own frame: grow it until the page fits in the viewport
    driver.set_window_size(1280, height + height - driver.execute_script("return window.innerHeight"))
    driver.save_screenshot(str(folder / f"studio-{name}.png"))
    driver.set_window_size(1280, 1000)


def _text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def _set(driver, element_id: str, value: str) -> None:
    e = driver.find_element("id", element_id)
    e.clear()
    e.send_keys(value)


def _points(driver) -> int:
    return int(driver.find_element("id", "curve").get_attribute("data-points") or 0)


def _status(driver) -> str:
    return driver.find_element("id", "train-badge").get_attribute("data-status")


@pytest.mark.slow
def test_the_whole_loop_in_a_browser(root, tmp_path):
    driver = _browser()
    from selenium.webdriver.support.ui import Select
    shots = Path(os.environ.get("PEFTKO_SCREENSHOTS") or tmp_path / "screenshots")
    port = free_port()
    studio = start_studio(root, port)
    url = f"http://127.0.0.1:{port}/"
    training_pid = None
    try:
        driver.get(url)
        # Corpus: the copy of the sample corpus, 7 markers, 0 problems, chips in the book
        _set(driver, "corpus-path", "corpus")
        driver.find_element("id", "corpus-open").click()
        _wait(driver, lambda d: d.execute_script("return lastReport && lastReport.corpus") == "corpus", 60,
              message="the report of corpus/")
        _wait(driver, lambda d: _text(d, "#n-markers b") == "7" and _text(d, "#n-problems b") == "0", 30,
              message="7 markers, 0 problems")
        chip = _wait(driver, lambda d: d.find_element("css selector", "#book .chip"), 30, message="a chip")
        assert chip.is_displayed() and chip.get_attribute("data-marker") == "|START_OF_BOOK|>"
        assert len(driver.find_elements("css selector", "#markers-table .chip")) == 7
        _shot(driver, "corpus", shots)
        # a wrong path and one outside the root each answer with one clear line
        _set(driver, "corpus-path", "no/such/corpus")
        driver.find_element("id", "corpus-open").click()
        _wait(driver, lambda d: "no/such/corpus: no such file or folder" in _text(d, "#corpus-error"), 30)
        _set(driver, "corpus-path", "../..")
        driver.find_element("id", "corpus-open").click()
        _wait(driver, lambda d: "outside the studio's root" in _text(d, "#corpus-error"), 30)
        assert "Traceback" not in driver.page_source

        # Train: the command, the memory plan, then a run watched as it goes
        driver.find_element("css selector", "nav button[data-page=train]").click()
        assert driver.find_element("id", "preset").get_attribute("value") == "tiny-demo.yaml"
        # 400 steps: an idle CPU trains the tiny base at ~20 steps a second, so a shorter run can end
        # before the Stop click lands (the page polls; the click is a request)
        for field, value in (("data", "corpus"), ("output", "runs/demo"), ("max_steps", "400"),
                             ("logging_steps", "5"), ("eval_steps", "100")):
            _set(driver, field, value)
        _wait(driver, lambda d: _text(d, "#command").endswith("--data corpus --output runs/demo --max-steps 400 "
                                                             "--logging-steps 5 --eval-steps 100"), 20, message="command")
        driver.find_element("id", "plan").click()
        _wait(driver, lambda d: "12 GiB: yes" in _text(d, "#plan-fit"), 480, 1,
              "the memory plan (the first one builds the tiny base)")
        driver.find_element("id", "start").click()
        _wait(driver, lambda d: _points(d) >= 2, 240, 0.5, "the curve's first points")
        seen = _points(driver)
        _wait(driver, lambda d: _points(d) > seen, 120, 0.5, "the curve gaining points")
        assert _status(driver) == "running"
        driver.find_element("id", "stop").click()
        _wait(driver, lambda d: _status(d) == "stopped", 120, 0.5,
              lambda d: f"the run stopped (now {_status(d)!r}; log ends {_text(d, '#log')[-600:]!r})")
        assert list((root / "runs" / "demo").glob("checkpoint-*")), "a stop writes a checkpoint"
        assert "--resume" in _text(driver, "#log")
        stopped_at = _points(driver)

        # Resume; then kill the studio: the training goes on, and a new studio re-attaches to it
        driver.find_element("id", "resume").click()
        _wait(driver, lambda d: _status(d) == "running", 60, 0.5, "the resumed run")
        jobs = sorted((root / ".peftko-studio" / "jobs").glob("*-train-*"))
        training_pid = json.loads((jobs[-1] / "job.json").read_text())["pid"]
        os.killpg(studio.pid, signal.SIGKILL)
        studio.wait()
        time.sleep(1)
        os.kill(training_pid, 0)  # still alive: it has its own session
        studio = start_studio(root, port)
        driver.refresh()  # a reload finds the training again
        driver.find_element("css selector", "nav button[data-page=train]").click()
        _wait(driver, lambda d: _status(d) in ("running", "finished"), 60, 0.5, "re-attached after a restart")
        _wait(driver, lambda d: _points(d) > stopped_at, 240, 0.5, "the resumed run's points")
        # 400 steps: seconds on an idle 2-core CPU, ten minutes and more when other work shares it
        _wait(driver, lambda d: _status(d) == "finished", 1500, 1, "the run finishing")
        _shot(driver, "train", shots)
        assert (root / "runs" / "demo" / "report.png").is_file()
        training_pid = None

        # Runs: the finished run with its bits per character before and after
        driver.find_element("css selector", "nav button[data-page=runs]").click()
        card = _wait(driver, lambda d: d.find_element("css selector", '.run[data-path="runs/demo"]'), 30)
        after = float(card.find_element("css selector", ".bpc-after").text)
        before = float(card.find_element("css selector", ".bpc-before").text)
        assert 0 < after < 20 and 0 < before < 20
        _wait(driver, lambda d: d.execute_script(
            "const i = document.querySelector('.run img'); return i && i.complete && i.naturalWidth > 0"), 30,
            message="report.png shown")

        assert card.find_element("css selector", ".kept-step").text.isdigit()
        # two runs' curves on one chart (one run here: it is both A and B)
        _wait(driver, lambda d: int(d.find_element("id", "compare-svg").get_attribute("data-points") or 0) > 0, 30,
              message="the comparison chart")

        # Ship: merge the run; the bar fills, the self-check is shown, the merged model joins the runs
        driver.find_element("css selector", "nav button[data-page=ship]").click()
        _wait(driver, lambda d: "runs/demo" in [o.get_attribute("value") for o in
                                                d.find_elements("css selector", "#ship-run option")], 30)
        Select(driver.find_element("id", "ship-run")).select_by_value("runs/demo")
        assert driver.find_element("id", "ship-output").get_attribute("value") == "runs/demo-merged"
        if not os.environ.get("PEFTKO_LLAMA_CPP"):  # --gguf without llama.cpp's converter: the CLI's one line
            driver.find_element("id", "ship-gguf").click()
            driver.find_element("id", "merge").click()
            _wait(driver, lambda d: "--gguf needs llama.cpp's convert_hf_to_gguf.py" in _text(d, "#ship-error") and d.find_element(
                "id", "ship-badge").get_attribute("data-status") == "failed", 120, 1, "the GGUF refusal")  # exit 2
            driver.find_element("id", "ship-gguf").click()
        driver.find_element("id", "merge").click()
        _wait(driver, lambda d: d.find_element("id", "ship-badge").get_attribute("data-status") == "finished", 240, 1,
              lambda d: f"the merge finishing ({_text(d, '#ship-log')[-400:]!r})")
        assert "tensors" in _text(driver, "#ship-check") and "LoRA targets" in _text(driver, "#ship-check")
        assert driver.find_element("id", "ship-bar").get_attribute("data-fraction") == "1.000"
        _shot(driver, "ship", shots)
        driver.find_element("css selector", "nav button[data-page=runs]").click()
        _wait(driver, lambda d: d.find_element("css selector", '.run[data-path="runs/demo-merged"]'), 60, 1,
              "the merged model among the runs")
        _shot(driver, "runs", shots)

        # Try: generate from the run; the markers come back as chips, with the stop reason
        driver.find_element("css selector", "nav button[data-page=try]").click()
        _wait(driver, lambda d: "runs/demo" in [o.get_attribute("value") for o in
                                                d.find_elements("css selector", "#try-model option")], 30)
        Select(driver.find_element("id", "try-model")).select_by_value("runs/demo")
        _set(driver, "max_new_tokens", "60")
        driver.find_element("id", "generate").click()
        reason = _wait(driver, lambda d: d.find_element("id", "stop-reason").get_attribute("data-reason"), 240, 1,
                       "a generated sample")
        assert reason in ("eos", "length", "marker")
        assert driver.find_elements("css selector", "#gen-out .chip")
        structure = driver.find_element("id", "structure")
        assert {structure.get_attribute(k) for k in ("data-pairs", "data-ended", "data-whole")} <= {"true", "false"}
        assert driver.find_element("id", "gen-bar").get_attribute("data-fraction") == "1.000"
        _shot(driver, "try", shots)

        # A locked output: another peftko process holds it; the page shows the CLI's message
        locked = root / "runs" / "locked"
        locked.mkdir(parents=True)
        with hold(locked / ".peftko.lock", "--output runs/locked"):
            driver.find_element("css selector", "nav button[data-page=train]").click()
            _set(driver, "output", "runs/locked")
            time.sleep(0.6)  # the command preview
            driver.find_element("id", "start").click()
            _wait(driver, lambda d: "is in use by another peftko process (pid" in _text(d, "#train-error"), 180, 1,
                  "the lock holder's message")
        assert "Traceback" not in driver.page_source

        # English switch
        driver.find_element("id", "lang").click()
        assert driver.find_element("css selector", "nav button[data-page=runs]").text == "Runs"
        driver.find_element("id", "lang").click()
    finally:
        driver.quit()
        if training_pid is not None:
            try:
                os.kill(training_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_studio(studio)


@pytest.mark.slow  # three tiny trainings and their evaluations: a minute or two on 2 cores
def test_markers_keep_or_delete_in_a_browser(root, tmp_path):
    """`peftko ablate` from its page: the bar moves through the three variants, then the verdict in
    plain Korean (the sign test's words kept), the table and ablation.png; English on the switch."""
    driver = _browser()
    shots = Path(os.environ.get("PEFTKO_SCREENSHOTS") or tmp_path / "screenshots")
    port = free_port()
    studio = start_studio(root, port)
    try:
        driver.get(f"http://127.0.0.1:{port}/#ablate")
        _wait(driver, lambda d: d.find_element("id", "ab-preset").get_attribute("value") == "tiny-demo.yaml", 30,
              message="the presets")
        for field, value in (("ab-data", "corpus"), ("ab-output", "runs/ablate"), ("ab-max_steps", "4"),
                             ("ab-samples", "1"), ("ab-sample_tokens", "8")):
            _set(driver, field, value)
        _wait(driver, lambda d: _text(d, "#ab-command").startswith("peftko ablate --config ") and _text(
            d, "#ab-command").endswith("--output runs/ablate --max-steps 4 --samples 1 --sample-tokens 8"), 20,
            message="the ablate command")
        driver.find_element("id", "ab-start").click()
        _wait(driver, lambda d: d.find_element("id", "ab-badge").get_attribute("data-status") == "running", 30)
        _wait(driver, lambda d: float(d.find_element("id", "ab-bar").get_attribute("data-fraction") or 0) > 0, 240, 0.5,
              "the bar moving")
        _wait(driver, lambda d: d.find_element("id", "ab-badge").get_attribute("data-status") != "running", 600, 1,
              lambda d: f"ablate ending ({_text(d, '#ab-log')[-400:]!r})")
        assert driver.find_element("id", "ab-badge").get_attribute("data-status") == "finished", _text(driver, "#ab-log")
        verdict = _wait(driver, lambda d: _text(d, "#ab-verdict"), 30, message="the verdict")
        assert verdict.startswith(("마커를", "여기서는")), verdict
        assert "부호 검정" in verdict and "registered" in verdict
        rows = driver.find_elements("css selector", "#ab-table tr")
        assert [r.find_elements("css selector", "td")[0].text for r in rows[1:]] == ["registered", "as-text", "deleted"]
        _wait(driver, lambda d: d.execute_script(
            "const i = document.getElementById('ab-chart'); return i.complete && i.naturalWidth > 0"), 30,
            message="ablation.png shown")
        _shot(driver, "ablate", shots)
        driver.find_element("id", "lang").click()
        english = _text(driver, "#ab-verdict")
        assert english == json.loads((root / "runs" / "ablate" / "ablation.json").read_text())["verdict"][len("verdict: "):]
        driver.find_element("id", "lang").click()
    finally:
        driver.quit()
        stop_studio(studio)

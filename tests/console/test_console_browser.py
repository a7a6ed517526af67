"""The web console in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium) against a real server with real training jobs: the key prompt, the jobs table, a job's
page with its loss chart gaining points, capacity, cancel, deploy, clone, and the new-job form
(with the server's 400 shown next to its field).

Set SLLM_SCREENSHOT_DIR to also save the screenshots the README shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import job_config, stored_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # real training jobs through the server, watched in the browser
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no Chromium here: `apt-get install -y chromium chromium-driver` (scripts/setup.sh "
        "does this where it runs as root with apt)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev dependency) missing")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "sk-console-browser-42"
WAIT_S = 90


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    server = stored_server(
        tmp_path_factory.mktemp("console") / "store",
        tiny_model_src,
        "--num-cpus",
        "2",
        api_key=KEY,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1300")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def jobs(srv):
    """A long job (watched, then cancelled) and a short one (completes, gets deployed)."""
    ids = {}
    for name, steps in (("long", 100000), ("short", 40)):
        cfg = job_config(
            srv.storage,
            training_config={"max_steps": steps, "logging_steps": 1},
            output_dir=f"tiny/adapters/{name}",
        )
        r = srv.client.post("/v1/fine_tuning/jobs", json=cfg)
        assert r.status_code == 200, r.text
        ids[name] = r.json()["job_id"]
    return ids


def wait(driver, cond, timeout: float = WAIT_S, what: str = ""):
    def check(d):
        try:
            return cond(d)
        except Exception:  # noqa: BLE001 - the page is re-rendering; ask again
            return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except Exception as exc:
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        raise AssertionError(
            f"timed out waiting for {what or cond}; browser errors: {errors}"
        ) from exc


def table_ids(driver) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr[data-job-id]")
    return [r.get_attribute("data-job-id") for r in rows]


def go(driver, srv, fragment: str) -> None:
    driver.get(f"{srv.url}/{fragment}")


def screenshot(driver, name: str) -> None:
    where = os.environ.get("SLLM_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / name))


def test_asks_for_the_key_and_keeps_it_for_the_session(srv, browser, jobs):
    go(browser, srv, "")
    gate = browser.find_element(By.ID, "keygate")
    wait(browser, lambda d: gate.is_displayed(), what="the key prompt")
    browser.find_element(By.ID, "key-input").send_keys("sk-wrong")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-message").text, what="refusal")
    assert browser.execute_script("return sessionStorage.getItem('sllm.apiKey')") == "sk-wrong"
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: set(jobs.values()) <= set(table_ids(d)), what="the jobs")
    assert not gate.is_displayed()
    # a reload keeps the key (sessionStorage): no prompt, the table fills again
    browser.refresh()
    wait(browser, lambda d: set(jobs.values()) <= set(table_ids(d)), what="the jobs again")
    assert not browser.find_element(By.ID, "keygate").is_displayed()


def test_jobs_table_newest_first_filters_and_pages(srv, browser, jobs):
    go(browser, srv, "#/jobs")
    wait(browser, lambda d: table_ids(d)[:2] == [jobs["short"], jobs["long"]], what="newest first")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{jobs["long"]}"]')
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == jobs["long"] and cells[1] == "tiny/llama" and cells[3] == "0"
    # live: the long job's progress moves without a reload
    wait(browser, lambda d: _row_status(d, jobs["long"]) == "running", what="running")
    first = _progress_step(browser, jobs["long"])
    wait(browser, lambda d: _progress_step(d, jobs["long"]) > first, what="progress to move")
    Select(browser.find_element(By.ID, "status-filter")).select_by_value("running")
    wait(browser, lambda d: jobs["long"] in table_ids(d) and jobs["short"] not in table_ids(d))
    assert all(_row_status(browser, j) == "running" for j in table_ids(browser))
    go(browser, srv, "#/jobs?limit=1")
    wait(browser, lambda d: table_ids(d) == [jobs["short"]], what="page 1")
    browser.find_element(By.ID, "next-page").click()
    wait(browser, lambda d: table_ids(d) == [jobs["long"]], what="page 2")
    browser.find_element(By.ID, "prev-page").click()
    wait(browser, lambda d: table_ids(d) == [jobs["short"]], what="back to page 1")


def _row_status(driver, job_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]').get_attribute(
        "data-status"
    )


def _progress_step(driver, job_id: str) -> int:
    cell = driver.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] td')[4].text
    return int(cell.split("/")[0]) if "/" in cell else 0


def _points(driver) -> int:
    return int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)


def test_job_page_chart_grows_while_the_job_runs(srv, browser, jobs):
    go(browser, srv, "#/jobs")
    link = f'a[href="#/job/{jobs["long"]}"]'
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, link), what="the job's link").click()
    wait(browser, lambda d: _points(d) >= 2, what="loss points")
    seen = _points(browser)
    wait(browser, lambda d: _points(d) > seen, what="the chart to gain points")
    chart = browser.find_element(By.ID, "loss-chart")
    assert chart.find_elements(By.CSS_SELECTOR, "polyline.series-Train")
    # the schedule is charted where the loss events carry the learning rate
    events = srv.client.get(f"/v1/fine_tuning/jobs/{jobs['long']}/events?limit=1000").json()
    with_lr = [e for e in events["data"] if "learning_rate" in (e["data"] or {})]
    assert with_lr, "loss events carry the learning rate"
    wait(browser, lambda d: d.find_element(By.ID, "lr-chart").is_displayed(), what="lr chart")
    events = browser.find_elements(By.CSS_SELECTOR, "#events-body tr[data-type=loss]")
    assert len(events) >= seen
    config = browser.find_element(By.ID, "job-config").text
    assert '"model": "tiny/llama"' in config and '"max_steps": 100000' in config
    stats = browser.find_element(By.ID, "job-stats").text
    assert "learning rate" in stats and "tokens/s" in stats
    log = browser.find_element(By.ID, "worker-log")
    wait(browser, lambda d: log.text and log.text != "loading...", what="the worker log panel")
    logs = srv.client.get(f"/v1/fine_tuning/jobs/{jobs['long']}/logs")
    # the log itself, followed as it grows (the Trainer prints a line per logged step)
    assert logs.status_code == 200, logs.text
    lines = lambda d: log.get_attribute("textContent").count("'loss': ")  # noqa: E731
    wait(browser, lambda d: lines(d) >= 1, what="the worker's log lines")
    shown = lines(browser)
    wait(browser, lambda d: lines(d) > shown, what="the worker's log to grow")


def test_capacity_shows_the_running_job(srv, browser, jobs):
    go(browser, srv, "#/capacity")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-owner="{jobs["long"]}"]'))
    summary = browser.find_element(By.ID, "capacity-summary").text
    assert "/ 2" in summary  # held / total CPUs


def test_pause_and_resume_from_the_job_page(srv, browser, jobs):
    go(browser, srv, f"#/job/{jobs['long']}")
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "running", what="running")
    browser.find_element(By.ID, "pause-job").click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "paused", what="paused")
    assert not browser.find_element(By.ID, "pause-job").is_displayed()
    browser.find_element(By.ID, "resume-job").click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text in ("pending", "running"))
    assert srv.client.get(f"/v1/fine_tuning/jobs/{jobs['long']}").json()["status"]["status"] in (
        "pending",
        "running",
    )


def test_cancel_from_the_job_page(srv, browser, jobs):
    go(browser, srv, f"#/job/{jobs['long']}")
    button = wait(browser, lambda d: d.find_element(By.ID, "cancel-job"))
    wait(browser, lambda d: button.is_enabled(), what="cancel enabled")
    button.click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "cancelled")
    assert srv.client.get(f"/v1/fine_tuning/jobs/{jobs['long']}").json()["status"]["status"] == (
        "cancelled"
    )
    assert not browser.find_element(By.ID, "cancel-job").is_enabled()
    go(browser, srv, "#/job/job-0000000000000000")
    wait(browser, lambda d: "job-0000000000000000" in d.find_element(By.ID, "job-missing").text)


def test_completed_job_files_deploy_and_models_page(srv, browser, jobs):
    srv.wait_status(jobs["short"], {"completed"})
    go(browser, srv, f"#/job/{jobs['short']}")
    wait(
        browser,
        lambda d: "adapter_model.safetensors" in d.find_element(By.ID, "adapter-files").text,
    )
    events = srv.client.get(f"/v1/fine_tuning/jobs/{jobs['short']}/events?limit=1000").json()
    losses = [e for e in events["data"] if e["type"] == "loss"]
    assert len(losses) >= 20
    wait(browser, lambda d: _points(d) == len(losses), what="every loss point")
    screenshot(browser, "console-job.png")
    name = browser.find_element(By.ID, "deploy-name")
    name.clear()
    name.send_keys("short-ft")
    browser.find_element(By.ID, "deploy-adapter").click()
    wait(browser, lambda d: "Deployed" in d.find_element(By.ID, "action-message").text)
    dep = srv.client.get("/v1/deployments/tiny/llama").json()
    assert {a["name"]: a["path"] for a in dep["adapters"]} == {"short-ft": "tiny/adapters/short"}
    go(browser, srv, "#/models")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-adapter="short-ft"]'))
    assert "tiny/llama" in browser.find_element(By.ID, "stored-models").text
    assert Select(browser.find_element(By.ID, "play-adapter")).first_selected_option.text == (
        "short-ft"
    )


def _with_key(driver, srv, fragment: str) -> None:
    """Open `fragment` with the key already in the session (so the test also runs alone)."""
    go(driver, srv, "")
    driver.execute_script("sessionStorage.setItem('sllm.apiKey', arguments[0])", KEY)
    go(driver, srv, fragment)
    driver.refresh()  # a new fragment alone does not start the app again
    wait(driver, lambda d: not d.find_element(By.ID, "keygate").is_displayed(), what="no prompt")


def _deployed_adapter(srv, jobs) -> str:
    """The short job's adapter deployed beside the tiny model (as the deploy test leaves it)."""
    srv.wait_status(jobs["short"], {"completed"})
    dep = srv.client.get("/v1/deployments/tiny/llama")
    if dep.status_code != 200 or "short-ft" not in {a["name"] for a in dep.json()["adapters"]}:
        body = {"model": "tiny/llama", "enable_lora": True}
        body["lora_adapters"] = {"short-ft": "tiny/adapters/short"}
        r = srv.client.post("/v1/deployments", json=body)
        assert r.status_code == 200, r.text
    return "short-ft"


def _pane(driver, which: str) -> tuple[str, str]:
    """(data-state, what the pane shows: the answer's exact text, or the error's)."""
    out = driver.find_element(By.ID, f"answer-{which}")
    state = out.get_attribute("data-state")
    shown = out.find_elements(By.CSS_SELECTOR, ".answer-text, .answer-error")
    return state, shown[0].get_attribute("textContent") if shown else ""


def _send(driver, prompt: str, max_tokens: str) -> None:
    box = driver.find_element(By.ID, "play-prompt")
    box.clear()
    box.send_keys(prompt)
    for field, value in (("play-max-tokens", max_tokens), ("play-temperature", "0")):
        _fill_id(driver, field, value)
    driver.find_element(By.ID, "play-send").click()


def _fill_id(driver, element_id: str, value: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def _settled(driver) -> bool:
    return all(_pane(driver, w)[0] in ("done", "error") for w in ("base", "adapter"))


def test_playground_shows_what_the_api_answers_side_by_side(srv, browser, jobs):
    adapter = _deployed_adapter(srv, jobs)
    _with_key(browser, srv, "#/models")
    select = lambda d: Select(d.find_element(By.ID, "play-adapter"))  # noqa: E731
    wait(browser, lambda d: select(d).first_selected_option.text == adapter, what="the adapter")
    Select(browser.find_element(By.ID, "play-model")).select_by_value("tiny/llama")
    prompt = "Tell me about the sea, matey."
    _send(browser, prompt, "8")
    wait(browser, _settled, what="both answers")
    chat = {
        "model": "tiny/llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "temperature": 0,
    }
    expected = {}
    for which, body in (("base", chat), ("adapter", {**chat, "lora_adapter_name": adapter})):
        r = srv.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        expected[which] = r.json()["choices"][0]["message"]["content"]
        assert _pane(browser, which) == ("done", expected[which])  # greedy: the same tokens
    assert expected["base"] and expected["base"] != expected["adapter"], expected  # 2 models

    # a 4xx from the server is shown in both panes, with its status and message
    _send(browser, prompt, "0")
    wait(browser, _settled, what="the refusals")
    r = srv.client.post("/v1/chat/completions", json={**chat, "max_tokens": 0})
    assert 400 <= r.status_code < 500
    message = r.json()["error"]["message"]
    for which in ("base", "adapter"):
        assert _pane(browser, which) == ("error", f"{r.status_code}: {message}")

    # an adapter gone since the list was drawn (the list refreshes every 3 s): the base pane
    # answers, the adapter pane shows the server's 404/400 naming the adapter
    browser.execute_script(
        "const s = document.getElementById('play-adapter');"
        "s.append(new Option('gone-ft', 'gone-ft', true, true));"
        "document.getElementById('play-max-tokens').value = '8';"
        "document.getElementById('play-send').click();"
    )
    wait(browser, _settled, what="the answer and the refusal")
    assert _pane(browser, "base") == ("done", expected["base"])
    r = srv.client.post("/v1/chat/completions", json={**chat, "lora_adapter_name": "gone-ft"})
    assert 400 <= r.status_code < 500 and "gone-ft" in r.json()["error"]["message"]
    state, shown = _pane(browser, "adapter")
    assert (state, shown) == ("error", f"{r.status_code}: {r.json()['error']['message']}")


def _field_error(driver, param: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'.field-error[data-error-for="{param}"]').text


def _fill(driver, param: str, value: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f'[name="{param}"]')
    box.clear()
    box.send_keys(value)


def test_new_job_form_shows_the_400_by_its_field_then_submits(srv, browser, jobs):
    before = len(srv.client.get("/v1/fine_tuning/jobs?limit=100").json()["data"])
    go(browser, srv, "#/new")
    model = wait(browser, lambda d: d.find_element(By.NAME, "model"))
    wait(browser, lambda d: "tiny/llama" in model.text, what="the stored models")
    Select(model).select_by_value("tiny/llama")
    ds = "backend_config.dataset_config"
    _fill(browser, f"{ds}.data_files", str(srv.storage / "data" / "train.jsonl"))
    Select(browser.find_element(By.NAME, f"{ds}.extension_type")).select_by_value("json")
    _fill(browser, "backend_config.output_dir", "tiny/adapters/form")
    lr = "backend_config.training_config.learning_rate"
    _fill(browser, lr, "-1")
    _fill(browser, "backend_config.training_config.max_steps", "3")
    # defaults are shown where fields are empty
    epochs = browser.find_element(By.NAME, "backend_config.training_config.num_train_epochs")
    assert epochs.get_attribute("placeholder") == "default: 3"
    browser.find_element(By.ID, "submit-job").click()
    wait(browser, lambda d: "learning_rate" in _field_error(d, lr), what="the 400 by its field")
    assert "must be a number > 0" in _field_error(browser, lr)
    assert len(srv.client.get("/v1/fine_tuning/jobs?limit=100").json()["data"]) == before
    _fill(browser, lr, "0.01")
    browser.find_element(By.ID, "submit-job").click()
    wait(browser, lambda d: d.current_url.split("#/job/")[-1].startswith("job-"), what="job page")
    job_id = browser.current_url.split("#/job/")[-1]
    cfg = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]["config"]
    assert cfg["model"] == "tiny/llama" and cfg["ft_backend"] == "peft_lora"
    assert cfg["backend_config"]["training_config"] == {"learning_rate": 0.01, "max_steps": 3}
    assert cfg["backend_config"]["dataset_config"]["tokenization_field"] == "prompt"


def test_form_offers_an_upload_only_where_the_files_api_answers(srv, browser, jobs):
    go(browser, srv, "#/new")
    ds = "backend_config.dataset_config"
    source = wait(browser, lambda d: d.find_element(By.NAME, f"{ds}.dataset_source"))
    form = lambda d: d.find_element(By.ID, "new-job-form")  # noqa: E731
    wait(
        browser, lambda d: form(d).get_attribute("data-ready") == "true", what="the form's choices"
    )
    offered = [o.get_attribute("value") for o in Select(source).options]
    has_files = srv.client.get("/v1/files").status_code == 200
    assert offered == (["local", "hf_hub", "file"] if has_files else ["local", "hf_hub"])
    if not has_files:
        return
    Select(browser.find_element(By.NAME, "model")).select_by_value("tiny/llama")
    Select(source).select_by_value("file")
    picker = browser.find_element(By.ID, "dataset-file")
    status = browser.find_element(By.ID, "upload-status")
    # a file the Files API refuses: its 400 shows by the upload field
    picker.send_keys(str(srv.storage / "data" / "train.jsonl"))  # {"prompt": ...} rows only
    wait(browser, lambda d: "line 1" in _field_error(d, f"{ds}.file_id"), what="the upload's 400")
    rows = srv.storage / "data" / "upload.jsonl"
    rows.write_text("".join(f'{{"text": "Ahoy number {i}, matey."}}\n' for i in range(12)))
    picker.send_keys(str(rows))
    wait(browser, lambda d: status.text.startswith("uploaded as file-"), what="the upload")
    file_id = status.text.removeprefix("uploaded as ")
    _fill(browser, f"{ds}.tokenization_field", "text")
    _fill(browser, "backend_config.output_dir", "tiny/adapters/uploaded")
    _fill(browser, "backend_config.training_config.max_steps", "2")
    browser.find_element(By.ID, "submit-job").click()
    wait(browser, lambda d: "#/job/job-" in d.current_url, what="the job page")
    job_id = browser.current_url.split("#/job/")[-1]
    cfg = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]["config"]
    assert cfg["backend_config"]["dataset_config"] == {
        "dataset_source": "file",
        "file_id": file_id,
        "tokenization_field": "text",
    }


def test_clone_prefills_the_form(srv, browser, jobs):
    go(browser, srv, f"#/job/{jobs['short']}")
    wait(browser, lambda d: d.find_element(By.ID, "clone-job").is_enabled())
    wait(browser, lambda d: "tiny/llama" in d.find_element(By.ID, "job-config").text)
    browser.find_element(By.ID, "clone-job").click()
    wait(browser, lambda d: d.find_elements(By.ID, "cloned-from"), what="the form")
    wait(
        browser,
        lambda d: (
            Select(d.find_element(By.NAME, "model")).first_selected_option.text == "tiny/llama"
        ),
    )
    steps = browser.find_element(By.NAME, "backend_config.training_config.max_steps")
    assert steps.get_attribute("value") == "40"
    preview = browser.find_element(By.ID, "request-preview").text
    assert '"output_dir": "tiny/adapters/short"' in preview
    assert '"save_strategy": "no"' in preview  # kept though the form has no field for it


def test_validation_loss_is_charted_beside_the_training_loss(srv, browser, jobs):
    cfg = job_config(
        srv.storage,
        training_config={"max_steps": 30, "logging_steps": 1},
        output_dir="tiny/adapters/validated",
    )
    cfg["backend_config"]["dataset_config"]["validation_split"] = 0.25
    r = srv.client.post("/v1/fine_tuning/jobs", json=cfg)
    if r.status_code == 400 and "validation_split" in (r.json()["error"]["param"] or ""):
        pytest.skip("this server has no validation split (issue #10)")
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    srv.wait_status(job_id, {"completed"})
    events = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    valid = [e for e in events if isinstance((e["data"] or {}).get("valid_loss"), float)]
    assert len(valid) >= 2
    go(browser, srv, f"#/job/{job_id}")
    chart = lambda d: d.find_element(By.ID, "loss-chart")  # noqa: E731
    wait(browser, lambda d: chart(d).get_attribute("data-points-valid") == str(len(valid)))
    assert chart(browser).find_elements(By.CSS_SELECTOR, "polyline.series-Valid")
    assert browser.find_element(By.ID, "valid-legend").is_displayed()
    screenshot(browser, "console-job.png")  # the README's, with both curves where there are two


def test_without_keys_the_console_opens_straight_away(tmp_path_factory, tiny_model_src, browser):
    server = stored_server(tmp_path_factory.mktemp("open") / "store", tiny_model_src)
    try:
        browser.execute_script("sessionStorage.clear()")
        go(browser, server, "#/jobs")
        wait(browser, lambda d: "No jobs." in d.find_element(By.ID, "jobs-body").text)
        assert not browser.find_element(By.ID, "keygate").is_displayed()
    finally:
        server.stop()

"""oral serve over real HTTP: uvicorn on a free localhost port, a tiny generator, tiny-llama as the base."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sms-spam", "movie-sentiment")
BASE = "tiny-llama"
HEX_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A generator trained briefly on a 2-task zoo of tiny-llama (3 checkpoints per 12-step run)."""
    from oral.config import load_config
    from oral.finetune import train_lora
    from oral.generate import Generator
    from oral.train import GeneratorTrainConfig, train_generator

    zoo, out = tmp_path_factory.mktemp("zoo"), tmp_path_factory.mktemp("gen") / "gen"
    cfg = load_config(GeneratorTrainConfig, REPO / "configs" / "generator-tiny.yaml",
                      ["device=cpu", "steps=40", "save_every=40", "warmup_steps=5"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread beats two on a shared 2-core machine
    try:
        for task in TASKS:
            train_lora(BASE, task, rank=4, steps=12, keep=3, save_every=3, out_dir=zoo, seed=0,
                       lr=2e-2, warmup_steps=2, eval_limit=4, eval_base=False)
        train_generator([zoo], out, cfg)
    finally:
        torch.set_num_threads(threads)
    return Generator.from_pretrained(out, device="cpu")


def make_app(generator, store: Path, **kwargs):
    from oral.models import load_base
    from oral.serve import create_app

    return create_app(generator, {BASE: load_base(BASE)}, store, **kwargs)  # its own copy of the base


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread; yield its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def app(generator, store):
    return make_app(generator, store)


@pytest.fixture(scope="module")
def client(app):
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def adapter(client) -> dict:
    r = client.post("/v1/adapters", json={"base": BASE, "prompt": "tell spam text messages from normal ones", "seed": 3})
    assert r.status_code == 201, r.text
    return r.json()


def assert_one_line_error(r: httpx.Response, status: int, words: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    reason = r.json()["error"]
    assert reason and "\n" not in reason and words.lower() in reason.lower(), reason


# -----------------------------------------------------------------------------
# Making, listing, downloading


def test_generated_adapter_is_stored_with_provenance_spec_and_link(adapter, store):
    assert len(adapter["id"]) == 32 and int(adapter["id"], 16) >= 0
    assert adapter["base"] == BASE and adapter["prompt"] == "tell spam text messages from normal ones"
    prov = adapter["provenance"]
    assert prov["seed"] == 3 and prov["steps"] == 60 and prov["guidance"] == 1.0 and prov["source"] == "oral serve"
    assert prov["zoo_manifest_sha256"] and prov["generator_step"] == 40
    spec = adapter["spec"]
    assert spec["rank"] == 4 and spec["layers"] == 2 and spec["params"] > 0 and spec["modules"]
    assert adapter["download"] == f"/v1/adapters/{adapter['id']}/download"
    assert (store / adapter["id"] / "adapter_model.safetensors").is_file()


def test_list_and_metadata_read_the_store(client, adapter):
    listed = client.get("/v1/adapters").json()["adapters"]
    assert adapter["id"] in [m["id"] for m in listed]
    meta = client.get(f"/v1/adapters/{adapter['id']}").json()
    assert meta == adapter


def test_download_unzips_to_an_adapter_plain_peft_loads_with_our_weights(client, adapter, tmp_path):
    from peft import PeftModel

    from oral.lora import load_adapter
    from oral.models import load_base

    r = client.get(adapter["download"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f'oral-{adapter["id"]}.zip' in r.headers["content-disposition"]
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    folder = tmp_path / f"oral-{adapter['id']}"
    _, state = load_adapter(folder)
    model, tok = load_base(BASE)
    ids = tok("Free entry! Text WIN to claim your prize", return_tensors="pt").input_ids
    with torch.no_grad():
        bare = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
        with_adapter = peft_model(ids).logits
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(state)
    for key, value in state.items():  # PEFT holds exactly the weights the server stored
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)
    assert not torch.allclose(bare, with_adapter)


def test_stored_adapter_is_what_vllm_loads_lora_tensors_only_rank_within_16(adapter, store):
    folder = store / adapter["id"]
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".safetensors")) and f != "adapter_model.safetensors"], files
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] <= 16
    assert all(r <= 16 for r in config.get("rank_pattern", {}).values())
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), keys
        for k in keys:
            shape = f.get_slice(k).get_shape()  # A: (r, in), B: (out, r)
            assert (shape[0] if k.endswith(".lora_A.weight") else shape[1]) <= 16, (k, shape)


# -----------------------------------------------------------------------------
# Trying an adapter next to the base


def test_try_with_a_task_gives_the_evaluators_labels_with_and_without_the_adapter(client, adapter, store):
    from oral.evaluate import Evaluator
    from oral.models import load_base
    from oral.tasks import Example, get_task

    inputs = ["WINNER!! Claim your free prize now, text CLAIM to 80086", "are we still on for lunch tomorrow?"]
    r = client.post("/v1/try", json={"base": BASE, "adapter": adapter["id"], "inputs": inputs, "task": "sms-spam"})
    assert r.status_code == 200, r.text
    res = r.json()
    task = get_task("sms-spam")
    assert res["kind"] == "classification" and res["labels"] == task.labels
    assert [row["input"] for row in res["rows"]] == inputs
    assert res["rows"][0]["prompt"] == task.template.format(text=inputs[0])
    # the same predictions as an evaluator of our own, bare and with the stored adapter
    ev = Evaluator(*load_base(BASE), progress=False)
    examples = [Example(row["prompt"], "", None, {}) for row in res["rows"]]
    bare = [task.labels[i] for i in ev.classify(task, examples)]
    ev.set_adapter(store / adapter["id"])
    adapted = [task.labels[i] for i in ev.classify(task, examples)]
    assert [row["base"]["label"] for row in res["rows"]] == bare
    assert [row["adapter"]["label"] for row in res["rows"]] == adapted
    for row in res["rows"]:
        for side in ("base", "adapter"):
            scores = row[side]["scores"]
            assert set(scores) == set(task.labels) and abs(sum(scores.values()) - 1) < 1e-3
            assert max(scores, key=scores.get) == row[side]["label"]
    assert any(row["base"]["scores"] != row["adapter"]["scores"] for row in res["rows"])


def test_try_without_a_task_gives_greedy_continuations_and_base_only_without_adapter(client, adapter):
    r = client.post("/v1/try", json={"base": BASE, "adapter": adapter["id"], "inputs": ["Once upon a time"]})
    assert r.status_code == 200, r.text
    row = r.json()["rows"][0]
    assert r.json()["kind"] == "continuation" and row["prompt"] == "Once upon a time"
    assert isinstance(row["base"]["text"], str) and isinstance(row["adapter"]["text"], str)
    r = client.post("/v1/try", json={"base": BASE, "inputs": ["Once upon a time"]})
    assert r.status_code == 200 and r.json()["rows"][0]["adapter"] is None
    assert r.json()["rows"][0]["base"] == row["base"]  # the adapter was switched off again


# -----------------------------------------------------------------------------
# Bad input: a 4xx with a one-line reason


BAD = [
    ("/v1/adapters", {"base": BASE, "prompt": ""}, 400, "empty"),
    ("/v1/adapters", {"base": BASE, "prompt": "   "}, 400, "empty"),
    ("/v1/adapters", {"base": BASE, "prompt": "x" * 20000}, 400, "limit is 2000"),
    ("/v1/adapters", {"base": "smollm2-135m", "prompt": "spam"}, 400, "unknown base"),
    ("/v1/adapters", {"base": "/etc", "prompt": "spam"}, 400, "unknown base"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "steps": 0}, 400, "steps"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "steps": 100000}, 400, "steps"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "guidance": -1}, 400, "guidance"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "seed": -1}, 400, "seed"),
    ("/v1/adapters", {"base": BASE}, 422, "prompt"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "steps": "many"}, 422, "steps"),
    ("/v1/adapters", {"base": BASE, "prompt": "spam", "path": "/tmp/x"}, 422, "path"),
    ("/v1/adapters", [1, 2], 422, ""),
    ("/v1/try", {"base": BASE, "inputs": []}, 400, "empty"),
    ("/v1/try", {"base": BASE, "inputs": ["hi"] * 17}, 400, "limit is 16"),
    ("/v1/try", {"base": BASE, "inputs": ["x" * 1001]}, 400, "limit is 1000"),
    ("/v1/try", {"base": BASE, "inputs": [""]}, 400, "empty"),
    ("/v1/try", {"base": "nope", "inputs": ["hi"]}, 400, "unknown base"),
    ("/v1/try", {"base": BASE, "inputs": ["hi"], "task": "nope"}, 400, "unknown task"),
    ("/v1/try", {"base": BASE, "inputs": ["hi"], "task": "src/oral/tasks/builtin_tasks/sms-spam.yaml"}, 400, "unknown task"),
    ("/v1/try", {"base": BASE, "inputs": ["hi"], "adapter": HEX_ID}, 404, "no adapter"),
    ("/v1/try", {"base": BASE, "inputs": ["hi"], "adapter": "../../etc"}, 400, "invalid adapter id"),
    ("/v1/try", {"base": BASE, "inputs": "hi"}, 422, "inputs"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}-{s}-{w or 'type'}-{i}" for i, (p, _, s, w) in enumerate(BAD)])
def test_bad_request_gets_4xx_with_one_line_reason(client, path, body, status, words):
    assert_one_line_error(client.post(path, json=body), status, words)


def test_malformed_json_oversized_body_and_missing_length_are_refused(client):
    headers = {"content-type": "application/json"}
    assert_one_line_error(client.post("/v1/adapters", content=b'{"base": "tiny-llama", "prompt": ', headers=headers), 400, "malformed JSON")
    big = json.dumps({"base": BASE, "prompt": "x" * 100_000}).encode()
    assert_one_line_error(client.post("/v1/adapters", content=big, headers=headers), 413, "limit is 65536")
    chunked = client.post("/v1/adapters", content=iter([b'{"base": "tiny-llama", "prompt": "spam"}']), headers=headers)
    assert_one_line_error(chunked, 411, "Content-Length")


@pytest.mark.parametrize("adapter_id", ["..", "...", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc", HEX_ID.upper(),
                                        HEX_ID[:-1], HEX_ID + "0", "." + HEX_ID[1:], "%00" + HEX_ID[3:], "x" * 32])
def test_adapter_ids_other_than_32_lowercase_hex_never_reach_the_disk(client, store, adapter_id):
    (store.parent / "secret.txt").write_text("do not serve")
    for suffix in ("", "/download"):
        r = client.get(f"/v1/adapters/{adapter_id}{suffix}")
        assert 400 <= r.status_code < 500 and "do not serve" not in r.text, (adapter_id, r.status_code, r.text)
        assert "\n" not in r.json()["error"]


def test_unknown_adapter_id_is_404(client):
    assert_one_line_error(client.get(f"/v1/adapters/{HEX_ID}"), 404, "no adapter")
    assert_one_line_error(client.get(f"/v1/adapters/{HEX_ID}/download"), 404, "no adapter")


# -----------------------------------------------------------------------------
# Queueing, failures, restarts


def test_generations_queue_one_at_a_time(client, app):
    service = app.state.service
    real, running_now, most = service.generator.generate, [0], [0]

    def counted(*args, **kwargs):
        running_now[0] += 1
        most[0] = max(most[0], running_now[0])
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            running_now[0] -= 1

    service.generator.generate = counted
    try:
        with ThreadPoolExecutor(3) as pool:
            rs = list(pool.map(lambda s: client.post("/v1/adapters", json={"base": BASE, "prompt": "spam", "seed": s, "steps": 5}),
                               range(3)))
    finally:
        service.generator.generate = real
    assert [r.status_code for r in rs] == [201] * 3
    assert len({r.json()["id"] for r in rs}) == 3 and most[0] == 1


def test_failed_generation_stores_nothing(client, app, store):
    service = app.state.service
    real = service.generator.generate

    def nan_adapter(*args, **kwargs):
        spec, state = real(*args, **kwargs)
        return spec, {k: torch.full_like(v, float("nan")) for k, v in state.items()}

    before = sorted(p.name for p in store.iterdir())
    service.generator.generate = nan_adapter
    try:
        r = client.post("/v1/adapters", json={"base": BASE, "prompt": "spam", "steps": 5})
    finally:
        service.generator.generate = real
    assert_one_line_error(r, 500, "nothing was stored")
    assert sorted(p.name for p in store.iterdir()) == before  # no new dir, no temporary debris


def test_store_survives_a_restart(generator, adapter, store):
    with running(make_app(generator, store)) as url:
        listed = httpx.get(f"{url}/v1/adapters", timeout=60).json()["adapters"]
    assert adapter["id"] in [m["id"] for m in listed]


# -----------------------------------------------------------------------------
# Safe by default


def test_api_key_is_required_on_every_v1_call_when_set(generator, adapter, store):
    with running(make_app(generator, store, api_key="s3cret")) as url, httpx.Client(base_url=url, timeout=60) as c:
        calls = [("GET", "/v1/info", None), ("GET", "/v1/adapters", None), ("GET", f"/v1/adapters/{adapter['id']}", None),
                 ("GET", f"/v1/adapters/{adapter['id']}/download", None),
                 ("POST", "/v1/try", {"base": BASE, "inputs": ["hi"]}), ("POST", "/v1/adapters", {"base": BASE, "prompt": ""})]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                assert_one_line_error(c.request(method, path, json=body, headers=headers), 401, "API key")
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/adapters", headers=ok).status_code == 200
        assert c.get(f"/v1/adapters/{adapter['id']}/download", headers=ok).status_code == 200
        assert c.get("/healthz").json() == {"status": "ok", "auth": True}  # the probe and the page stay open
        assert c.get("/").status_code == 200


def test_binding_beyond_loopback_needs_an_api_key(monkeypatch, capsys, tmp_path):
    from oral.cli import main
    from oral.serve import check_bind, serve

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ValueError, match="API key"):
            check_bind(host, None)
        check_bind(host, "key")
    with pytest.raises(ValueError, match="API key"):  # before anything loads: the generator dir does not exist
        serve(tmp_path / "no-generator", host="0.0.0.0")
    monkeypatch.delenv("ORAL_API_KEY", raising=False)
    assert main(["serve", "--generator", str(tmp_path / "no-generator"), "--host", "0.0.0.0"]) == 2
    assert "API key" in capsys.readouterr().err


def test_cli_serves_the_store_in_a_process_of_its_own(generator, adapter, store):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ORAL_API_KEY"}
    cmd = [sys.executable, "-m", "oral.cli", "serve", "--generator", str(generator.path), "--base", BASE,
           "--port", str(port), "--store", str(store), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "oral serve did not answer in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/adapters", timeout=30).json()["adapters"]
        assert adapter["id"] in [m["id"] for m in listed]
    finally:
        proc.terminate()
        proc.wait(30)


def test_page_and_health_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="base"', 'id="generate"', 'id="inputs"', 'id="try"', "/v1/adapters", "/v1/try"):
        assert element in r.text
    assert client.get("/healthz").json() == {"status": "ok", "auth": False}
    info = client.get("/v1/info").json()
    assert info["bases"] == [BASE] and "sms-spam" in [t["name"] for t in info["tasks"]]


# -----------------------------------------------------------------------------
# The page in a real headless browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_page_in_headless_chromium_makes_an_adapter_and_shows_it_next_to_the_base(client, tmp_path):
    """Set ORAL_SCREENSHOT=PATH to keep the screenshot (docs/serve.png is made this way)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,1000",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(str(client.base_url) + "/")
        wait.until(lambda d: Select(d.find_element(By.ID, "base")).options)
        driver.find_element(By.ID, "prompt").send_keys("tell spam text messages from normal ones")
        driver.find_element(By.ID, "generate").click()
        wait.until(ec.presence_of_element_located((By.ID, "download")))
        assert "Adapter " in driver.find_element(By.ID, "adapter").text
        driver.find_element(By.ID, "inputs").send_keys(
            "WINNER!! Claim your free prize now, text CLAIM to 80086\nare we still on for lunch tomorrow?")
        Select(driver.find_element(By.ID, "task")).select_by_value("sms-spam")
        driver.find_element(By.ID, "try").click()
        wait.until(ec.presence_of_element_located((By.ID, "results-table")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#results-table tr")[1:]
        assert len(rows) == 2
        for row in rows:
            cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            assert len(cells) == 3 and all(cells), cells
            assert cells[1].split("\n")[0] in ("spam", "ham") and cells[2].split("\n")[0] in ("spam", "ham")
        assert driver.find_element(By.ID, "status").text == ""
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("ORAL_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["ORAL_SCREENSHOT"])
    finally:
        driver.quit()

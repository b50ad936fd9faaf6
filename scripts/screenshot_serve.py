"""docs/serve.png: `oral serve` with the bundled generator on smollm2-135m, driven in headless Chromium.

Needs Debian's chromium + chromium-driver and selenium (the test extra):
    python scripts/screenshot_serve.py [--out docs/serve.png] [--port 8765]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

PROMPT = "Tell spam text messages from normal ones."
INPUTS = "WINNER!! Claim your free prize now, text CLAIM to 80086\nare we still on for lunch tomorrow?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="oral-serve-")
    server = subprocess.Popen([sys.executable, "-m", "oral.cli", "serve", "--port", str(args.port), "--store", store])
    url = f"http://127.0.0.1:{args.port}/"
    try:
        for _ in range(240):  # the generator and the base load first
            try:
                urllib.request.urlopen(url + "healthz", timeout=2)
                break
            except OSError:
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,1000",
                    f"--user-data-dir={tempfile.mkdtemp()}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                                  options=options)
        try:
            wait = WebDriverWait(driver, 300)
            driver.get(url)
            wait.until(lambda d: Select(d.find_element(By.ID, "base")).options)
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            driver.find_element(By.ID, "generate").click()
            wait.until(ec.presence_of_element_located((By.ID, "download")))
            driver.find_element(By.ID, "inputs").send_keys(INPUTS)
            Select(driver.find_element(By.ID, "task")).select_by_value("sms-spam")
            driver.find_element(By.ID, "try").click()
            wait.until(ec.presence_of_element_located((By.ID, "results-table")))
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()

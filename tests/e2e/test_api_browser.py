"""The API's page in a real headless Chromium: a user submits a package,
watches its progress bar reach 100 % (pushed by the event stream), and the
chapters' audio elements point at signed URLs that answer MP3; a second user
sees none of it. Runs ``pg-broker api`` and a real ``celery -A tasks worker``.
The screenshot goes to tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import mutagen.mp3
import pytest
from celery_workers import REPO_ROOT, free_port, process, wait_for

from tasks.api.auth import DEV_SECRET, mint_token
from tasks.demo import start_worker

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO_ROOT / "tests" / "artifacts"
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a1c3")
BOB = uuid.UUID("00000000-0000-4000-8000-00000000b0b2")


@pytest.fixture
def site(database_url: str, db, tmp_path: Path) -> Iterator[str]:
    """``pg-broker api --dev`` and a worker of the app on the test database."""
    env = {**os.environ, "PG_BROKER_URL": database_url, "PG_BROKER_STORAGE_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO_ROOT)}
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
                 "SUPABASE_JWT_SECRET"):
        env.pop(name, None)
    port = free_port()
    api = process(["pg-broker", "api", "--dev", "--port", str(port)], env, tmp_path / "api.log")
    worker = start_worker(env, f"browser-{uuid.uuid4().hex[:6]}@%h", pool="solo",
                          log_file=tmp_path / "worker.log")
    api.start()
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(base + "/openapi.json", timeout=2).status_code == 200
            except httpx.HTTPError:
                return not api.alive
        wait_for(up, 60, lambda: api.describe("the API to answer"))
        assert api.alive, api.describe("the API exited")
        yield base
    finally:
        api.stop()
        worker.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pg-broker-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1200,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _jobs(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.job')].map(e => ({id: e.dataset.id,"
        " status: e.dataset.status, progress: Number(e.dataset.progress),"
        " bar: e.querySelector('.bar > div').style.width,"
        " audio: [...e.querySelectorAll('audio')].map(a => a.src)}))")


def test_a_user_submits_watches_progress_reach_100_and_plays_the_mp3s(site: str, browser) -> None:
    driver = browser
    driver.get(f"{site}/#token={mint_token(ALICE, DEV_SECRET)}")
    wait_for(lambda: "Signed in as" in driver.find_element("id", "who").text, 30, "sign-in")
    driver.find_element("id", "title").clear()
    driver.find_element("id", "title").send_keys("Browser package")
    driver.find_element("id", "send").click()

    def done() -> list[dict] | None:
        jobs = _jobs(driver)
        return jobs if jobs and jobs[0]["status"] in ("completed", "failed") and len(
            jobs[0]["audio"]) == 2 else None

    (job,) = wait_for(done, 120, lambda: f"the job to finish; page shows {_jobs(driver)}; "
                      f"message: {driver.find_element('id', 'message').text!r}")
    assert (job["status"], job["progress"], job["bar"]) == ("completed", 100, "100%")
    driver.execute_script("document.querySelector('.job').scrollIntoView()")
    wait_for(lambda: driver.execute_script(
        "const bar = document.querySelector('.job .bar');"
        " return bar.firstElementChild.getBoundingClientRect().width >= bar.clientWidth - 1"),
        10, "the bar's animation to end")
    SCREENSHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / "api-page.png"))
    for src in job["audio"]:
        response = httpx.get(src, timeout=30)
        assert (response.status_code, response.headers["content-type"]) == (200, "audio/mpeg")
        # An ID3 tag (which chapter it is), then MPEG layer III frames.
        audio = mutagen.mp3.MP3(io.BytesIO(response.content))
        assert audio.tags is not None and audio.info.layer == 3, response.content[:16]
        assert audio.info.length > 0.5
    # The element itself can load it: Chromium reads its duration.
    duration = driver.execute_async_script(
        "const done = arguments[0]; const a = document.querySelector('audio');"
        " a.preload = 'auto'; a.addEventListener('loadedmetadata', () => done(a.duration));"
        " a.addEventListener('error', () => done(-1)); a.load();")
    assert duration > 0.5

    driver.get(f"{site}/#token={mint_token(BOB, DEV_SECRET)}")
    wait_for(lambda: str(BOB) in driver.find_element("id", "who").text
             and driver.find_element("id", "jobs").get_attribute("data-loaded"), 30,
             "Bob signed in and his jobs listed")
    assert _jobs(driver) == []
    mine = driver.execute_async_script(
        "const done = arguments[0]; fetch('/v1/jobs/" + job["id"] + "', {headers: {Authorization:"
        " 'Bearer ' + localStorage.getItem('pgbroker.token')}}).then(r => done(r.status));")
    assert mine == 404

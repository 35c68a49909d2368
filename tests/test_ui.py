"""The live page in headless Chromium (Debian's `chromium`; `.ci/run` installs it): what a person
sees after typing the admin key, the rollback button, and a screenshot that is not blank."""

import asyncio
import base64
import io
import itertools
import json
import shutil
import subprocess

import aiohttp
import openai
import pytest

from tests.test_adapters import adapter_dir
from tests.test_auth import ADMIN_KEY, CLIENT_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")


class Browser:
    """Chromium driven over the DevTools protocol (a websocket), one page."""

    def __init__(self, process: subprocess.Popen, socket: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession):
        self.process, self.socket, self.session = process, socket, session
        self.ids = itertools.count(1)
        self.dialogs: list[str] = []

    @classmethod
    async def start(cls, profile) -> "Browser":
        process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1280,1800", "about:blank"],
            stderr=subprocess.PIPE, text=True)
        endpoint = await asyncio.wait_for(asyncio.to_thread(cls._devtools_url, process), 60)
        session = aiohttp.ClientSession()
        port = endpoint.split(":")[2].split("/")[0]
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            [page] = [t for t in await response.json() if t["type"] == "page"]
        browser = cls(process, await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0), session)
        await browser.send("Page.enable")
        await browser.send("Runtime.enable")
        return browser

    @staticmethod
    def _devtools_url(process: subprocess.Popen) -> str:
        for line in process.stderr:
            if line.startswith("DevTools listening on "):
                return line.split()[-1]
        raise AssertionError("chromium exited before it listened")

    async def send(self, method: str, **params):
        call_id = next(self.ids)
        await self.socket.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.socket.receive_json(), 30)
            if message.get("method") == "Page.javascriptDialogOpening":  # a confirm(): a person clicks OK
                self.dialogs.append(message["params"]["message"])
                asyncio.get_running_loop().create_task(self.send_nowait("Page.handleJavaScriptDialog", accept=True))
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    async def send_nowait(self, method: str, **params) -> None:
        await self.socket.send_json({"id": next(self.ids), "method": method, "params": params})

    async def run(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def text_shows(self, *wanted: str, timeout_s: float = 30) -> str:
        """The page's visible text once it shows every `wanted` string (bounded wait)."""
        text = ""
        for _ in range(int(timeout_s / 0.25)):
            text = await self.run("document.body ? document.body.innerText : ''") or ""
            if all(w in text for w in wanted):
                return text
            await asyncio.sleep(0.25)
        raise AssertionError(f"the page never showed {wanted}; it shows:\n{text}")

    async def close(self) -> None:
        await self.socket.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(30)


async def _traffic(proxy, tmp_path) -> None:
    """Held-out and training episodes on the base model, then on planner-v1."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/planner/v1", api_key=CLIENT_KEY, max_retries=0)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as session:
        for round_no, reward in ((0, 0.25), (1, 0.75)):
            if round_no:
                async with session.post(f"{proxy.url}/v1/adapters", headers=admin,
                                        json={"agent": "planner", "path": adapter_dir(tmp_path)}) as r:
                    assert r.status == 201
            for k, held_out in itertools.product(range(3), (True, False)):
                async with session.post(f"{proxy.url}/v1/episodes", json={
                        "task": f"sum-{k}", "metadata": {"eval": held_out}}) as r:
                    assert r.status == 201, await r.text()
                    episode = (await r.json())["episode_id"]
                await client.chat.completions.create(model="base", messages=[{"role": "user", "content": f"add {k}"}],
                                                     extra_headers={"X-Flywheel-Episode": episode})
                async with session.post(f"{proxy.url}/v1/episodes/{episode}/feedback",
                                        json={"reward": reward + 0.1 * k}) as r:
                    assert r.status == 200


async def test_a_person_sees_rewards_agents_adapters_and_episodes_and_can_roll_back(start_proxy, tmp_path):
    from PIL import Image

    proxy = await start_proxy(api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,), adapter_roots=(str(tmp_path),))
    await _traffic(proxy, tmp_path)
    browser = await Browser.start(tmp_path / "profile")
    try:
        await browser.send("Page.navigate", url=f"{proxy.url}/ui")
        await browser.text_shows("an admin key is needed")
        assert await browser.run("getComputedStyle(document.getElementById('key-form')).display") != "none"
        await browser.run("document.getElementById('key').focus()")
        await browser.send("Input.insertText", text=ADMIN_KEY)
        await browser.run("document.querySelector('#key-form button').click()")
        text = await browser.text_shows("ready", "planner-v1", "roll back", "(held-out)")
        assert "an admin key is needed" not in text
        assert await browser.run("getComputedStyle(document.getElementById('key-form')).display") == "none"
        assert "no learner" in text.lower()  # this proxy has none
        # the held-out table: the base model, then planner-v1, 3 episodes each, means 0.35 and 0.85
        assert await browser.run("document.querySelectorAll('#heldout-table tbody tr').length") == 2
        rows = await browser.run("[...document.querySelectorAll('#heldout-table tbody tr')].map(r => r.innerText)")
        assert rows[0].startswith("base\t3\t0.35") and rows[1].startswith("planner-v1\t3\t0.85"), rows
        assert await browser.run("document.querySelectorAll('#reward-chart svg circle').length") >= 4 + 2
        assert await browser.run("document.querySelectorAll('#episodes details').length") == 12
        await browser.run("document.querySelector('#episodes summary').click()")  # the latest episode's calls
        await browser.text_shows("add 2\t w0 w1 w2 w3\t0.95")  # prompt, completion, credit
        png = base64.b64decode((await browser.send("Page.captureScreenshot", format="png"))["data"])
        (tmp_path / "ui.png").write_bytes(png)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        colours = image.getcolors(maxcolors=1 << 20)
        background = max(colours)[0] / (image.width * image.height)
        assert image.width >= 1000 and len(colours) > 50 and background < 0.95, (len(colours), background)

        await browser.run("[...document.querySelectorAll('#adapters button')].find(b => b.innerText === 'roll back')"
                          ".click()")
        await browser.text_shows("base model")
        assert browser.dialogs == ["Roll planner back from planner-v1 to its previous version?"]
    finally:
        await browser.close()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as session:
        async with session.get(f"{proxy.url}/v1/adapters") as r:
            assert (await r.json())["agents"]["planner"]["current"] is None


async def test_the_page_holds_no_data_and_its_data_needs_the_admin_key(start_proxy):
    proxy = await start_proxy(api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/ui") as r:
            assert r.status == 200 and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert "<script src=\"/ui/app.js\"" in await r.text()
        async with session.get(f"{proxy.url}/ui/nothing.js") as r:
            assert r.status == 404
        for key, status in ((None, 401), (CLIENT_KEY, 403), (ADMIN_KEY, 200)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.get(f"{proxy.url}/v1/dashboard", headers=headers) as r:
                assert r.status == status
                if status == 200:
                    assert set(json.loads(await r.text())) == {"heldout", "train", "updates", "agents", "episodes"}

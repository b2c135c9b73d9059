"""The chat page in a real browser (headless Chromium via Selenium; skipped, with the reason, where
the OS has no Chromium: `sudo make browser-deps`).

The answer, Stop, reload and screenshot tests talk to the real SmolLM2-135M-Instruct; the key,
error and RAG tests to the tiny random Llama of tests/eval. Nothing asserts on wall-clock time:
every wait is for a state of the page or of /metrics, with a generous limit only so that a broken
page fails instead of hanging.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import httpx
import pytest

from ember.serve import create_app, running
from tests.serve.browser import chrome, console_errors, network_log, screenshot
from tests.engine.test_multi_lora import adapters  # noqa: F401
from tests.serve.conftest import make_app, metric

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# seconds before a wait gives up: room for a slow shared CI machine, never a speed assertion
LIMIT = float(os.environ.get("EMBER_UI_WAIT", "240"))


# ---- fixtures and page helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with chrome() as driver:
        yield driver


@pytest.fixture(scope="module")
def smol_url(smollm2_file):
    app = create_app(smollm2_file, served_model_name="smollm2", num_kv_blocks=512, log_interval=0)
    with running(app) as url:
        yield url


def until(driver, condition, what: str):
    return WebDriverWait(driver, LIMIT, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    until(driver, lambda d: state(d) in ("ready", "needs-key"), "the page did not finish loading")


def field(driver, name: str, value) -> None:
    el = driver.find_element(By.ID, name)
    el.clear()
    el.send_keys(str(value))


def ask(driver, question: str, **settings) -> None:
    for name, value in settings.items():
        field(driver, name, value)
    driver.find_element(By.ID, "new-chat").click()
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()


def last_reply(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def reply_done(driver) -> bool:
    replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    return bool(replies) and replies[-1].get_attribute("data-done") == "true" and state(driver) == "ready"


def wait_metrics_idle(url: str) -> None:
    deadline = time.monotonic() + LIMIT
    while metric(url, "ember:num_requests_running") or metric(url, "ember:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the server kept the request running"
        time.sleep(0.05)


def throttle(app, seconds: float) -> None:
    """Each engine step sleeps first: the tiny model would otherwise finish before the page acts."""
    engine = app.state.serving.engine.engine
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]


# ---- the real model ------------------------------------------------------------------------------
def test_an_answer_streams_is_measured_and_survives_a_reload(browser, smol_url) -> None:
    d = browser
    open_page(d, smol_url)
    network_log(d)  # from here on: every request the page makes
    # every change of the reply's text, recorded in the page itself (so no chunk is missed between polls)
    d.execute_script("""
        window.grew = [];
        new MutationObserver(() => {
          const replies = document.querySelectorAll('.msg.assistant .content');
          if (replies.length) window.grew.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    ask(d, "Write a Python function that adds two numbers, in a code block.", temperature=0)
    until(d, reply_done, "the reply did not finish")
    reply = last_reply(d)
    answer = reply.find_element(By.CLASS_NAME, "content").text
    # the DOM grew chunk by chunk: many distinct partial lengths before the whole answer (not strictly
    # increasing: Markdown can shorten the text, e.g. when a ``` fence opens)
    partial = set(d.execute_script("return window.grew")) - {0, len(answer)}
    assert len(partial) >= 10, partial
    meta = reply.find_element(By.CLASS_NAME, "meta").text
    assert "tok/s" in meta and "TTFT" in meta and "tokens" in meta, meta
    assert reply.find_elements(By.CSS_SELECTOR, "pre code"), "the code block was not rendered"
    until(d, lambda d: d.find_element(By.ID, "stat-running").text == "0", "the status panel never showed idle")
    shot = screenshot(d, "ui-answer.png")
    assert shot.stat().st_size > 10_000

    origin = "{0.scheme}://{0.netloc}".format(urlsplit(smol_url))
    assert all(u.startswith(origin + "/") for u in network_log(d))
    assert not console_errors(d)

    d.refresh()  # the conversation is in localStorage, not in the page
    until(d, lambda d: state(d) == "ready", "the page did not reload")
    titles = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#conversations .open")]
    assert titles[0].startswith("Write a Python function")
    assert last_reply(d).find_element(By.CLASS_NAME, "content").text == answer
    assert "tok/s" in last_reply(d).find_element(By.CLASS_NAME, "meta").text
    loaded = d.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => [e.name, e.decodedBodySize])")
    assert all(u.startswith(origin + "/") for u, _ in loaded)
    page = sum(size for u, size in loaded if urlsplit(u).path == "/" or urlsplit(u).path.startswith("/ui/"))
    assert 0 < page < 200_000, page


def test_stop_aborts_the_request_and_frees_its_kv_blocks(browser, smol_url) -> None:
    d = browser
    open_page(d, smol_url)
    wait_metrics_idle(smol_url)
    gone = metric(smol_url, "ember:request_failure_total", reason="client_disconnected")
    ask(d, "Count from 1 to 500, one number per line.", temperature=0, max_tokens=2000)
    until(d, lambda d: len(last_reply(d).find_element(By.CLASS_NAME, "content").text) > 20, "no reply text")
    assert metric(smol_url, "ember:num_requests_running") == 1  # still generating when Stop is pressed
    assert metric(smol_url, "ember:kv_cache_usage_perc") > 0
    d.find_element(By.ID, "stop").click()
    until(d, reply_done, "Stop did not end the reply")
    assert "stopped" in last_reply(d).find_element(By.CLASS_NAME, "meta").text
    wait_metrics_idle(smol_url)  # the server aborted it: no request running, every KV block back
    assert metric(smol_url, "ember:request_failure_total", reason="client_disconnected") == gone + 1
    until(d, lambda d: (d.find_element(By.ID, "stat-running").text, d.find_element(By.ID, "stat-kv").text)
          == ("0", "0.0%"), "the status panel did not show the freed server")
    screenshot(d, "ui-stopped.png")


def test_the_model_picker_lists_v1_models(browser, smol_url) -> None:
    d = browser
    open_page(d, smol_url)
    served = [m["id"] for m in httpx.get(smol_url + "/v1/models").json()["data"]]
    options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == served == ["smollm2"]


# ---- the tiny model ------------------------------------------------------------------------------
def test_markdown_is_rendered_and_escaped(browser, server) -> None:
    d = browser
    open_page(d, server.url)
    render = ("const done = arguments[arguments.length - 1];"
              "import('/ui/markdown.js').then(m => done(arguments[0].map(m.render)));")
    html = d.execute_async_script(render, [
        "<script>alert(1)</script> **bold** and *it* `a<b`",
        "```python\nprint('<hi>')\n```",
        "- one\n- two\n\n1. first",
        "[ok](https://example.org/x) [bad](javascript:alert(1))",
        "```\nstill streaming",
        "3. third\n4. fourth",
    ])
    assert html[0] == ("<p>&lt;script&gt;alert(1)&lt;/script&gt; <strong>bold</strong> and <em>it</em> "
                       "<code>a&lt;b</code></p>")
    assert html[1] == '<pre data-lang="python"><code>print(&#39;&lt;hi&gt;&#39;)</code></pre>'
    assert html[2] == "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"
    assert 'href="https://example.org/x"' in html[3] and "javascript" not in html[3].split("</a>")[-1].split("bad")[0]
    assert "<a" not in html[3].split("</a>", 1)[1]  # the javascript: link is text only
    assert html[4] == "<pre><code>still streaming</code></pre>"
    assert html[5] == '<ol start="3"><li>third</li><li>fourth</li></ol>'


def test_an_api_key_is_asked_for_once_and_kept(browser, tiny_dir) -> None:
    d = browser
    with running(make_app(tiny_dir, api_key="sk-ui")) as url:
        d.get(url + "/")
        until(d, lambda d: state(d) == "needs-key", "the page did not ask for the key")
        assert d.find_element(By.ID, "key-dialog").get_attribute("open") is not None
        assert "API key" in d.find_element(By.ID, "key-reason").text
        d.find_element(By.ID, "key-input").send_keys("sk-ui")
        d.find_element(By.ID, "key-save").click()
        until(d, lambda d: state(d) == "ready", "the key was not accepted")
        d.refresh()
        until(d, lambda d: state(d) == "ready", "the kept key was not used after a reload")
        assert d.find_element(By.ID, "key-dialog").get_attribute("open") is None
        ask(d, "Hello", max_tokens=4, temperature=0)
        until(d, reply_done, "no reply")
        assert not last_reply(d).find_element(By.CLASS_NAME, "error").text


def test_errors_are_explained(browser, tiny_dir) -> None:
    d = browser
    app = make_app(tiny_dir, max_num_seqs=1, max_queue_len=0)
    throttle(app, 0.02)
    with running(app) as url:
        open_page(d, url)
        ask(d, "Hello", max_tokens=100_000)  # over the 512-token context
        until(d, reply_done, "no reply")
        error = last_reply(d).find_element(By.CLASS_NAME, "error").text
        assert "Too long for the model's context" in error and "maximum context length is 512" in error

        body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=LIMIT) as held:
            lines = held.iter_lines()  # kept: a dropped generator would close the stream (an abort)
            next(lines)
            until(d, lambda _: metric(url, "ember:num_requests_running") == 1, "the held request is not running")
            ask(d, "Hello", max_tokens=4)
            until(d, reply_done, "no reply")
            error = last_reply(d).find_element(By.CLASS_NAME, "error").text
        assert "The server is busy" in error and "Try again in 1 s" in error, error


def test_rag_sources_are_shown_under_the_answer(browser, tiny_dir, tmp_path_factory) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("lancedb")
    from ember.rag import Embedder, Index, ingest
    from tests.rag.conftest import build_tiny_embedder, write_corpus

    root = tmp_path_factory.mktemp("ui-rag")
    with Index.open(root / "idx", create=True, embedder=Embedder(build_tiny_embedder(root / "embedder"))) as idx:
        ingest(idx, write_corpus(root / "docs", n=4))
    d = browser
    with running(make_app(tiny_dir, rag_index=root / "idx", rag_k=2, rag_mode="bm25", rag_max_tokens=8)) as url:
        open_page(d, url)
        ask(d, "What does the cherry module keep?", temperature=0)
        until(d, reply_done, "no reply")
        items = last_reply(d).find_elements(By.CSS_SELECTOR, ".sources li")
        assert len(items) == 2
        assert items[0].text.startswith("[1] cherry.md")
        assert "cherry" in items[0].find_element(By.CLASS_NAME, "snippet").text
        link = items[0].find_element(By.CLASS_NAME, "source-link")
        assert link.text.endswith("cherry.md")
        screenshot(d, "ui-rag.png")
        link.click()
        until(d, lambda d: "Cherry guide" in d.find_element(By.ID, "source-text").text, "the source did not open")
        d.find_element(By.ID, "source-close").click()


def test_settings_go_into_the_request(browser, server) -> None:
    d = browser
    open_page(d, server.url)
    # record what the page sends (the page calls the global fetch at each request)
    d.execute_script("window.sent = []; const f = window.fetch; window.fetch = (url, init) => {"
                     "  if (String(url).includes('/chat/')) window.sent.push(JSON.parse(init.body));"
                     "  return f(url, init); };")
    field(d, "system", "You are terse.")
    ask(d, "Hello", temperature=0.3, top_p=0.9, max_tokens=3)
    until(d, reply_done, "no reply")
    body = d.execute_script("return window.sent[0]")
    assert body["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["model"]) == (0.3, 0.9, 3, "tiny")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "3 tokens" in last_reply(d).find_element(By.CLASS_NAME, "meta").text  # from the usage chunk
    field(d, "system", "")


def test_the_picker_lists_lora_adapters_and_a_chosen_one_answers(browser, tiny_dir, adapters) -> None:  # noqa: F811
    d = browser
    with running(make_app(tiny_dir, lora_modules={"tiny-lora": adapters[1]}, max_lora_rank=8)) as url:
        open_page(d, url)
        options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")]
        assert options == ["tiny", "tiny-lora"]
        d.execute_script("window.sent = []; const f = window.fetch; window.fetch = (url, init) => {"
                         "  if (String(url).includes('/chat/')) window.sent.push(JSON.parse(init.body));"
                         "  return f(url, init); };")
        d.execute_script("const s = document.getElementById('model'); s.value = 'tiny-lora';"
                         "s.dispatchEvent(new Event('change'));")
        ask(d, "Hello", max_tokens=6, temperature=0)
        until(d, reply_done, "no reply")
        reply = last_reply(d)
        assert not reply.find_element(By.CLASS_NAME, "error").text
        sent = d.execute_script("return window.sent[0]")
        assert sent["model"] == "tiny-lora"
        # the page shows what the adapter says: the same request, not streamed, through the API
        body = {k: v for k, v in sent.items() if k not in ("stream", "stream_options")}
        want = httpx.post(url + "/v1/chat/completions", json=body, timeout=LIMIT).json()
        base = httpx.post(url + "/v1/chat/completions", json={**body, "model": "tiny"}, timeout=LIMIT).json()
        assert want["model"] == "tiny-lora" and want["choices"][0]["message"]["content"] != \
            base["choices"][0]["message"]["content"]
        kept = d.execute_script("return JSON.parse(localStorage.getItem('ember.conversations'))"
                                ".flatMap(c => c.messages).filter(m => m.role === 'assistant').map(m => m.content)")
        assert want["choices"][0]["message"]["content"] in kept
        assert "tiny-lora" in reply.find_element(By.CLASS_NAME, "meta").text
        d.execute_script("localStorage.clear()")


def test_conversations_are_exported_and_deleted(browser, server) -> None:
    d = browser
    open_page(d, server.url)
    ask(d, "Export me", max_tokens=2)
    until(d, reply_done, "no reply")
    # catch the download: the blob the page builds and the file name it gives it
    exported = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        URL.createObjectURL = (blob) => { window.blob = blob; return 'blob:caught'; };
        HTMLAnchorElement.prototype.click = function () {
          window.blob.text().then(text => done([this.download, JSON.parse(text)])); };
        document.getElementById('export').click();""")
    name, data = exported
    assert name == "ember-conversations.json"
    first = data["conversations"][0]
    assert first["title"] == "Export me" and [m["role"] for m in first["messages"]] == ["user", "assistant"]
    before = len(d.find_elements(By.CSS_SELECTOR, "#conversations li"))
    d.find_element(By.CSS_SELECTOR, "#conversations li.active .delete").click()
    titles = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#conversations .open")]
    assert len(titles) == before - 1 and "Export me" not in titles
    kept = d.execute_script("return JSON.parse(localStorage.getItem('ember.conversations')).map(c => c.title)")
    assert "Export me" not in kept

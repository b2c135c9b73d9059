"""The chat page as HTTP sees it: served at / with a same-origin-only policy, small, self-contained,
off with --no-ui; the RAG source route reads only files of the index. (The browser tests are in
test_webui_browser.py.)"""

from __future__ import annotations

import re

import httpx
import pytest

from ember.cliconfig import parse_config
from ember.commands.serve import ServeConfig
from ember.serve import running
from ember.serve.webui import UI_DIR, ui_files
from tests.serve.conftest import make_app


def test_the_page_and_its_files_are_served_with_a_same_origin_policy(server) -> None:
    assert httpx.head(server.url + "/").status_code == 200
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for name in re.findall(r'(?:src|href)="/ui/([^"]+)"', page.text):
        r = httpx.get(f"{server.url}/ui/{name}")
        assert r.status_code == 200 and "content-security-policy" in r.headers, name
    assert httpx.get(server.url + "/ui/../app.py").status_code == 404
    assert httpx.get(server.url + "/ui/nothing.js").status_code == 404


def test_the_page_is_small_and_names_no_other_origin() -> None:
    files = ui_files()
    assert {"index.html", "app.js", "style.css"} <= set(files)
    assert sum(len(body) for body, _ in files.values()) < 200_000
    for name, (body, _) in files.items():
        # an absolute URL in a page file would be a request to another origin (a CDN, a font)
        assert not re.search(rb"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.IGNORECASE), name
    assert all(p.name in files for p in UI_DIR.iterdir())  # nothing in ui/ that the server would not send


def test_no_ui_leaves_only_the_api(tiny_dir) -> None:
    assert parse_config(ServeConfig, ["--model", "m", "--no-ui"], "ember serve").ui is False
    assert parse_config(ServeConfig, ["--model", "m"], "ember serve").ui is True
    with running(make_app(tiny_dir, ui=False)) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/ui/app.js").status_code == 404
        assert httpx.get(url + "/v1/models").status_code == 200


def test_the_api_key_guards_the_api_but_not_the_page(tiny_dir) -> None:
    with running(make_app(tiny_dir, api_key="sk-test")) as url:
        assert httpx.get(url + "/").status_code == 200  # the page loads, then asks for the key
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/rag/source", params={"path": "x"}).status_code == 401


def test_rag_source_without_an_index_is_a_clear_error(server) -> None:
    r = httpx.get(server.url + "/v1/rag/source", params={"path": "/etc/passwd"})
    assert r.status_code == 400 and "--rag-index" in r.json()["error"]["message"]


def test_rag_source_reads_only_indexed_files(tmp_path) -> None:
    from ember.serve.errors import APIError
    from ember.serve.webui import read_source

    doc = tmp_path / "a.md"
    doc.write_text("# A\n\nbody", encoding="utf-8")
    assert read_source(str(doc), indexed=True) == "# A\n\nbody"
    with pytest.raises(APIError) as e:
        read_source(str(doc), indexed=False)  # a real file, but not one the index was built from
    assert e.value.status == 404
    with pytest.raises(APIError):
        read_source(str(tmp_path / "gone.md"), indexed=True)


def test_without_chromium_the_browser_tests_skip_and_say_how_to_install_it(monkeypatch) -> None:
    pytest.importorskip("selenium")
    from tests.serve import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="make browser-deps"):
        with browser.chrome():
            pass

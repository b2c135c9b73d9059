import httpx, time
from ember.serve import running
from tests.serve.conftest import make_app, metric
from tests.serve.test_webui_browser import throttle, open_page, ask, until, reply_done, last_reply, browser
from selenium.webdriver.common.by import By

def test_dbg(tiny_dir, browser):
    d = browser
    app = make_app(tiny_dir, max_num_seqs=1, max_queue_len=0)
    throttle(app, 0.02)
    s = app.state.serving
    with running(app) as url:
        open_page(d, url)
        ask(d, "Hello", max_tokens=100_000)
        until(d, reply_done, "no reply")
        print("err", last_reply(d).find_element(By.CLASS_NAME, "error").text)
        print(s.engine.num_unfinished, metric(url, "ember:num_requests_running"), metric(url, "ember:num_requests_waiting"))
        body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
        t = time.time()
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as held:
            it = held.iter_lines()
            print(repr(next(it))[:50], time.time() - t)
            for _ in range(5):
                print(s.engine.num_unfinished, metric(url, "ember:num_requests_running"), metric(url, "ember:num_requests_waiting"), metric(url, "ember:generation_tokens_total"), time.time() - t)
                time.sleep(0.3)

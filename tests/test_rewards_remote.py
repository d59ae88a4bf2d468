"""RemoteReward against real loopback servers (good, flaky, hanging, broken) and serve-reward."""

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmpo.rewards import RewardError
from lmpo.rewards.combine import compute_rewards
from lmpo.rewards.remote import RemoteReward
from lmpo.rewards.serve import make_server


class Server:
    """A loopback HTTP server whose behaviour per request is given by ``script(n, body)``,
    which returns (status, reply object) or sleeps."""

    def __init__(self, script):
        self.requests = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status, obj = script(len(outer.requests), body)
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d/score" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def lengths(n, body):
    return 200, {"rewards": [float(len(c)) for c in body["completions"]]}


def test_protocol_and_columns(serve):
    s = serve(lengths)
    r = RemoteReward(s.url, timeout=60, retries=0, name="lens")
    assert r.__name__ == "lens"
    assert r(["p1", "p2"], ["abc", "de"], answer=["1", "2"], level=[3, 4]) == [3.0, 2.0]
    assert s.requests == [{"prompts": ["p1", "p2"], "completions": ["abc", "de"],
                           "columns": {"answer": ["1", "2"], "level": [3, 4]}}]


def test_flaky_server_recovers_with_backoff(serve):
    def flaky(n, body):
        return (503, {"error": "warming up"}) if n <= 2 else lengths(n, body)

    s = serve(flaky)
    t0 = time.monotonic()
    assert RemoteReward(s.url, timeout=60, retries=3, backoff=0.1)(["p"], ["abcd"]) == [4.0]
    assert len(s.requests) == 3
    assert time.monotonic() - t0 >= 0.1 + 0.2  # backoff 0.1 then 0.2 s


def test_hanging_server_times_out_then_raises(serve):
    release, answered = threading.Event(), []

    def hang(n, body):
        release.wait(120)                      # hangs until the test is done with it
        answered.append(n)
        return lengths(n, body)

    s = serve(hang)
    try:
        with pytest.raises(RewardError) as e:
            RemoteReward(s.url, timeout=0.3, retries=1, backoff=0.05)(["p"], ["x"])
        assert answered == [] and len(s.requests) == 2    # the client gave up on both, no reply came
    finally:
        release.set()
    assert s.url in str(e.value) and "2 attempt" in str(e.value) and "timed out" in str(e.value).lower()


def test_client_errors_are_not_retried(serve):
    s = serve(lambda n, body: (400, {"error": "no such column"}))
    with pytest.raises(RewardError, match="HTTP 400.*no such column"):
        RemoteReward(s.url, timeout=60, retries=3, backoff=0.01)(["p"], ["x"])
    assert len(s.requests) == 1


def test_wrong_length_and_junk_replies(serve):
    s = serve(lambda n, body: (200, {"rewards": [1.0]}))
    with pytest.raises(RewardError, match="returned 1 rewards for 2"):
        RemoteReward(s.url, retries=0)(["p", "q"], ["x", "y"])
    s2 = serve(lambda n, body: (200, b"<html>oops</html>"))
    with pytest.raises(RewardError, match="not JSON"):
        RemoteReward(s2.url, retries=1, backoff=0.01)(["p"], ["x"])
    assert len(s2.requests) == 2
    s3 = serve(lambda n, body: (200, {"rewards": [None, "bad", 2]}))
    out = RemoteReward(s3.url, retries=0)(["p"] * 3, ["x"] * 3)
    assert out[0] is None and math.isnan(out[1]) and out[2] == 2.0


def test_nothing_listening():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RewardError, match=r"127\.0\.0\.1:%d.*after 2 attempt.*(refused|Connection)" % port):
        RemoteReward("http://127.0.0.1:%d/" % port, timeout=1, retries=1, backoff=0.01)(["p"], ["x"])


def test_bad_url():
    with pytest.raises(RewardError, match="http"):
        RemoteReward("ftp://example.invalid/x")


def test_failed_batch_in_compute_rewards(serve):
    s = serve(lambda n, body: (500, {"error": "down"}))
    r = RemoteReward(s.url, timeout=1, retries=1, backoff=0.01, name="judge")
    res = compute_rewards([("judge", r)], None, ["p", "q"], ["x", "y"], {})
    assert res.valid == [False, False] and "judge" in res.failures[0] and s.url in res.failures[0]


def test_make_server_roundtrip_with_builtin():
    from lmpo.rewards import math_answer

    httpd = make_server(math_answer, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/" % httpd.server_address[1]
        r = RemoteReward(url, timeout=60, retries=0)
        assert r(["q", "q", "q"], ["\\boxed{1/2}", "\\boxed{3}", "x"], answer=["0.5", "4", None]) == [1.0, 0.0, None]
        with urllib.request.urlopen(url + "health", timeout=60) as resp:
            assert json.load(resp) == {"ok": True, "reward": "math_answer"}
        bad = urllib.request.Request(url, data=b'{"prompts": 1}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400 and b"completions" in e.value.read()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_reports_reward_errors_and_nan():
    def picky(prompts, completions, **kw):
        if "boom" in completions:
            raise RuntimeError("cannot score boom")
        return [math.nan if c == "nan" else 1.0 for c in completions]

    httpd = make_server(picky, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = RemoteReward("http://127.0.0.1:%d/" % httpd.server_address[1], timeout=60, retries=1, backoff=0.01)
        out = r(["p", "p"], ["ok", "nan"])
        assert out[0] == 1.0 and math.isnan(out[1])
        with pytest.raises(RewardError, match="HTTP 500.*cannot score boom"):
            r(["p"], ["boom"])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_trl_keywords_cross_the_wire():
    """completion_ids, trainer_state and chat-form completions reach the served function; its
    log_metric / log_extra come back to the caller's; sys.exit in it is an HTTP 500, not a dead server."""
    from lmpo.rewards.combine import TrainerState

    def judge(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kw):
        if completions[0][0]["content"] == "exit":
            sys.exit(1)
        log_metric("judge/calls", 1.0)
        log_extra("ids_len", [len(ids) for ids in completion_ids])
        return [float(trainer_state.global_step + len(ids)) for ids in completion_ids]

    httpd = make_server(judge, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = RemoteReward("http://127.0.0.1:%d/" % httpd.server_address[1], timeout=5, retries=0, name="judge")
        chat = [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
        res = compute_rewards([("judge", r)], None, [[{"role": "user", "content": "q"}]] * 2, chat, {},
                              completion_ids=[[1, 2, 3], [4]], trainer_state=TrainerState(global_step=10))
        assert res.rewards == [13.0, 11.0]
        assert res.logged == {"judge/calls": 1.0} and res.extra == {"ids_len": [3, 1]}
        res = compute_rewards([("judge", r)], None, ["q"], [[{"role": "assistant", "content": "exit"}]], {},
                              completion_ids=[[1]])
        assert "HTTP 500" in res.errors["judge"] and "sys.exit(1)" in res.errors["judge"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_reward_main_in_a_subprocess(tmp_path):
    (tmp_path / "myreward.py").write_text(
        "def exclaim(prompts, completions, bonus=None, **kw):\n"
        "    return [c.count('!') + (b or 0) for c, b in zip(completions, bonus or [0] * len(completions))]\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    code = "import sys; from lmpo.rewards.serve import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "myreward.py:exclaim", "--host", "127.0.0.1",
                             "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward exclaim on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        assert RemoteReward(url, timeout=60, retries=0)(["p", "p"], ["hi!!", "x"], bonus=[1, 0]) == [3.0, 0.0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_reward_main_unknown_spec(capsys):
    from lmpo.rewards.serve import main

    assert main(["math_anser", "--port", "0"]) == 2
    assert "Did you mean 'math_answer'" in capsys.readouterr().err


def test_serve_reward_model_dir_uses_scorer(tmp_path, monkeypatch):
    """A directory spec goes to lmpo.rewards.reward_model.RewardModelScorer."""
    from lmpo.rewards import serve

    class RewardModelScorer:
        def __init__(self, path):
            self.path = path

        def __call__(self, prompts, completions, **kw):
            return [0.5] * len(completions)

    monkeypatch.setattr(serve, "RewardModelScorer", RewardModelScorer)
    name, scorer = serve.load_reward(str(tmp_path))
    assert isinstance(scorer, RewardModelScorer) and scorer.path == str(tmp_path)
    assert name == tmp_path.name

"""The vLLM rollout engine without vLLM: the conversion of vLLM outputs into a ``RolloutBatch``
(checked against the built-in sampler and through the training loss), the clear errors, the
colocated engine's sleep / wake / weight-push order against a stand-in ``vllm`` module, and server
mode against a small fake vLLM HTTP server in a thread."""

from __future__ import annotations

import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lmpo import algorithms as A
from lmpo.config import ConfigError, load_config
from lmpo.data import DatasetError
from lmpo.models.load import load_causal_lm, load_tokenizer
from lmpo.rollout import RolloutBatch, rollout
from lmpo.rollout.engine import SamplingSpec
from lmpo.rollout.vllm_engine import (Completion, VLLMEngine, VLLMServerError, completion_from_openai,
                                      completion_from_vllm, encode_prompts, save_weights, to_rollout_batch)
from lmpo.rl.forward import completion_logp

PROMPTS = ["12+34=", "7+5=", "99+99="]          # different lengths: left padding matters
ROWS = [{"i": i} for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_causal_lm(tiny_dir, torch.device("cpu")).eval()


def _cfg(tmp_path, **keys) -> object:
    return load_config(None, [f"output_dir={tmp_path}", "rollout.engine=vllm", *[f"{k}={v}" for k, v in keys.items()]])


# ----------------------------------------------------------------------------- the pure conversion


def test_conversion_shapes_padding_mask_logprobs_and_order(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    groups = [
        [Completion([21, 22, eos], [-0.1, -0.2, -0.3], "stop"),          # prompt 0, sample 0: EOS at 3
         Completion([23, 24, 25, 26], [-1.0, -1.1, -1.2, -1.3], "length")],  # sample 1: hit max_tokens
        [Completion([eos], [-0.5], "stop"),                               # prompt 1: EOS at once
         Completion([27, 28], [-2.0, -2.1], None)],                       # no finish reason, no EOS
        [Completion([29, eos], [-0.7, -0.8], None),                       # no finish reason, ends in EOS
         Completion([30], [-0.9], "stop")],                               # a stop token other than EOS
    ]
    ids, mask = encode_prompts(tok, PROMPTS, max_prompt_len=None)
    b = to_rollout_batch(tok, PROMPTS, ROWS, groups, ids, mask, version=7)
    N, T = 6, 4
    assert b.completion_ids.shape == b.mask.shape == b.sampler_logp.shape == (N, T)
    assert b.group_size == 2 and len(b) == N
    assert b.completion_ids.dtype == torch.long and b.mask.dtype == torch.float32
    assert b.completion_ids.tolist() == [[21, 22, eos, pad], [23, 24, 25, 26], [eos, pad, pad, pad],
                                         [27, 28, pad, pad], [29, eos, pad, pad], [30, pad, pad, pad]]
    assert b.mask.sum(-1).tolist() == [3, 4, 1, 2, 2, 1]
    assert torch.equal(b.mask, (b.completion_ids != pad).float())    # pad id is never sampled here
    torch.testing.assert_close(b.sampler_logp[0], torch.tensor([-0.1, -0.2, -0.3, 0.0]))
    torch.testing.assert_close(b.sampler_logp[3], torch.tensor([-2.0, -2.1, 0.0, 0.0]))
    assert b.sampler_logp[b.mask == 0].eq(0).all()
    assert b.truncated.tolist() == [False, True, False, True, False, False]
    # prompt-major: rows i*G .. i*G+G-1 are prompt i's, prompts left-padded and repeated
    assert b.prompts == [p for p in PROMPTS for _ in range(2)]
    assert [r["i"] for r in b.rows] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(b.prompt_ids, ids.repeat_interleave(2, 0)) and torch.equal(b.prompt_mask, mask.repeat_interleave(2, 0))
    assert bool(b.prompt_mask[:, -1].all()) and int(b.prompt_ids[2, 0]) == pad     # "7+5=" is left-padded
    # decoded without special tokens, like the built-in rollout
    assert b.completions[0] == tok.decode([21, 22]) and b.completions[2] == ""
    assert b.policy_version.tolist() == [7] * N and b.policy_version.dtype == torch.long


def test_conversion_rejects_inconsistent_outputs(tok):
    ids, mask = encode_prompts(tok, PROMPTS[:1], None)
    with pytest.raises(ValueError, match="log-probs"):
        to_rollout_batch(tok, PROMPTS[:1], ROWS[:1], [[Completion([5, 6], [-1.0], "length")]], ids, mask)
    with pytest.raises(ValueError, match="abort"):
        to_rollout_batch(tok, PROMPTS[:1], ROWS[:1], [[Completion([5], [-1.0], "abort")]], ids, mask)
    ids2, mask2 = encode_prompts(tok, PROMPTS[:2], None)
    with pytest.raises(ValueError, match="same number"):
        to_rollout_batch(tok, PROMPTS[:2], ROWS[:2], [[Completion([5], [-1.0], "length")], []], ids2, mask2)


def test_prompt_longer_than_max_prompt_len_names_it(tok):
    with pytest.raises(DatasetError, match=r"prompt 1 .*7 tokens.*max_prompt_len=6.*99\+99="):
        encode_prompts(tok, ["7+5=", "99+99="], max_prompt_len=6)


def test_vllm_and_openai_outputs_parse(tok):
    Logprob = types.SimpleNamespace
    out = types.SimpleNamespace(token_ids=[21, 22], finish_reason="length", index=0,
                                logprobs=[{21: Logprob(logprob=-0.25), 3: Logprob(logprob=-9.0)}, {22: Logprob(logprob=-0.5)}])
    assert completion_from_vllm(out) == Completion([21, 22], [-0.25, -0.5], "length")
    choice = {"index": 0, "finish_reason": "stop", "text": "ab",
              "logprobs": {"tokens": ["token_id:21", "token_id:2"], "token_logprobs": [-0.25, -0.75]}}
    assert completion_from_openai(choice) == Completion([21, 2], [-0.25, -0.75], "stop")
    assert completion_from_openai({**choice, "token_ids": [30, 31]}).token_ids == [30, 31]    # return_token_ids
    with pytest.raises(VLLMServerError, match="token_id"):
        completion_from_openai({**choice, "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0]}})


class EosBias(torch.nn.Module):
    """The tiny model with +``bias`` on the EOS logit, so random weights stop at varied lengths."""

    def __init__(self, model, eos_id, bias=3.0):
        super().__init__()
        self.model, self.eos_id, self.bias = model, eos_id, bias

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.eos_id] += self.bias
        return out


def _as_vllm_outputs(b: RolloutBatch) -> list[list[Completion]]:
    """A built-in batch as vLLM would have returned it: each completion's real tokens, log-probs, finish reason."""
    out = []
    for i in range(len(b)):
        L = int(b.mask[i].sum())
        c = Completion(b.completion_ids[i, :L].tolist(), b.sampler_logp[i, :L].tolist(),
                       "length" if b.truncated[i] else "stop")
        if i % b.group_size == 0:
            out.append([])
        out[-1].append(c)
    return out


def test_conversion_equals_builtin_rollout_and_trains(model, tok):
    """The same samples through vLLM's output format give the built-in rollout's batch field for field,
    and that batch goes through cat / select, the trainer's log-probs and the policy loss."""
    wrapped = EosBias(model, tok.eos_token_id)
    G, seeds = 4, [11, 22, 33]
    with torch.no_grad():
        ref = rollout(wrapped, tok, PROMPTS, ROWS, SamplingSpec(group_size=G, max_new_tokens=6, temperature=1.0),
                      seeds=seeds, device=torch.device("cpu"))
    assert ref.truncated.any() and not ref.truncated.all(), "want both EOS-ended and truncated samples"
    ids, mask = encode_prompts(tok, PROMPTS, None)
    b = to_rollout_batch(tok, PROMPTS, ROWS, _as_vllm_outputs(ref), ids, mask, version=3)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "mask", "sampler_logp", "truncated"):
        got, want = getattr(b, name), getattr(ref, name)
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), name
    assert b.completions == ref.completions and b.prompts == ref.prompts and b.rows == ref.rows
    assert b.group_size == ref.group_size

    both = RolloutBatch.cat([b, b.select(torch.arange(G, 2 * G))])      # a whole group again
    assert len(both) == 4 * G and both.completion_ids.shape[1] == b.completion_ids.shape[1]
    assert torch.equal(both.policy_version, torch.full((4 * G,), 3))
    assert both.prompts[-G:] == [PROMPTS[1]] * G

    logp, _, _ = completion_logp(wrapped, b, 1.0)                       # the trainer's forward
    m = b.mask > 0
    torch.testing.assert_close(logp.detach()[m], b.sampler_logp[m], atol=1e-5, rtol=0)
    tis = A.truncated_is_weights(logp.detach(), b.sampler_logp, b.mask, cap=2.0)
    torch.testing.assert_close(tis[m], torch.ones(int(m.sum())), atol=1e-4, rtol=0)
    adv = A.grpo_advantages(torch.arange(len(b), dtype=torch.float32) % 3, G)
    loss = A.aggregate_loss(A.policy_loss(logp, b.sampler_logp, adv, b.mask), b.mask)
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


# ----------------------------------------------------------------------------- clear errors


def test_missing_vllm_names_the_key_and_the_fix(tmp_path, tiny_dir, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)          # import vllm -> ImportError, installed or not
    with pytest.raises(ConfigError, match=r"rollout\.engine.*pip install 'lmpo\[vllm\]'"):
        VLLMEngine.from_config(_cfg(tmp_path), tiny_dir, tok)


def test_colocate_without_cuda_says_so(tmp_path, tiny_dir, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        VLLMEngine.from_config(_cfg(tmp_path), tiny_dir, tok)


def test_unsupported_sampling_records_and_missing_url(tmp_path):
    for key in ("algo.keep_sampling_mask", "algo.keep_routing"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _cfg(tmp_path, **{key: "true"})
    with pytest.raises(ConfigError, match=r"rollout\.vllm_url"):
        _cfg(tmp_path, **{"rollout.vllm_mode": "server"})


def test_unreachable_server_names_url_and_key(tmp_path, tiny_dir, tok):
    import socket

    with socket.socket() as s:                              # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(VLLMServerError, match=rf"{url}.*rollout\.vllm_url"):
        VLLMEngine.from_config(_cfg(tmp_path, **{"rollout.vllm_mode": "server", "rollout.vllm_url": url}), tiny_dir, tok)


# ----------------------------------------------------------------------------- colocate, with a stand-in vllm


def _fake_sample(seed: int, k: int, max_tokens: int, eos: int) -> list[int]:
    """Sample k of a request seeded ``seed``: vLLM seeds it ``seed + k``; here its tokens encode that."""
    s = seed + k
    return ([21 + s % 5, 22 + s % 3] + ([eos] if s % 2 == 0 else [23, 24, 25]))[:max_tokens]


def _fake_vllm(calls: list, eos: int):
    """A ``vllm`` module with the calls the colocated engine makes, recording them in ``calls``."""
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class FakeModel:
        def load_weights(self, weights):
            loaded = dict(weights)
            calls.append(("load_weights", loaded))
            return set(loaded)

    class LLM:
        def __init__(self, **kw):
            calls.append(("init", kw))
            self.model = FakeModel()

        def sleep(self, level=1):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tags))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

        def apply_model(self, fn):
            return [fn(self.model)]

        def generate(self, prompts, sampling_params, use_tqdm=True):
            calls.append(("generate", [p["prompt_token_ids"] for p in prompts], [p.kw for p in sampling_params]))
            outs = []
            for p in sampling_params:
                n, seed, T = p.kw["n"], p.kw["seed"], p.kw["max_tokens"]
                samples = []
                for k in reversed(range(n)):                    # out of order: the engine sorts by index
                    ids = _fake_sample(seed, k, T, eos)
                    samples.append(types.SimpleNamespace(
                        index=k, token_ids=ids, finish_reason="stop" if ids[-1] == eos else "length",
                        logprobs=[{t: types.SimpleNamespace(logprob=-0.1 * (j + 1))} for j, t in enumerate(ids)]))
                outs.append(types.SimpleNamespace(outputs=samples))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_colocate_sleeps_wakes_and_pushes_weights_lazily(tmp_path, tiny_dir, tok, model, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls, tok.eos_token_id))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = VLLMEngine.from_config(_cfg(tmp_path, device="cpu", **{"rollout.vllm_gpu_memory_utilization": 0.25}),
                                    tiny_dir, tok)
    init = calls[0][1]
    assert init["model"] == str(tiny_dir) and init["enable_sleep_mode"] is True and init["gpu_memory_utilization"] == 0.25
    assert init["logprobs_mode"] == "processed_logprobs"
    assert calls[1:] == [("sleep", 1)], "asleep until the first generate"

    spec = SamplingSpec(group_size=3, max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5)
    calls.clear()
    b = engine.generate(PROMPTS, ROWS, [10, 20, 30], spec)
    assert [c[0] for c in calls] == ["wake_up", "generate", "sleep"] and calls[0] == ("wake_up", None)
    _, prompt_ids, params = calls[1]
    assert prompt_ids == [tok(p)["input_ids"] for p in PROMPTS]
    assert params[1] == dict(n=3, seed=20, temperature=0.7, top_p=0.9, top_k=5, max_tokens=4, logprobs=0)
    assert b.completion_ids[1 * 3 + 2, :2].tolist() == _fake_sample(20, 2, 4, tok.eos_token_id)[:2]  # prompt 1, sample 2
    assert b.policy_version.tolist() == [0] * 9

    engine.update_weights(model, 1)
    engine.update_weights(model, 2)                 # only the newest is pushed
    assert len(calls) == 3, "update_weights itself touches nothing"
    calls.clear()
    b = engine.generate(PROMPTS[:1], ROWS[:1], [10], spec)
    assert [c[0] for c in calls] == ["wake_up", "load_weights", "wake_up", "reset_prefix_cache", "generate", "sleep"]
    assert calls[0] == ("wake_up", ["weights"]) and calls[2] == ("wake_up", ["kv_cache"])
    pushed = calls[1][1]
    assert set(pushed) == set(model.state_dict()) and all(torch.equal(pushed[k], v) for k, v in model.state_dict().items())
    assert b.policy_version.tolist() == [2] * 3

    engine.update_weights(model, 2)                 # same version: nothing to push
    calls.clear()
    engine.generate(PROMPTS[:1], ROWS[:1], [10], spec)
    assert [c[0] for c in calls] == ["wake_up", "generate", "sleep"]


# ----------------------------------------------------------------------------- server mode, a fake vLLM server


class FakeVLLMServer:
    """Answers /v1/models, /v1/completions (vLLM's response format, choices out of order) and the
    dev-mode /collective_rpc and /reset_prefix_cache; records every request. ``rpc_kwargs_fail``:
    answer 500 to a collective_rpc with kwargs (an older vLLM); ``dev_mode=False``: 404 there."""

    def __init__(self, eos: int, rpc_kwargs_fail=False, dev_mode=True):
        self.eos, self.rpc_kwargs_fail, self.dev_mode, self.requests = eos, rpc_kwargs_fail, dev_mode, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj=None):
                data = b"" if obj is None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                fake.requests.append(("POST", self.path, body))
                if self.path == "/v1/completions":
                    return self._send(200, fake.completion(body))
                if self.path in ("/collective_rpc", "/reset_prefix_cache") and not fake.dev_mode:
                    return self._send(404, {"detail": "Not Found"})
                if self.path == "/collective_rpc":
                    if fake.rpc_kwargs_fail and body.get("kwargs"):
                        return self._send(500, {"error": "TypeError: reload_weights() got an unexpected keyword"})
                    return self._send(200, {"results": [None]})
                if self.path == "/reset_prefix_cache":
                    return self._send(200)
                self._send(404, {"detail": "Not Found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def completion(self, body):
        choices = []
        for k in reversed(range(body["n"])):
            ids = _fake_sample(body["seed"], k, body["max_tokens"], self.eos)
            lps = [-0.1 * (j + 1) for j in range(len(ids))]
            choices.append({"index": k, "text": "", "finish_reason": "stop" if ids[-1] == self.eos else "length",
                            "stop_reason": None, "logprobs": {
                                "tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps,
                                "top_logprobs": [{f"token_id:{t}": lp} for t, lp in zip(ids, lps)],
                                "text_offset": list(range(len(ids)))}})
        return {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 0, "total_tokens": 0}}

    def posts(self, path):
        return [b for m, p, b in self.requests if m == "POST" and p == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _server_engine(tmp_path, tiny_dir, tok, url):
    return VLLMEngine.from_config(_cfg(tmp_path, **{"rollout.vllm_mode": "server", "rollout.vllm_url": url}), tiny_dir, tok)


def test_server_requests_batch_and_lazy_reload(tmp_path, tiny_dir, tok, model):
    spec = SamplingSpec(group_size=3, max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5)
    with FakeVLLMServer(tok.eos_token_id) as server:
        engine = _server_engine(tmp_path, tiny_dir, tok, server.url + "/")
        b = engine.generate(PROMPTS, ROWS, [10, 20, 30], spec)
        reqs = sorted(server.posts("/v1/completions"), key=lambda r: r["seed"])
        assert [r["seed"] for r in reqs] == [10, 20, 30]
        for r, p in zip(reqs, PROMPTS):
            assert r["prompt"] == tok(p)["input_ids"] and r["model"] == "tiny"
            assert (r["n"], r["temperature"], r["top_p"], r["top_k"], r["max_tokens"], r["logprobs"]) == (3, 0.7, 0.9, 5, 4, 0)
            assert r["return_tokens_as_token_ids"] is True and r["repetition_penalty"] == 1.0
        eos = tok.eos_token_id
        for j, seed in enumerate([10, 20, 30]):                 # prompt-major, samples in index order
            for k in range(3):
                want = _fake_sample(seed, k, 4, eos)
                row = j * 3 + k
                assert b.completion_ids[row, :len(want)].tolist() == want
                assert int(b.mask[row].sum()) == len(want) and bool(b.truncated[row]) == (want[-1] != eos)
                torch.testing.assert_close(b.sampler_logp[row, :len(want)], torch.tensor([-0.1 * (i + 1) for i in range(len(want))]))
        assert b.policy_version.tolist() == [0] * 9 and not server.posts("/collective_rpc")

        engine.update_weights(model, 1)
        assert not server.posts("/collective_rpc"), "the reload waits for the next generate"
        b = engine.generate(PROMPTS[:1], ROWS[:1], [10], spec)
        path = (tmp_path / "vllm_weights" / "step_1").resolve()
        assert server.posts("/collective_rpc") == [{"method": "reload_weights", "kwargs": {"weights_path": str(path)},
                                                    "timeout": engine.backend.timeout}]
        assert len(server.posts("/reset_prefix_cache")) == 1
        methods = [(m, p) for m, p, _ in server.requests]
        assert methods.index(("POST", "/reset_prefix_cache")) < len(methods) - 1 and methods[-1] == ("POST", "/v1/completions")
        assert b.policy_version.tolist() == [1] * 3
        from safetensors.torch import load_file

        saved = load_file(str(path / "model.safetensors"))
        state = model.state_dict()
        assert set(saved) <= set(state) and "model.embed_tokens.weight" in saved
        assert all(torch.equal(saved[k], state[k]) for k in saved)
        assert (path / "config.json").exists() and (path / "tokenizer_config.json").exists()

        engine.generate(PROMPTS[:1], ROWS[:1], [10], spec)      # no new version: no reload
        assert len(server.posts("/collective_rpc")) == 1


def test_server_reload_falls_back_for_older_vllm_and_needs_dev_mode(tmp_path, tiny_dir, tok, model):
    spec = SamplingSpec(group_size=2, max_new_tokens=3)
    with FakeVLLMServer(tok.eos_token_id, rpc_kwargs_fail=True) as server:
        engine = _server_engine(tmp_path, tiny_dir, tok, server.url)
        for version in (1, 2):
            engine.update_weights(model, version)
            engine.generate(PROMPTS[:1], ROWS[:1], [5], spec)
        path = str((tmp_path / "vllm_weights" / "step_2").resolve())
        assert [r["method"] for r in server.posts("/collective_rpc")][-3:] == ["reload_weights", "update_config", "reload_weights"]
        assert server.posts("/collective_rpc")[-2]["args"] == [{"model_config": {"model": path}}]
        assert sorted(p.name for p in (tmp_path / "vllm_weights").iterdir()) == ["step_2"], "older weights removed"
    with FakeVLLMServer(tok.eos_token_id, dev_mode=False) as server:
        engine = _server_engine(tmp_path / "b", tiny_dir, tok, server.url)
        engine.update_weights(model, 1)
        with pytest.raises(VLLMServerError, match="VLLM_SERVER_DEV_MODE=1"):
            engine.generate(PROMPTS[:1], ROWS[:1], [5], spec)


def test_lora_weights_are_saved_merged(tmp_path, tiny_dir, tok):
    peft = pytest.importorskip("peft")
    base = load_causal_lm(tiny_dir, torch.device("cpu"))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()                                    # a trained adapter: ΔW ≠ 0
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    before = q.base_layer.weight.detach().clone()
    save_weights(lora, tok, Path(tmp_path) / "merged")
    from safetensors.torch import load_file

    saved = load_file(str(Path(tmp_path) / "merged" / "model.safetensors"))
    assert not [k for k in saved if "lora" in k or "base_layer" in k]
    want = (before + q.get_delta_weight("default")).detach()
    assert not torch.equal(want, before), "the adapter must change the weight"
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], want)
    torch.testing.assert_close(saved["model.layers.0.mlp.up_proj.weight"],               # not adapted: as it was
                               base.model.layers[0].mlp.up_proj.weight.detach())
    assert torch.equal(q.base_layer.weight, before) and not q.merged, "the trainer's model stays unmerged"

"""The server's guards without worker processes: API key, body limit, loopback binding, form parsing.

The app is built over an engine that is configured but not started (no process is spawned): these requests are
answered before any job would be submitted.
"""

import openai
import pytest
from fastapi.testclient import TestClient

from qistudio.cli.main import main
from qistudio.engine import Engine, EngineConfig, ModelSpec
from qistudio.server.app import create_app
from qistudio.server.bodies import unflatten
from qistudio.server.errors import APIError
from qistudio.server.security import authorized, is_loopback
from qistudio.server.settings import Limits, ServerSettings

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def app():
    engine = Engine(EngineConfig(model=ModelSpec("qistudio-demo", ()), devices=("cpu",)))
    settings = ServerSettings("qistudio-demo", api_key=KEY, limits=Limits(max_body_bytes=1000))
    return create_app(engine, settings, own_engine=False)


def test_every_route_but_health_needs_the_key(app):
    with TestClient(app) as http:
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/images/generations"),
                             ("GET", "/v1/jobs/job-x"), ("DELETE", "/v1/jobs/job-x")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                response = http.request(method, path, headers=headers)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 503  # open, and honest: no worker runs
        models = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "qistudio-demo"


def test_the_openai_client_sends_the_key_as_the_server_expects(app):
    with TestClient(app) as http:
        good = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        assert [m.id for m in good.models.list()] == ["qistudio-demo"]
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_a_body_past_the_limit_is_refused(app):
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as http:
        declared = http.post("/v1/images/generations", headers=auth, json={"prompt": "x" * 2000})
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit is found while reading
            for _ in range(10):
                yield b"x" * 500

        streamed = http.post("/v1/images/generations", headers={**auth, "content-type": "application/json"},
                             content=chunks())
        assert streamed.status_code == 413 and "1000 bytes" in streamed.json()["error"]["message"]


def test_key_comparison_and_loopback():
    assert authorized(f"Bearer {KEY}", KEY) and authorized(f"bearer {KEY}", KEY)
    assert not any(authorized(h, KEY) for h in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"))
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com"))


def test_serve_refuses_an_open_address_without_a_key(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("QISTUDIO_API_KEY", raising=False)
    for argv, words in ((["--host", "0.0.0.0"], "give --api-key"), (["--demo", "--model", "x"], "not both"),
                        (["--lora-dir", str(tmp_path / "none")], "no such folder"),
                        (["--port", "70000"], "--port must be in"), (["--workers", "0"], "must be >= 1")):
        with pytest.raises(SystemExit) as caught:
            main(["serve", *argv])
        assert caught.value.code == 2 and words in capsys.readouterr().err


def test_form_fields_unflatten_as_the_openai_client_writes_them():
    items = [("prompt", "x"), ("image[]", "a"), ("image[]", "b"), ("loras[][name]", "s"), ("loras[][scale]", "0.5"),
             ("loras[][name]", "t"), ("extra[k]", "v"), ("n", "2")]
    assert unflatten(items) == {"prompt": "x", "image": ["a", "b"], "n": "2", "extra": {"k": "v"},
                                "loras": [{"name": "s", "scale": "0.5"}, {"name": "t"}]}
    assert unflatten([("a", "1"), ("a", "2")]) == {"a": ["1", "2"]}
    for bad in ([("a[b][c]", "1")], [("a", "1"), ("a[]", "2")], [("bad]", "1")]):
        with pytest.raises(APIError):
            unflatten(bad)

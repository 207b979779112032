"""Admin security: closed without a token, 401 on a wrong one, the token never logged or echoed,
and the reload path confined to the models root."""

from __future__ import annotations

import logging
import os

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import service.deps
from modelpack.manifest import copy_package
from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE

TOKEN = "s3cr3t-Admin-T0ken-9f4e2c71"  # distinctive, so a leak anywhere is found by substring
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix of the token
    {"Authorization": f"Bearer {TOKEN}x"},  # the token plus one character
    {"Authorization": f"Bearer {TOKEN.lower()}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": b"Bearer \xff\xfe\x00tok"},  # not UTF-8, with a NUL
]
ADMIN_CALLS = [("GET", "/admin/tau", None), ("PUT", "/admin/tau", {"tau": 0.5}),
               ("POST", "/admin/reload", {"package": "b"})]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    copy_package(SHIPPED_PACKAGE, root / "a", version="1.0.0-a")
    copy_package(SHIPPED_PACKAGE, root / "b", version="1.0.0-b")
    return root


@pytest.fixture
def client(models_root):
    settings = Settings(model_dir=models_root / "a", admin_token=TOKEN, log_level="DEBUG")
    with TestClient(create_app(settings, registry=CollectorRegistry())) as c:
        yield c


def call(client, method, path, body, headers):
    return client.request(method, path, json=body, headers=headers)


# -- closed without a token, 401 on a missing or wrong one -------------------------------------
@pytest.mark.parametrize("token", [None, ""])
def test_admin_is_closed_without_a_configured_token(models_root, token):
    settings = Settings(model_dir=models_root / "a", admin_token=token)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as client:
        for method, path, body in ADMIN_CALLS:
            for headers in ({}, AUTH, {"Authorization": "Bearer "}):
                r = call(client, method, path, body, headers)
                assert r.status_code == 404, (method, path, headers)
                assert r.json()["error"]["code"] == "admin_disabled"
        assert client.get("/readyz").json()["model"]["version"] == "1.0.0-a"  # nothing reloaded


@pytest.mark.parametrize("headers", WRONG, ids=range(len(WRONG)))
def test_wrong_or_missing_token_is_401(client, headers):
    for method, path, body in ADMIN_CALLS:
        r = call(client, method, path, body, headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/readyz").json()["model"]["version"] == "1.0.0-a"


def test_unauthenticated_body_is_never_parsed(client):
    """Without the token a bad body still answers 401, not 422: no information before auth."""
    r = client.put("/admin/tau", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = client.post("/admin/reload", json={"package": "../../etc"})
    assert r.status_code == 401


def test_token_is_compared_in_constant_time(client, monkeypatch):
    seen = []
    real = service.deps.hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.deps.hmac, "compare_digest", spy)
    assert client.get("/admin/tau", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/admin/tau", headers=AUTH).status_code == 200
    assert [a for a, _ in seen] == [b"nope", TOKEN.encode()]


# -- the token is never logged or echoed ---------------------------------------------------------
def test_token_never_appears_in_logs_responses_or_settings(models_root, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CPCNN_UNKNOWN_SETTING", TOKEN)  # logged by name only, as unknown
    (models_root / "broken").mkdir(exist_ok=True)
    settings = Settings(model_dir=models_root / "a", admin_token=TOKEN, log_level="DEBUG")
    seen: list[str] = [repr(settings), str(settings), str(settings.model_dump()),
                       settings.model_dump_json()]
    with TestClient(create_app(settings, registry=CollectorRegistry()),
                    raise_server_exceptions=False) as client:
        responses = [
            client.get("/v1/model"), client.get("/readyz"), client.get("/healthz"),
            client.get("/metrics"), client.get("/openapi.json"), client.get("/docs"),
            client.get("/admin/tau", headers=AUTH),
            client.put("/admin/tau", json={"tau": 0.4}, headers=AUTH),
            client.put("/admin/tau", json={"tau": 7}, headers=AUTH),  # a 422
            client.put("/admin/tau", content=b"{bad", headers=AUTH),
            client.post("/admin/reload", json={"package": "b"}, headers=AUTH),
            client.post("/admin/reload", json={"package": "broken"}, headers=AUTH),  # a 409
            client.post("/admin/reload", json={"package": "../a"}, headers=AUTH),
            client.post("/admin/reload", json={"package": "missing"}, headers=AUTH),
            client.post(f"/classify?token={TOKEN[:4]}", content=b"x",
                        headers={"Content-Type": "image/png", **AUTH}),
            client.get(f"/nowhere/{TOKEN[:5]}", headers=AUTH),
            client.post("/readyz", headers=AUTH),  # a 405
            client.get("/v1/model", headers=AUTH),
        ]
        responses += [call(client, m, p, b, h) for h in WRONG for m, p, b in ADMIN_CALLS]
    assert {r.status_code for r in responses} >= {200, 401, 404, 405, 409, 422}
    for r in responses:
        seen.append(r.text)
        seen.extend(f"{k}: {v}" for k, v in r.headers.items())
    seen.append(caplog.text)
    seen.extend(str(record.__dict__) for record in caplog.records)
    assert "CPCNN_UNKNOWN_SETTING" in caplog.text  # the logs were captured
    for text in seen:
        assert TOKEN not in text


# -- the reload path stays inside the models root --------------------------------------------
@pytest.mark.parametrize("package, status, code", [
    ("..", 422, "invalid_parameter"),
    ("../a", 422, "invalid_parameter"),
    ("a/../b", 422, "invalid_parameter"),
    ("a/", 422, "invalid_parameter"),
    ("/etc", 422, "invalid_parameter"),
    (os.path.abspath(os.sep), 422, "invalid_parameter"),
    ("C:\\Windows", 422, "invalid_parameter"),
    ("..\\a", 422, "invalid_parameter"),
    (".", 422, "invalid_parameter"),
    (".hidden", 422, "invalid_parameter"),
    ("~root", 422, "invalid_parameter"),
    ("%2e%2e", 422, "invalid_parameter"),
    ("a\x00", 422, "invalid_parameter"),
    ("a\n", 422, "invalid_parameter"),
    ("", 422, "invalid_parameter"),
    ("x" * 300, 422, "invalid_parameter"),
    ("missing", 404, "package_not_found"),
    ("a-file", 404, "package_not_found"),
    ("link-out", 403, "outside_models_root"),
    ("dangling", 404, "package_not_found"),
    ("files-link-out", 403, "outside_models_root"),
])
def test_reload_path_is_confined_to_the_models_root(client, models_root, tmp_path_factory,
                                                    package, status, code):
    outside = tmp_path_factory.mktemp("outside")
    copy_package(SHIPPED_PACKAGE, outside / "pkg", version="9.9.9-outside")
    if not (models_root / "a-file").exists():
        (models_root / "a-file").write_text("not a directory")
        (models_root / "link-out").symlink_to(outside / "pkg")  # a valid package, but outside
        (models_root / "dangling").symlink_to(outside / "gone")
        inner = copy_package(SHIPPED_PACKAGE, models_root / "files-link-out")
        (inner / "head0.onnx").unlink()
        (inner / "head0.onnx").symlink_to(outside / "pkg" / "head0.onnx")
    r = client.post("/admin/reload", json={"package": package}, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert client.get("/readyz").json()["model"]["version"] == "1.0.0-a"  # still the old one


def test_symlink_inside_the_models_root_is_allowed(client, models_root):
    link = models_root / "current"
    if not link.exists():
        link.symlink_to(models_root / "b")
    r = client.post("/admin/reload", json={"package": "current"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["version"] == "1.0.0-b"


# -- small things an attack run found --------------------------------------------------------
def test_head_on_get_routes_answers_like_get(client):
    for path in ("/healthz", "/readyz", "/metrics", "/v1/model", "/v2/health/live"):
        r = client.head(path)
        assert r.status_code == 200, (path, r.status_code)
    assert client.head("/classify").status_code == 405  # POST only
    assert 'method="HEAD"' in client.get("/metrics").text


def test_negative_zero_tau_is_stored_and_echoed_as_zero(client):
    r = client.put("/admin/tau", content=b'{"tau": -0.0}', headers=AUTH)
    assert r.status_code == 200 and r.json()["tau"] == 0.0
    assert "-0.0" not in r.text
    assert "-0.0" not in client.get("/admin/tau", headers=AUTH).text


def test_admin_bodies_are_bounded(client):
    r = client.put("/admin/tau", content=b'{"tau": 0.5, "pad": "' + b"x" * 100_000 + b'"}',
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_secrets_in_a_query_string_never_reach_the_access_log():
    from service.logconfig import RedactSecrets

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "PUT",
                               f"/admin/tau?token={TOKEN}&x=1&api_key=k2", "1.1", 401), None)
    assert RedactSecrets().filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "k2" not in line
    assert "token=[redacted]" in line and "x=1" in line

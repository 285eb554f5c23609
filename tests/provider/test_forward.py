"""A forwarded API request: its wire form round-trips, bad params are refused, and running it through an ASGI app
in-process gives the app's status, headers and body (FastAPI's own validation included)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from lunsync.provider.forward import BadForward, HttpRequest, HttpResponse, run_asgi
from pydantic import BaseModel


class Item(BaseModel):
    name: str


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/items/{n}", status_code=201)
    async def make(n: int, item: Item, q: str = "") -> dict[str, object]:
        return {"n": n, "name": item.name, "q": q}

    return app


def test_the_wire_form_round_trips_and_keeps_only_what_the_worker_needs() -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/items/3", "query_string": b"q=x",
             "headers": [(b"authorization", b"Bearer secret"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5555)}
    req = HttpRequest.from_scope(scope, b'{"name":"a"}')
    assert req.headers == (("content-type", "application/json"),)  # the token stays with the control
    assert HttpRequest.from_params(req.to_params()) == req
    assert req.json() == {"name": "a"}
    assert HttpRequest("GET", "/", "", (), b"{not json").json() is None
    resp = HttpResponse.of_json(409, {"error": "no"}, (("location", "/x"),))
    assert HttpResponse.from_result(resp.to_result()) == resp


@pytest.mark.parametrize("params", [{}, {"method": "GET", "path": "/", "query": "", "headers": [], "body": "%%%"},
                                    {"method": "GET", "path": "/", "query": "", "headers": 5, "body": ""}])
def test_params_that_are_not_a_request_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(BadForward):
        HttpRequest.from_params(params)  # type: ignore[arg-type]
    with pytest.raises(BadForward):
        HttpResponse.from_result(params)


def test_a_request_runs_through_the_app_in_process() -> None:
    app = _app()
    ok = HttpRequest("POST", "/v1/items/3", "q=x", (("content-type", "application/json"),), b'{"name":"a"}')
    resp = asyncio.run(run_asgi(app, ok))
    assert resp.status == 201 and resp.json() == {"n": 3, "name": "a", "q": "x"}
    assert dict(resp.headers)["content-type"] == "application/json"
    bad = HttpRequest("POST", "/v1/items/x", "", (("content-type", "application/json"),), b'{"name":1}')
    resp = asyncio.run(run_asgi(app, bad))
    assert resp.status == 422
    assert asyncio.run(run_asgi(app, HttpRequest("GET", "/nowhere", "", (), b""))).status == 404

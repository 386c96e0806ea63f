"""The studio's HTTP side: one page (static/), a JSON API, and the guards every request passes."""

from __future__ import annotations

import secrets
import traceback
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from peftko.core.config import BUILTIN_DATA
from peftko.core.errors import UserError
from peftko.studio import views
from peftko.studio.jobs import Jobs, command_line
from peftko.studio.sandbox import Root

STATIC = {"app.js": "text/javascript", "pages.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
COOKIE = "peftko_studio_token"
# Flags the Train page sets, and what each must be.
TRAIN_FLAGS = {"max_steps": int, "epochs": float, "lr": float, "lora_r": int, "seq_len": int, "batch_size": int,
               "grad_accum": int, "logging_steps": int, "eval_steps": int, "save_steps": int}
TRAIN_CHOICES = {"quant": ("4bit", "8bit", "none"), "device": ("auto", "cpu", "cuda")}


class Studio:
    def __init__(self, root: Root, token: str | None = None, loopback: bool = True):
        self.root, self.token, self.loopback = root, token, loopback
        self.jobs = Jobs(root.path)

    # --- the guards
    def refused(self, request: Request) -> Response | None:
        host = _hostname(request.headers.get("host") or "")
        if self.loopback and host not in LOOPBACK_NAMES:  # a page of another site, via DNS rebinding
            return JSONResponse({"error": f"host {host!r} refused: open the studio at 127.0.0.1"}, 403)
        if self.token is not None:
            given = (request.headers.get("x-peftko-token") or request.cookies.get(COOKIE)
                     or request.query_params.get("token") or "")
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return JSONResponse({"error": "token missing or wrong: open the URL the studio printed"}, 401)
        if request.method == "POST" and request.headers.get("x-peftko") != "1":  # a form of another site
            return JSONResponse({"error": "POST without the studio's header refused"}, 403)
        return None

    def app(self):
        """The ASGI application: the routes behind the guards."""
        routes = [Route("/", self.page), Route("/static/{name}", self.static),
                  Route("/api/choices", self.api(lambda q: views.choices(self.root))),
                  Route("/api/corpus", self.api(lambda q: views.corpus_report(self.root, q.get("path", "")))),
                  Route("/api/book", self.api(lambda q: views.book(self.root, q.get("corpus", ""), q.get("file", "")))),
                  Route("/api/metrics", self.api(lambda q: views.metrics(self.root, q.get("run", "")))),
                  Route("/api/runs", self.api(lambda q: {"runs": views.runs(self.root)})),
                  Route("/api/report", self.report),
                  Route("/api/jobs", self.api(self.job_list)),
                  Route("/api/jobs/{id}", self.api(lambda q: self.jobs.state(q["id"]))),
                  Route("/api/jobs/{id}/stop", self.api(lambda q: self.jobs.stop(q["id"])), methods=["POST"]),
                  Route("/api/jobs/{id}/resume", self.api(self.resume), methods=["POST"]),
                  Route("/api/train", self.api(self.train), methods=["POST"]),
                  Route("/api/generate", self.api(self.generate), methods=["POST"]),
                  Route("/api/merge", self.api(self.merge), methods=["POST"]),
                  Route("/api/ablate", self.api(self.ablate), methods=["POST"]),
                  Route("/api/ablation", self.api(lambda q: views.ablation(self.root, q.get("dir", "")))),
                  Route("/api/ablation.png", self.ablation_chart)]
        app = Starlette(routes=routes)

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                refusal = self.refused(Request(scope))
                if refusal is not None:
                    return await refusal(scope, receive, send)
            return await app(scope, receive, send)
        return guarded

    def api(self, handler):
        """A JSON endpoint: query, path and (for POST) body fields in one dict; a UserError answers 400
        with its one line, anything else 500 with a line, never a traceback."""
        async def endpoint(request: Request) -> Response:
            fields = dict(request.query_params)
            if request.method == "POST":
                try:
                    body = await request.json()
                except ValueError:
                    body = None
                if not isinstance(body, dict):
                    return JSONResponse({"error": "the request body must be a JSON object"}, 400)
                fields |= body
            fields |= request.path_params  # the job named in the path, whatever the body says
            try:
                return JSONResponse(await run_in_threadpool(handler, fields))
            except UserError as e:
                return JSONResponse({"error": str(e)}, 400)
            except Exception as e:  # noqa: BLE001 (the page shows one line; the studio's stderr has the rest)
                traceback.print_exc()
                return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        return endpoint

    # --- the page
    async def page(self, request: Request) -> Response:
        response = Response(_static("index.html"), media_type="text/html; charset=utf-8")
        if self.token is not None:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return JSONResponse({"error": f"no file {name}"}, 404)
        return Response(_static(name), media_type=STATIC[name] + "; charset=utf-8")

    async def report(self, request: Request) -> Response:
        try:
            return FileResponse(views.image(self.root, request.query_params.get("run", "")), media_type="image/png")
        except UserError as e:
            return JSONResponse({"error": str(e)}, 400)

    async def ablation_chart(self, request: Request) -> Response:
        try:
            return FileResponse(views.ablation_chart(self.root, request.query_params.get("dir", "")),
                                media_type="image/png")
        except UserError as e:
            return JSONResponse({"error": str(e)}, 400)

    # --- the commands
    def job_list(self, q: dict) -> dict:
        kind = q.get("kind") or None
        limit = str(q.get("limit", 20))
        if not limit.isdigit():
            raise UserError(f"limit: {limit!r} is not a count")
        return {"jobs": [self.jobs.state(i) for i in self.jobs.ids(kind)[:int(limit)]]}

    def train_argv(self, q: dict, command: str = "lora-train") -> tuple[list[str], str]:
        argv = [command]
        if q.get("preset"):
            presets = {p["name"]: p["path"] for p in views.choices(self.root)["presets"]}
            if q["preset"] not in presets:
                raise UserError(f"preset {q['preset']}: not one of {', '.join(presets) or 'none'}")
            argv += ["--config", presets[q["preset"]]]
        model = (q.get("model") or "").strip()
        if model:
            if model not in views.BUILTIN_BASES:
                folder = self.root.inside(model)
                if not folder.is_dir():
                    raise UserError(f"base {model}: not a folder")
                model = self.root.shown(folder)
            argv += ["--model", model]
        data = (q.get("data") or "").strip()
        if data:
            argv += ["--data", data if data == BUILTIN_DATA else self.root.shown(self.root.corpus(data))]
        output = (q.get("output") or "").strip()
        if not output:
            raise UserError("give an output folder (under the root) for the run")
        out = self.root.inside(output, must_exist=False)
        if out == self.root.path:
            raise UserError("the output must be a folder below the root, not the root itself")
        argv += ["--output", self.root.shown(out)]
        for name, kind in TRAIN_FLAGS.items():
            value = q.get(name)
            if value not in (None, ""):
                try:
                    number = kind(value)
                except (TypeError, ValueError):
                    raise UserError(f"{name}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
                argv += ["--" + name.replace("_", "-"), str(number)]
        for name, allowed in TRAIN_CHOICES.items():
            if q.get(name):
                if q[name] not in allowed:
                    raise UserError(f"{name}: {q[name]!r} is not one of {', '.join(allowed)}")
                argv += ["--" + name, q[name]]
        return argv, self.root.shown(out)

    def train(self, q: dict) -> dict:
        argv, output = self.train_argv(q)
        if q.get("action") == "preview":
            return {"command": command_line(argv)}
        if q.get("action") == "plan":
            return self.jobs.state(self.jobs.start("plan", [*argv, "--dry-run"], output).id)
        return self.jobs.state(self.jobs.start("train", argv, output).id)

    def ablate(self, q: dict) -> dict:
        """`peftko ablate` with the Train page's settings, and the structure score's sampling kept small
        when the page asks (--samples, --sample-tokens)."""
        argv, output = self.train_argv(q, "ablate")
        for name in ("samples", "sample_tokens"):
            value = q.get(name)
            if value not in (None, ""):
                if not str(value).isdigit() or int(value) < 1:
                    raise UserError(f"{name}: {value!r} is not a count of 1 or more")
                argv += ["--" + name.replace("_", "-"), str(int(value))]
        if q.get("force"):
            argv.append("--force")
        if q.get("action") == "preview":
            return {"command": command_line(argv)}
        return self.jobs.state(self.jobs.start("ablate", argv, output).id)

    def resume(self, q: dict) -> dict:
        job = self.jobs.get(q["id"])
        if job.kind != "train":
            raise UserError(f"job {job.id} is not a training")
        argv = [a for a in job.argv[:-2] if a != "--resume"] + ["--resume"]
        return self.jobs.state(self.jobs.start("train", argv, job.output).id)

    def generate(self, q: dict) -> dict:
        model = self.root.inside(q.get("model", ""))
        argv = ["generate", self.root.shown(model), "--prompt", str(q.get("prompt") or "|START_OF_BOOK|>"), "--json"]
        for name, kind in (("max_new_tokens", int), ("temperature", float), ("seed", int)):
            if q.get(name) not in (None, ""):
                try:
                    argv += ["--" + name.replace("_", "-"), str(kind(q[name]))]
                except (TypeError, ValueError):
                    raise UserError(f"{name}: {q[name]!r} is not a number") from None
        return self.jobs.state(self.jobs.start("generate", argv, self.root.shown(model)).id)

    def merge(self, q: dict) -> dict:
        """`peftko merge RUN --output OUT [--gguf]`: the standalone model (and a GGUF) beside the run."""
        run = self.root.inside(q.get("run", ""))
        if views.runs_record(run) is None:
            raise UserError(f"{self.root.shown(run)}: not a finished run (no peftko.json that reads)")
        output = (q.get("output") or "").strip() or self.root.shown(run) + "-merged"
        out = self.root.inside(output, must_exist=False)
        if out == self.root.path:
            raise UserError("the merged model needs a folder below the root, not the root itself")
        argv = ["merge", self.root.shown(run), "--output", self.root.shown(out)]
        if q.get("gguf"):
            argv.append("--gguf")
        return self.jobs.state(self.jobs.start("merge", argv, self.root.shown(out)).id)


def _static(name: str) -> bytes:
    return (Path(str(resources.files("peftko.studio"))) / "static" / name).read_bytes()


def _hostname(host: str) -> str:
    """The Host header without its port: "127.0.0.1:8765" -> "127.0.0.1", "[::1]:8765" -> "[::1]"."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

"""`nps serve`: the preference app's pages and routes (Starlette, server-rendered Jinja2 pages).

    nps serve --run runs/steering --candidates candidates.jsonl --store store [--host 127.0.0.1]
              [--port 8000] [--admin-token TOKEN] [--baseline base|RUN[:MODEL]]

Pages: **Teach** (answer pairs, most informative first), **Try** (a response steered by your
answers; a blind A/B against the baseline), **Profile** (counts, the model's confidence, the
consistency and drift checks, where your z sits) and **Admin** (everyone's counts, A/B results
per person and group, dataset export; behind ``--admin-token``).

Safe by default: the app binds 127.0.0.1 unless told otherwise, and any other address needs an
admin token; a person is known by a cookie holding their name and secret key (or a personal link
that sets it), so a person sees only their own profile; names are checked before they touch a
path; request bodies are bounded (``MAX_BODY``) and must be URL-encoded forms. Every bad request
is answered with a 4xx page that says what to do; nothing is written for it.

No request made by another site changes who is signed in: a personal link (a GET, which any page
can make a browser open) only shows a confirmation page, and the person cookie is set by its POST,
which carries a one-time value that the page also set as a SameSite=Strict cookie (a cross-site
POST sends no such cookie). The admin cookie holds a random session, never the admin token.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from nps.errors import ConfigError
from nps.serve.store import NAME_PATTERN, NAME_RULE, Store, StoreError, check_name

MAX_BODY = 32 * 1024  # bytes of a request body: a name, a choice, or a prompt of any text URL-encoded
TOO_LARGE = f"The request is larger than {MAX_BODY} bytes; forms here carry a name, a prompt or a choice."
PERSON_COOKIE = "nps_person"
ADMIN_COOKIE = "nps_admin"
CONFIRM_COOKIE = "nps_confirm"  # the one-time value a personal link's confirmation page set
ADMIN_SESSIONS = 32  # admin sign-ins remembered at once (the oldest is forgotten first)
WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",  # personal links carry a key: never send them on
    "cache-control": "no-store",
}
log = logging.getLogger("nps.serve")


class Problem(Exception):
    """A request the app refuses: rendered as a page with ``status`` and ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(service, admin_token: str | None = None):
    """The Starlette application over a ``PreferenceService``."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    here = Path(__file__).parent
    templates = Environment(loader=FileSystemLoader(here / "templates"), autoescape=select_autoescape(["html"]))
    store: Store = service.store

    def page(request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
        html = templates.get_template(template).render(person=current_person(request), admin=admin_token is not None,
                                                       path=request.url.path, **values)
        return HTMLResponse(html, status_code=status)

    def current_person(request: Request) -> str | None:
        name, _, key = request.cookies.get(PERSON_COOKIE, "").partition(".")
        return name if name and key and store.verify(name, key) else None

    def personal_link(request: Request) -> str | None:
        """The signed-in person's link back (from their own cookie: the store keeps only the key's digest)."""
        name, _, key = request.cookies.get(PERSON_COOKIE, "").partition(".")
        return f"{request.base_url}p/{name}/{key}" if current_person(request) else None

    def require_person(request: Request) -> str:
        name = current_person(request)
        if name is None:
            raise Problem(401, "Pick a name on the start page first (or open your personal link).")
        return name

    admin_sessions: list[str] = []  # random values held by signed-in admins' cookies, oldest first

    def is_admin(request: Request) -> bool:
        """A signed-in admin's session cookie, or the token itself as ``Authorization: Bearer`` (for scripts)."""
        if admin_token is None:
            return False
        session = request.cookies.get(ADMIN_COOKIE, "").encode()
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        return any(hmac.compare_digest(session, s.encode()) for s in list(admin_sessions)) or (
            bool(bearer) and hmac.compare_digest(bearer, admin_token.encode()))

    async def form(request: Request, *fields: str) -> dict[str, str]:
        """The URL-encoded form of a POST, bounded by MAX_BODY; missing fields are a 400."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise Problem(415, "Send the form URL-encoded (application/x-www-form-urlencoded), as browsers do.")
        length = request.headers.get("content-length")
        if length is not None and (not WHOLE_NUMBER.fullmatch(length) or int(length) > MAX_BODY):
            raise Problem(413, TOO_LARGE)
        body = b""
        async for chunk in request.stream():  # counted as it arrives: a missing or false length changes nothing
            body += chunk
            if len(body) > MAX_BODY:
                raise Problem(413, TOO_LARGE)
        try:
            values = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                                    max_num_fields=16))
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "The form could not be read (not URL-encoded UTF-8); reload the page and "
                               "try again.") from None
        missing = [f for f in fields if f not in values]
        if missing:
            raise Problem(400, f"The form lacks {', '.join(missing)}; reload the page and try again.")
        return values

    def see_other(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303)

    def with_person_cookie(response: Response, name: str, key: str) -> Response:
        response.set_cookie(PERSON_COOKIE, f"{name}.{key}", max_age=365 * 24 * 3600, httponly=True, samesite="strict")
        return response

    # -- start ---------------------------------------------------------------------------------------
    async def home(request: Request):
        return page(request, "home.html", name_rule=NAME_RULE, total=len(service.candidates),
                    link=personal_link(request) if request.query_params.get("new") else None)

    async def start(request: Request):
        values = await form(request, "name")
        name = values["name"].strip().lower()
        group = values.get("group", "").strip().lower() or "default"
        check_name(name)
        check_name(group, "group")
        if current_person(request) == name:
            return see_other("/teach")
        key = await run_in_threadpool(store.create_person, name, group)
        if key is None:
            raise Problem(409, f"The name {name!r} is taken. Open your personal link to continue as {name}, "
                               "or pick another name.")
        return with_person_cookie(see_other("/?new=1"), name, key)

    def valid_link(request: Request) -> tuple[str, str]:
        name, key = request.path_params["name"], request.path_params["key"]
        if not store.verify(name, key):
            raise Problem(403, "This personal link is not valid. Check that you copied all of it.")
        return name, key

    async def personal_link_page(request: Request):
        """A personal link asks before it signs anyone in (it may have been opened by another site)."""
        name, key = valid_link(request)
        if current_person(request) == name:
            return see_other("/teach")
        token = secrets.token_urlsafe(18)
        response = page(request, "link.html", name=name, key=key, token=token)
        response.set_cookie(CONFIRM_COOKIE, token, max_age=600, httponly=True, samesite="strict")
        return response

    async def sign_in_by_link(request: Request):
        name, key = valid_link(request)
        values = await form(request, "token")
        expected = request.cookies.get(CONFIRM_COOKIE, "")
        if not expected or not hmac.compare_digest(values["token"].encode(), expected.encode()):
            raise Problem(403, "This confirmation did not come from your personal link's page; open your link "
                               "again and continue from there.")
        response = with_person_cookie(see_other("/teach"), name, key)
        response.delete_cookie(CONFIRM_COOKIE)
        return response

    async def leave(request: Request):
        await form(request)
        response = see_other("/")
        response.delete_cookie(PERSON_COOKIE)
        return response

    # -- Teach -----------------------------------------------------------------------------------------
    async def teach(request: Request):
        name = require_person(request)
        question = await run_in_threadpool(service.next_question, name)
        return page(request, "teach.html", question=question, saved=request.query_params.get("saved"),
                    total=len(service.candidates), write_problem=store.write_problem)

    async def teach_answer(request: Request):
        name = require_person(request)
        values = await form(request, "candidate", "choice")
        if not WHOLE_NUMBER.fullmatch(values["candidate"]):
            raise Problem(400, "The pair id must be a whole number; reload the Teach page.")
        record = await run_in_threadpool(service.answer, name, int(values["candidate"]), values["choice"])
        return see_other("/teach?saved=" + ("skip" if record.get("choice") == "skip" else "answer"))

    # -- Try -------------------------------------------------------------------------------------------------
    prompt_help = {"examples": service.example_prompts(), "free_text": service.free_text}  # what a prompt may be

    async def try_page(request: Request):
        name = require_person(request)
        summary = await run_in_threadpool(service.ab_summary, [name])
        return page(request, "try.html", summary=summary, **prompt_help)

    async def try_submit(request: Request):
        name = require_person(request)
        values = await form(request, "prompt", "mode")
        if values["mode"] not in ("steer", "ab"):
            raise Problem(400, "Choose 'Show my response' or 'Blind A/B test'.")
        summary = await run_in_threadpool(service.ab_summary, [name])
        common = {"summary": summary, "prompt": values["prompt"], **prompt_help}
        if values["mode"] == "steer":
            response = await run_in_threadpool(service.respond, name, values["prompt"])
            answers = len(await run_in_threadpool(service.answered_pairs, name))
            return page(request, "try.html", steered=response, answers=answers, **common)
        trial = await run_in_threadpool(service.open_trial, name, values["prompt"])
        return page(request, "try.html", trial=trial, **common)

    async def try_judge(request: Request):
        name = require_person(request)
        values = await form(request, "trial", "verdict")
        record = await run_in_threadpool(service.judge, name, values["trial"], values["verdict"])
        summary = await run_in_threadpool(service.ab_summary, [name])
        return page(request, "try.html", judged=record, summary=summary, prompt=record["prompt"], **prompt_help)

    # -- Profile -----------------------------------------------------------------------------------------------
    async def profile(request: Request):
        name = require_person(request)
        records = await run_in_threadpool(service.answered_pairs, name)
        report, unchecked = await run_in_threadpool(service.consistency, name)
        confidence = await run_in_threadpool(service.confidence, name)
        _, version, _ = await run_in_threadpool(service.latent, name)
        history = await run_in_threadpool(store.history, name)
        summary = await run_in_threadpool(service.ab_summary, [name])
        skipped = await run_in_threadpool(service.skipped, name)
        return page(request, "profile.html", records=records, report=report, unchecked=unchecked,
                    confidence=confidence, version=version, history=history, summary=summary, skipped=skipped,
                    total=len(service.candidates), fingerprint=service.run.fingerprint, link=personal_link(request))

    async def latent_map(request: Request):
        name = require_person(request)
        return Response(await run_in_threadpool(service.latent_map, name), media_type="image/png")

    async def download(request: Request):
        name = require_person(request)
        path = store.profile_path(name)
        if not path.exists():
            raise Problem(404, "You have not answered any pair yet; start on the Teach page.")
        return FileResponse(path, media_type="application/x-ndjson", filename=f"{name}.jsonl")

    # -- Admin -------------------------------------------------------------------------------------------------
    def require_admin(request: Request) -> None:
        if admin_token is None:
            raise Problem(404, "The admin page is off; start `nps serve` with --admin-token to turn it on.")
        if not is_admin(request):
            raise Problem(403, "Sign in with the admin token on the Admin page.")

    async def admin(request: Request):
        if admin_token is None:
            require_admin(request)
        if not is_admin(request):
            return page(request, "admin_login.html")
        summary = await run_in_threadpool(service.admin_summary)
        return page(request, "admin.html", summary=summary)

    async def admin_login(request: Request):
        if admin_token is None:
            require_admin(request)
        values = await form(request, "token")
        if not hmac.compare_digest(values["token"].encode(), admin_token.encode()):
            raise Problem(403, "That is not the admin token given to `nps serve --admin-token`.")
        admin_sessions.append(secrets.token_urlsafe(32))
        del admin_sessions[:-ADMIN_SESSIONS]
        response = see_other("/admin")
        response.set_cookie(ADMIN_COOKIE, admin_sessions[-1], httponly=True, samesite="strict")
        return response

    async def admin_export(request: Request):
        require_admin(request)
        await form(request)
        folder, metadata = await run_in_threadpool(store.export, service.digest, service.run.fingerprint)
        summary = await run_in_threadpool(service.admin_summary)
        return page(request, "admin.html", summary=summary, export={"folder": str(folder), **metadata})

    async def admin_export_file(request: Request):
        require_admin(request)
        digest = request.path_params["digest"]
        if not NAME_PATTERN.fullmatch(digest):
            raise Problem(404, "No such export.")
        path = store.exports_dir / digest / "pairs.jsonl"
        if not path.exists():
            raise Problem(404, "No such export; export again from the Admin page.")
        return FileResponse(path, media_type="application/x-ndjson", filename=f"preferences-{digest}.jsonl")

    async def health(request: Request):
        return PlainTextResponse("ok")

    async def stylesheet(request: Request):
        return FileResponse(here / "static" / "style.css", media_type="text/css")

    # -- errors ------------------------------------------------------------------------------------------------
    async def problem(request: Request, error: Exception):
        if isinstance(error, Problem):
            status, message = error.status, error.message
        elif isinstance(error, StoreError):
            status, message = error.status, str(error)
        elif isinstance(error, HTTPException):
            status = error.status_code
            message = {404: "There is no such page.", 405: "This page does not take that kind of request."}.get(
                status, str(error.detail))
        else:
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            status, message = 500, "Something went wrong on the server; your answers so far are saved."
        return page(request, "error.html", status=status, message=message)

    routes = [
        Route("/", home), Route("/start", start, methods=["POST"]),
        Route("/p/{name}/{key}", personal_link_page), Route("/p/{name}/{key}", sign_in_by_link, methods=["POST"]),
        Route("/leave", leave, methods=["POST"]),
        Route("/teach", teach), Route("/teach", teach_answer, methods=["POST"]),
        Route("/try", try_page), Route("/try", try_submit, methods=["POST"]),
        Route("/try/judge", try_judge, methods=["POST"]),
        Route("/profile", profile), Route("/profile/z.png", latent_map), Route("/profile/download", download),
        Route("/admin", admin), Route("/admin/login", admin_login, methods=["POST"]),
        Route("/admin/export", admin_export, methods=["POST"]),
        Route("/admin/exports/{digest}/pairs.jsonl", admin_export_file),
        Route("/healthz", health), Route("/static/style.css", stylesheet),
    ]
    handlers: dict[Any, Callable] = {Problem: problem, StoreError: problem, HTTPException: problem,
                                     Exception: problem}
    app = Starlette(routes=routes, exception_handlers=handlers)

    async def with_security_headers(scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(k.encode(), v.encode())
                                                                   for k, v in SECURITY_HEADERS.items()]
            await send(message)

        await app(scope, receive, send_with_headers if scope["type"] == "http" else send)

    return with_security_headers


def check_bind(host: str, port: int, admin_token: str | None) -> None:
    """Refuse a non-local bind without an admin token, a weak admin token and a port that cannot be
    (one line each, the CLI's error)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port; use 1 to 65535 (0 picks a free one)")
    if host not in LOCAL_HOSTS and not admin_token:
        raise ConfigError(f"--host {host} exposes the app beyond this machine; set --admin-token too "
                          "(and only share the address on a network you trust)")
    advice = "use a long random one (python -c 'import secrets; print(secrets.token_urlsafe())')"
    if admin_token is not None and len(admin_token) < 12:
        raise ConfigError(f"--admin-token is shorter than 12 characters; {advice}")
    if admin_token is not None and any(character.isspace() for character in admin_token):
        raise ConfigError(f"--admin-token holds whitespace (a blank or mis-pasted token?); {advice}")


def serve(run_dir: str, candidates: str, store_dir: str, *, host: str = "127.0.0.1", port: int = 8000,
          admin_token: str | None = None, model: str = "np_dpo", baseline: str = "base", particles: int = 256,
          echo: Callable[[str], None] = print) -> None:
    """Load the run, open the store and serve until interrupted. ``port`` 0 picks a free port
    (the address is printed once the socket is bound)."""
    check_bind(host, port, admin_token)
    if particles < 2:
        raise ConfigError(f"--particles {particles} must be at least 2 (plausible users to tell apart)")
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"nps serve needs the web extra ({error.name} is missing): "
                          "pip install 'nps[serve]'") from None
    from nps.data.profiles import read_candidates
    from nps.serve.service import PreferenceService
    from nps.steering_run import SteeringRun

    read_candidates(candidates)  # a malformed candidate file fails before the run loads
    store = Store(store_dir).open()
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port") from None
        service = PreferenceService(SteeringRun.load(run_dir, model), candidates, store, baseline=baseline,
                                    num_particles=particles)
        import uvicorn

        config = uvicorn.Config(create_app(service, admin_token), log_level="warning", access_log=False,
                                limit_concurrency=256, timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
        shown = f"[{host}]" if ":" in host else host
        echo(f"nps serve: http://{shown}:{listener.getsockname()[1]}/ (store {store.directory}, "
             f"{len(service.candidates)} candidate pairs; Ctrl-C stops)")
        sys.stdout.flush()
        threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        store.close()

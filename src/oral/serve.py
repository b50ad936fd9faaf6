"""Serving: an HTTP service (FastAPI + uvicorn) that makes LoRA adapters from a task description.

    oral serve --generator GEN --base smollm2-135m            # http://127.0.0.1:8000/
    ORAL_API_KEY=... oral serve --generator GEN --host 0.0.0.0  # any other interface needs a key

or from Python:

    app = create_app(Generator.from_pretrained(GEN), ["smollm2-135m"])  # any ASGI server runs it
    serve(GEN, bases=["smollm2-135m"], port=8000)                       # uvicorn, as the CLI does

Endpoints (every /v1 call needs `Authorization: Bearer KEY` when the app has an api_key):

    GET  /                          the web page: describe a task, get an adapter, try it, download it
    GET  /healthz                   {"status": "ok"}
    GET  /v1/info                   bases, tasks, limits
    POST /v1/adapters               {base, prompt, seed?, guidance?, steps?} -> a stored adapter's metadata
    GET  /v1/adapters               the stored adapters, newest first
    GET  /v1/adapters/{id}          one adapter's metadata (provenance, spec summary, download link)
    GET  /v1/adapters/{id}/download the adapter dir as a .zip (one folder, `oral-<id>/`)
    POST /v1/try                    {base, adapter?, inputs, task?} -> outputs of the base and of
                                    base + adapter side by side: with a task, its label scores
                                    (classification) or greedy answers for each input put into
                                    the task's template; without, greedy continuations of each input

The process loads the generator and each base once at start and serves one request that runs a
model at a time (a lock: others queue). Adapters are stored as plain PEFT dirs under
STORE/<id>/ (default $ORAL_HOME/served), written atomically by oral.lora.save_adapter, and listed
from disk, so they survive a restart. Ids are 32 hex digits made by the server; requests name
bases from the list given at start, tasks by name (never a path), and have size limits
(`ServeLimits`). Errors are JSON `{"error": "<one line>"}` with a 4xx status for bad input.

Serving the adapters with vLLM: they hold only lora_A / lora_B tensors (what vLLM accepts), at
the generator's rank (vLLM's --max-lora-rank, 16 by default, must be at least that):

    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 16
    # with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in vLLM's environment:
    curl -X POST localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \
         -d '{"lora_name": "sentiment", "lora_path": "/path/to/oral-<id>"}'
    # then ask for "model": "sentiment" in /v1/completions

See docs/SERVING.md.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import re
import string
import threading
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from oral.evaluate import Evaluator, encode_pair
from oral.generate import GenerationError, Generator
from oral.lora import AdapterError, LoraSpec, load_adapter, read_provenance, save_adapter
from oral.models import base_id, load_base
from oral.paths import oral_home
from oral.tasks import Example, Task, TaskError, get_task, list_tasks

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the only names the store serves
PAGE = Path(__file__).parent / "web" / "index.html"
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
DEFAULT_BASES = ("smollm2-135m",)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for."""

    max_body_bytes: int = 64 * 1024  # a request body (JSON)
    max_prompt_chars: int = 2000  # the task description
    max_inputs: int = 16  # examples in one /v1/try
    max_input_chars: int = 1000  # characters of one example
    max_steps: int = 250  # denoising steps
    max_guidance: float = 10.0  # classifier-free guidance scale
    max_new_tokens: int = 24  # greedy tokens of a continuation (no task)


class ServeError(Exception):
    """A request the service refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -----------------------------------------------------------------------------
# Binding: safe by default


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"binding {host} exposes the service beyond this machine: set an API key "
                         "(ORAL_API_KEY or --api-key) or bind 127.0.0.1")


# -----------------------------------------------------------------------------
# Requests


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    prompt: str
    seed: int = 0
    guidance: float | None = None  # None: the generator's recommended scale (Generator.default_guidance)
    steps: int | None = None  # None: the generator's recommended number (Generator.default_steps)


class TryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    adapter: str | None = None
    inputs: list[str]
    task: str | None = None


# -----------------------------------------------------------------------------
# The adapter store: STORE/<id>/ plain PEFT dirs


def _spec_summary(spec: LoraSpec) -> dict[str, Any]:
    ranks = sorted({m.rank for m in spec.modules})
    alphas = sorted({m.alpha for m in spec.modules})
    return {
        "modules": spec.module_types,
        "layers": len(spec.layers),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "params": spec.num_params,
        "summary": spec.summary(),
    }


class AdapterStore:
    """Adapters by id in one directory; everything is read from disk (nothing held in memory)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, adapter_id: str) -> Path:
        """The dir of a stored adapter; 400 for a malformed id, 404 for an unknown one."""
        if not isinstance(adapter_id, str) or not ADAPTER_ID.fullmatch(adapter_id):
            raise ServeError(400, "invalid adapter id: expected 32 lowercase hex digits")
        path = self.root / adapter_id
        if not (path / "adapter_config.json").is_file():
            raise ServeError(404, f"no adapter {adapter_id}")
        return path

    def new_path(self) -> tuple[str, Path]:
        adapter_id = uuid.uuid4().hex
        return adapter_id, self.root / adapter_id

    def ids(self) -> list[str]:
        """Ids of complete adapters (temporary dirs of writers in flight start with '.')."""
        return [p.name for p in self.root.iterdir()
                if ADAPTER_ID.fullmatch(p.name) and (p / "adapter_config.json").is_file()]

    def metadata(self, adapter_id: str) -> dict[str, Any]:
        path = self.path(adapter_id)
        provenance = read_provenance(path) or {}
        return {
            "id": adapter_id,
            "base": provenance.get("base"),
            "prompt": provenance.get("prompt"),
            "created": provenance.get("created"),
            "spec": _spec_summary(LoraSpec.from_adapter_dir(path)),
            "provenance": provenance,
            "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
            "download": f"/v1/adapters/{adapter_id}/download",
        }

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every readable adapter, newest first; a damaged one is logged and skipped."""
        out = []
        for adapter_id in self.ids():
            try:
                out.append(self.metadata(adapter_id))
            except (ValueError, OSError, ServeError) as e:
                log.warning("skipping stored adapter %s: %s", adapter_id, e)
        return sorted(out, key=lambda m: m["created"] or "", reverse=True)

    def zip_bytes(self, adapter_id: str) -> bytes:
        """The adapter dir as a zip holding one folder, oral-<id>/."""
        path = self.path(adapter_id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(path.iterdir()):
                if p.is_file():
                    zf.write(p, f"oral-{adapter_id}/{p.name}")
        return buf.getvalue()


# -----------------------------------------------------------------------------
# The service: the loaded models behind one lock


@dataclass
class Base:
    """One served base: its name as given at start, the loaded model and an evaluator over it."""

    name: str
    id: str  # oral.models.base_id: what adapters record
    model: torch.nn.Module
    evaluator: Evaluator


def _prompt_for(task: Task, text: str) -> str:
    """Put a user's input into the task's template (a template of one field)."""
    fields = {f for _, f, _, _ in string.Formatter().parse(task.template) if f}
    if len(fields) != 1:
        raise ServeError(400, f"task {task.name!r} has a template of fields {sorted(fields)}; /v1/try fills one field")
    return task.template.format_map({fields.pop(): text})


def _continuation_task(max_new_tokens: int) -> Task:
    """A task-free 'continue this text' task: the input is the whole prompt."""
    return Task("continuation", "generation", "{text}", loader=list, descriptions=["continue the text"],
                heldout_descriptions=[], max_new_tokens=max_new_tokens)


class Service:
    """The generator, the bases, the store and the lock; one method per model-running endpoint."""

    def __init__(self, generator: Generator, bases: Sequence[str] | Mapping[str, tuple], store: AdapterStore,
                 limits: ServeLimits):
        self.generator = generator
        self.store = store
        self.limits = limits
        self.lock = threading.Lock()  # one model run at a time; other requests wait their turn
        self.bases: dict[str, Base] = {}
        loaded = bases if isinstance(bases, Mapping) else {name: None for name in bases}
        if not loaded:
            raise ValueError("serve at least one base")
        for name, pair in loaded.items():
            model, tokenizer = pair if pair is not None else load_base(name)
            # The generator's model condition reads the bare weights: compute it now, before the
            # evaluator injects LoRA layers. A base the generator never learned fails here, at start.
            layout = generator.layout_for(name)
            generator.model_condition(name, layout, model)
            rank = max(m.rank for m in generator.tokenizers[layout].spec.modules)
            if rank > VLLM_MAX_LORA_RANK:
                log.warning("adapters for %s have rank %d: serve them with vLLM --max-lora-rank %d", name, rank, rank)
            self.bases[name] = Base(name, base_id(name), model, Evaluator(model, tokenizer, progress=False))
        self.continuation = _continuation_task(limits.max_new_tokens)

    def base(self, name: str) -> Base:
        if name not in self.bases:
            raise ServeError(400, f"unknown base {name!r}; this server serves {', '.join(self.bases)}")
        return self.bases[name]

    def info(self) -> dict[str, Any]:
        tasks = []
        for name in list_tasks():
            t = get_task(name)
            tasks.append({"name": t.name, "kind": t.kind, "labels": t.labels, "template": t.template})
        return {"bases": list(self.bases), "tasks": tasks, "limits": asdict(self.limits)}

    # --- POST /v1/adapters -----------------------------------------------------

    def create_adapter(self, req: AdapterRequest) -> dict[str, Any]:
        lim = self.limits
        base = self.base(req.base)
        if not req.prompt.strip():
            raise ServeError(400, "the prompt is empty: describe the task the adapter should do")
        if len(req.prompt) > lim.max_prompt_chars:
            raise ServeError(400, f"the prompt has {len(req.prompt)} characters; the limit is {lim.max_prompt_chars}")
        steps, guidance = self.generator.sampling(req.steps, req.guidance)
        if not 1 <= steps <= lim.max_steps:
            raise ServeError(400, f"steps must be in 1..{lim.max_steps}, got {steps}")
        if not 0.0 <= guidance <= lim.max_guidance:
            raise ServeError(400, f"guidance must be in 0..{lim.max_guidance}, got {guidance}")
        if not 0 <= req.seed < 2**32:
            raise ServeError(400, f"seed must be in 0..2**32-1, got {req.seed}")
        with self.lock:
            # c_model was cached at start, so the generator needs no weights here; save_adapter
            # checks the adapter against the base's config, then writes it atomically.
            spec, state = self.generator.generate(base.name, req.prompt, seed=req.seed, steps=steps,
                                                  guidance=guidance)
        provenance = {**self.generator.provenance(base.name, req.prompt, req.seed, steps, guidance,
                                                  "ddim", 0.0), "source": "oral serve"}
        adapter_id, path = self.store.new_path()
        save_adapter(path, spec, state, provenance=provenance, base_model=base.model.config)
        log.info("adapter %s for %s: %r", adapter_id, base.name, req.prompt[:80])
        return self.store.metadata(adapter_id)

    # --- POST /v1/try ----------------------------------------------------------

    def try_adapter(self, req: TryRequest) -> dict[str, Any]:
        lim = self.limits
        base = self.base(req.base)
        if not req.inputs:
            raise ServeError(400, "inputs is empty: give at least one example")
        if len(req.inputs) > lim.max_inputs:
            raise ServeError(400, f"{len(req.inputs)} inputs; the limit is {lim.max_inputs}")
        for i, text in enumerate(req.inputs):
            if not text.strip():
                raise ServeError(400, f"input {i} is empty")
            if len(text) > lim.max_input_chars:
                raise ServeError(400, f"input {i} has {len(text)} characters; the limit is {lim.max_input_chars}")
        if req.task is not None and req.task not in list_tasks():
            raise ServeError(400, f"unknown task {req.task!r}; known tasks: {', '.join(list_tasks())}")
        task = get_task(req.task) if req.task is not None else self.continuation
        prompts = [_prompt_for(task, t) for t in req.inputs] if req.task is not None else list(req.inputs)
        adapter = None
        if req.adapter is not None:
            path = self.store.path(req.adapter)
            made_for = (read_provenance(path) or {}).get("base")
            if made_for not in (None, base.id):
                raise ServeError(400, f"adapter {req.adapter} was made for base {made_for!r}, not {base.name!r}")
            adapter = load_adapter(path)
        examples = [Example(p, "", None, {}) for p in prompts]  # unlabeled: only the prompt is read
        with self.lock:
            ev = base.evaluator
            ev.set_adapter(None)
            without = self._outputs(ev, task, examples)
            with_ = None
            if adapter is not None:
                ev.set_adapter(adapter[1], adapter[0])
                try:
                    with_ = self._outputs(ev, task, examples)
                finally:
                    ev.set_adapter(None)
        kind = task.kind if req.task is not None else "continuation"
        rows = [{"input": text, "prompt": p, "base": b, "adapter": a}
                for text, p, b, a in zip(req.inputs, prompts, without, with_ or [None] * len(prompts))]
        return {"base": base.name, "adapter": req.adapter, "task": req.task, "kind": kind,
                "labels": task.labels, "rows": rows}

    @staticmethod
    @torch.inference_mode()
    def _outputs(ev: Evaluator, task: Task, examples: list) -> list[dict[str, Any]]:
        """Per example: {"label", "scores": {label: probability}} or {"text"}."""
        if task.kind == "generation":
            return [{"text": t} for t in ev.generate(task, examples)]
        # The evaluator's label scoring: the log-likelihood of each label word after the prompt.
        pairs = [encode_pair(ev.tokenizer, ex.prompt, " " + w, ev.max_length) for ex in examples for w in task.labels]
        lp = torch.stack([x.sum() for x in ev._continuation_logprobs(pairs, task.name)])
        probs = lp.view(len(examples), len(task.labels)).softmax(-1)  # (N, L), over the labels
        return [{"label": task.labels[int(p.argmax())],
                 "scores": {w: round(float(v), 4) for w, v in zip(task.labels, p)}} for p in probs]


# -----------------------------------------------------------------------------
# The app


def _one_line(exc: RequestValidationError) -> tuple[int, str]:
    err = exc.errors()[0] if exc.errors() else {}
    if err.get("type") == "json_invalid":
        return 400, f"malformed JSON body: {err.get('ctx', {}).get('error', 'could not parse it')}"
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    return 422, f"{loc}: {err.get('msg', 'invalid')}"


def create_app(
    generator: Generator | str | Path | None,
    bases: Sequence[str] | Mapping[str, tuple] = DEFAULT_BASES,
    store_dir: str | Path | None = None,
    api_key: str | None = None,
    limits: ServeLimits = ServeLimits(),
    device: str = "auto",
) -> FastAPI:
    """The ASGI app. Loads the generator (a Generator, a dir, or None for the bundled one) and each
    base once (`bases`: names or dirs, or {name: (model, tokenizer)} already loaded).

    store_dir: where adapters go (default $ORAL_HOME/served). api_key: required on every /v1 call
    as `Authorization: Bearer KEY` when set.
    """
    api_key = api_key or None  # an empty key is no key
    if not isinstance(generator, Generator):
        generator = Generator.from_pretrained(generator, device=device)
    store = AdapterStore(store_dir if store_dir is not None else oral_home() / "served")
    service = Service(generator, bases, store, limits)

    def authorized(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    app = FastAPI(title="oral", summary="LoRA adapters from a task description", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key on /v1 (before anything else is read), then the body's size."""
        if api_key is not None and request.url.path.startswith("/v1") and not authorized(request):
            return _error(401, "missing or wrong API key: send `Authorization: Bearer KEY`", {"WWW-Authenticate": "Bearer"})
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "send the request body with a Content-Length header")
            if int(length) > limits.max_body_bytes:
                return _error(413, f"the request body has {length} bytes; the limit is {limits.max_body_bytes}")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        return _error(exc.status, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(*_one_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, exc: AdapterError):
        # a generated adapter that failed validation: nothing was written
        return _error(500, f"the generated adapter failed validation, nothing was stored: {_first_line(exc)}")

    @app.exception_handler(GenerationError)
    @app.exception_handler(TaskError)
    async def request_error(request: Request, exc: ValueError):
        return _error(400, _first_line(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return _error(500, f"internal error ({type(exc).__name__}): {_first_line(exc)}")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "auth": api_key is not None}

    v1 = APIRouter(prefix="/v1")

    @v1.get("/info")
    def info() -> dict:
        return service.info()

    @v1.post("/adapters", status_code=201)
    def create_adapter(req: AdapterRequest) -> dict:
        return service.create_adapter(req)

    @v1.get("/adapters")
    def list_adapters() -> dict:
        return {"adapters": store.list()}

    @v1.get("/adapters/{adapter_id}")
    def adapter_metadata(adapter_id: str) -> dict:
        return store.metadata(adapter_id)

    @v1.get("/adapters/{adapter_id}/download")
    def download(adapter_id: str) -> Response:
        data = store.zip_bytes(adapter_id)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="oral-{adapter_id}.zip"'})

    @v1.post("/try")
    def try_adapter(req: TryRequest) -> dict:
        return service.try_adapter(req)

    app.include_router(v1)
    return app


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason.splitlines()[0] if reason else str(status)}, status_code=status, headers=headers)


# -----------------------------------------------------------------------------
# Running it


def serve(
    generator: str | Path | None = None,
    bases: Sequence[str] = DEFAULT_BASES,
    host: str = "127.0.0.1",
    port: int = 8000,
    store_dir: str | Path | None = None,
    api_key: str | None = None,
    limits: ServeLimits = ServeLimits(),
    device: str = "auto",
    log_level: str = "info",
) -> None:
    """Check the bind, load everything once, then serve with uvicorn until interrupted."""
    import uvicorn

    check_bind(host, api_key)
    app = create_app(generator, bases, store_dir, api_key, limits, device)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

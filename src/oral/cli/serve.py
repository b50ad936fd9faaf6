"""oral serve: an HTTP service and web page that make LoRA adapters from a task description."""

import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve adapter generation over HTTP, with a web page",
        description=(
            "oral serve [--generator GEN] [--base B ...] [--host H] [--port P] [--store DIR]. Open "
            "http://HOST:PORT/ for the page; the JSON API is under /v1 (see docs/SERVING.md). Binds "
            "127.0.0.1 by default; any other address needs an API key (ORAL_API_KEY, or --api-key), "
            "then sent on every /v1 call as `Authorization: Bearer KEY`."
        ),
    )
    p.add_argument("--generator", help="trained generator directory (from oral train); default: the bundled one")
    p.add_argument("--base", action="append", dest="bases", metavar="BASE",
                   help="a base model to serve (repeat for more; default smollm2-135m): embedded name, local dir or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--store", help="adapter store directory (default $ORAL_HOME/served)")
    p.add_argument("--api-key", default=os.environ.get("ORAL_API_KEY"),
                   help="API key required on /v1 calls (default $ORAL_API_KEY; the variable keeps it out of `ps`)")
    p.add_argument("--device", default="auto", help="generator device: cpu, cuda, or auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.serve import DEFAULT_BASES, check_bind, serve

    check_bind(args.host, args.api_key)  # before loading anything
    serve(args.generator, bases=args.bases or list(DEFAULT_BASES), host=args.host, port=args.port,
          store_dir=args.store, api_key=args.api_key, device=args.device)
    return 0

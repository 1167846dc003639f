"""Serve the draft/target pair behind an OpenAI-compatible endpoint.

POST /v1/chat/completions, /v1/completions (streaming or not), GET
/v1/models, GET /health, and POST /v1/compress (the compressed prompt, for
any other engine). Prompts go through --method at --budget (auto: full or
specpc, whichever is predicted to answer sooner; the models' speed is
measured at start, once per machine and setting), those shorter than
--min-prompt-tokens, if given, through full; a request may choose its own
`method`, `budget`, `method_options` and `speculative` (the openai client's
extra_body).
Needs the server extra: pip install "pyspec-gguf[server]".
"""

import logging

from .common import add_method_args, add_model_args, checked_options, open_session


def add_cli_args(parser) -> None:
    add_method_args(parser)
    parser.set_defaults(budget=0.25)
    parser.add_argument("--min-prompt-tokens", type=int, default=None,
                        help="shorter prompts always go through full (default: none; --method decides)")
    add_model_args(parser, max_tokens=512)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--workers", type=int, default=1,
                        help="requests answered at once, sharing the loaded pair (default 1)")
    parser.add_argument("--queue-size", type=int, default=32,
                        help="requests that may wait; more are answered 503 (default 32)")
    parser.add_argument("--cache-slots", type=int, default=2,
                        help="prompts whose KV each model keeps for the requests that follow, shared by the workers "
                        "(default 2; 0: off)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the target's file name)")


def main(args) -> int:
    try:
        import uvicorn

        from ..server import Policy, WorkerPool, create_app
    except ImportError as e:
        raise RuntimeError(f"the server needs its extra: pip install \"pyspec-gguf[server]\" ({e})") from None
    options = checked_options(args)
    if args.min_prompt_tokens is not None and args.min_prompt_tokens < 0:
        raise ValueError("--min-prompt-tokens must be >= 0")
    if args.workers < 1 or args.queue_size < 1 or args.cache_slots < 0:
        raise ValueError("--workers and --queue-size must be >= 1, --cache-slots >= 0")
    policy = Policy(args.method, args.budget, options, args.min_prompt_tokens, args.max_tokens, args.speculative)
    session = open_session(args, uses_draft=True)
    try:
        pool = WorkerPool(session, args.workers, args.queue_size, args.cache_slots)
        model_id = args.model_name or session.target.name.removesuffix(".gguf")
        app = create_app(pool, policy, model_id, args.api_key)
        logging.getLogger("pyspec_gguf").setLevel(logging.INFO)
        if args.method == "auto":  # measured before the first request, not during it
            for which in ("draft", "target"):
                session.speed(which)
        shorter = f", full below {args.min_prompt_tokens} tokens" if args.min_prompt_tokens is not None else ""
        print(f"pyspec-gguf: serving {model_id} ({args.method} at budget {args.budget}{shorter}) "
              f"on http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        session.close()
    return 0

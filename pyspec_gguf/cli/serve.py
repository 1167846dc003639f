"""Serve the draft/target pair behind an OpenAI-compatible endpoint.

POST /v1/chat/completions, /v1/completions (streaming or not), GET
/v1/models, GET /health, and POST /v1/compress (the compressed prompt, for
any other engine). Prompts go through --method at --budget (auto: full or
specpc, whichever is predicted to answer sooner; the models' speed is
measured at start, once per machine and setting), those shorter than
--min-prompt-tokens, if given, through full; a request may choose its own
`method`, `budget`, `method_options` and `speculative` (the openai client's
extra_body).

With --upstream URL the answers come from another OpenAI-compatible engine
(llama-server, Ollama, vLLM, ...): only the draft is loaded, prompts of at
least --min-prompt-tokens (default 1024) are compressed by it (specpc
unless --method names another prompt method) and forwarded, shorter ones
forwarded unchanged.

The draft's KV of the last prompts is saved to --cache-dir (at most
--cache-max-gb), so after a restart a conversation's next turn costs the
draft only its new tokens.
Needs the server extra: pip install "pyspec-gguf[server]".
"""

import logging
from pathlib import Path

from .. import registry
from ..store import StateStore, documents_dir
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
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where the draft's states are saved, so a restart does not read a conversation again "
                        "(default: the cache folder's documents/, where Document.save writes)")
    parser.add_argument("--cache-max-gb", type=float, default=4.0,
                        help="the most the saved states may take, the least recently used dropped (default 4; 0: "
                        "none are saved)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the target's file name)")
    parser.add_argument("--upstream", default=None, metavar="URL",
                        help="answer from this OpenAI-compatible engine (its base URL, e.g. http://127.0.0.1:8080/v1), "
                        "its long prompts compressed by the draft; no target is loaded")
    parser.add_argument("--upstream-api-key", default=None, help="sent upstream as 'Authorization: Bearer KEY'")
    parser.add_argument("--upstream-model", default=None, help="the model name sent upstream (default: the client's)")
    parser.add_argument("--upstream-timeout", type=float, default=600.0,
                        help="seconds the upstream may take for the next piece of an answer (default 600)")


# in front of an upstream, shorter prompts pass unchanged unless --min-prompt-tokens says otherwise
UPSTREAM_MIN_PROMPT_TOKENS = 1024


def main(args) -> int:
    try:
        from ..server import Policy, Upstream
    except ImportError as e:
        raise RuntimeError(f"the server needs its extra: pip install \"pyspec-gguf[server]\" ({e})") from None
    options = checked_options(args)
    if args.min_prompt_tokens is not None and args.min_prompt_tokens < 0:
        raise ValueError("--min-prompt-tokens must be >= 0")
    if args.workers < 1 or args.queue_size < 1 or args.cache_slots < 0 or args.cache_max_gb < 0:
        raise ValueError("--workers and --queue-size must be >= 1, --cache-slots and --cache-max-gb >= 0")
    if args.upstream is None:
        return serve(args, Policy(args.method, args.budget, options, args.min_prompt_tokens, args.max_tokens,
                                  args.speculative))
    if args.target:
        raise ValueError("with --upstream the upstream is the target: give --draft only")
    # the draft alone: it compresses, and its tokenizer counts the prompts
    args.target = args.draft = args.draft or registry.default_model("draft")
    minimum = UPSTREAM_MIN_PROMPT_TOKENS if args.min_prompt_tokens is None else args.min_prompt_tokens
    policy = Policy("specpc" if args.method == "auto" else args.method, args.budget, options, minimum,
                    args.max_tokens)
    upstream = Upstream(args.upstream, args.upstream_api_key, args.upstream_model, args.upstream_timeout)
    return serve(args, policy, upstream)


def serve(args, policy, upstream=None) -> int:
    import uvicorn

    from ..server import WorkerPool, create_app

    session = open_session(args, uses_draft=True)
    try:
        store = None
        if args.cache_max_gb > 0 and args.cache_slots:
            store = StateStore(Path(args.cache_dir) if args.cache_dir else documents_dir(), session.draft,
                               int(args.cache_max_gb * 2**30))
        pool = WorkerPool(session, args.workers, args.queue_size, args.cache_slots, store)
        if upstream is not None:  # only a name: the upstream checks the model a request names
            model_id = args.model_name or args.upstream_model or "upstream"
        else:
            model_id = args.model_name or session.target.name.removesuffix(".gguf")
        app = create_app(pool, policy, model_id, args.api_key, upstream)
        logging.getLogger("pyspec_gguf").setLevel(logging.INFO)
        if policy.method == "auto":  # measured before the first request, not during it
            for which in ("draft", "target"):
                session.speed(which)
        how = f"{policy.method} at budget {policy.budget}"
        if upstream is not None:
            how += f" from {policy.min_prompt_tokens} tokens on, answered by {upstream.url}"
        elif policy.min_prompt_tokens is not None:
            how += f", full below {policy.min_prompt_tokens} tokens"
        print(f"pyspec-gguf: serving {model_id} ({how}) on http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        session.close()
    return 0

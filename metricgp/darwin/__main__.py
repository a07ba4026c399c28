"""`python -m metricgp.darwin`: DarwinLM structured level search, or EvoPress unstructured (see cli.py)."""

from __future__ import annotations

import sys

from metricgp.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from metricgp.darwin.cli import build_parser, config_from_args, resume_overrides
    from metricgp.darwin.run import resume, start
    from metricgp.provenance import provenance

    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.resume is not None:
        out = args.resume
        search = resume(out, resume_overrides(parser, args), progress=progress, provenance=provenance())
    else:
        config = config_from_args(args)
        out = args.out
        search = start(config, out, provenance(), progress=progress)
    print(f"best: kept {search.space.kept_fraction(search.parent):.4f}, fitness {search.fitness:.6g} "
          f"after {search.gen} generations -> {out}/best.json, {out}/levels.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

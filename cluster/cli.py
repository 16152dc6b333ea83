"""The `paceflow` command line: validate configs, browse presets and fields, prepare models, run the demo.

Every subcommand that takes a CONFIG accepts a preset name (see `paceflow presets`) or a YAML path, followed
by any number of `key.sub=value` overrides. Configuration errors exit with status 2 and name the field.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from configs.load import (
    ConfigError,
    load_config,
    model_classes,
    preset_names,
    read_yaml,
    resolve_config_path,
    to_yaml,
)
from configs.schema import RunConfig

EXAMPLES = """\
examples:
  paceflow presets                                   list the shipped presets
  paceflow validate tiny_cpu                         print the fully resolved config
  paceflow validate configs/presets/smollm2_cpu.yaml learner.lr=3e-6 rollout.sampling.num_samples=16
  paceflow schema objective                          every objective field with its type, default and meaning
  paceflow prepare smollm2_cpu                       convert/cache the model and check the task data
  paceflow demo smollm2_cpu --prompts 4              sample and score rollout groups on this machine
  paceflow train tiny_cpu                            train end to end on this CPU (minutes)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may also follow options (`demo CONFIG --prompts 2 a.b=c`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"paceflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except (FileNotFoundError, ValueError) as exc:  # missing model or data, bad task data: say what and stop
        print(f"paceflow {args.command}: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paceflow",
        description="Asynchronous LLM post-training by distribution matching (GFlowNet trajectory balance, "
        "PACED-RL, PowerFlow; GRPO baseline) on Ray + vLLM + Redis + DeepSpeed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
        p.add_argument(
            "config",
            nargs="?" if optional else None,
            default="smollm2_cpu" if optional else None,
            help=f"preset name ({', '.join(preset_names())}) or path to a YAML file"
            + (" (default: smollm2_cpu)" if optional else ""),
        )
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any field, e.g. learner.lr=1e-5")

    p = sub.add_parser(
        "validate",
        help="check a config and print it resolved",
        description="Validate CONFIG with the overrides applied and print every field, defaults filled in. "
        "Errors name the field path, the value given and what is allowed; exit status 2.",
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=_validate)

    p = sub.add_parser("presets", help="list the shipped presets", description="List configs/presets/*.yaml.")
    p.set_defaults(func=_presets)

    p = sub.add_parser(
        "schema",
        help="document config fields",
        description="Print the fields of a config section (e.g. 'learner', 'objective', 'rollout.sampling') "
        "with type, default and meaning; no argument lists the top-level sections.",
    )
    p.add_argument("section", nargs="?", default="", help="dotted section path")
    p.set_defaults(func=_schema)

    p = sub.add_parser(
        "prepare",
        help="cache the model and check the task data",
        description="Resolve the model (build the tiny model, or convert SmolLM2 from its GGUF once) and load "
        "the task, printing where everything is. Run it on every node of a cluster before training.",
    )
    with_config(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "train",
        help="train: rollout actors + replay + learner, with a live progress display",
        description="Run the configured experiment: start a local Ray (or join cluster.address), the replay "
        "(in-process or Redis), cluster.num_rollout_actors rollout actors and the DeepSpeed learner, train for "
        "learner.num_steps steps, evaluate every eval.every_steps, and save a Hugging Face checkpoint to "
        "output_dir/name/final. Metrics go to output_dir/name/metrics.jsonl.",
    )
    with_config(p)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a quick smoke run)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR (output_dir/name) from its last checkpoint: learner, optimizer, log Z, "
        "replay, scheduler and counters",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "demo",
        help="sample and score rollout groups with the configured model and task",
        description="The smallest real slice of the pipeline: prepare the model, load the task, sample "
        "G responses per prompt with the Hugging Face engine and score them with the verifier.",
    )
    with_config(p, optional=True)
    p.add_argument("--prompts", type=int, default=4, help="number of training prompts to roll out (default 4)")
    p.set_defaults(func=_demo)
    return parser


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(cfg.model_dump_json(indent=2) if args.json else to_yaml(cfg), end="" if not args.json else "\n")
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        description = read_yaml(resolve_config_path(name)).get("description", "")
        print(f"{name:<30} {description}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    models: list[type[BaseModel]] = [RunConfig]
    for part in [p for p in args.section.split(".") if p]:
        fields = {name: f for m in models for name, f in m.model_fields.items()}
        if part not in fields:
            raise ConfigError(f"{args.section!r}: no section {part!r}; choose from {', '.join(sorted(fields))}")
        models = model_classes(fields[part].annotation)
        if not models:
            raise ConfigError(f"{args.section!r}: {part!r} is a value, not a section")
    for model in models:
        kind = model.model_fields.get("kind")
        title = f"[{args.section or 'config'}] kind: {kind.default}" if kind else f"[{args.section or 'config'}]"
        print(f"{title}\n  {(model.__doc__ or '').strip().splitlines()[0]}")
        for name, f in model.model_fields.items():
            if name == "kind":
                continue
            default = "required" if f.is_required() else f"default {_show_default(f)}"
            print(f"  {name}: {_type_name(f.annotation)} ({default})")
            if f.description:
                print(f"      {f.description}")
        print()
    return 0


def _show_default(field: typing.Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "{...}"
    return json.dumps(value, default=str)


def _type_name(annotation: typing.Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        return str(annotation).replace("typing.", "").replace("configs.schema.", "").replace("pathlib.", "")
    return getattr(annotation, "__name__", str(annotation))


def _prepare(args: argparse.Namespace) -> int:
    from actors.tasks import build_task
    from cluster.models import resolve_model_dir

    cfg = load_config(args.config, args.overrides)
    print(f"model: {resolve_model_dir(cfg.model)}")
    task = build_task(cfg.task)
    print(f"task:  {task.name}: {len(task.train)} training / {len(task.eval)} held-out prompts")
    for note in task.warnings:
        print(f"warning: {note}")
    if task.skipped_rows:
        print(f"skipped {task.skipped_rows} malformed rows: {'; '.join(task.skip_reasons)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.launch import train

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: got {args.max_steps} (must be >= 1)")
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, console=Console(), max_steps=args.max_steps, resume=Path(args.resume) if args.resume else None)
    print(f"done: {len(summary.steps)} steps; run directory {summary.run_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.demo import run_demo

    if args.prompts < 1:
        raise ConfigError(f"--prompts: got {args.prompts} (must be >= 1)")
    cfg = load_config(args.config, args.overrides)
    run_demo(cfg, num_prompts=args.prompts, console=Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

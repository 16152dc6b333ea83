"""The `paceflow` command line: validate configs, browse presets and fields, prepare models, run the demo.

Every subcommand that takes a CONFIG accepts a preset name (see `paceflow presets`) or a YAML path, followed
by any number of `key.sub=value` overrides. Configuration errors exit with status 2 and name the field.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from cluster.compare import OBJECTIVES
from cluster.control import RunUnavailable
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

_T = typing.TypeVar("_T")

EXAMPLES = """\
examples:
  paceflow presets                                   list the shipped presets
  paceflow validate tiny_cpu                         print the fully resolved config
  paceflow validate configs/presets/smollm2_cpu.yaml learner.lr=3e-6 rollout.sampling.num_samples=16
  paceflow schema objective                          every objective field with its type, default and meaning
  paceflow prepare smollm2_cpu                       convert/cache the model and check the task data
  paceflow demo smollm2_cpu --prompts 4              sample and score rollout groups on this machine
  paceflow train tiny_cpu                            train end to end on this CPU (minutes)
  paceflow eval runs/smollm2_cpu --against base      held-out metrics of a run's final policy vs the base model
  paceflow compare smollm2_cpu --rollouts 960 --seeds 3   GRPO, TB, PACED-RL, PowerFlow on one rollout budget
  paceflow eval base smollm2_cpu --samples 8         the base model on the preset's held-out prompts
  paceflow pareto smollm2_powerflow_creative --run runs/smollm2_powerflow_creative   diversity vs quality
  paceflow report runs/smollm2_cpu                   (re)draw a run's plots and markdown report
  paceflow status runs/tiny_cpu                      a running job: step, actors, throughput, replay, lag
  paceflow scale runs/tiny_cpu --actors 4            add or remove rollout actors of a running job
  paceflow stop runs/tiny_cpu                        end a running job cleanly after its current step
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
    except (FileNotFoundError, ValueError, RunUnavailable) as exc:  # missing model or data, bad task data, no run
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
        "eval",
        help="held-out metrics with 95%% confidence intervals (avg@k, pass@k, maj@k, diversity)",
        description="Evaluate a model on CONFIG's held-out prompts: sample --samples responses per prompt, score "
        "them with the training verifier, and print avg@k, pass@k (unbiased estimator), maj@k, distinct answers "
        "per prompt and distinct-n with 95%% confidence intervals over prompts. MODEL_OR_RUN is 'base' (CONFIG's "
        "own model), a run directory (its final policy; CONFIG defaults to the run's config.yaml) or a Hugging "
        "Face model directory. --against evaluates a second model on the same prompts and reports the paired "
        "difference. Runs on vLLM where it is installed (else Hugging Face generate); engine logs go to --log.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="'base', a run directory, or a model directory")
    p.add_argument("config", nargs="?", default=None, help="preset name or YAML path (default: the run's config)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any field, e.g. task.eval_size=256")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: eval.num_prompts)")
    p.add_argument("--samples", type=int, default=None, help="responses per prompt, k (default: eval.num_samples)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: eval.temperature)")
    p.add_argument("--pass-k", default="1", help="comma-separated k for pass@k, each <= --samples (default: 1)")
    p.add_argument("--against", metavar="MODEL_OR_RUN", default=None, help="a second model, e.g. 'base'")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="generation engine")
    p.add_argument("--json", metavar="PATH", default=None, help="also write metrics and per-prompt results here")
    p.add_argument("--log", metavar="PATH", default=None, help="engine output (default: paceflow-eval.log)")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "report",
        help="(re)draw a run's plots and markdown report",
        description="Read RUN_DIR's metrics.jsonl, evals.jsonl and calibration.jsonl and write its PNG plots and "
        "report.md (paceflow train does this at the end of every run).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "status",
        help="show a running job: step, actors and their weight versions, throughput, replay, lag",
        description="Connect to the Ray cluster of the run in RUN_DIR (its control.json) and print the snapshot "
        "the driver publishes after every learner step.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "scale",
        help="add or remove rollout actors of a running job, without restarting the learner",
        description="Set the number of rollout actors of the running job in RUN_DIR. The driver applies it "
        "between learner steps: new actors load the newest weights and join; removed actors finish their current "
        "step first, so every group they made reaches the replay. On an autoscaling cluster, rollout nodes follow "
        "the actors' resource demand. Synchronous runs (learner.sync) cannot scale.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--actors", type=int, required=True, help="the number of rollout actors to keep")
    p.set_defaults(func=_scale)

    p = sub.add_parser(
        "stop",
        help="end a running job cleanly after its current learner step (resumable)",
        description="Ask the running job in RUN_DIR to stop after its current learner step. It finishes as if it "
        "had reached learner.num_steps: actors stop, a checkpoint, the final policy and the report are written. "
        "`paceflow train CONFIG --resume RUN_DIR` continues it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_stop)

    p = sub.add_parser(
        "compare",
        help="objectives head to head on one rollout budget: table, learning curves, CIs across seeds",
        description="Train each objective (--objectives) on CONFIG's model, task and prompts, from the same seeds, "
        "in synchronous mode, each for the number of steps that consumes --rollouts generated responses; evaluate "
        "on the held-out split before, during and after; write OUT/compare.md (the table: final held-out accuracy "
        "with a 95% CI across seeds), OUT/compare.png (held-out accuracy against rollouts and against seconds), "
        "OUT/compare.json and every run's directory. PACED-RL brings its prompt scheduler and success buffer; the "
        "others run with uniform prompts. Runs one after another on this machine (or on the cluster's Ray).",
    )
    with_config(p)
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated (default: all four)")
    p.add_argument("--rollouts", type=int, required=True, help="responses generated per run: the budget")
    p.add_argument("--seeds", type=int, default=1, help="seeds per objective (default 1; >= 3 for real CIs)")
    p.add_argument("--out", default=None, help="output directory (default: OUTPUT_DIR/compare-NAME)")
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "pareto",
        help="diversity vs quality of trained runs against the base model swept over temperatures",
        description="For a task without a verifier (creative writing, PowerFlow alpha < 1): evaluate the base model "
        "and each --run's final policy at each of --temperatures on CONFIG's held-out prompts, and report semantic "
        "diversity and distinct-2 against prompt relevance (a quality proxy from a local sentence encoder, not the "
        "training signal), with 95%% CIs and the paired change against the base at the same temperature. Writes "
        "OUT/pareto.md, OUT/pareto.json and OUT/pareto.png (quality against diversity, one curve per model).",
    )
    with_config(p)
    p.add_argument("--run", action="append", default=[], metavar="RUN_DIR", help="a trained run (repeatable)")
    p.add_argument("--temperatures", default="0.7,1.0,1.3", help="comma-separated (default 0.7,1.0,1.3)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: eval.num_prompts)")
    p.add_argument("--samples", type=int, default=None, help="responses per prompt (default: eval.num_samples)")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="generation engine")
    p.add_argument("--out", default=None, help="output directory (default: OUTPUT_DIR/pareto-NAME)")
    p.set_defaults(func=_pareto)

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


def _compare(args: argparse.Namespace) -> int:
    import shlex

    from rich.console import Console

    from cluster.compare import compare
    from cluster.console import third_party_output_to

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.output_dir).expanduser() / f"compare-{cfg.name}"
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ConfigError(f"--objectives: got {(unknown or [''])[0]!r}, allowed {', '.join(OBJECTIVES)}")
    if args.rollouts < 1 or args.seeds < 1:
        raise ConfigError(f"--rollouts and --seeds must be >= 1 (got {args.rollouts} and {args.seeds})")
    command = shlex.join(["paceflow", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else None
    with third_party_output_to(out / "compare.log") as terminal:
        compare(
            args.config,
            list(args.overrides),
            objectives,
            rollouts=args.rollouts,
            seeds=args.seeds,
            out=out,
            console=Console(file=terminal),
            command=command,
        )
    return 0


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
    import shlex

    from rich.console import Console

    from cluster.console import third_party_output_to
    from cluster.launch import train

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: got {args.max_steps} (must be >= 1)")
    cfg = load_config(args.config, args.overrides)
    log_path = Path(cfg.output_dir).expanduser() / cfg.name / "train.log"
    command = shlex.join(["paceflow", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None
    try:
        with third_party_output_to(log_path) as terminal:
            summary = train(
                cfg,
                console=Console(file=terminal),
                max_steps=args.max_steps,
                resume=Path(args.resume) if args.resume else None,
                command=command,
            )
    except Exception:
        print(f"paceflow train: the run failed; library and worker output is in {log_path}", file=sys.stderr)
        raise
    print(f"done: {len(summary.steps)} steps; run directory {summary.run_dir} (library output: {log_path.name})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.eval_command import run_eval

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config:  # `eval RUN key=value`: the first override landed in CONFIG
        overrides.insert(0, config)
        config = None
    run_dir = Path(args.model) if args.model != "base" else None
    if config is None:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"CONFIG is required: {args.model!r} is not a run directory with a config.yaml")
        config = str(run_dir / "config.yaml")
    cfg = load_config(config, overrides)
    pass_ks = _comma_separated("--pass-k", args.pass_k, int, "integers, e.g. 1,4")
    _at_least(1, {"--prompts": args.prompts, "--samples": args.samples})
    samples = args.samples or cfg.eval.num_samples
    if any(k < 1 or k > samples for k in pass_ks):
        raise ConfigError(f"--pass-k: got {args.pass_k!r}; each k must be between 1 and --samples={samples}")
    return run_eval(
        cfg,
        model=args.model,
        against=args.against,
        num_prompts=args.prompts or cfg.eval.num_prompts,
        num_samples=samples,
        temperature=cfg.eval.temperature if args.temperature is None else args.temperature,
        pass_ks=pass_ks,
        engine=args.engine,
        json_path=Path(args.json) if args.json else None,
        log_path=Path(args.log or "paceflow-eval.log"),
        console_factory=Console,
    )


def _comma_separated(flag: str, text: str, convert: Callable[[str], _T], what: str) -> list[_T]:
    try:
        return [convert(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r} (comma-separated {what})") from None


def _at_least(minimum: int, flags: dict[str, int | None], why: str = "") -> None:
    for flag, value in flags.items():
        if value is not None and value < minimum:
            raise ConfigError(f"{flag}: got {value} (must be >= {minimum}{why})")


def _pareto(args: argparse.Namespace) -> int:
    import shlex

    from rich.console import Console

    from cluster.evaluate import pick_engine
    from cluster.pareto import run_pareto

    cfg = load_config(args.config, args.overrides)
    temperatures = _comma_separated("--temperatures", args.temperatures, float, "numbers, e.g. 0.7,1.0")
    _at_least(2, {"--prompts": args.prompts, "--samples": args.samples}, ": diversity is measured between responses")
    out = Path(args.out) if args.out else Path(cfg.output_dir).expanduser() / f"pareto-{cfg.name}"
    run_pareto(
        cfg,
        runs=args.run,
        temperatures=temperatures,
        num_prompts=args.prompts or cfg.eval.num_prompts,
        num_samples=args.samples or cfg.eval.num_samples,
        engine=pick_engine(args.engine),
        out=out,
        console_factory=Console,
        command=shlex.join(["paceflow", *sys.argv[1:]]) if sys.argv[1:2] == ["pareto"] else "paceflow pareto",
    )
    print(f"wrote {out / 'pareto.md'}, {out / 'pareto.png'} and {out / 'pareto.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cluster.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a paceflow run directory?)")
    report = write_report(run_dir)
    print(f"wrote {report} and its plots")
    return 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.control import ask, status_table

    status = ask(Path(args.run_dir), "status")
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    elif not status.get("step"):
        print(f"{args.run_dir}: running, no learner step yet ({status.get('desired_actors')} actors wanted)")
    else:
        Console().print(status_table(status))
    return 0


def _scale(args: argparse.Namespace) -> int:
    import ray

    from cluster.control import ask

    if args.actors < 1:
        raise ConfigError(f"--actors: got {args.actors} (must be >= 1)")
    try:
        want = ask(Path(args.run_dir), "set_actors", args.actors)
    except ray.exceptions.RayTaskError as exc:  # the control actor refused (a synchronous run, a bad count)
        print(f"paceflow scale: {exc.cause}", file=sys.stderr)
        return 2
    print(f"{args.run_dir}: {want} rollout actor(s) wanted; the driver applies it after the current learner step")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from cluster.control import ask

    ask(Path(args.run_dir), "request_stop")
    print(f"{args.run_dir}: stopping after the current learner step (checkpoint, final policy, report)")
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

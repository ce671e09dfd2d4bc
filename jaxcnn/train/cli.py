"""Command line generated from TrainConfig: one flag per field, validated by argparse."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import signal
import sys
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from jaxcnn.train.config import TrainConfig
from jaxcnn.train.recipes import RECIPES, build_config

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../jaxcnn/
_GROUPS = ("model", "data", "augmentation", "optimization", "hardware", "run")


def _checked(base, check, name):
    ok, what = check

    def parse(s: str):
        v = base(s)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{s!r}: must be {what}")
        return v
    parse.__name__ = base.__name__  # argparse names the type in "invalid int value" messages
    return parse


def _optional(parse):
    def p(s: str):
        return None if s.lower() in ("none", "off", "") else parse(s)
    p.__name__ = parse.__name__
    return p


def _kwarg(s: str):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"{s!r}: expected KEY=VALUE, e.g. growth_rate=12")
    k, v = s.split("=", 1)
    try:
        v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        pass  # a bare word stays a string: stem=cifar
    if isinstance(v, list):
        v = tuple(v)
    return k.strip(), v


def _dataset_choices() -> List[str]:
    from jaxcnn.data import KNOWN_TFDS_DATASETS
    return list(KNOWN_TFDS_DATASETS)


def build_parser(prog: Optional[str] = None, description: str = "",
                 defaults: Mapping[str, Any] = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with a flag for every TrainConfig field.

    Flags default to argparse.SUPPRESS, so the parsed namespace holds only what was typed; the
    recipe and `defaults` fill in the rest (see parse_config). Help shows the dataclass default.
    """
    from jaxcnn.models import list_models
    defaults = dict(defaults)
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings resolve as: TrainConfig defaults < this script's "
                                       "defaults < --recipe < flags you give.\nRecipes:\n" +
                                       "\n".join(f"  {r.name:8s} {r.source}" for r in RECIPES.values()))
    groups = {g: p.add_argument_group(g) for g in _GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    dynamic_choices = {"model": list_models(), "dataset": _dataset_choices(), "recipe": list(RECIPES)}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        md = f.metadata
        shown = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        extra = " (default: the recipe's, else %r)" % (shown,) if f.name not in ("model", "recipe") \
            else (" (default: %r)" % (shown,) if f.name == "model" else "")
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=md["help"] + extra, dest=f.name)
        hint = hints[f.name]
        origin_args = typing.get_args(hint)
        optional = type(None) in origin_args
        base = next((a for a in origin_args if a is not type(None)), hint) if optional else hint
        choices = dynamic_choices.get(f.name, md.get("choices"))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "model_kwargs":
            kw.update(nargs="*", type=_kwarg, metavar="KEY=VALUE")
        elif typing.get_origin(base) is tuple:
            kw.update(nargs="*", type=_checked(int, md["check"], f.name) if "check" in md else int,
                      metavar="EPOCH")
        else:
            parse = base
            if "check" in md:
                parse = _checked(base, md["check"], f.name)
            if optional:
                parse = _optional(parse)
            kw["type"] = parse
            if choices is not None:
                kw["choices"] = choices
                kw["metavar"] = "{" + ",".join(choices) + "}" if len(choices) <= 12 else f.name.upper()
                if len(choices) > 12:
                    kw["help"] += "; one of: " + ", ".join(choices)
        groups[md["group"]].add_argument(flag, **kw)
    return p


def parse_config(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None,
                 description: str = "", defaults: Mapping[str, Any] = (),
                 required: Sequence[str] = ()) -> TrainConfig:
    """Parse flags into a validated TrainConfig; bad values exit through argparse's error."""
    return parse_args(argv, prog=prog, description=description, defaults=defaults, required=required)[0]


def parse_args(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None,
               description: str = "", defaults: Mapping[str, Any] = (),
               required: Sequence[str] = ()) -> Tuple[TrainConfig, Set[str]]:
    """(validated TrainConfig, names of the fields given on the command line)."""
    parser = build_parser(prog, description, defaults)
    ns = vars(parser.parse_args(argv))
    typed = set(ns)
    for name in required:
        if ns.get(name) is None and dict(defaults).get(name) is None:
            parser.error(f"--{name.replace('_', '-')} is required")
    if "model_kwargs" in ns:
        ns["model_kwargs"] = dict(ns["model_kwargs"])
    if "decay_epochs" in ns:
        ns["decay_epochs"] = tuple(ns["decay_epochs"])
    recipe = ns.pop("recipe", None) or dict(defaults).get("recipe")
    base = {k: v for k, v in dict(defaults).items() if k != "recipe"}
    try:
        config = build_config(recipe, base=base, **ns)
        config.validate()
        from jaxcnn.models import create_model
        create_model(config.model, config.num_classes, **config.model_kwargs)  # names unknown fields
        if config.devices is not None:
            import jax
            n = jax.local_device_count()
            if config.devices > n:
                raise ValueError(f"--devices {config.devices}: only {n} local device(s) "
                                 f"({jax.devices()[0].platform}) are available; choose 1..{n}")
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config, typed


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None, description: str = "",
         defaults: Mapping[str, Any] = (), required: Sequence[str] = ()) -> int:
    """Entry point shared by experiments/*.py: train (or --eval-only) and print the outcome."""
    config, typed = parse_args(argv, prog=prog, description=description, defaults=defaults,
                               required=required)
    from jaxcnn.train.loop import EVAL_OVERRIDABLE, evaluate, train_and_evaluate
    try:
        if config.eval_only:
            res = evaluate(config.checkpoint, overrides={k: getattr(config, k) for k in typed
                                                         if k in EVAL_OVERRIDABLE})
            return 0 if res["count"] else 1
        train_and_evaluate(config, exit_on_second_interrupt=True)
    except KeyboardInterrupt:  # train_and_evaluate has said what was kept and how to resume
        # Another Ctrl-C during the interpreter's teardown could land under XLA (see
        # loop.StopOnInterrupt) and hang it: end the process instead.
        signal.signal(signal.SIGINT, lambda *_: os._exit(128 + signal.SIGINT))
        return 128 + signal.SIGINT
    except (ValueError, OSError, FloatingPointError) as e:
        # jaxcnn's own errors name the problem and the fix: print just that. Anything raised
        # elsewhere (a library, a bug) keeps its traceback, as does JAXCNN_TRACEBACK=1.
        if os.environ.get("JAXCNN_TRACEBACK") or not raised_by_jaxcnn(e):
            raise
        print(f"{prog or 'jaxcnn'}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    return 0


def raised_by_jaxcnn(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is in the jaxcnn package."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and os.path.abspath(last).startswith(_PACKAGE)


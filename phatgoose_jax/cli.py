"""The ``phatgoose-jax`` console script.

Subcommands:
  demo         the embedded CPU demo (`phatgoose_jax.demo`): ``--output_dir``, ``--seed``, ``--quick``;
               ``--gin_file=runs/demo.gin`` / ``--gin.DemoConfig.FIELD=VALUE`` override its sizes;
  train-expert `phatgoose_jax.train` with ``--gin_file=runs/train_expert.gin`` first, then every other
               flag passed through (``--gin_file``, ``--gin.NAME=VALUE``, ``--gin_bindings``, ...);
  train-gate   the same with ``runs/train_gate.gin``;
  library      the expert library: ``create``, ``add`` (a training run's export or ``--peft`` a HF PEFT
               adapter folder), ``list``, ``remove``, ``info``;
  eval         `phatgoose_jax.eval` (flags passed through) when that module is present.

Errors are one line on stderr, ``phatgoose-jax: error: ...`` naming the culprit, exit status 2, no
traceback (``--debug`` before the subcommand re-raises instead). Unknown subcommands, missing
arguments and bad values get the same treatment.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, List, Optional, Sequence

PROG = "phatgoose-jax"
EXIT_USAGE = 2


class CliError(ValueError):
  """A command-line problem (one line, names the culprit)."""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump) raised as `CliError`."""

  def error(self, message: str):  # pylint: disable=arguments-differ
    where = self.prog[len(PROG):].strip()  # e.g. 'library add' for a subcommand's parser
    raise CliError(f"{where}: {message}" if where else message)


def _one_line(error: BaseException) -> str:
  """One line, gin's call-site suffix ("In call to configurable 'train' (<function ...>)") cut."""
  from phatgoose_jax.errors import clean_message  # pylint: disable=g-import-not-at-top
  return clean_message(error)


# ------------------------------------------------------------------------------------------------
# library
# ------------------------------------------------------------------------------------------------
def _require_path(path: str, what: str, kind: str = "dir") -> str:
  if not os.path.exists(path):
    raise CliError(f"{what} {path} does not exist")
  if kind == "dir" and not os.path.isdir(path):
    raise CliError(f"{what} {path} is not a directory")
  return path


def _library_create(args) -> int:
  from phatgoose_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  _require_path(args.base, "--base checkpoint", kind="any")
  config, params = checkpoints.load_checkpoint(args.base)
  lib = ExpertLibrary.create(args.path, checkpoints.params_fingerprint(params), config,
                             rank=args.rank)
  print(f"created expert library {lib.path} (base {lib.base_fingerprint})")
  return 0


def _library_add(args) -> int:
  from phatgoose_jax.library import ExpertLibrary, add_peft_adapter, lora_from_adapters_tree  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  lib = ExpertLibrary.open(_require_path(args.path, "expert library"))
  if args.expert_index is not None and args.official is None:
    raise CliError("library add: --expert-index needs --official BEST_PT")
  if sum(x is not None for x in (args.source, args.peft, args.official)) != 1:
    raise CliError("library add: give exactly one of SOURCE (a training run or its export/), "
                   "--peft ADAPTER_DIR and --official BEST_PT")
  if args.official is not None:
    from phatgoose_jax.library import import_phatgoose_checkpoint  # pylint: disable=g-import-not-at-top
    _require_path(args.official, "--official checkpoint", kind="any")
    index = args.expert_index
    if index is not None and index.isdigit():
      index = int(index)
    lora, scale, gates, info = import_phatgoose_checkpoint(args.official, index)
    lib.add(args.name, lora, scale, task=args.task, gates=gates, provenance=info,
            overwrite=args.overwrite)
  elif args.peft is not None:
    _require_path(args.peft, "--peft adapter folder")
    add_peft_adapter(lib, args.name, args.peft, task=args.task, overwrite=args.overwrite)
  else:
    _require_path(args.source, "SOURCE", kind="any")
    tree, meta = state_lib.load_exported_adapters(args.source)
    state_lib.require_complete_export(meta, args.source)
    lora, gates = lora_from_adapters_tree(tree)
    if not lora:
      raise CliError(f"library add: {args.source} holds no lora_a/lora_b adapters")
    if "scale" not in meta:
      raise CliError(f"library add: {args.source} has no metadata.json field 'scale'")
    lib.add(args.name, lora, meta["scale"], task=args.task or meta.get("task"), gates=gates,
            base_fingerprint=meta.get("base_fingerprint"), overwrite=args.overwrite,
            provenance={"source": os.path.abspath(args.source), "import_kind": "training_export",
                        "mode": meta.get("mode"), "step": meta.get("step")})
  entry = lib.metadata(args.name)
  print(f"added {args.name} to {lib.path}: rank {entry['rank']}, scale {entry['scale']:g}, "
        f"{len(entry['sites'])} sites, vectors {entry['vectors'] or 'none'}")
  return 0


def _library_list(args) -> int:
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  lib = ExpertLibrary.open(_require_path(args.path, "expert library"))
  if args.json:
    print(json.dumps([lib.metadata(n) | {"name": n} for n in lib.names()], indent=2,
                     default=str))
    return 0
  print(f"{lib.path}: {len(lib)} experts (base {lib.base_fingerprint})")
  for name in lib.names():
    m = lib.metadata(name)
    print(f"  {name}\ttask={m.get('task')}\trank={m['rank']}\tscale={m['scale']:g}\t"
          f"vectors={','.join(m['vectors']) or '-'}")
  return 0


def _library_remove(args) -> int:
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  lib = ExpertLibrary.open(_require_path(args.path, "expert library"))
  lib.remove(args.name)
  print(f"removed {args.name} from {lib.path}")
  return 0


def _library_vectors(args) -> int:
  """Computes router vectors that depend on the experts' weights only (Arrow prototypes)."""
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import arrow  # pylint: disable=g-import-not-at-top
  lib = ExpertLibrary.open(_require_path(args.path, "expert library"))
  names = [n for n in (args.experts or "").split(",") if n] or None
  unknown = sorted(set(names or ()) - set(lib.names()))
  if unknown:
    raise ValueError(f"--experts: {unknown} are not in {lib.path} (has {lib.names()})")
  done = arrow.compute_arrow_vectors(lib, names, skip_existing=not args.overwrite)
  print(f"stored '{args.kind}' vectors of {len(done)} expert(s) in {lib.path}"
        + ("" if done else " (all had them; --overwrite recomputes)"))
  return 0


def _average_activation_vectors(args, gin_flags: Sequence[str]) -> int:
  """`library vectors LIB average_activation --gin_file=...`: the gin job of
  runs/average_activation.gin (model preset + that file + the experts' data gin)."""
  import gin  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import average_activation  # pylint: disable=g-import-not-at-top
  _require_path(args.path, "expert library")
  files, bindings, paths, rest = gin_utils.split_flags(gin_flags)
  if rest:
    raise CliError(f"library vectors: unrecognized arguments: {' '.join(rest)}")
  if not any(f.endswith("runs/average_activation.gin") for f in files):
    raise CliError("library vectors LIB average_activation: pass --gin_file=MODEL_PRESET "
                   "--gin_file=runs/average_activation.gin --gin_file=DATA_GIN (the experts' "
                   "tasks run through the base model)")
  bindings = list(bindings) + [f"LIBRARY_PATH={os.path.abspath(args.path)!r}"]
  gin.clear_config()
  try:
    gin_utils.parse_gin(files, bindings, paths, finalize=False)
    experts = [n for n in (args.experts or "").split(",") if n] or None
    done = average_activation.build_library_vectors(experts=experts,  # pylint: disable=no-value-for-parameter
                                                    overwrite=args.overwrite)
  finally:
    gin.clear_config()
  print(f"stored 'average_activation' vectors of {len(done)} expert(s) in "
        f"{os.path.abspath(args.path)}" + ("" if done else " (all had them; --overwrite "
                                           "recomputes)"))
  return 0


def _library_info(args) -> int:
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  lib = ExpertLibrary.open(_require_path(args.path, "expert library"))
  if args.name:
    info: Any = lib.metadata(args.name)
  else:
    info = {"path": lib.path, "base_fingerprint": lib.base_fingerprint,
            "t5_config": lib.t5_config.to_dict(), "rank": lib.rank, "sites": lib.sites,
            "experts": lib.names()}
    if args.check:
      info["problems"] = lib.check()
  print(json.dumps(info, indent=2, default=str))
  return 1 if args.check and info.get("problems") else 0


# ------------------------------------------------------------------------------------------------
# delegation
# ------------------------------------------------------------------------------------------------
def _train(gin_file: str, passthrough: Sequence[str]) -> int:
  from phatgoose_jax import train  # pylint: disable=g-import-not-at-top
  return train.main([f"--gin_file={gin_file}"] + list(passthrough))


def _eval(passthrough: Sequence[str]) -> int:
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("phatgoose_jax.eval") is None:
    raise CliError("eval: phatgoose_jax.eval is not available in this installation")
  module = importlib.import_module("phatgoose_jax.eval")
  return int(module.main(list(passthrough)) or 0)


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  from phatgoose_jax import demo  # pylint: disable=g-import-not-at-top
  parser = _Parser(prog=PROG, description="PHATGOOSE in JAX: demo, training, expert library.")
  parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  p = sub.add_parser("demo", help="the embedded CPU demo (pretrain, experts, gates, evaluation)")
  demo.add_arguments(p)

  for name, gin_file in (("train-expert", "runs/train_expert.gin"),
                         ("train-gate", "runs/train_gate.gin")):
    p = sub.add_parser(name, help=f"phatgoose_jax.train with {gin_file} (gin flags pass through)",
                       add_help=False)
    p.set_defaults(gin_file=gin_file)
  sub.add_parser("eval", help="phatgoose_jax.eval (flags pass through)", add_help=False)

  lib = sub.add_parser("library", help="manage an expert library")
  acts = lib.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
  acts.required = True
  p = acts.add_parser("create", help="create an empty library for a base checkpoint")
  p.add_argument("path", help="library folder to create")
  p.add_argument("--base", required=True, help="base checkpoint (ours, HF or T5X)")
  p.add_argument("--rank", type=int, default=None, help="pin every expert's rank")
  p.set_defaults(func=_library_create)
  p = acts.add_parser("add", help="add an expert from a training run or a PEFT adapter")
  p.add_argument("path", help="library folder")
  p.add_argument("name", help="expert name")
  p.add_argument("source", nargs="?", default=None,
                 help="training run MODEL_DIR, its export/ or a lora.safetensors")
  p.add_argument("--peft", default=None, help="HF PEFT LoRA adapter folder instead of SOURCE")
  p.add_argument("--official", default=None,
                 help="an official PHATGOOSE PyTorch best.pt instead of SOURCE (torch extra)")
  p.add_argument("--expert-index", default=None,
                 help="with --official: which expert of a multi-expert checkpoint")
  p.add_argument("--task", default=None, help="task name recorded with the expert")
  p.add_argument("--overwrite", action="store_true", help="replace an expert of that name")
  p.set_defaults(func=_library_add)
  p = acts.add_parser("list", help="list the experts")
  p.add_argument("path", help="library folder")
  p.add_argument("--json", action="store_true", help="print the entries' metadata as JSON")
  p.set_defaults(func=_library_list)
  p = acts.add_parser("remove", help="remove an expert")
  p.add_argument("path", help="library folder")
  p.add_argument("name", help="expert name")
  p.set_defaults(func=_library_remove)
  p = acts.add_parser("vectors", help="compute router vectors: 'arrow' from the experts' "
                      "weights, 'average_activation' from their data (gin flags: model preset, "
                      "runs/average_activation.gin, data gin)")
  p.add_argument("path", help="library folder")
  p.add_argument("kind", choices=["arrow", "average_activation"],
                 help="'arrow' (Ostapenko et al. 2024) or 'average_activation' (PHATGOOSE 5.1)")
  p.add_argument("--experts", default=None, help="comma-separated experts (default: all)")
  p.add_argument("--overwrite", action="store_true", help="recompute existing vectors")
  p.set_defaults(func=_library_vectors)
  p = acts.add_parser("info", help="library (or one expert's) metadata as JSON")
  p.add_argument("path", help="library folder")
  p.add_argument("name", nargs="?", default=None, help="an expert (default: the library)")
  p.add_argument("--check", action="store_true", help="verify every entry (exit 1 on problems)")
  p.set_defaults(func=_library_info)
  return parser


def run(argv: Sequence[str]) -> int:
  """Parses ``argv`` and runs the subcommand (errors propagate)."""
  from phatgoose_jax import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.configure_from_env()  # PHATGOOSE_JAX_MALLOC=heap (see phatgoose_jax/cpu_malloc.py)
  parser = build_parser()
  args, rest = parser.parse_known_args(list(argv))
  if args.command in ("train-expert", "train-gate", "eval") and any(
      a in ("-h", "--help") for a in rest):
    module = "phatgoose_jax.eval" if args.command == "eval" else "phatgoose_jax.train"
    print(f"phatgoose-jax {args.command}: gin flags pass through to python -m {module}.\n\n"
          + (importlib.import_module(module).__doc__ or "").strip())
    return 0
  if args.command in ("train-expert", "train-gate"):
    return _train(args.gin_file, rest)
  if args.command == "eval":
    return _eval(rest)
  if args.command == "demo":
    from phatgoose_jax import demo  # pylint: disable=g-import-not-at-top
    from phatgoose_jax import gin_utils  # pylint: disable=g-import-not-at-top
    bad = gin_utils.split_flags(rest)[3]
    if bad:
      raise CliError(f"demo: unrecognized arguments: {' '.join(bad)}")
    return demo.run_from_args(args, rest)
  if getattr(args, "action", None) == "vectors" and args.kind == "average_activation":
    return _average_activation_vectors(args, rest)
  if rest:
    raise CliError(f"{args.command}: unrecognized arguments: {' '.join(rest)}")
  return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point: one-line errors with exit status 2 (``--debug`` shows the traceback)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv[:1] or os.environ.get("PHATGOOSE_JAX_DEBUG") == "1"
  try:
    import gin  # pylint: disable=g-import-not-at-top
    gin_errors: tuple = (getattr(gin.config, "ParseError", ValueError),)
  except ImportError:  # pragma: no cover
    gin_errors = ()
  try:
    code = run(argv)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130
  except (ValueError, OSError, KeyError, ImportError, *gin_errors) as e:
    if debug:
      raise
    print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except SystemExit as e:  # train.main / gin_utils.run_main style exits.
    return int(e.code or 0) if isinstance(e.code, (int, type(None))) else EXIT_USAGE
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())

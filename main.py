"""Single entry point: `python main.py train|finetune|sample|export|import -c configs/config_<action>.json`;
`python main.py keys [action]` prints the config keys (the tables of docs/configuration.md).

Thin on purpose: parse the action and config, make a fresh run folder, call one stage. A mistake in the user's
input (config, dataset, checkpoint) prints one line and exits with status 2.

The top of the layers: it may import evaluation/, which guided_diffusion never does. A sample config with
`hardness_args` needs evaluation's scorer; this file hands `evaluation.freemask.measure_hardness` to the sample
action (imported only then: the scorer's packages load only when used).
"""

from __future__ import annotations

import argparse
import json
import sys

from guided_diffusion.config import ACTIONS, config_to_dict, load_config
from guided_diffusion.distributed import REQUEUE_EXIT_STATUS, current_world, ignore_stop_signals, process_group
from guided_diffusion.errors import exit_status
from guided_diffusion.keys import keys_text

DEFAULT_CONFIGS = {action: f"configs/config_{action}.json" for action in ACTIONS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keys"]:
        keys = argparse.ArgumentParser(prog="main.py keys", description="Print the config keys (default, ISDM name, "
                                       "meaning) as Markdown: one action's table, or without an action the whole "
                                       "docs/configuration.md page.")
        keys.add_argument("action", nargs="?", choices=ACTIONS)
        return argparse.Namespace(command="keys", **vars(keys.parse_args(argv[1:])))
    parser = argparse.ArgumentParser(description="Semantic Diffusion Model: train, finetune, sample.",
                                     epilog="python main.py keys [action]: the config keys of an action (or all)")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("-c", "--config", help="JSON config (default: configs/config_<action>.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (value read as JSON), e.g. --set batch_size=4")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit (sample with balance_args or hardness_args: also "
                             "choose the masks and write the reports into a new run folder, without sampling)")
    return argparse.Namespace(command="run", **vars(parser.parse_args(argv)))


def run(args: argparse.Namespace) -> int | None:
    path = args.config or DEFAULT_CONFIGS[args.action]
    loaded = load_config(path, args.action, args.overrides)
    config = loaded.config
    for note in loaded.notes:
        print(f"note: {note}")
    if (args.dry_run or args.action in ("export", "import")) and not current_world().is_main:
        return None  # single-process work under a launcher: rank 0 does it, once
    if args.dry_run:
        print(json.dumps(config_to_dict(config), indent=2))
        if args.action == "sample" and (config.balance_args is not None or config.hardness_args is not None):
            from guided_diffusion.sample import preview_mask_selection
            preview_mask_selection(config, loaded.given, str(path), measure_hardness=hardness_measure(config))
        return
    if args.action == "sample":
        from guided_diffusion.sample import run_sampling
        run_sampling(config, loaded.given, str(path), measure_hardness=hardness_measure(config))
        return
    if args.action == "export":
        from guided_diffusion.export import run_export
        run_export(config)
        return
    if args.action == "import":
        from guided_diffusion.convert import run_import
        run_import(config)
        return

    from guided_diffusion.train import run_training
    if run_training(config, args.action).stop_signal:  # SIGTERM/SIGUSR1: latest.pt is saved; sbatch requeues
        ignore_stop_signals()  # exit in order even when srun ends the step on another rank's exit
        return REQUEUE_EXIT_STATUS
    return None


def hardness_measure(config):
    """evaluation's scorer for a sample config with hardness_args (guided_diffusion/hardness.py), else None."""
    if config.hardness_args is None:
        return None
    from evaluation.freemask import measure_hardness
    return measure_hardness


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "keys":
        sys.stdout.write(keys_text(args.action))
        return 0

    def action() -> int | None:
        with process_group():  # torchrun / srun / mpirun: one process group around the action; one process: none
            return run(args)

    return exit_status(action)


if __name__ == "__main__":
    sys.exit(main())

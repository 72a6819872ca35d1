"""Single entry point: `python main.py train|finetune|masks|sample|export|import -c configs/config_<action>.json`;
`python main.py keys [section]` prints the config keys (the tables of docs/configuration.md).

Thin on purpose: parse the action and config, make a fresh run folder, call one stage. A mistake in the user's
input (config, dataset, checkpoint) prints one line and exits with status 2.

The top of the layers: it may import evaluation/, which guided_diffusion never does. A sample config with
`hardness_args` needs evaluation's scorer; this file reads its settings (`hardness_args.scorer`, a mistake stops
the action before any work) and hands `evaluation.freemask.measure_hardness` to the sample action (imported only
then: the scorer's packages load only when used). `keys` adds evaluation's config sections (`hardness_args.scorer`,
and `evaluate` of evaluation/evaluate.sh) to guided_diffusion's here, at the top.
"""

from __future__ import annotations

import argparse
import json
import sys

from evaluation.evaluate.config import EvaluateConfig
from evaluation.segmenter.settings import SCORER_KEY, ScorerSettings
from guided_diffusion.config import ACTIONS, LoadedConfig, config_to_dict, load_config
from guided_diffusion.distributed import current_world, process_group
from guided_diffusion.errors import exit_status
from guided_diffusion.keys import keys_text, sections

# config sections of the layers above guided_diffusion, after its own in `main.py keys` and docs/configuration.md
KEY_SECTIONS = ((SCORER_KEY, ScorerSettings), ("evaluate", EvaluateConfig))

DEFAULT_CONFIGS = {action: f"configs/config_{action}.json" for action in ACTIONS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keys"]:
        keys = argparse.ArgumentParser(prog="main.py keys", description="Print the config keys (default, ISDM name, "
                                       "meaning) as Markdown: one section's table (an action, a nested object such "
                                       "as balance_args, or evaluate), or without one the whole "
                                       "docs/configuration.md page.")
        keys.add_argument("action", nargs="?", choices=list(sections(KEY_SECTIONS)), metavar="section")
        return argparse.Namespace(command="keys", **vars(keys.parse_args(argv[1:])))
    parser = argparse.ArgumentParser(description="Semantic Diffusion Model: train, finetune, sample.",
                                     epilog="python main.py keys [section]: the config keys of an action (or all)")
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
    for note in loaded.notes:
        print(f"note: {note}")
    if (args.dry_run or args.action in ("export", "import")) and not current_world().is_main:
        return None  # single-process work under a launcher: rank 0 does it, once
    stage = dry_run if args.dry_run else STAGES[args.action]
    return stage(loaded, args.action, str(path))


# Every action runs the same way: stage(loaded config, action, config path) -> exit status (None = 0). The stage
# modules are imported when their action runs; resume and stop signals are the training module's business.

def train(loaded: LoadedConfig, action: str, source: str) -> int | None:
    from guided_diffusion.train import train_action
    return train_action(loaded.config, action)


def masks(loaded: LoadedConfig, action: str, source: str) -> int | None:
    from guided_diffusion.masks.train import masks_action
    return masks_action(loaded.config)


def sample(loaded: LoadedConfig, action: str, source: str) -> int | None:
    from guided_diffusion import distributed
    from guided_diffusion.sampling.sample import run_sampling
    result = run_sampling(loaded.config, loaded.given, source,
                          measure_hardness=hardness_measure(loaded.config, source))
    if result.get("stop_signal"):  # the images written are kept: a requeued job with auto_resume continues
        distributed.ignore_stop_signals()
        return distributed.REQUEUE_EXIT_STATUS
    return None


def export(loaded: LoadedConfig, action: str, source: str) -> int | None:
    from guided_diffusion.interchange.export import run_export
    run_export(loaded.config)
    return None


def import_labels(loaded: LoadedConfig, action: str, source: str) -> int | None:
    from guided_diffusion.interchange.importing import run_import
    run_import(loaded.config)
    return None


def dry_run(loaded: LoadedConfig, action: str, source: str) -> int | None:
    """Print the resolved config; a sample config that selects masks also previews the selection."""
    config = loaded.config
    measure = hardness_measure(config, source) if action == "sample" else None
    print(json.dumps(config_to_dict(config), indent=2))
    if action == "sample" and (config.balance_args is not None or config.hardness_args is not None):
        from guided_diffusion.sampling.sample import preview_mask_selection
        preview_mask_selection(config, loaded.given, source, measure_hardness=measure)
    return None


STAGES = {"train": train, "finetune": train, "masks": masks, "sample": sample, "export": export,
          "import": import_labels}


def hardness_measure(config, source: str):
    """evaluation's scorer for a sample config with hardness_args (guided_diffusion/sampling/hardness.py), its
    settings read first (a ConfigError naming `source` and the key), else None."""
    if config.hardness_args is None:
        return None
    ScorerSettings.of_sample_config(config, source)
    from evaluation.freemask import measure_hardness
    return measure_hardness


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "keys":
        sys.stdout.write(keys_text(args.action, KEY_SECTIONS))
        return 0

    def action() -> int | None:
        with process_group():  # torchrun / srun / mpirun: one process group around the action; one process: none
            return run(args)

    return exit_status(action)


if __name__ == "__main__":
    sys.exit(main())

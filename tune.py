"""Choose temperature, alpha, lr, weight decay and teacher weighting by measurement: a resumable Optuna search.

    python tune.py --task A --student_model MobileNetV3 --trials 30 --num_epochs 20
    python tune.py --task A --student_model MobileNetV3 --trials 30 --num_epochs 20   # again: continues the study
    python tune.py --config my_task.yaml --trials 50 --storage postgresql://user@host/db --study_name pets

Every train.py flag passes through to each trial; a searched setting given as a flag (--alpha 0.6) is
fixed instead of searched. Writes to --output_dir (default evaluation/tune/<study name>): study.db (the
study, unless --storage names another database), trials/ (one run folder per trial), trials.csv,
history.png, importance.png, temperature_alpha.png, best.yaml and summary.md.
"""

import argparse
import sys

from kd.cli import ArgumentParser, add_output_dir, add_training_arguments, given_options, positive_int
from kd.errors import run_cli
from kd.experiments.tune_plan import TunePlan
from kd.settings import TrainSettings, settings_problem

SEARCH_FLAGS = ("trials", "search_space", "storage", "study_name", "output_dir", "sampler_seed", "pruner",
                "prune_warmup", "confirm_seeds")
PLAN = TunePlan(settings=TrainSettings(), space={})  # the search's defaults, spelt once: TunePlan's


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_arguments(p)
    search = p.add_argument_group("search")
    search.add_argument("--trials", type=positive_int, default=PLAN.trials,
                        help="finished (complete or pruned) trials the study should hold; a rerun runs only the "
                             "missing ones")
    search.add_argument("--search_space", metavar="YAML", default=None,
                        help="ranges that replace the defaults (configs/search_space.yaml shows them)")
    search.add_argument("--storage", metavar="URL", default=PLAN.storage,
                        help="an Optuna database URL shared by several processes or machines, e.g. "
                             "postgresql://user@host/db (None: sqlite:///<output>/study.db)")
    search.add_argument("--study_name", default=PLAN.study_name, help="None: Task<name>_<student>")
    add_output_dir(search, "results folder (None: evaluation/tune/<study name>)")
    search.add_argument("--sampler_seed", type=int, default=PLAN.sampler_seed, help="seed of the TPE sampler")
    search.add_argument("--pruner", choices=["median", "none"], default="median" if PLAN.prune else "none",
                        help="median: stop a trial whose validation accuracy is below the median of earlier "
                             "trials at the same epoch")
    search.add_argument("--prune_warmup", type=positive_int, default=PLAN.prune_warmup, metavar="EPOCHS",
                        help="epochs every trial trains before the pruner may stop it (None: a quarter of "
                             "--num_epochs)")
    search.add_argument("--confirm_seeds", type=int, nargs="+", default=list(PLAN.confirm_seeds), metavar="SEED",
                        help="at the end, retrain the tuned and the default settings with each seed and compare "
                             "their test accuracy")
    return p


def main(argv: list[str]) -> None:
    from kd.experiments.tuning import DEFAULT_SPACE, load_search_space, run_tuning

    parser = get_args_parser()
    options = vars(parser.parse_args(argv))
    search = {name: options.pop(name) for name in SEARCH_FLAGS}
    options["task"] = options.pop("config") or options["task"]
    given = given_options(parser, argv)
    settings = TrainSettings(**options)
    if problem := settings_problem(settings):
        parser.error(problem)
    space = load_search_space(search["search_space"], {name: options[name] for name in DEFAULT_SPACE if name in given})
    plan = TunePlan(settings=settings, space=space, trials=search["trials"], output_dir=search["output_dir"],
                    storage=search["storage"], study_name=search["study_name"], sampler_seed=search["sampler_seed"],
                    prune=search["pruner"] == "median", prune_warmup=search["prune_warmup"],
                    confirm_seeds=tuple(dict.fromkeys(search["confirm_seeds"])))
    print(run_tuning(plan))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))

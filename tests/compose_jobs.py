"""Run many ``fairseq-hydra-train ... --cfg job`` command lines through fairseq's own entry point
(``fairseq_cli.hydra_train.cli_main``, what the console script calls) in one process.

Composing runs nothing, so a process per command line spends nearly all of its few seconds
importing torch and fairseq; the tests that check how recipes compose share one import instead.
Each job gets its own ``sys.argv``, captured output and exit status, a fresh hydra, and fresh
warning registries (a warning shown for one job is shown again for the next, as in its own process).

Usage: python compose_jobs.py JOBS.json RESULTS.json, JOBS.json holding {name: [argument, ...]};
RESULTS.json gets {name: {"returncode": int, "stdout": str}}, stdout and stderr together.
"""

import contextlib
import io
import json
import sys
import traceback
import warnings


def compose(arguments: list) -> dict:
    """One fairseq-hydra-train command line (without the program name), as its own process would run it."""
    from fairseq_cli import hydra_train
    from hydra.core.global_hydra import GlobalHydra

    output = io.StringIO()
    sys.argv = ["fairseq-hydra-train", *arguments]
    returncode = 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), warnings.catch_warnings():
        try:
            hydra_train.cli_main()
        except SystemExit as stop:
            returncode = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:
            traceback.print_exc()
            returncode = 1
    GlobalHydra.instance().clear()
    return {"returncode": returncode, "stdout": output.getvalue()}


def main() -> None:
    jobs_path, results_path = sys.argv[1:3]
    jobs = json.load(open(jobs_path))
    results = {name: compose(arguments) for name, arguments in jobs.items()}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

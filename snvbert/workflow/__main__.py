"""``python -m snvbert.workflow [--slurm] --configfile my.yaml [Snakemake's arguments]``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from snvbert.errors import SnvbertError
from snvbert.utils.cli import user_errors_exit
from snvbert.workflow import CONFIG, PROFILES, SNAKEFILE


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(
            __doc__.strip() + f"\n\nsettings: {CONFIG}\n" + (sys.modules[__package__].__doc__ or "")
        )
        return 0
    if importlib.util.find_spec("snakemake") is None:
        raise SnvbertError(
            "the workflow runs on Snakemake, which is not installed: `make install` or "
            "`pip install 'snvbert[workflow]'`"
        )
    extra: list[str] = []
    if "--slurm" in args:
        args.remove("--slurm")
        if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            raise SnvbertError(
                "--slurm needs Snakemake's SLURM executor plugin: `pip install "
                "snakemake-executor-plugin-slurm` (`make install` installs it)"
            )
        extra = ["--workflow-profile", str(PROFILES / "slurm")]
    if "--configfile" not in args and not any(a.startswith("--configfile=") for a in args):
        raise SnvbertError(f"give --configfile my.yaml (a copy of {CONFIG}, your paths filled in)")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *extra, *args]
    return subprocess.run(cmd, env={**os.environ}).returncode


if __name__ == "__main__":
    sys.exit(main())

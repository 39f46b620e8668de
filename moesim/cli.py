"""The ``moesim`` command line: builds the typer app and registers each domain's commands
(they live in the domain's ``commands`` module), then turns bad input into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moesim import __version__
from moesim.console import make_console
from moesim.errors import InputError
from moesim.hardware_commands import hardware_list_cmd, hardware_show_cmd
from moesim.kernels.commands import (
    calibrate_cmd,
    import_profile_cmd,
    kernels_bench_cmd,
    predict_cmd,
)
from moesim.model.capture_cmd import capture_cmd
from moesim.model.commands import models_cmd, train_reference_cmd
from moesim.placement.commands import place_cmd, replan_cmd
from moesim.plan.commands import plan_capacity_cmd
from moesim.report.commands import report_cmd
from moesim.scenario_commands import init_cmd
from moesim.sim.commands import a2a_cmd, demo_cmd, simulate_cmd
from moesim.sweep.commands import sweep_cmd
from moesim.traces.commands import (
    trace_import_cmd,
    trace_stats_cmd,
    trace_synth_cmd,
    trace_upgrade_cmd,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="moesim",
    help=(
        "Simulate Mixture-of-Experts models on GPU/TPU clusters by replaying real routing "
        "traces through a discrete-event model of devices and links."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # a pipe or a file gets click's plain help: paragraphs re-wrapped, names never cut
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
)
hardware_app = typer.Typer(help="List and inspect hardware profiles.", no_args_is_help=True)
app.add_typer(hardware_app, name="hardware")
trace_app = typer.Typer(help="Import, synthesise and inspect routing traces.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")
kernels_app = typer.Typer(
    help="Kernel timings: benchmark kernels, import profiler traces, predict a kernel.",
    no_args_is_help=True,
)
app.add_typer(kernels_app, name="kernels")

console = make_console()

# in the order `moesim --help` lists them
app.command("demo")(demo_cmd)
app.command("init")(init_cmd)
app.command("simulate")(simulate_cmd)
app.command("models")(models_cmd)
app.command("train-reference")(train_reference_cmd)
app.command("capture")(capture_cmd)
app.command("place")(place_cmd)
app.command("replan")(replan_cmd)
app.command("sweep")(sweep_cmd)
app.command("plan-capacity")(plan_capacity_cmd)
app.command("report")(report_cmd)
app.command("calibrate")(calibrate_cmd)
app.command("a2a")(a2a_cmd)

hardware_app.command("list")(hardware_list_cmd)
hardware_app.command("show")(hardware_show_cmd)

trace_app.command("import")(trace_import_cmd)
trace_app.command("stats")(trace_stats_cmd)
trace_app.command("upgrade")(trace_upgrade_cmd)
trace_app.command("synth")(trace_synth_cmd)

kernels_app.command("bench")(kernels_bench_cmd)
kernels_app.command("import-profile")(import_profile_cmd)
kernels_app.command("predict")(predict_cmd)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"moesim {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point: bad input (ours or a command-line usage error) becomes one line on
    stderr and exit status 2."""
    # typer ships its own copy of click; find its exception base classes through a public one
    usage_error: type[Exception] = next(
        c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
    )
    args = sys.argv[1:]
    if args[:1] == ["plan-capacity"]:
        from moesim.plan.commands import expand_multi_value_options

        args = expand_multi_value_options(args)
    try:
        rc = app(args=args, standalone_mode=False)
    except InputError as err:
        sys.stderr.write(f"moesim: error: {err}\n")
        raise SystemExit(2) from None
    except usage_error as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # help already printed
            raise SystemExit(0) from None
        ctx = getattr(err, "ctx", None)
        cmd = ctx.command_path if ctx else "moesim"
        msg = " ".join(getattr(err, "format_message", err.__str__)().split())
        sys.stderr.write(f"{cmd}: error: {msg} (see '{cmd} --help')\n")
        raise SystemExit(2) from None
    except typer.Abort:
        sys.stderr.write("moesim: aborted\n")
        raise SystemExit(130) from None
    except OSError as err:  # a path that cannot be read or written: the user's to fix
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"moesim: error: {where}{err.strerror or err}\n")
        raise SystemExit(2) from None
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()

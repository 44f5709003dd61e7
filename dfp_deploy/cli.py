"""Command-line entry point: `dfp-deploy build | bench | inspect | backends | recipe-keys | fingerprint`."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from dfp_deploy import __version__
from dfp_deploy.core.errors import DfpError


MAX_MESSAGE = 300


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message as exactly one line of at most `limit` characters: line breaks and control characters escaped
    (a key or path may hold them), the middle cut with "…" (its start names the key, its end often the fix)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _quiet_libraries() -> None:
    """torch, onnxruntime and onnxscript warn about their own internals on stderr, which drowns our one-line
    messages. All Python warnings go: dfp-deploy reports its own through report.json `warnings` and the CLI, never
    the warnings module, and a library's warning is often attributed (stacklevel) to the caller's module, so a
    per-module filter misses it. `python -W ...` or PYTHONWARNINGS still win, for whoever debugs them."""
    if not sys.warnoptions and not os.environ.get("PYTHONWARNINGS"):
        warnings.simplefilter("ignore")


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Cli(click.Group):
    """Turns expected failures into one line on stderr and the documented exit code (docs/ARCHITECTURE.md)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _quiet_libraries()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # a bare `dfp-deploy`: the help text is the answer, not an error line
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # usage errors: click prints usage + hint + error on three lines
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(one_line(f"error: {exc.format_message()}", MAX_MESSAGE - len(hint)) + hint, err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DfpError as exc:
            click.echo(one_line(f"error: {exc}"), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:  # SIGINT, SIGTERM, SIGHUP (core/interrupts.py): 130, 143, 129
            from dfp_deploy.core.interrupts import describe, exit_code

            click.echo(describe(exc), err=True)
            sys.exit(exit_code(exc))


_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="override a recipe key, e.g. --set compress.prune.ratio=0.5 (repeatable)")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfp-deploy")
def main():
    """Data-free pruning and quantization of PyTorch CNNs, exported to measured deployment engines."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@click.option("--out", type=str, default=None, help="output folder (overrides output.dir)")
@click.option("--quiet", is_flag=True, help="no progress output")
def build(recipe: Path, overrides, out, quiet):
    """Compress, export, build and measure the model described by RECIPE."""
    from dfp_deploy.core.interrupts import handled

    with handled():  # SIGTERM and SIGHUP end the build like Ctrl-C: previous output kept, no staging left
        _build(recipe, overrides, out, quiet)


def _build(recipe: Path, overrides, out, quiet):
    from dfp_deploy.pipeline import build as run_build
    from dfp_deploy.pipeline import output_dir
    from dfp_deploy.recipe import load_recipe
    from dfp_deploy.recipe.loader import check_output_dir

    r = load_recipe(recipe, list(overrides), out=out)
    check_output_dir(output_dir(r, recipe), "--out" if out is not None else "output.dir")
    report = run_build(r, recipe, quiet=quiet)
    click.echo(_summary(report))


def _summary(r: dict) -> str:
    parts = [f"params {r['params']['before']:,} -> {r['params']['after']:,}",
             f"MACs {r['macs']['before'] / 1e6:.2f}M -> {r['macs']['after'] / 1e6:.2f}M"]
    lat = r["latency"]
    if "before" in lat:
        from dfp_deploy.measure.latency import unsettled_range

        span = unsettled_range(lat.get("speedup_rounds"))
        spread = f", {span[0]:.2f}-{span[1]:.2f}x by round" if span else ""
        parts.append(f"p50 {lat['before']['p50_ms']:.3f} -> {lat['after']['p50_ms']:.3f} ms "
                     f"({lat['speedup']:.2f}x{spread}, {lat['backend']}, batch {lat['batch']})")
    acc = r.get("accuracy")
    if acc and acc["metric"] == "top1_percent":
        parts.append(f"top-1 {acc['before']:.2f} -> {acc['after']:.2f}%")
    elif acc:
        parts.append(f"{acc['metric']} {_metric_value(acc['before'])} -> {_metric_value(acc['after'])}")
    parts.append(f"parity max|diff| {r['parity']['max_abs_err']:.1e}")
    # a parity pass on outputs of ~zero scale proves nothing: said where the user looks, not only in report.json
    notes = "".join(f"\nwarning: {w}" for w in r["parity"].get("warnings", []))
    notice = r.get("prune", {}).get("notice")
    return (f"notice: {notice}\n" if notice else "") + "; ".join(parts) + notes \
        + f"\nwrote {r['artifacts']['dir']}/report.json and report.md"


def _metric_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v:.4g}" for k, v in value.items()) + "}"
    return f"{value:.4g}"


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="vary a recipe key over comma-separated values, parsed as --set parses one (repeatable: the "
                   "variants are every combination)")
@_set_option
@click.option("--with", "with_dirs", multiple=True, metavar="DIR",
              help="an existing `dfp-deploy build` output folder timed in the same run (repeatable), e.g. a searched "
                   "plan; it must come from the recipe's model, weights, input shape, backend and batch")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="run the interleaved schedule this many times, the order reversed every other time")
@click.option("--out", type=str, default=None, help="bench folder (default: the recipe's output folder + -bench)")
@click.option("--quiet", is_flag=True, help="no progress output")
def bench(recipe: Path, grid, overrides, with_dirs, repeats, out, quiet):
    """Build every variant of a --grid through the pipeline, time them interleaved with the original, one table."""
    import shlex

    from dfp_deploy.core.interrupts import handled
    from dfp_deploy.pipeline.bench import bench as run_bench
    from dfp_deploy.report.bench_table import table

    words = ["dfp-deploy", "bench", str(recipe), *(w for g in grid for w in ("--grid", g)),
             *(w for s in overrides for w in ("--set", s)), *(w for d in with_dirs for w in ("--with", d)),
             *(["--repeats", str(repeats)] if repeats != 1 else []), *(["--out", out] if out is not None else [])]
    with handled():  # SIGTERM and SIGHUP end the bench like Ctrl-C: previous bench folder kept, no staging left
        result = run_bench(recipe, list(overrides), list(grid), out=out, command=shlex.join(words), quiet=quiet,
                           with_dirs=list(with_dirs), repeats=repeats)
    click.echo("\n".join(table(result)))
    click.echo(f"wrote {result['dir']}/bench.md and bench.json")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
def inspect(recipe: Path, overrides):
    """Print the channel groups, channel counts and MACs of the recipe's model (and what the plan keeps)."""
    from dfp_deploy.pipeline import inspect as run_inspect
    from dfp_deploy.recipe import load_recipe

    info = run_inspect(load_recipe(recipe, list(overrides)), recipe)
    click.echo(f"{info['model']}: input {info['input_shape']}, {info['params']:,} params, "
               f"{info['macs'] / 1e6:.2f} M MACs per image")
    keep = info["plan"].keep
    rows = [("group", "channels", "kept", "MACs(M)", "prunable", "notes")]
    for g in info["groups"]:
        note = g.reason or ("residual" if g.residual else "")
        kept = len(keep[g.name]) if g.name in keep else g.channels
        rows.append((g.name, str(g.channels), str(kept), f"{g.macs / 1e6:.2f}", "yes" if g.prunable else "no", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for w in info["warnings"]:
        click.echo(f"warning: {w}", err=True)


@main.command()
def backends():
    """List the engine backends, whether they can run here, and why not."""
    from dfp_deploy.backends.registry import list_backends

    rows = [("backend", "available", "version", "device", "reason")]
    for b in list_backends():
        rows.append((b.name, "yes" if b.available else "no", b.version or "-", b.device or "-", b.reason or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@main.command("recipe-keys")
@click.option("--advanced", is_flag=True, help="also the keys under `advanced:` (research variants, lab knobs)")
def recipe_keys(advanced):
    """List the recipe keys with their type, default and meaning."""
    from dfp_deploy.recipe import iter_keys
    from dfp_deploy.recipe.loader import ADVANCED

    for key, typ, default, doc in iter_keys():
        if advanced or not key.startswith(ADVANCED):
            click.echo(f"{key}  ({typ}, default {default!r})\n    {doc}")


@main.command()
@click.option("--backend", "backend_name", default="ort-cpu", show_default=True, help="target backend")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--size", type=click.IntRange(1, 1024), default=14, show_default=True,
              help="spatial size of the probe convolution")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="engine threads (backend default)")
@click.option("--refresh", is_flag=True, help="measure again even if a fingerprint for this target is stored")
@click.option("--quiet", is_flag=True, help="no progress output")
def fingerprint(backend_name, precision, batch, size, threads, refresh, quiet):
    """Measure (or show the stored) latency fingerprint of a target: the channel multiple its convolutions want."""
    from dfp_deploy.pipeline import fingerprint as run_fingerprint

    result, path, reused = run_fingerprint(backend_name, precision, batch, size=size, threads=threads,
                                           refresh=refresh, quiet=quiet)
    k = result.key
    click.echo(f"{k.backend} {k.precision} batch {k.batch} on {k.device}: channel multiple {result.multiple} "
               f"(a count off the multiple runs {100 * result.cost_of_not_rounding():+.0f} % vs the next multiple up; "
               f"{len(result.channels)} channel counts {result.channels[0]}-{result.channels[-1]})")
    click.echo(f"{'reused' if reused else 'wrote'} {path}")


if __name__ == "__main__":
    main()

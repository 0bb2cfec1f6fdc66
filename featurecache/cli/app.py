"""The ``featurecache`` command: a thin click layer over the package's plain functions.

Every command parses its options, calls one function, and prints the result. A
:class:`~featurecache.errors.FeaturecacheError` becomes one clean line and exit code 1.
"""

from __future__ import annotations

import errno
import functools
import os

import click

from ..errors import FeaturecacheError

__all__ = ["cli", "main"]


def _friendly(fn=None, *, style: str = "cli"):
    """Turn the package's errors into one-line ClickExceptions, naming options as ``style``
    shows them (``cli``: --overwrite; ``pipeline``: embed.overwrite = true); a full disk is
    one line too; anything else is reported as a bug (``--debug`` for the traceback)."""
    if fn is None:
        return functools.partial(_friendly, style=style)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.meta["featurecache.style"] = style  # for the warnings main() prints
        try:
            return fn(*args, **kwargs)
        except FeaturecacheError as exc:
            raise click.ClickException(exc.message(style, _table_of, _declared)) from None
        except BrokenPipeError:
            # the reader of our output went away (`featurecache info f.h5 | head`): stop
            # quietly, as git does; stdout is pointed at /dev/null so the final flush is silent
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None  # 128 + SIGPIPE, what a shell shows for git log
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise click.ClickException(f"no space left on device while writing "
                                           f"{exc.filename or 'the output'}; nothing was "
                                           f"written under the final name.") from None
            if _debug(ctx):
                raise
            raise click.ClickException(f"{exc.strerror or exc}"
                                       f"{': ' + str(exc.filename) if exc.filename else ''}.") from None
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"internal error ({type(exc).__name__}: {exc}). This is a bug in featurecache: "
                f"run again with --debug (or FEATURECACHE_DEBUG=1) for the traceback, and "
                f"report it.") from None

    return wrapper


def _debug(ctx) -> bool:
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.params.get("debug")) or \
        os.environ.get("FEATURECACHE_DEBUG", "") not in ("", "0")


def _declared(name: str):
    """The declaration of keyword ``name``: the flag and key messages name it by."""
    from ..options import declared

    return declared(name)


def _table_of(name: str):
    """The pipeline table that holds key ``name`` (for messages in pipeline style)."""
    from ..pipeline import SCHEMA

    return next((table for table, keys in SCHEMA.items() if name in keys and table), None)

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featurecache")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
def cli(debug):
    """Embed images once with a frozen backbone; compare layer depths, heads and fine-tuning.

    \b
    Typical session:
      featurecache layers efficientnet_lite0
      featurecache embed DATA -o feats.h5 --layer blocks.5 --layer blocks.10 --layer avgpool
      featurecache compare feats.h5 --heads logreg,svm -o reports/run1/
      featurecache predict reports/run1/best.joblib photo.jpg
    Fine-tune the top blocks from the cache and compare (strategy column):
      featurecache embed DATA -o feats.h5 --layer avgpool --keep-map stage4
      featurecache finetune feats.h5 --from stage4 -o ft/
      featurecache compare feats.h5 --heads logreg,mlp --finetuned ft/ -o reports/run2/
    """

@cli.command(epilog="""\b
Examples:
  featurecache run pipelines/digits-demo.toml
  featurecache run pipelines/clipart10.toml --set data.root=../shared/data/clipart10
  featurecache run pipelines/reference.toml --dry-run""")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, e.g. --set data.max_per_class=10 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Validate, check the inputs, show the plan; run nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_friendly(style="pipeline")
def run(pipeline_file, overrides, dry_run, quiet):
    """Run a pipeline file: embed -> compare -> report, in one command.

    Writes OUTPUT/features.h5, OUTPUT/report/ and OUTPUT/run.json. A matching feature
    file from an earlier run is reused (or resumed), not recomputed. Relative paths in the
    file are relative to the file's folder; those given with --set, to the current folder.
    """
    from ..pipeline import check_pipeline, load_pipeline, run_pipeline

    plan = load_pipeline(pipeline_file, overrides)
    click.echo(plan.describe())
    if dry_run:
        s = check_pipeline(plan)
        click.echo(f"inputs ok: {s['images']} images, {s['classes']} classes, splits "
                   f"{'/'.join(s['splits'])}; weights {s['weights']}; layer widths "
                   + ", ".join(f"{k}={v}" for k, v in s["layers"].items()))
        click.echo("dry run: nothing was run.")
        return
    record = run_pipeline(plan, progress=not quiet)
    click.echo(record["table"])
    click.echo(record["verdict"].replace("**", ""))
    click.echo(f"\nreport: {record['outputs']['report']}  run record: {plan.output / 'run.json'}")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def main():
    import warnings

    from ..errors import FeaturecacheWarning

    python_show = warnings.showwarning

    def show(message, category, *args, **kwargs):
        """The package's own warnings as one clean line; others as Python prints them."""
        if issubclass(category, FeaturecacheWarning):
            ctx = click.get_current_context(silent=True)
            style = ctx.meta.get("featurecache.style", "cli") if ctx is not None else "cli"
            text = message.message(style, _table_of, _declared) \
                if isinstance(message, FeaturecacheWarning) \
                else str(message)
            click.echo(f"warning: {text}", err=True)
        else:
            python_show(message, category, *args, **kwargs)

    warnings.showwarning = show
    from ..malloc import tune

    tune()  # this process is ours: keep activation buffers in the heap (see malloc.py)
    cli(prog_name="featurecache")


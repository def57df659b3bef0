"""`moekit run RECIPE` and `moekit demo`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console

from moekit.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "pipeline" / "recipes"  # the shipped recipes


@app.command()
def run(recipe: Path = typer.Argument(..., help="YAML recipe, or the name of a shipped one (moekit/pipeline/recipes/)"),
        out: Path = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>-<hash>)"),
        report: bool = typer.Option(True, help="write report.md with figures into the run directory")):
    """Run a recipe's steps in order; finished steps are skipped when the run is repeated."""
    from moekit.pipeline.recipe import load_recipe
    from moekit.pipeline.report import write_report
    from moekit.pipeline.runner import run_recipe

    r = load_recipe(recipe if recipe.exists() or recipe.is_absolute() else RECIPES / recipe)
    run_dir = out or Path("runs") / f"{r.name}-{r.fingerprint()}"
    start = time.perf_counter()
    results = run_recipe(r, run_dir)
    if report:
        path = write_report(results, run_dir, title=f"moekit run: {r.name}")
        Console().print(f"report: {path}")
    Console().print(f"run directory: {run_dir}  ({time.perf_counter() - start:.0f} s)")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
         data_dir: Path = typer.Option(Path("../shared/data"), "--data-dir", envvar="MOEKIT_DATA",
                                       help="folder with calib/ and dev/ (also $MOEKIT_DATA); absent: the model's own "
                                            "text, no tasks"),
         limit: int = typer.Option(None, help="items per task (default: the recipe's, 50)"),
         fresh: bool = typer.Option(False, "--fresh", help="discard an earlier demo run in --out and start again")):
    """The main job on the embedded default MoE: profile, prune, re-route, evaluate, report."""
    import shutil

    from moekit.pipeline.recipe import demo_recipe
    from moekit.pipeline.report import write_report
    from moekit.pipeline.runner import run_recipe

    if data_dir.is_dir():  # the embedded default is built (once) on the same calibration text the demo uses
        os.environ["MOEKIT_DATA"] = str(data_dir.resolve())
    if fresh and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    recipe = demo_recipe(RECIPES / "smollm2-moe.yaml", data_dir, limit)
    results = run_recipe(recipe, out)
    path = write_report(results, out, title="moekit demo: the embedded default MoE (smollm2-moe)")
    console = Console()
    console.print(path.read_text().split("\n\n")[1])
    console.print(f"\nreport: {path}   ({time.perf_counter() - start:.0f} s)")

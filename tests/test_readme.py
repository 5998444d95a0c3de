"""What the README and docs/ paste as output is what the code prints now.

Every fenced block of README.md and docs/*.md that opens with a prompt line
``$ python -m convbn_pass.inspect ...`` is run (each command once, in-process
through ``main(argv)``) and its stdout compared with the lines pasted under the
prompt, byte for byte: decisions, totals, counters and byte figures are
deterministic for a given model, input and torch version. The text report holds
no timings (they go to stderr and to the JSON's ``timings_s``), so nothing is
normalised. A block without a prompt line is not checked (outputs of models from
torchvision or timm, which this suite's environment may lack).
"""

from __future__ import annotations

import contextlib
import functools
import io
import pathlib
import re
import shlex
from typing import NamedTuple

import pytest
import torch

from convbn_pass import inspect as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROMPT = "$ python -m convbn_pass.inspect"
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


class Pasted(NamedTuple):
    where: str        # "README.md:123", the prompt's line
    argv: tuple[str, ...]
    output: str       # the lines under the prompt, up to the next prompt or the fence


def pasted(path: pathlib.Path) -> list[Pasted]:
    """The prompted inspect commands of one page, each with the output pasted under it."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in _FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        if not lines or not lines[0].startswith(PROMPT):
            continue
        prompts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
        for start, end in zip(prompts, prompts[1:]):
            argv = shlex.split(lines[start][len(PROMPT):])
            output = "".join(line + "\n" for line in lines[start + 1:end])
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            found.append(Pasted(f"{name}:{first_line + start}",
                                tuple(argv), output))
    return found


CASES = [case for page in PAGES for case in pasted(page)]


@functools.lru_cache(maxsize=None)
def _stdout(argv: tuple[str, ...]) -> str:
    out, err = io.StringIO(), io.StringIO()
    # As a user runs it: Dynamo's own recompile limit (8), not the suite's raised one.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            torch._dynamo.config.patch(recompile_limit=8):
        status = cli.main([*argv, "--quiet"])
    assert status == 0, err.getvalue()
    return out.getvalue()


def test_the_readme_pastes_the_default_inspect_run():
    """The README's first output is the no-argument run, so that it is checked here."""
    readme = [case for case in CASES if case.where.startswith("README.md:")]
    assert readme and readme[0].argv == ()
    assert "totals    20 candidates" in readme[0].output


@pytest.mark.parametrize("case", CASES, ids=[case.where for case in CASES])
def test_pasted_output_is_what_the_code_prints(case: Pasted):
    assert _stdout(case.argv) == case.output, f"{case.where}: pasted output is stale"


def test_a_changed_figure_is_caught(tmp_path: pathlib.Path):
    """The comparison sees one digit changed in a pasted byte count."""
    page = tmp_path / "page.md"
    [case] = [c for c in CASES if c.where.startswith("README.md:")][:1]
    wrong = re.sub(r"(\d),(\d{3}) bytes", lambda m: f"{(int(m[1]) + 1) % 10},{m[2]} bytes",
                   case.output, count=1)
    assert wrong != case.output
    page.write_text(f"```\n{PROMPT}\n{wrong}```\n", encoding="utf-8")
    [read] = pasted(page)
    assert read.output == wrong and _stdout(read.argv) != read.output


# --- the headline table: figures of the committed benchmark results ---------------------

MODELS = {"ResNet-18": "resnet18", "ResNet-50": "resnet50", "ResNeXt-50": "resnext50",
          "MobileNetV2": "mobilenet_v2", "EfficientNet-lite (SiLU)": "efficientnet_lite",
          "U-Net": "unet", "MLP (Linear+BN1d)": "mlp_bn"}
# U-Net's row comes from its run under the current policy, the others from the grid.
FOLDER = {"unet": "cpu-unet"}
_ROW = re.compile(r"^\| (?P<model>[^,|]+), (?P<batch>\d+)[^|]* \| (?P<mb>[^|]+) \| "
                  r"(?P<times>[^|]+) \|$", re.MULTILINE)


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+\.\d+", text)


def _matches(pasted: str, value: float) -> bool:
    """``pasted`` is ``value`` rounded to as many decimals as ``pasted`` shows."""
    return float(pasted) == round(value, len(pasted.split(".")[1]))


def test_headline_table_is_the_committed_results():
    """Each row of the README's headline table: activation MB of compile / built-in /
    auto / memory (= deploy) and step-time ratios of built-in / auto / memory ± noise,
    as the committed results.json holds them."""
    from benchmarks import report
    rows = list(_ROW.finditer((ROOT / "README.md").read_text(encoding="utf-8")))
    assert len(rows) == 9
    runs = {folder: report.read(ROOT / "benchmarks" / "results" / folder / "results.json")
            for folder in ("cpu", "cpu-unet")}
    for row in rows:
        model, batch = MODELS[row["model"]], int(row["batch"])
        run = runs[FOLDER.get(model, "cpu")]
        [cell] = [c for c in run.cells if (c.model, c.batch) == (model, batch)]
        saved = [cell.modes[m].saved_bytes / 1e6
                 for m in ("compile", "builtin", "pass_auto", "pass_memory", "deploy")]
        times = [cell.modes[m].ratio for m in ("builtin", "pass_auto", "pass_memory")]
        figures = [*saved[:4], *times, report.noise(cell)]
        pasted_figures = _numbers(row["mb"]) + _numbers(row["times"])
        assert len(pasted_figures) == len(figures), row[0]
        assert all(_matches(p, v) for p, v in zip(pasted_figures, figures)), (row[0], figures)
        assert saved[3] == saved[4], row[0]  # "memory = Deploy"


def test_policies_page_lists_every_reason():
    """docs/policies.md's table of reasons has one row per key of convbn_pass.REASONS."""
    import convbn_pass
    text = (ROOT / "docs" / "policies.md").read_text(encoding="utf-8")
    table = text[text.index("| key | when |"):]
    keys = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
    assert sorted(keys) == sorted(convbn_pass.REASONS)

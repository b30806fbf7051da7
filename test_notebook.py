"""The teaching notebook runs top to bottom, and is committed with the outputs of a full run (figures visible
without a kernel; regenerate them with `jupyter-execute --inplace tutorial.ipynb`, nbclient's command).

Runs tutorial.ipynb with nbclient on the "python3" kernel (ipykernel provides it) at the
notebook's small budget (A2MIM_NOTEBOOK_BUDGET=small, well under a minute on 2 CPU cores),
with the repository as the kernel's working directory, so that it imports the project's files.
"""

import base64
import io
import json
from pathlib import Path

import ipykernel  # noqa: F401  (provides the "python3" kernel that nbclient starts)
import nbclient
import nbformat
import pytest
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

REPO = Path(__file__).resolve().parent
NOTEBOOK = REPO / "tutorial.ipynb"

# Run in the kernel before the notebook's first cell: every figure rendered to PNG (the inline backend's
# plt.show) has its axes checked. A visible axis needs a title and both labels; a colour-mapped image (a
# spectrum) needs a colour bar with a label; images drawn with their axis off (photos, diagrams) need neither.
FIGURE_CHECK = """
import matplotlib.backend_bases

FIGURE_PROBLEMS, FIGURES_CHECKED = [], []
_print_figure = matplotlib.backend_bases.FigureCanvasBase.print_figure


def _check_axes(figure):
    bars = [im.colorbar for ax in figure.axes for im in ax.images if im.get_array().ndim == 2]
    for ax in figure.axes:
        for im in ax.images:
            if im.get_array().ndim == 2 and im.colorbar is None:
                FIGURE_PROBLEMS.append(f"{ax.get_title()!r}: a colour-mapped image without a colour bar")
    for bar in bars:
        if bar is not None and not (bar.ax.get_ylabel() or bar.ax.get_xlabel()):
            FIGURE_PROBLEMS.append("a colour bar without a label")
    bar_axes = [bar.ax for bar in bars if bar is not None]
    for ax in figure.axes:
        if ax.axison and not any(ax is b for b in bar_axes):
            for part, text in (("title", ax.get_title()), ("x label", ax.get_xlabel()), ("y label", ax.get_ylabel())):
                if not text:
                    FIGURE_PROBLEMS.append(f"axes {ax.get_title()!r} ({ax.get_xlabel()!r}) has no {part}")


def _checked_print_figure(self, *args, **kwargs):
    _check_axes(self.figure)
    FIGURES_CHECKED.append(self.figure.get_label())
    return _print_figure(self, *args, **kwargs)


matplotlib.backend_bases.FigureCanvasBase.print_figure = _checked_print_figure
"""
FIGURE_REPORT = (
    "import json\n"
    'print("FIGURE CHECK", json.dumps({"renders": len(FIGURES_CHECKED), "problems": FIGURE_PROBLEMS}))'
)


def text_of(nb):
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )


def colourful_share(png_bytes):
    # Share of pixels with a clear colour: |R − G| + |G − B| above 60 (of 510). Grey pixels score 0.
    with Image.open(io.BytesIO(png_bytes)) as img:
        rgb_3hw = pil_to_tensor(img.convert("RGB")).int()
    chroma_hw = (rgb_3hw[0] - rgb_3hw[1]).abs() + (rgb_3hw[1] - rgb_3hw[2]).abs()
    return (chroma_hw > 60).float().mean().item()


def section_pngs(nb, heading):
    # The PNG outputs of the code cells from the markdown cell starting with `heading` to the next section.
    start = next(
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "markdown" and cell.source.startswith(heading)
    )
    pngs = []
    for cell in nb.cells[start + 1 :]:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            break
        pngs += [
            base64.b64decode(out["data"]["image/png"])
            for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})
        ]
    return pngs


@pytest.fixture(scope="module")
def small_run():
    # One execution for the tests below. The kernel is a child process and inherits this environment.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_CHECK))
    nb.cells.append(nbformat.v4.new_code_cell(FIGURE_REPORT))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("A2MIM_NOTEBOOK_BUDGET", "small")
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}}
        )
        client.execute()  # raises CellExecutionError, naming the cell and its traceback, if any cell fails
    return nb


def test_committed_notebook_shows_the_outputs_of_a_full_run_small_and_without_progress_bars():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [i for i, cell in enumerate(code) if not cell.outputs] == [], (
        "every code cell shows its output"
    )
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 6 and NOTEBOOK.stat().st_size <= 2_000_000
    # the full budget; no tqdm pages
    assert "budget 'full'" in text_of(nb) and "it/s" not in text_of(nb)


def test_committed_notebook_shows_the_mean_fill_on_a_colour_photograph():
    pngs = section_pngs(nbformat.read(NOTEBOOK, as_version=4), "## 2. Masking and the mean fill")
    assert pngs, "the fill section shows a figure"
    share = colourful_share(pngs[0])
    assert share > 0.05, (
        f"only {share:.1%} of the fill figure's pixels are coloured: a grey image, not a photograph"
    )
    # The measure itself: the same figure turned grey has no coloured pixel.
    grey_png = io.BytesIO()
    with Image.open(io.BytesIO(pngs[0])) as img:
        img.convert("L").convert("RGB").save(grey_png, format="PNG")
    assert colourful_share(grey_png.getvalue()) == 0


def test_gamma_focal_l1_simmim_and_mae_are_defined_in_the_markdown_that_first_names_them():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    definitions = {  # term as written anywhere (source of any cell) -> what its first cell must say
        "γ": ("initialised to 1e-6", "multiplies"),
        "focal-l1": ("ℓ(e) = |e|·(2·sigmoid(α·|e|) − 1)", "α = 0.2"),
        "focal_l1": ("ℓ(e) = |e|·(2·sigmoid(α·|e|) − 1)", "α = 0.2"),
        "SimMIM": ("**SimMIM** (Xie et al.",),
        "MAE": ("**MAE** (He et al.",),
    }
    for term, phrases in definitions.items():
        first = next(
            cell
            for cell in nb.cells
            if term in (cell.source.lower() if term.islower() else cell.source)
        )
        assert first.cell_type == "markdown", (
            f"{term} is first named in code, before the text defines it"
        )
        assert all(p in first.source for p in phrases), (
            f"the text that first names {term} does not define it"
        )


@pytest.mark.slow
def test_notebook_runs_every_cell_without_error_at_the_small_budget(small_run):
    errors = [
        out
        for cell in small_run.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert errors == []
    assert "budget 'small'" in text_of(small_run)  # the environment variable reached the kernel
    # progress is printed once per step by the notebook, never as tqdm bars
    assert "it/s" not in text_of(small_run)


@pytest.mark.slow
def test_every_plot_axis_has_a_title_and_labels_and_every_spectrum_a_labelled_colour_bar(small_run):
    report = text_of(small_run).split("FIGURE CHECK ")[-1]
    checked = json.loads(report.splitlines()[0])
    figures = [
        out
        for cell in small_run.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert checked["renders"] >= len(figures) >= 6  # the check saw every figure the notebook shows
    assert checked["problems"] == []

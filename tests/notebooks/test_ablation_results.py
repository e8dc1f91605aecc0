"""notebooks/ablation_results.ipynb on small reports in the format of `python -m
ldm_jax.experiments report` (a numeric sweep with two seeds, a categorical one with one seed, one
without its markdown report), and on an empty results folder."""
import re

import pytest

from tests.notebooks.execute import image_outputs, outputs_text, run_notebook

NOTEBOOK = "ablation_results.ipynb"

# The CSV keeps bookkeeping columns (counts) that the report's table, and so the plot, leaves out.
GUIDANCE_CSV = """\
point,sampler.guidance_scale,seeds,prompt_accuracy/test/ok,prompt_accuracy/test/ok_std,prompt_accuracy/test/num_samples,prompt_accuracy/test/num_samples_std,bpd/total,bpd/total_std
sampler.guidance_scale=1.0,1.0,2,0.41,0.03,256,0,1.52,0.01
sampler.guidance_scale=2.0,2.0,2,0.83,0.02,256,0,1.52,0.01
sampler.guidance_scale=4.0,4.0,2,0.88,0.04,256,0,1.53,0.02
"""
GUIDANCE_MD = """\
# guidance: how strong should classifier-free guidance be?

| point | seeds | prompt_accuracy/test/ok | bpd/total |
|---|---|---|---|
| sampler.guidance_scale=1.0 | 2 | 0.41 ± 0.03 | 1.52 ± 0.01 |
| sampler.guidance_scale=2.0 | 2 | 0.83 ± 0.02 | 1.52 ± 0.01 |
| sampler.guidance_scale=4.0 | 2 | 0.88 ± 0.04 | 1.53 ± 0.02 |

Findings: accuracy saturates above scale 2 (GUIDANCE-FINDING-MARKER).

![guidance](guidance.png)
"""
OBJECTIVE_CSV = """\
point,diffusion.objective,seeds,prompt_accuracy/test/ok,prompt_accuracy/test/ok_std,bpd/total,bpd/total_std
diffusion.objective=simple,'simple',1,0.9,,1.61,
diffusion.objective=vlb,'vlb',1,0.62,,1.38,
diffusion.objective=hybrid,'hybrid',1,0.87,,1.44,
"""
OBJECTIVE_MD = """\
# objective: what does the variational bound cost?

| point | seeds | prompt_accuracy/test/ok | bpd/total |
|---|---|---|---|
| diffusion.objective=vlb | 1 | 0.62 | 1.38 |

Findings: OBJECTIVE-FINDING-MARKER.
"""
# No written report: the notebook shows the CSV as a table. Two categorical overrides: bars.
SCHEDULE_CSV = """\
point,diffusion.schedule,diffusion.zero_terminal_snr,seeds,prompt_accuracy/test/ok,prompt_accuracy/test/ok_std
diffusion.schedule=cosine,'cosine',False,3,0.8,0.05
"diffusion.schedule=cosine,diffusion.zero_terminal_snr=True",'cosine',True,3,0.85,0.01
diffusion.schedule=linear,'linear',False,3,0.7,0.1
"""


def markdown_outputs(nb) -> str:
    """Every text/markdown output (IPython.display.Markdown) of the executed notebook, joined."""
    return "".join(out["data"]["text/markdown"] for cell in nb.cells for out in cell.get("outputs", [])
                   if "text/markdown" in out.get("data", {}))


@pytest.mark.slow
def test_plots_and_shows_every_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name, csv_text, md_text in (("guidance", GUIDANCE_CSV, GUIDANCE_MD), ("objective", OBJECTIVE_CSV, OBJECTIVE_MD)):
        (results / f"{name}.csv").write_text(csv_text)
        (results / f"{name}.md").write_text(md_text)
    (results / "schedule.csv").write_text(SCHEDULE_CSV)
    (results / "notes.txt").write_text("not a report")  # other files are ignored
    nb = run_notebook(NOTEBOOK, {"RESULTS_DIR": str(results)}, cwd=tmp_path)
    assert image_outputs(nb) == 3  # one figure per sweep
    shown = markdown_outputs(nb)
    assert "GUIDANCE-FINDING-MARKER" in shown and "OBJECTIVE-FINDING-MARKER" in shown
    assert "| sampler.guidance_scale=2.0 | 2 | 0.83 ± 0.02 |" in shown  # the reports' tables
    assert "guidance.png" not in shown  # the report's relative image link (broken here) is dropped
    # The CSV without a report, as a table: means ± std over seeds.
    assert "| diffusion.schedule=cosine,diffusion.zero_terminal_snr=True | 3 | 0.85 ± 0.01 |" in shown
    text = outputs_text(nb)
    assert "3 experiment report(s)" in text and "guidance, objective, schedule" in text
    # A panel per metric of the report's table (guidance: not its num_samples column), or of the CSV.
    assert re.findall(r"<Figure size \d+x\d+ with (\d+) Axes>", text) == ["2", "2", "1"]
    assert "No experiment results" not in text and "skipping" not in text


@pytest.mark.slow
def test_without_reports_says_so_and_plots_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    nb = run_notebook(NOTEBOOK, {"RESULTS_DIR": str(tmp_path / "empty")}, cwd=tmp_path)
    assert "No experiment results in" in outputs_text(nb)
    assert image_outputs(nb) == 0 and markdown_outputs(nb) == ""

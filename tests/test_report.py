"""``vggkit report``: the single-run report written at the end of training, the comparison of
several runs, its Markdown twin, never overwriting a user's file, and the HTML page rendered
in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggkit.config import TrainConfig
from vggkit.errors import DataError, UsageError
from vggkit.evaluation import plots, report
from vggkit.evaluation.report import write_report
from vggkit.workflow import train

TINY = dict(model="vgg_compact", dataset="digits", image_size=8, subset=200, batch_size=50,
            crop_padding=0, flip=False, precision="fp32")
SECTIONS = ("Results", "Learning curves", "Confusion matrix",
            "Grad-CAM of misclassified test images", "Per-class metrics",
            "Misclassified test images", "Model summary", "Configuration",
            "Machine and versions")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """A 2-epoch run without augmentation and a 3-epoch run with it; training writes each
    run's own report."""
    root = tmp_path_factory.mktemp("report")
    plain = root / "digits-2ep"
    augmented = root / "digits-3ep-aug"
    train(TrainConfig(**TINY, epochs=2, out=str(plain)), progress=False)
    train(TrainConfig(**{**TINY, "flip": True, "crop_padding": 1}, epochs=3, out=str(augmented)),
          progress=False)
    return [plain, augmented]


@pytest.fixture(scope="module")
def comparison(runs, tmp_path_factory) -> list[Path]:
    return write_report(runs, tmp_path_factory.mktemp("compare"))


def data_uri_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def markdown_images(md_path: Path) -> list[Path]:
    return [md_path.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())]


def check_self_contained(page: str) -> None:
    """No resource outside the file: every src is a data URI, no stylesheet or script link."""
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:3]
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def png_size(blob: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(blob)) as img:
        img.load()
        return img.size


# ----------------------------------------------------------------------------- content
def test_training_writes_a_self_contained_report_and_its_markdown_twin(runs):
    run = runs[0]
    page = (run / "report.html").read_text()
    check_self_contained(page)
    for section in SECTIONS:
        assert f">{section}" in page, section
    assert "time of learning" in page and "images/s" in page and "torch" in page
    assert "Total params:" in page  # the Keras-style model summary
    embedded = data_uri_images(page)
    assert [png_size(b) for b in embedded[:2]] == [plots.curves_pixels(),
                                                   plots.confusion_matrix_pixels(10)]
    # curves, confusion matrix, Grad-CAM of mistakes, mistakes
    assert len(embedded) == page.count("<img ") == 4

    md_path = run / "report.md"
    md = md_path.read_text()
    for section in SECTIONS:
        assert f"## {section}" in md, section
    files = markdown_images(md_path)
    assert [f.name for f in files] == ["curves.png", "confusion_matrix.png", "gradcam.png",
                                       "misclassified.png"]
    # the same pictures, byte for byte, in both files
    assert [f.read_bytes() for f in files] == embedded


def test_report_tables_hold_the_run_figures(runs):
    import json

    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    page = (run / "report.html").read_text()
    assert f"{100 * summary['test_acc']:.2f}%" in page
    assert report.duration(summary["train_seconds"]) in page
    with np.load(run / "predictions.npz") as saved:
        logits, labels = saved["logits"], saved["labels"]
    wrong = int((logits.argmax(1) != labels).sum())
    assert f"of the {wrong:,} mistakes" in page
    # per-class support sums to the test-set size, as printed in the macro-average row
    assert f"<td>macro average</td>" in page and f'<td class="num">{len(labels):,}</td>' in page


@pytest.mark.parametrize("seconds, shown", [
    (None, "n/a"), (12.34, "12.3 s"), (59.97, "1 min 00.0 s"), (61.5, "1 min 01.5 s"),
    (3599.97, "1 h 00 min"), (3690.0, "1 h 02 min"), (4498.6, "1 h 15 min"), (5369.0, "1 h 29 min"),
])
def test_durations_round_to_the_unit_shown_never_truncate(seconds, shown):
    # The results table once showed 4,498.6 s (74.98 min) as "1 h 14 min".
    assert report.duration(seconds) == shown


def test_comparison_report_has_a_table_and_overlaid_curves(comparison):
    html_path, md_path = comparison
    assert (html_path.name, md_path.name) == ("report.html", "report.md")
    assert html_path.parent == md_path.parent
    page = html_path.read_text()
    check_self_contained(page)
    assert ">Comparison<" in page and "final test accuracy" in page and "time of learning" in page
    assert "digits-2ep" in page and "digits-3ep-aug" in page
    assert "crop (pad 1, reflect), flip" in page and "<td>none</td>" in page
    names = [f.name for f in markdown_images(md_path)]
    assert names[0] == "compare-curves.png"
    assert sum(n.endswith("-curves.png") and n.startswith("run") for n in names) == 2
    assert len(data_uri_images(page)) == len(names)
    for f in markdown_images(md_path):
        assert png_size(f.read_bytes())[0] > 0
    # one comparison row per run, with its epochs
    rows = re.findall(r"<tr><td>(digits-[^<]+)</td>(.*?)</tr>", page)
    assert [r[0] for r in rows[:2]] == ["digits-2ep", "digits-3ep-aug"]
    assert ">2</td>" in rows[0][1] and ">3</td>" in rows[1][1]


def test_report_never_overwrites_a_users_file(runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("<html>my own notes</html>")
    with pytest.raises(UsageError, match="report.html exists and was not written by vggkit"):
        write_report(runs[:1], out)
    assert (out / "report.html").read_text() == "<html>my own notes</html>"
    assert not (out / "report.md").exists()

    other = tmp_path / "other"
    (other / "report_files").mkdir(parents=True)
    (other / "report_files" / "curves.png").write_bytes(b"my picture")
    with pytest.raises(UsageError, match="report_files exists"):
        write_report(runs[:1], other)
    assert (other / "report_files" / "curves.png").read_bytes() == b"my picture"

    # its own earlier report is replaced without complaint
    again = tmp_path / "again"
    write_report(runs[:1], again)
    first = (again / "report.md").read_text()
    write_report(runs[:1], again)
    assert (again / "report.md").read_text().split("\n", 1)[1].count("##") == \
        first.split("\n", 1)[1].count("##")

    with pytest.raises(UsageError, match="not a run folder"):
        write_report([tmp_path / "missing"], tmp_path / "x")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match="--out"):
        write_report(runs[:1], tmp_path / "afile")


def test_report_of_an_unfinished_run_says_what_is_missing(runs, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(runs[0], run)
    for name in ("summary.json", "predictions.npz", "report.html", "report.md"):
        (run / name).unlink()
    html_path, _ = write_report([run], run)
    page = html_path.read_text()
    assert "no predictions.npz" in page and ">Learning curves<" in page
    assert ">Confusion matrix" not in page


def test_report_without_the_test_images_skips_only_the_grid(runs, tmp_path, monkeypatch):
    def unavailable(*args, **kwargs):
        raise DataError("digits: not here")

    monkeypatch.setattr(report, "load_split", unavailable)
    html_path, _ = write_report(runs[:1], tmp_path / "nogrid")
    page = html_path.read_text()
    assert "test images are not available here (digits: not here)" in page
    assert "No Grad-CAM overlays: the test images are not available here" in page
    assert ">Confusion matrix" in page and page.count("<img ") == 2


# ----------------------------------------------------------------------------- browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium")
                                        else None)
    if path is None:
        pytest.skip("the browser test needs Debian's chromium (`apt-get install -y chromium`; "
                    "`make test` installs it where it can)")
    return path


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})


def rendered_body(chromium: str, tmp_path: Path, page: Path) -> dict[str, str]:
    """The attributes of <body> after the page's load event, from the rendered DOM."""
    done = run_chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom",
                        page.resolve().as_uri())
    match = re.search(r"<body([^>]*)>", done.stdout)
    assert match, f"chromium rendered no page (exit {done.returncode}): {done.stderr[-2000:]}"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


@pytest.mark.parametrize("which", ["single", "comparison"])
def test_report_renders_in_a_headless_browser(runs, comparison, chromium, tmp_path, which):
    page = runs[0] / "report.html" if which == "single" else comparison[0]
    images = page.read_text().count("<img ")
    assert page.read_text().count('alt="Grad-CAM overlays of ') == (1 if which == "single" else 2)
    body = rendered_body(chromium, tmp_path, page)
    assert body.get("data-images") == str(images), body
    assert body.get("data-broken-images") == "0", body

    shot = tmp_path / "shot.png"
    done = run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                        page.resolve().as_uri())
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # text, tables, plots


def test_the_browser_check_sees_a_broken_image(runs, chromium, tmp_path):
    """The check above can fail: a report whose picture is corrupt counts it as broken."""
    page = (runs[0] / "report.html").read_text()
    first = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(first.group(1), base64.b64encode(b"not a png").decode()))
    body = rendered_body(chromium, tmp_path, broken)
    assert body.get("data-broken-images") == "1", body

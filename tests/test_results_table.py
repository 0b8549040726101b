"""``vggkit results``: collecting a run's small artefacts into docs/results/, the table built
from them, its place in a README, and the repository's own README kept equal to it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

import vggkit
from vggkit.cli import main
from vggkit.errors import UsageError
from vggkit.evaluation import results

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="vgg_compact", dataset="digits", image_size=8, subset=200, batch_size=50,
            crop_padding=0, flip=False, precision="fp32", epochs=1)
COMMAND = "vggkit train --epochs 1 --out runs/x | tee log"
VAL_SOURCE = "train holdout: 20 images (stratified, seed 0)"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch run, its summary given the keys newer trainers write."""
    path = tmp_path_factory.mktemp("results") / "run"
    vggkit.train(vggkit.TrainConfig(**TINY, out=str(path)), progress=False)
    summary = json.loads((path / "summary.json").read_text())
    summary.update(command=COMMAND, val_source=VAL_SOURCE,
                   load_average={"start": [1.93, 1.5, 1.2], "end": [3.14, 2.0, 1.5]})
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


@pytest.fixture
def project(run, tmp_path) -> Path:
    """A project folder with a README holding the markers and one collected run."""
    (tmp_path / "README.md").write_text(
        f"# p\n\nintro\n\n## Results\n\n{results.BEGIN}\nold table\n{results.END}\n\nkept text\n")
    assert main(["results", "collect", str(run), "--name", "digits-1ep", "--experiment",
                 "digits, 1 epoch", "--into", str(tmp_path / "docs" / "results")]) == 0
    return tmp_path


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]  # not at an escaped \|


def test_collect_copies_the_small_artefacts_and_no_weights(run, project):
    folder = project / "docs" / "results" / "digits-1ep"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "experiment.yaml",
                 "confusion_matrix.csv", "confusion_matrix.png", "curves.png"):
        assert name in names
    assert not any(n.endswith((".safetensors", ".npz", ".html")) for n in names), names
    # the same summary, but for paths made relative to the repository
    copied, original = (json.loads((f / "summary.json").read_text()) for f in (folder, run))
    assert copied["run"] == os.path.relpath(original["run"])
    assert {**copied, "run": None} == {**original, "run": None}
    assert yaml.safe_load((folder / "experiment.yaml").read_text()) == {
        "experiment": "digits, 1 epoch"}
    csv = (folder / "confusion_matrix.csv").read_text().splitlines()
    assert csv[0].split(",")[1:] == [str(i) for i in range(10)]  # digits' class names
    assert len(csv) == 11
    # every image report.md shows is there, relative to the report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "report.md").read_text())
    assert "curves.png" in links and "confusion_matrix.png" in links
    for link in links:
        assert (folder / link).is_file(), link


def test_collect_draws_what_the_run_lacks(run, tmp_path):
    """A run without a report (--no-report) still gets its curves, matrix and report."""
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("report*"))
    folder = results.collect(bare, "bare", into=tmp_path / "out")
    for name in ("curves.png", "confusion_matrix.png"):
        assert (folder / name).read_bytes().startswith(b"\x89PNG"), name
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "report.md").read_text())
    assert links and all((folder / link).is_file() for link in links)
    # the drawing paths used when even the report has no such image
    summary = json.loads((bare / "summary.json").read_text())
    assert results.draw_curves(bare, summary).startswith(b"\x89PNG")
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    results.draw_confusion(bare, summary, drawn)
    assert (drawn / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    csv = "confusion_matrix.csv"
    assert (drawn / csv).read_text() == (folder / csv).read_text()
    assert yaml.safe_load((folder / "experiment.yaml").read_text()) == {"experiment": "bare"}


def test_table_row_shows_the_summary(run, project):
    text = results.build_table(project / "docs" / "results", project)
    header, row = table_rows(text)
    summary = json.loads((run / "summary.json").read_text())
    row = cells(row)
    assert len(row) == len(results.HEADERS) == header.count(" | ") + 1
    assert row[0] == "digits, 1 epoch"
    assert row[1] == f"vgg_compact ({summary['params']['total']:,})"
    sizes = summary["dataset"]
    val = summary.get("val_size", sizes["val"])
    assert row[2] == f"digits ({sizes['train']:,} / {val} / {sizes['test']})"
    assert row[3] == "1"
    assert row[4] == f"{100 * summary['test_acc']:.2f}%"
    assert row[5] == (f"{100 * summary['best_val_acc']:.2f}% (epoch {summary['best_epoch']}); "
                      f"{VAL_SOURCE}")
    assert row[6].endswith(" s")
    assert row[8] == f"{summary['machine']['cpu']}, {summary['machine']['cpu_count']} cores, fp32"
    assert row[9] == "1.9 → 3.1 ⚠ loaded"
    assert row[10] == "`vggkit train --epochs 1 --out runs/x \\| tee log`"  # | escaped
    assert row[11] == ("[confusion matrix](docs/results/digits-1ep/confusion_matrix.png), "
                         "[report](docs/results/digits-1ep/report.md)")


def test_a_chained_run_names_the_command_that_made_it_and_counts_its_pieces(tmp_path):
    """summary.json's command is the first piece's, not the last --resume; the row says how
    many pieces followed; --overwrite starts the record afresh."""
    path = tmp_path / "run"
    made = "vggkit train --epochs 1 --out RUN"
    vggkit.train(vggkit.TrainConfig(**TINY, schedule="constant", out=str(path)), progress=False,
                 command=made)
    for epochs in (2, 3):
        summary = vggkit.train(vggkit.TrainConfig(resume=str(path), epochs=epochs),
                               progress=False, command="vggkit train --resume RUN")
    assert summary["epochs_completed"] == 3 and summary["command"] == made
    assert [r["resume"] for r in summary["starts"]] == [False, True, True]
    assert all(len(r["load_start"]) == 3 and r["started"].endswith("Z")
               for r in summary["starts"])
    results.collect(path, "chained", into=tmp_path / "results")
    row = cells(table_rows(results.build_table(tmp_path / "results"))[1])
    assert row[10] == "`vggkit train --epochs 1 --out RUN`, then 2 `--resume` pieces"
    again = vggkit.train(vggkit.TrainConfig(**TINY, out=str(path), overwrite=True),
                         progress=False, command="vggkit train --overwrite")
    assert again["command"] == "vggkit train --overwrite" and len(again["starts"]) == 1


def test_older_summary_shows_dashes(run, tmp_path):
    folder = results.collect(run, "old", into=tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("command", "load_average", "val_source", "best_val_acc", "best_epoch",
                "machine", "params"):
        summary.pop(key)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "experiment.yaml").unlink()
    row = cells(table_rows(results.build_table(tmp_path))[1])
    assert row[0] == "old" and row[1] == "vgg_compact"
    assert row[5] == row[9] == row[10] == "—"
    assert row[8] == "fp32"  # no machine, still the precision


def test_rows_follow_order_then_name(run, tmp_path):
    for name in ("a", "b", "c"):
        results.collect(run, name, experiment=f"exp {name}", into=tmp_path)
    (tmp_path / "c" / "experiment.yaml").write_text("experiment: exp c\norder: 1\nnote: first\n")
    # collecting again keeps order and note, and may change the experiment text
    results.collect(run, "c", experiment="exp C", into=tmp_path)
    assert yaml.safe_load((tmp_path / "c" / "experiment.yaml").read_text()) == {
        "experiment": "exp C", "order": 1, "note": "first"}
    main_table = results.build_table(tmp_path).split("Repeated runs")[0]  # a, b, c repeat
    firsts = [cells(r)[0] for r in table_rows(main_table)[1:]]
    assert firsts == ["exp C", "exp a", "exp b"]
    (tmp_path / "a" / "experiment.yaml").write_text("experiment: exp a\norder: first\n")
    with pytest.raises(UsageError, match=r"a/experiment.yaml: order must be a number"):
        results.build_table(tmp_path)


def test_runs_that_differ_only_in_seed_get_their_spread(run, tmp_path):
    # name: (seed, test accuracy, seconds of learning); "other" halves the rate
    made = {"s0": (0, 0.5, 60.0), "s1": (1, 0.6, 120.0), "s2": (2, 0.7, 180.0),
            "other": (0, 0.9, 60.0)}
    for name, (seed, acc, seconds) in made.items():
        folder = results.collect(run, name, into=tmp_path)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config.update(seed=seed, out=f"runs/{name}")
        if name == "other":
            config["lr"] = config["lr"] / 2  # another experiment, whatever its seed
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(test_acc=acc, train_seconds=seconds)
        (folder / "summary.json").write_text(json.dumps(summary))
    repeats = results.build_table(tmp_path).split("Repeated runs")[1]
    rows = [cells(r) for r in table_rows(repeats)[1:]]
    assert rows == [["s0 (0), s1 (1), s2 (2): 3 runs", "60.00% ± 10.00", "50.00% – 70.00%",
                     "2 min 00.0 s"]]
    shutil.rmtree(tmp_path / "s1")
    shutil.rmtree(tmp_path / "s2")
    assert "Repeated runs" not in results.build_table(tmp_path)  # one run is not a spread


def test_readme_block_replaced_then_checked(project, capsys):
    readme = project / "README.md"
    argv = ["results", "table", str(project / "docs" / "results"), "--readme", str(readme)]
    assert main(argv + ["--check"]) == 1  # "old table" is not the generated one
    assert "the results table is not the one" in capsys.readouterr().err
    assert main(argv) == 0
    text = readme.read_text()
    before, block, after = re.split(f"{re.escape(results.BEGIN)}\n|{re.escape(results.END)}\n",
                                    text)
    assert before == "# p\n\nintro\n\n## Results\n\n" and after == "\nkept text\n"
    assert "old table" not in block and "| digits, 1 epoch |" in block
    assert main(argv + ["--check"]) == 0
    assert main(argv) == 0 and readme.read_text() == text  # idempotent
    readme.write_text(text.replace("digits, 1 epoch", "digits, one epoch"))
    capsys.readouterr()
    assert main(argv + ["--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(readme) in err
    assert "digits, one epoch" in readme.read_text()  # --check wrote nothing


@pytest.mark.parametrize("text", ["# p\n\nno markers\n", f"# p\n{results.BEGIN}\nonly begin\n",
                                  f"{results.END}\n{results.BEGIN}\n"])
def test_missing_marker_is_one_line_naming_the_file(project, capsys, text):
    readme = project / "README.md"
    readme.write_text(text)
    assert main(["results", "table", str(project / "docs" / "results"),
                 "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(readme) in err and results.BEGIN in err
    assert readme.read_text() == text


def test_collect_refuses_a_folder_that_is_not_a_finished_run(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("summary.json"))
    for folder, why in ((unfinished, "not a finished run folder (no summary.json)"),
                        (tmp_path / "missing", "not a folder")):
        assert main(["results", "collect", str(folder), "--name", "x",
                     "--into", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(folder) in err and why in err
    assert not (tmp_path / "out" / "x").exists()
    with pytest.raises(UsageError, match="--name"):
        results.collect(run, "../escape", into=tmp_path / "out")


def test_collect_refuses_another_run_under_the_same_name(run, tmp_path):
    results.collect(run, "n", into=tmp_path)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "test_acc": 0.5}))
    with pytest.raises(UsageError, match=r"n: already holds a different run \(summary.json"):
        results.collect(other, "n", into=tmp_path)
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["test_acc"] != 0.5
    results.collect(other, "n", into=tmp_path, overwrite=True)
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["test_acc"] == 0.5


def test_empty_results_folder_gives_a_fixed_line(tmp_path):
    assert results.build_table(tmp_path / "absent") == results.build_table(tmp_path)
    assert "No runs collected yet" in results.build_table(tmp_path)


def test_repository_readme_holds_the_generated_table():
    """The README's results table cannot drift from docs/results/."""
    readme = REPO / "README.md"
    assert results.update_readme(REPO / "docs" / "results", readme, check=True), (
        "README.md's results table differs from docs/results/; run "
        "`vggkit results table docs/results --readme README.md`")


def test_collected_summary_names_paths_relative_to_the_repository(tmp_path, monkeypatch):
    from vggkit.evaluation.results import _relative_paths

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"run": str(tmp_path / "runs" / "x"),
                                "dataset": {"source": str(tmp_path.parent / "data" / "mnist")}}))
    _relative_paths(path)
    data = json.loads(path.read_text())
    assert data["run"] == "runs/x" and data["dataset"]["source"] == "../data/mnist"

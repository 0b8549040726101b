"""Grad-CAM: on images whose class is the corner holding a bright square, the heat map of a
briefly trained network peaks in that corner; ``predict --cam`` writes one overlay per image;
the report shows the overlays of the misclassified test images, or says why it cannot."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggkit
from vggkit.cli import main
from vggkit.data.testing import CORNER_CLASSES, write_corners_npz
from vggkit.evaluation import plots
from vggkit.evaluation.cam import cam_paths, grad_cam, normalise, overlay
from vggkit.evaluation.report import write_report
from vggkit.evaluation.runs import load_model
from test_report import chromium, rendered_body  # noqa: F401  (a fixture: chromium or a skip)

MISLABELLED = 4  # test images labelled with the wrong corner: the model's only mistakes


@pytest.fixture(scope="module")
def corners(tmp_path_factory):
    """vgg_compact trained for 2 epochs on 320 corner images (it learns the task); the
    test split has 40 images, the first 4 mislabelled. Training writes the report."""
    root = tmp_path_factory.mktemp("cam")
    arrays = write_corners_npz(root / "corners.npz", n_train=320, n_test=40,
                               mislabelled=MISLABELLED)
    config = vggkit.TrainConfig(model="vgg_compact", dataset=f"npz:{root / 'corners.npz'}",
                                epochs=2, batch_size=32, optimizer="adam", lr=1e-3,
                                crop_padding=0, flip=False, precision="fp32", threads=1,
                                out=str(root / "run"))
    threads = torch.get_num_threads()
    try:
        summary = vggkit.train(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["test_acc"] == pytest.approx(1 - MISLABELLED / 40), "the task was not learned"
    return root / "run", arrays


def quadrant(heat: np.ndarray) -> int:
    """0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right: where the maximum is."""
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    return 2 * int(row >= heat.shape[0] // 2) + int(col >= heat.shape[1] // 2)


def test_heat_map_peaks_in_the_corner_of_the_square(corners):
    run, arrays = corners
    model, ckpt = load_model(run)
    images = torch.from_numpy(arrays["x_test"].transpose(0, 3, 1, 2).copy())
    heat, shown = grad_cam(model, normalise(images, ckpt.meta["mean"], ckpt.meta["std"]))
    assert heat.shape == (40, 32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert (shown == arrays["corner_test"]).all()  # the top class is the square's corner
    hits = np.array([quadrant(h) for h in heat]) == arrays["corner_test"]
    assert hits.mean() >= 0.75, f"heat maps peak in the square's corner for {hits.mean():.0%}"
    # the heat map of another class looks elsewhere: not the same picture
    other, _ = grad_cam(model, normalise(images[:8], ckpt.meta["mean"], ckpt.meta["std"]),
                        ((arrays["corner_test"][:8] + 1) % 4).tolist())
    assert np.abs(other - heat[:8]).mean() > 0.05


def test_overlay_is_enlarged_and_coloured():
    image = np.full((1, 8, 8), 100, np.uint8)
    heat = np.zeros((8, 8))
    heat[:4, :4] = 1.0
    rgb = overlay(image, heat)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[:64, :64].mean((0, 1)), rgb[64:, 64:].mean((0, 1))
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where hot, blue where cold
    assert overlay(np.zeros((3, 200, 300), np.uint8), np.zeros((200, 300))).shape == (200, 300, 3)


def save_test_images(arrays, folder: Path, which: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in which:
        path = folder / f"img{i}.png"
        Image.fromarray(arrays["x_test"][i]).save(path)
        paths.append(path)
    return paths


def test_predict_cam_writes_one_overlay_per_image(corners, tmp_path, capsys):
    run, arrays = corners
    images = save_test_images(arrays, tmp_path / "in", [4, 5, 6])  # correctly labelled
    out = tmp_path / "cams"
    assert main(["predict", str(run), *map(str, images), "--cam", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["img4-cam.png", "img5-cam.png", "img6-cam.png"]
    for result, corner in zip(results, arrays["corner_test"][4:7]):
        assert result["cam"]["class"] == CORNER_CLASSES[corner]
        with Image.open(result["cam"]["path"]) as png:
            assert png.format == "PNG" and png.size == (128, 128)
            colours = np.asarray(png.convert("RGB"), dtype=np.float64)
        plain = np.asarray(Image.open(images[0]).convert("RGB"))  # not just the image
        assert colours.std(axis=(0, 1)).min() > 10 and colours.shape[0] > plain.shape[0]

    # another class's map on request, and the plain listing names the files
    assert main(["predict", str(run), str(images[0]), "--cam", str(out),
                 "--cam-class", "bottom-right"]) == 0
    assert f"Grad-CAM of bottom-right: {out / 'img4-cam.png'}" in capsys.readouterr().out


def test_predict_cam_flags_fail_clearly(corners, tmp_path, capsys):
    run, arrays = corners
    image = save_test_images(arrays, tmp_path, [4])[0]
    assert main(["predict", str(run), str(image), "--cam", str(tmp_path / "c"),
                 "--cam-class", "top-rigth"]) == 2
    err = capsys.readouterr().err
    assert "unknown --cam-class 'top-rigth' (did you mean 'top-right'?)" in err
    assert "choose from: bottom-left, bottom-right, top-left, top-right" in err
    assert main(["predict", str(run), str(image), "--cam-class", "top-left"]) == 2
    assert "--cam-class: give --cam OUTDIR" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["predict", str(run), str(image), "--cam", str(tmp_path / "afile")]) == 2
    assert "--cam " in capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1


def test_cam_file_names_stay_apart_for_equal_stems(tmp_path):
    assert [p.name for p in cam_paths(["a/x.png", "b/x.jpg", "y.png"], tmp_path)] == \
        ["x-1-cam.png", "x-2-cam.png", "y-cam.png"]


def report_images(page: str) -> list[bytes]:
    import base64

    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_shows_grad_cam_of_the_mistakes_grouped_by_true_class(corners):
    run, _ = corners
    page = (run / "report.html").read_text()
    section = page.split('id="gradcam"', 1)[1].split("<h2", 1)[0]
    assert "true → predicted" in section
    # the 4 mistakes are one per true class: 4 rows of 1, every class named in the alt text
    assert "Grad-CAM overlays of 4 misclassified test images" in section
    assert all(name in section for name in CORNER_CLASSES)
    (blob,) = report_images(section)
    with Image.open(io.BytesIO(blob)) as png:
        assert png.size == plots.cam_grid_pixels(4, 1)
    # it sits beside the confusion matrix, and the Markdown twin has the same picture
    assert page.index('id="confusion"') < page.index('id="gradcam"') < page.index('id="per-class"')
    md = (run / "report.md").read_text()
    assert "## Grad-CAM of misclassified test images" in md
    assert (run / "report_files" / "gradcam.png").read_bytes() == blob


def test_report_without_the_dataset_says_so_in_the_grad_cam_section(corners, tmp_path):
    run, _ = corners
    dataset = run.parent / "corners.npz"
    dataset.rename(tmp_path / "away.npz")
    try:
        html_path, md_path = write_report([run], tmp_path / "out")
    finally:
        (tmp_path / "away.npz").rename(dataset)
    page = html_path.read_text()
    section = page.split('id="gradcam"', 1)[1].split("<h2", 1)[0]
    assert "No Grad-CAM overlays: the test images are not available here" in section
    assert "corners.npz" in section and "<img " not in section
    assert ">Confusion matrix" in page
    assert "No Grad-CAM overlays: the test images are not available here" in md_path.read_text()


def test_report_with_overlays_renders_in_a_headless_browser(corners, chromium,  # noqa: F811
                                                           tmp_path):
    """As the report's own browser test: every image, the overlays included, decodes."""
    page = corners[0] / "report.html"
    assert page.read_text().count('alt="Grad-CAM overlays of ') == 1
    body = rendered_body(chromium, tmp_path, page)
    assert body.get("data-images") == str(page.read_text().count("<img ")) == "4", body
    assert body.get("data-broken-images") == "0", body

"""amoe.inference without torch: preprocessing equal to the data modules', the sparse dispatch, and clear
errors for a folder that is not an export, a metadata/graph mismatch and a missing runtime package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_export import MIXED
from fixtures_model import tiny_model

from amoe import inference
from amoe.export import export
from amoe.inference import Inferencer, ModelFolderError, read_image, resize
from data_modules.base import read_rgb


@pytest.mark.parametrize("size_in,size_out", [((37, 50), (16, 23)), ((10, 7), (23, 30)), ((33, 20), (56, 56))])
@pytest.mark.parametrize("antialias", [True, False])
def test_resize_equals_torch_interpolate(size_in, size_out, antialias):
    x = np.random.default_rng(0).random((*size_in, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=size_out, mode="bilinear",
                        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    assert np.abs(resize(x, size_out, antialias) - ref).max() < 1e-5


def test_read_image_equals_the_data_modules_reader(mixed_images):
    for name in MIXED:
        a, b = read_image(mixed_images / name), read_rgb(mixed_images / name)
        assert a.dtype == np.uint8 and a.shape == b.shape and (a == b).all(), name


def test_inference_imports_neither_torch_nor_lightning(exported, mixed_images):
    code = (
        "import sys; from amoe.inference import Inferencer\n"
        f"p = Inferencer({str(exported['onnx'])!r}).predict({str(mixed_images / 'a.jpg')!r})\n"
        "assert p.anomaly_map.shape == (32, 32) and p.mask.shape == (32, 32) and isinstance(p.is_anomalous, bool)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'torchvision', 'timm'))\n"
        "print('LOADED', bad, p.score)"
    )
    src = str(Path(inference.__file__).parents[1])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": f"{src}:{Path(src).parent}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout


def test_predict_accepts_paths_arrays_and_lists(exported, mixed_images):
    inf = Inferencer(exported["onnx"])
    path = mixed_images / "a.png"
    one = inf.predict(path)
    arr = inf.predict(read_rgb(path))
    many = inf.predict([path, mixed_images / "sub/gray.jpg"])
    assert abs(one.score - arr.score) < 1e-6 and abs(one.score - many[0].score) < 1e-5
    assert one.is_anomalous == (one.score > inf.image_threshold)
    assert (one.mask == (one.anomaly_map > inf.pixel_threshold)).all()


def test_sparse_dispatch_runs_each_selected_expert_once_on_its_rows(tmp_path, monkeypatch):
    model = tiny_model(router_input="patch_mean").eval()
    with torch.no_grad():  # a router that sends different images to different experts
        model.router.mlp[2].weight.mul_(3000)
    x = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, ["a"] * 6, sparse=True)
        maps, scores = model.score(out)
    topk = out.router.topk.numpy()
    assert len({tuple(sorted(r)) for r in topk.tolist()}) > 1  # routes differ between images
    inf = Inferencer(export(model, str(tmp_path / "ts"), "torchscript"), class_name="a")
    calls = []
    original = inference.Graph.__call__

    def spy(self, feed):
        if self in inf.experts:
            calls.append((inf.experts.index(self), len(feed[self.names[0]])))
        return original(self, feed)

    monkeypatch.setattr(inference.Graph, "__call__", spy)
    got = inf.forward(x.numpy())
    np.testing.assert_array_equal(got["topk"], topk)
    assert np.abs(got["scores"] - scores.numpy()).max() < 1e-5 and np.abs(got["maps"] - maps.numpy()).max() < 1e-5
    expected = sorted((i, int((topk == i).any(1).sum())) for i in range(model.config.num_experts) if (topk == i).any())
    assert sorted(calls) == expected  # only selected experts, once each, on exactly the rows that chose them


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_not_an_export_folder(tmp_path, capsys):
    with pytest.raises(ModelFolderError, match="metadata.json: missing.*amoe export"):
        Inferencer(tmp_path)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="missing format"):
        Inferencer(tmp_path)
    from amoe.cli import main

    assert main(["predict", "--model", str(tmp_path / "nope"), "--data.path", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_metadata_graph_mismatch_names_the_file(exported, tmp_path):
    d = _copy(exported["onnx"], tmp_path / "swapped")
    shutil.copy(d / "expert_02.onnx", d / "expert_00.onnx")  # a component expert where a patch expert belongs
    with pytest.raises(ModelFolderError, match=r"expert_00\.onnx: graph inputs .* do not match metadata"):
        Inferencer(d)
    d = _copy(exported["onnx"], tmp_path / "crop")
    meta = json.loads((d / "metadata.json").read_text())
    meta["crop_size"] = 64
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match=r"front\.onnx: input 'image' has shape"):
        Inferencer(d)
    (d / "score.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"score\.onnx: graph file listed in metadata.json is missing"):
        Inferencer(d)
    with pytest.raises(ModelFolderError, match="cannot run under runtime 'onnxruntime'"):
        Inferencer(exported["openvino"], "onnxruntime")


@pytest.mark.parametrize("fmt,package", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_missing_runtime_package_says_what_to_install(exported, monkeypatch, fmt, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ModelFolderError, match=rf"runtime '{package}' is not installed: pip install 'amoe\["):
        Inferencer(exported[fmt])


@pytest.mark.parametrize("overrides", [{"global_expert": "ae"}, {"num_component_experts": 0, "top_k": 3}])
def test_other_expert_layouts_export_with_parity(tmp_path, overrides):
    """The AE-only global expert (its graph also takes the encoder tokens) and a model without component
    experts (no class input, no part outputs) export and run with the checkpoint's scores."""
    model = tiny_model(**overrides).eval()
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps, scores = model.score(model(x, ["a"] * 3, sparse=True))
    inf = Inferencer(export(model, str(tmp_path / "ts"), "torchscript"), class_name="a")
    meta = inf.meta["graphs"]
    if overrides.get("global_expert") == "ae":
        assert meta["experts"][-1]["inputs"] == ["image", "fused"]
    else:
        assert meta["front"]["inputs"] == ["image"] and "parts" not in meta["front"]["outputs"]
    got = inf.forward(x.numpy())
    assert np.abs(got["scores"] - scores.numpy()).max() < 1e-5 and np.abs(got["maps"] - maps.numpy()).max() < 1e-5


def test_predict_model_names_an_unreadable_image_or_skips_it(exported, tmp_path, capsys):
    from amoe.cli import main
    from amoe.fixture_trees import noise, save, touch

    folder = tmp_path / "imgs"
    save(folder / "ok.png", noise(30, 30, seed=1))
    touch(folder / "broken.png", b"\x89PNG\r\n\x1a\n truncated")
    results = tmp_path / "results"
    assert main(["predict", "--model", str(exported["onnx"]), "--data.path", str(folder), "--model.results_root", str(results)]) == 2
    assert "broken.png: cannot be read as an image" in capsys.readouterr().err
    assert main(["predict", "--model", str(exported["onnx"]), "--data.path", str(folder), "--model.results_root",
                 str(results), "--data.skip_bad_files", "true", "--model.run_name", "skip"]) == 0
    run = results / "predict" / "skip"
    assert json.loads((run / "summary.json").read_text())["skipped"] == 1 and "broken.png" in (run / "skipped.csv").read_text()
    assert len((run / "scores.csv").read_text().strip().splitlines()) == 2  # header + ok.png

"""The reduced demo (--quick) runs end to end, writes results.json and report.md, refuses to run over an
earlier demo without --overwrite, and with it reuses the dataset and gives the same results."""
import json
import os
import re

import pytest

import demo
from metrics import results_table
from utils import ToolkitError


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The output folder of one `python demo.py --quick` run, and what it returned."""
    folder = tmp_path_factory.mktemp("demo") / "out"
    demo.main(["--quick", "--output-folder", str(folder)])
    return folder


def read_results(folder):
    with open(folder / demo.RESULTS_JSON, encoding="utf-8") as file:
        return json.load(file)


def test_results_hold_bleu_of_the_three_models(quick_demo):
    results = read_results(quick_demo)
    assert list(results) == list(demo.RESULTS) == ["no_attention", "attention", "adaptive", "transformer", "attention_scst",
                                                    "blind"]
    for scores in results.values():
        assert all(0.0 <= scores[f"bleu{n}"] <= 1.0 for n in range(1, 5))
        assert "meteor" not in scores  # --quick leaves the coco-caption metrics out


def test_report_holds_the_table_and_links_to_existing_figures(quick_demo):
    report = (quick_demo / demo.REPORT_MD).read_text(encoding="utf-8")
    assert results_table(read_results(quick_demo)) in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted([demo.CURVES_PNG, demo.ATTENTION_PNG])
    for link in links:
        assert (quick_demo / link).stat().st_size > 0
    for decoder in ("\"decoder\": \"rnn\"", "\"decoder\": \"attention\""):
        assert decoder in report  # the cfg of each run


def test_an_earlier_demo_is_refused_without_overwrite(quick_demo):
    before = read_results(quick_demo)
    with pytest.raises(ToolkitError, match="already holds a demo.*--overwrite"):
        demo.main(["--quick", "--output-folder", str(quick_demo)])
    assert read_results(quick_demo) == before


def test_overwrite_reuses_the_dataset_and_reproduces_the_results(quick_demo, capsys):
    before = read_results(quick_demo)
    stamp = quick_demo / demo.DATA_FOLDER / demo.DATA_STAMP
    stamp_time = os.path.getmtime(stamp)
    demo.main(["--quick", "--output-folder", str(quick_demo), "--overwrite"])
    assert "Reusing the shapes dataset" in capsys.readouterr().out
    assert os.path.getmtime(stamp) == stamp_time
    assert read_results(quick_demo) == before  # deterministic for its seed


def test_the_blind_control_trains_and_tests_on_images_that_are_all_the_same(quick_demo):
    import h5py
    from checkpoints import load_checkpoint

    checkpoints = quick_demo / demo.CHECKPOINT_FOLDER
    blind = next(checkpoints.glob("BEST_checkpoint_*_blind.pth.tar"))
    cfg = load_checkpoint(str(blind))["cfg"]
    assert cfg["data_folder"] == str(quick_demo / demo.BLIND_FOLDER) and cfg["decoder"] == "attention"
    seeing = load_checkpoint(str(next(checkpoints.glob("BEST_checkpoint_*_attention_*.pth.tar"))))["cfg"]
    # the blind control's own (coarser) grid; the models that look read the demo's
    assert (cfg["encoded_image_size"], seeing["encoded_image_size"]) == (demo.QUICK.blind_grid,
                                                                         demo.QUICK.encoded_image_size)
    for split in ("TRAIN", "TEST"):
        with h5py.File(quick_demo / demo.BLIND_FOLDER / f"{split}_IMAGES_{cfg['data_name']}.hdf5", "r") as h5:
            images = h5["images"][...]
        assert (images == demo.BLIND_GREY).all() and len(images) > 1


def test_a_blind_control_trained_on_constant_images_scores_near_the_best_constant_caption(tmp_path):
    """Trained and tested on grey images, the attention decoder learns the best it can say without looking: one
    caption for every test image, scoring near the best caption written without looking (not near zero)."""
    import solver
    import shapes
    from conftest import make_tiny_shapes, tiny_cfg

    n_train, n_val, n_test = 400, 20, 60
    data = make_tiny_shapes(tmp_path / "data", n_train, n_val, n_test, image_size=32)
    blind = demo.make_blind_data(demo.Data(data.folder, data.data_name, None, {}), str(tmp_path / "blind"))
    # 10 epochs: the validation loss is flat from the 6th (about 1.0)
    run = solver.train(tiny_cfg(blind, tmp_path / "runs", decoder="attention", epochs=10, decoder_lr=4e-3,
                                embed_dim=64, attention_dim=64, decoder_dim=64, deterministic=True))
    predictions = tmp_path / "blind.json"
    scores = solver.test(run["best_checkpoint"], demo.BEAM_SIZE, predictions_json=str(predictions),
                         coco_metrics=False, device="cpu")
    captions = {prediction["caption"] for prediction in json.loads(predictions.read_text(encoding="utf-8"))}
    best_constant = shapes.bleu_figures(n_test, seed=0, first_index=n_train + n_val)["blind"]  # 0.269
    assert len(captions) == 1
    assert 0.2 <= best_constant and 0.6 * best_constant <= scores["bleu4"] <= best_constant + 0.02

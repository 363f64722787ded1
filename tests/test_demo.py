"""The reduced demo (--quick) runs end to end, writes results.json and report.md, refuses to run over an
earlier demo without --overwrite, and with it reuses the dataset and gives the same results."""
import json
import os
import re

import pytest

import demo
from utils import ToolkitError, results_table


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
    for split in ("TRAIN", "TEST"):
        with h5py.File(quick_demo / demo.BLIND_FOLDER / f"{split}_IMAGES_{cfg['data_name']}.hdf5", "r") as h5:
            images = h5["images"][...]
        assert (images == demo.BLIND_GREY).all() and len(images) > 1

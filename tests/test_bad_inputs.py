"""Input that used to crash, hang or mislead: edited checkpoints, numbers of 0, a folder as --out, foreign
files, a named pipe among the pictures, more torchrun processes than GPUs, bad files in torch hub's cache, and
a course file with state_dict hooks. Each is refused with a message naming the file, key or value at fault,
exit code 2 on the command line and no traceback."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import checkpoints
import course_import
import distributed
import solver
from backbones import family_of, load_weights
from conftest import tiny_cfg
from utils import ToolkitError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def solver_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "solver.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, check=False)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    return solver.train(tiny_cfg(tiny_shapes, tmp_path_factory.mktemp("bad_inputs"), decoder="attention"))


@pytest.fixture(scope="module")
def image(tiny_shapes):
    return os.path.join(tiny_shapes.folder, "shapes_images", "shapes_000000.jpg")


class CallsGetcwd:
    def __reduce__(self):
        return os.getcwd, ()


# ---------------------------------------------------------------- 1. checkpoints checked after loading

def edited(path, out, edit):
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, out)
    return str(out)


EDITS = {
    "decoder_dim": (lambda c: c["cfg"].update(decoder_dim="32"), ["cfg['decoder_dim'] = '32' (str)", "int"]),
    "encoded_image_size": (lambda c: c["cfg"].update(encoded_image_size=4.0),
                           ["cfg['encoded_image_size'] = 4.0 (float)", "int"]),
    "decoder": (lambda c: c["cfg"].update(decoder=3), ["cfg['decoder'] = 3 (int)", "str or None"]),
    "cfg_list": (lambda c: c.update(cfg=list(c["cfg"].items())), ["cfg = [(", "(list)", "a dict of cfg key"]),
    "format_version": (lambda c: c.update(format_version="2"), ["format_version = '2' (str)", "a whole number"]),
    "no_word_map": (lambda c: c.pop("word_map"), ["lacks 'word_map'"]),
}


@pytest.mark.parametrize("name", EDITS)
def test_an_edited_checkpoint_is_refused_by_every_command_naming_the_key(trained, tiny_shapes, image, tmp_path,
                                                                         name):
    edit, fragments = EDITS[name]
    path = edited(trained["last_checkpoint"], tmp_path / f"{name}.pth.tar", edit)
    calls = {"test": lambda: solver.test(path, coco_metrics=False),
             "caption": lambda: solver.caption(path, [image]),
             "compare": lambda: solver.compare([trained["best_checkpoint"], path], coco_metrics=False),
             "resume": lambda: solver.train(tiny_cfg(tiny_shapes, tmp_path / "resumed", decoder="attention",
                                                     epochs=3, checkpoint=path))}
    for command, call in calls.items():
        with pytest.raises(ToolkitError) as error:
            call()
        message = str(error.value)
        assert repr(path) in message, (command, message)
        for fragment in fragments:
            assert fragment in message, (command, message)
    if name == "decoder_dim":
        assert_clean_error(solver_cli("test", "--checkpoint", path), repr(path), "cfg['decoder_dim'] = '32'")


def test_weights_that_do_not_fit_the_cfg_are_refused(trained, tmp_path, image):
    path = edited(trained["last_checkpoint"], tmp_path / "wider.pth.tar", lambda c: c["cfg"].update(decoder_dim=64))
    with pytest.raises(ToolkitError, match="its decoder_state does not fit the .* its cfg describes"):
        solver.caption(path, [image])


# ---------------------------------------------------------------- 2. numbers of 0

def test_batch_size_and_max_steps_of_zero_are_refused(trained, image, monkeypatch):
    best = trained["best_checkpoint"]
    for call, message in ((lambda: solver.caption(best, [image], batch_size=0), "batch_size = 0"),
                          (lambda: solver.caption(best, [image], max_steps=0), "max_steps = 0"),
                          (lambda: solver.test(best, batch_size=0), "batch_size = 0"),
                          (lambda: solver.test(best, max_steps=-1), "max_steps = -1"),
                          (lambda: solver.compare([best], batch_size=0), "batch_size = 0")):
        with pytest.raises(ToolkitError, match=f"{message} must be a whole number of at least 1 \\(--"):
            call()
    captioner = solver.Captioner.from_checkpoint(best, "cpu")
    with pytest.raises(ToolkitError, match="batch_size = 0 must be a whole number of at least 1"):
        captioner.caption([image], batch_size=0)
    assert_clean_error(solver_cli("caption", "--checkpoint", best, image, "--batch-size", "0"),
                       "batch_size = 0 must be a whole number of at least 1 (--batch-size)")


# ---------------------------------------------------------------- 3. the collective timeout

def test_an_infinite_or_huge_collective_timeout_is_refused(monkeypatch):
    for text in ("inf", "nan", "1e30", "-inf", "0"):
        monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, text)
        with pytest.raises(ToolkitError, match=f"CAPTIONING_DDP_TIMEOUT_S = '{text}'; set it to a positive number "
                                               f"of seconds, at most"):
            distributed.collective_timeout()
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "90")
    assert distributed.collective_timeout().total_seconds() == 90


# ---------------------------------------------------------------- 4. compare --out

def test_compare_refuses_an_out_folder_before_any_work(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(solver, "test", lambda *args, **kwargs: pytest.fail("compare tested before checking --out"))
    with pytest.raises(ToolkitError, match="out \\(--out\\) .* is a folder; pass a file name"):
        solver.compare([trained["best_checkpoint"]], out=str(tmp_path))


# ---------------------------------------------------------------- 5. import-course of a picture

def test_import_course_of_a_picture_says_it_is_no_pytorch_file(image, tiny_shapes, tmp_path):
    with pytest.raises(ToolkitError) as error:
        course_import.import_course_checkpoint(image, tiny_shapes.folder, tiny_shapes.data_name)
    message = str(error.value)
    assert f"{image!r} is not a PyTorch file (it looks like a JPEG image)" in message
    assert "trust" not in message and "pickle" not in message
    assert not os.path.exists(course_import.default_out(image))
    with pytest.raises(ToolkitError, match="is not a PyTorch file \\(it looks like a JPEG image\\)"):
        checkpoints.load_checkpoint(image)


# ---------------------------------------------------------------- 6. course classes defined in a notebook

def test_a_checkpoint_of_notebook_classes_gets_the_import_course_hint(tmp_path, monkeypatch):
    notebook = type("Encoder", (nn.Module,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Encoder", notebook, raising=False)
    path = str(tmp_path / "BEST_checkpoint_notebook.pth.tar")
    torch.save({"epoch": 3, "encoder": notebook()}, path)
    with pytest.raises(ToolkitError) as error:
        checkpoints.load_checkpoint(path)
    message = str(error.value)
    assert "course's train.py" in message and "__main__.Encoder" in message and "import-course" in message
    foreign = str(tmp_path / "foreign.pth.tar")
    torch.save({"epoch": CallsGetcwd()}, foreign)
    with pytest.raises(ToolkitError) as error:
        checkpoints.load_checkpoint(foreign)
    assert "not a checkpoint of this toolkit" in str(error.value) and "refers to posix.getcwd" in str(error.value)
    assert "\x1b" not in checkpoints.unloadable_message(foreign, RuntimeError("\x1b[1mbold\x1b[0m text"))


# ---------------------------------------------------------------- 7. the same file name in two folders

def test_compare_gives_checkpoints_of_one_name_a_row_each(trained, tmp_path, monkeypatch):
    name = os.path.basename(trained["best_checkpoint"])
    paths = []
    for folder, bleu in (("A", 0.1), ("B", 0.2)):
        os.makedirs(tmp_path / folder)
        paths.append(str(tmp_path / folder / name))
        shutil.copy(trained["best_checkpoint"], paths[-1])
    scores = {paths[0]: 0.1, paths[1]: 0.2}
    monkeypatch.setattr(solver, "test", lambda path, **options: {"bleu4": scores[path]})
    table = solver.compare(paths).splitlines()
    assert len(table) == 4
    assert table[2].startswith(f"| A/{name} | 0.1000 |") and table[3].startswith(f"| B/{name} | 0.2000 |")
    assert solver.checkpoint_labels(["x/a.pth", "y/b.pth", "z/a.pth", "y/b.pth"]) == [
        "x/a.pth", "b.pth", "z/a.pth", "b.pth (2)"]


# ---------------------------------------------------------------- 8. a named pipe among the pictures

def raise_timeout(signum, frame):
    raise TimeoutError("captioning hung on the named pipe")


def test_a_named_pipe_is_never_read(trained, image, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(image, folder / "photo.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub.jpg").mkdir()
    previous = signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(60)
    try:
        results = solver.caption(trained["best_checkpoint"], [str(folder)], beam_size=2)
        assert [result["path"] for result in results] == [str(folder / "photo.jpg")]
        alone = solver.caption(trained["best_checkpoint"], str(folder / "pipe.jpg"), beam_size=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert alone[0]["caption"] is None and "pipe.jpg' is a named pipe, not an image file" in alone[0]["error"]
    result = solver_cli("caption", "--checkpoint", trained["best_checkpoint"], folder / "pipe.jpg")
    assert_clean_error(result, "pipe.jpg' is a named pipe")


# ---------------------------------------------------------------- 9. more torchrun processes than GPUs

def test_torchrun_with_more_processes_than_gpus_is_refused_on_every_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("a GPU was taken before the check"))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(ToolkitError, match="torchrun started 2 processes on this machine .* but it has 1 GPU"
                                               "\\(s\\).*--nproc_per_node 1"):
            distributed.Ranks.from_environment("cuda")


# ---------------------------------------------------------------- 10. a bad file in torch hub's cache

def test_a_bad_file_in_torch_hubs_cache_is_named_with_the_fix(tmp_path, monkeypatch):
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    url = get_model_weights("resnet18")["IMAGENET1K_V1"].url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    family = family_of("resnet18")
    classifier = family.build("resnet18")
    for content in ("malicious", "garbage", "a list"):
        if content == "malicious":
            torch.save({"conv1.weight": CallsGetcwd()}, cached)
        elif content == "garbage":
            cached.write_bytes(b"<html>not the weights</html>")
        else:
            torch.save([torch.zeros(1)], cached)
        with pytest.raises(ToolkitError) as error:
            load_weights(classifier, family, "resnet18", "IMAGENET1K_V1")
        message = str(error.value)
        assert repr(str(cached)) in message and "Delete it; the next run downloads it again" in message, message
        assert "\x1b" not in message


# ---------------------------------------------------------------- 11. a trusted course file with hooks

def test_a_trusted_course_file_is_read_without_calling_its_hooks(tmp_path):
    from course_models import DecoderWithAttention, save_course_checkpoint

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    encoder.register_buffer("scratch", torch.ones(1), persistent=False)
    decoder = DecoderWithAttention({"embed_dim": 8, "attention_dim": 6, "decoder_dim": 10, "dropout": 0.3,
                                    "device": torch.device("cpu"), "vocab_size": 12})
    expected = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    decoder._state_dict_hooks[0] = nn.Linear  # an allow-listed class, which state_dict() would call
    decoder.attention._state_dict_pre_hooks[0] = nn.Linear
    path = tmp_path / "hooked.pth.tar"
    save_course_checkpoint(path, encoder, decoder, epoch=1, epochs_since_improvement=0, bleu4=0.1,
                           decoder_optimizer=None)
    course = course_import.read_course_file(str(path), trust_pickle=True)
    for got, want in ((course.encoder_state, expected["encoder"]), (course.decoder_state, expected["decoder"])):
        assert list(got) == list(want)
        assert all(torch.equal(got[name], want[name]) for name in want)
    assert "scratch" not in course.encoder_state

"""The CUDA paths against the CPU's, on a machine with a GPU (skipped elsewhere): the teacher-forced pass, a
training step that never waits for the device (CUDA's own sync debug mode raises if it does), bf16 inference
features against float32, the batched beam search against the one-image search, and the CLIP-S reward under
autocast against the CPU's.

    pytest tests/test_on_cuda.py      # on a GPU machine
"""
import copy

import numpy as np
import pytest
import torch

import config
import training
from beam_search import beam_search, beam_search_one
from clip_reward import ClipReward
from clip_score import ClipScorer
from conftest import tiny_cfg
from datasets import load_word_map
from encoding import EncodingPlan, encode_images, inference_plan
from models import Encoder
from test_beam_search import END, START, trained_decoder
from test_clip_reward import IMAGE_INDICES, candidates_and_texts
from test_teacher_forcing import grouped_batch, make_decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["rnn", "attention", "adaptive", "transformer"])
def test_teacher_forced_pass_on_cuda_equals_the_cpu(name):
    decoder = make_decoder(name).eval()
    inputs = grouped_batch()
    with torch.no_grad():
        cpu_scores, _, cpu_lengths, cpu_alphas, _ = decoder(*inputs)
        cuda_inputs = [tensor.cuda() for tensor in inputs]
        cuda_inputs[2] = inputs[2]  # lengths stay on the CPU, as the loader gives them
        scores, _, lengths, alphas, _ = copy.deepcopy(decoder).cuda()(*cuda_inputs)
    assert lengths == cpu_lengths
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=1e-4, atol=1e-4)
    if cpu_alphas is not None:
        torch.testing.assert_close(alphas.cpu(), cpu_alphas, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder", ["attention", "adaptive", "rnn", "transformer"])
def test_a_cuda_training_step_never_synchronises(tiny_shapes, tmp_path, decoder):
    cfg = tiny_cfg(tiny_shapes, tmp_path, decoder=decoder, device="cuda", transformer_layers=1,
                   transformer_encoder_layers=1, transformer_heads=2, grad_clip=5.0)
    trainer = training.Trainer(config.validate_cfg(cfg))
    try:
        loaded = next(iter(trainer.train_loader))
        trainer.train_step(loaded)  # the optimisers' state is made in the first step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
        try:
            stats = trainer.train_step(loaded)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(stats["loss"][0]).item()
    finally:
        trainer.lock.release()


def test_bf16_features_on_cuda_are_within_tolerance_of_float32():
    torch.manual_seed(0)
    encoder = Encoder(4, "resnet18", weights=None).cuda().eval()
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8).cuda()
    plan = inference_plan("cuda", len(images))
    assert plan.autocast_dtype in (torch.bfloat16, torch.float16)
    fast = encode_images(encoder, images, plan)
    exact = encode_images(encoder, images, EncodingPlan(torch.contiguous_format, len(images), None))
    assert fast.dtype == exact.dtype == torch.float32 and not torch.equal(fast, exact)  # bf16 did run
    relative = (fast - exact).norm() / exact.norm()
    assert relative < 0.02, relative
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(1), exact.flatten(1))
    assert cosine.min() > 0.999


@pytest.mark.parametrize("name", ["rnn", "attention", "adaptive"])
def test_batched_beam_search_on_cuda_equals_the_one_image_search(name):
    decoder, encoder_out = trained_decoder(name)
    decoder, encoder_out = copy.deepcopy(decoder).cuda(), encoder_out.cuda()
    batched = beam_search(decoder, encoder_out, START, END, 3, max_steps=14)
    reference = [beam_search_one(decoder, encoder_out[i:i + 1], START, END, 3, max_steps=14)
                 for i in range(len(encoder_out))]
    assert [c.words for c in batched] == [c.words for c in reference]
    assert [c.score for c in batched] == pytest.approx([c.score for c in reference], abs=1e-4)


@pytest.mark.parametrize("decoder", ["attention", "adaptive", "transformer"])
def test_cuda_graphs_train_as_the_step_by_step_loop(tiny_shapes, tmp_path, decoder):
    """Two steps with the teacher-forced pass replayed as CUDA graphs against two eager steps, from the same
    weights: the same losses and weights after (bf16 autocast, so within its tolerance). The second batch has the
    first one's shapes and other captions (2 and 5 of its 40 run into the second segment): its step replays the
    graphs captured by the first on new inputs."""
    results = {}
    for graphs in (False, True):
        cfg = tiny_cfg(tiny_shapes, tmp_path / str(graphs), decoder=decoder, device="cuda", cuda_graphs=graphs,
                       dropout=0.0, transformer_dropout=0.0, seed=3)
        trainer = training.Trainer(config.validate_cfg(cfg))
        try:
            assert (trainer.decoder_module.training_graphs is not None) == graphs
            batches = iter(trainer.train_loader)
            losses = [trainer.train_step(next(batches))["loss"][0].item() for _ in range(2)]
            results[graphs] = losses, [p.detach().float().cpu() for p in trainer.decoder_module.parameters()]
            if graphs and decoder != "transformer":  # each segment captured once, then replayed
                keys = trainer.decoder_module.training_graphs.graphs
                assert sorted(key[0] for key in keys) == list(range(len(keys)))
        finally:
            trainer.lock.release()
    assert results[True][0] == pytest.approx(results[False][0], rel=2e-2)
    for graphed, plain in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(graphed, plain, rtol=2e-2, atol=2e-3)


def test_the_clip_reward_on_cuda_under_autocast_equals_the_cpu(tiny_shapes, tiny_clip):
    model, tokenizer = tiny_clip
    word_map = load_word_map(tiny_shapes.folder, tiny_shapes.data_name)
    candidates, _ = candidates_and_texts(word_map)
    rewards = [ClipReward.from_split(ClipScorer(clip, tokenizer), tiny_shapes.folder, tiny_shapes.data_name, word_map)
               for clip in (model, copy.deepcopy(model).cuda())]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as in a training step: the reward stays float32
        on_cuda = rewards[1].scores(candidates, torch.tensor(IMAGE_INDICES))  # indices on the CPU, as loaded
    np.testing.assert_allclose(on_cuda, rewards[0].scores(candidates, IMAGE_INDICES), rtol=0, atol=2e-3)

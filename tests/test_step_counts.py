"""What a training step asks of the device, counted (the same on every machine): no host synchronisation inside
a cross-entropy step, and fewer aten operations (kernel launches on a GPU) in the teacher-forced pass than in
the step-by-step reference."""
import pytest
import torch

import config
import training
from benchmarks.op_counts import OpCounter, trainer_tensors
from conftest import tiny_cfg
from test_teacher_forcing import grouped_batch, make_decoder, step_by_step


@pytest.mark.parametrize("decoder", ["attention", "adaptive", "rnn", "transformer"])
def test_a_cross_entropy_training_step_never_waits_for_the_device(tiny_shapes, tmp_path, decoder):
    cfg = tiny_cfg(tiny_shapes, tmp_path, decoder=decoder, transformer_layers=1, transformer_encoder_layers=1,
                   transformer_heads=2, grad_clip=5.0, lr_warmup_steps=3)
    trainer = training.Trainer(config.validate_cfg(cfg))
    try:
        loaded = next(iter(trainer.train_loader))
        trainer.train_step(loaded)  # the optimisers' state is made in the first step
        with OpCounter(trainer_tensors(trainer, loaded)) as counts:
            stats = trainer.train_step(loaded)
        assert counts.synchronisations == 0, counts.where_synchronised
        assert counts.operations > 0 and all(isinstance(value, torch.Tensor) for value, _ in stats.values())
    finally:
        trainer.lock.release()


@pytest.mark.parametrize("name", ["attention", "adaptive"])
def test_the_teacher_forced_pass_dispatches_fewer_operations_than_the_step_by_step_pass(name):
    decoder = make_decoder(name).train()
    inputs = grouped_batch(images=4, length=16)
    with OpCounter(decoder.parameters()) as fast:
        decoder(*inputs)[0].sum().backward()
    with OpCounter(decoder.parameters()) as reference:
        step_by_step(decoder, *inputs)[0].sum().backward()
    assert fast.operations < reference.operations, (fast.by_operation, reference.by_operation)
    assert fast.by_operation["addmm"] < reference.by_operation["addmm"]  # one output layer, not one per step


@pytest.mark.parametrize("name", ["rnn_cell_loop", "attention"])
def test_the_teacher_forced_loop_slices_nothing_while_no_caption_ends(name):
    """A slice's backward zero-fills a gradient of the whole tensor: the loop slices the memory and the state only
    at the steps where captions end, and takes every position's words from one unbind. With captions of one
    length (15 steps) none ends before the last step: at most one slice's backward in the whole pass (the
    step-by-step reference has 2 to 4 a step)."""
    decoder = make_decoder(name).train()
    encoder_out, captions, lengths, caption_image = grouped_batch(images=4, length=16)
    lengths = torch.full_like(lengths, 16)
    with OpCounter(decoder.parameters()) as counts:
        decoder(encoder_out, captions, lengths, caption_image)[0].sum().backward()
    with OpCounter(decoder.parameters()) as reference:
        step_by_step(decoder, encoder_out, captions, lengths, caption_image)[0].sum().backward()
    sliced = counts.by_operation["slice_backward"] + counts.by_operation["select_backward"]
    assert sliced <= 1 and reference.by_operation["slice_backward"] >= 2 * 15, counts.by_operation

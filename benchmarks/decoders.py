"""The decoders' sections: training samples/s of the course's path against the toolkit's (grouped captions,
cached features), batched against one-image beam search, the Transformer's cached incremental step, and SCST."""
import itertools
import os
import statistics
import time

import torch

from beam_search import beam_search, beam_search_one
from benchmarks.common import (BEAM_BATCH, BEAM_SIZE, DECODERS, build_feature_caches, check_reads_cache,
                               coco_projection, fastest_alternately, make_trainer, read_cached_features, report,
                               report_ratio, synchronize, time_side_by_side, timed, training_steps)

def training_section(data, work, settings):
    """Per decoder: course-style vs grouped + cached training, then the beam search comparison on a
    decoder trained a little further. Returns the figures and the best checkpoint of the trained attention
    decoder (what encoder_section tests)."""
    figures = {"train": {}, "beam": {}}
    cache = None
    for decoder_name in DECODERS:
        course = make_trainer(data, work, settings, decoder_name, group_captions=False, feature_cache=False)
        if decoder_name == "rnn":
            course.decoder.fused_lstm = False  # the course's step-by-step LSTMCell loop
        if cache is None:  # every Trainer's encoder has the same weights: one cache serves all
            cache = build_feature_caches(course.encoder, data, os.path.join(work, "cache"), "cpu")
            report("feature_cache_build", f"{cache.images} images (TRAIN + VAL) in {cache.seconds:.1f} s "
                                          f"({cache.images / cache.seconds:.2f} images/s), once before training")
        fast = make_trainer(data, work, settings, decoder_name)
        check_reads_cache(fast, cache)
        fast_steps = training_steps(fast)
        totals = time_side_by_side({"course": (training_steps(course), 1),
                                    "cached": (fast_steps, settings.cached_steps_per_round)},
                                   settings.warmup_steps, settings.timing_rounds, "cpu")
        del course
        train = {side: {"captions": captions, "seconds": seconds, "samples_per_s": captions / seconds}
                 for side, (captions, seconds) in totals.items()}
        report_training(decoder_name, train, settings)
        train["speedup"] = train["cached"]["samples_per_s"] / train["course"]["samples_per_s"]
        train["coco_projection"] = {"course": coco_projection(train["course"]["samples_per_s"]),
                                    "cached": coco_projection(train["cached"]["samples_per_s"],
                                                              cache.images / cache.seconds)}
        figures["train"][decoder_name] = train
        figures["beam"][decoder_name] = beam_comparison(fast, fast_steps, read_cached_features(cache.paths[1]),
                                                        settings)
        if decoder_name == "attention":
            figures["scst"] = scst_section(fast, data, work, settings)
            trained_checkpoint = fast.paths.best  # written by scst_section
        del fast, fast_steps
    figures["transformer"] = transformer_section(data, work, settings, cache)
    figures["beam"]["transformer"] = figures["transformer"].pop("beam")
    figures["feature_cache"] = cache.figures()
    report_coco_projection(figures["train"]["attention"]["coco_projection"])
    return figures, trained_checkpoint


def report_training(decoder_name, train, settings):
    course, cached = train["course"], train["cached"]
    report(f"train_course_{decoder_name}", f"{course['samples_per_s']:.2f} samples/s ({course['captions']} "
                                           f"captions in {course['seconds']:.1f} s; per caption, {settings.backbone} "
                                           f"in the loop)")
    report(f"train_cached_{decoder_name}", f"{cached['samples_per_s']:.2f} samples/s ({cached['captions']} "
                                           f"captions in {cached['seconds']:.1f} s; grouped, cached float16 features)")
    report_ratio(f"train_speedup_{decoder_name}", cached["samples_per_s"] / course["samples_per_s"])


def report_coco_projection(projection):
    course, cached = projection["course"], projection["cached"]
    report("coco_epoch_cpu_attention", f"training pass of one COCO epoch (113,287 images x 5 captions) at these "
                                       f"rates: course {course['epoch_hours']:.1f} h, cached "
                                       f"{cached['epoch_hours']:.1f} h (+ {cached['cache_hours']:.1f} h once to "
                                       f"build the TRAIN + VAL cache)")


def beam_comparison(trainer, steps, encoder_out, settings):
    """Train the decoder a little further (so its captions end at varied lengths), then beam search
    the cached VAL encodings one image at a time and batched; returns the figures."""
    name = trainer.cfg["decoder"]
    losses, training_seconds = timed(
        lambda: [loss.item() for _, loss in itertools.islice(steps, settings.beam_training_steps)])
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    report(f"beam_decoder_training_{name}", f"{settings.beam_training_steps} more steps in {training_seconds:.1f} s, "
                                            f"loss {first:.2f} -> {last:.2f}")
    decoder = trainer.decoder.eval()
    start_id, end_id = trainer.word_map["<start>"], trainer.word_map["<end>"]
    search = dict(start_id=start_id, end_id=end_id, beam_size=BEAM_SIZE)
    beam_search_one(decoder, encoder_out[:1], **search)  # warm-up
    beam_search(decoder, encoder_out[:2], **search)
    searches = {"one": lambda chunk: [beam_search_one(decoder, image[None], **search) for image in chunk],
                "batched": lambda chunk: beam_search(decoder, chunk, **search)}
    one, batched, one_seconds, batched_seconds = [], [], 0.0, 0.0
    for chunk in encoder_out.split(BEAM_BATCH):  # side by side, chunk by chunk
        fastest = fastest_alternately(searches, settings.beam_rounds, chunk)
        one, one_seconds = one + fastest["one"][0], one_seconds + fastest["one"][1]
        batched, batched_seconds = batched + fastest["batched"][0], batched_seconds + fastest["batched"][1]
    mismatches = sum(a.words != b.words for a, b in zip(one, batched))
    lengths = [len(caption.words) - 2 for caption in one]  # words between <start> and <end>
    unfinished = sum(caption.words[-1] != end_id for caption in one)
    images = len(encoder_out)
    one_rate, batched_rate = images / one_seconds, images / batched_seconds
    suffix = "" if name == "attention" else f"_{name}"
    report(f"beam_one{suffix}", f"{one_rate:.2f} images/s ({images} images in {one_seconds:.2f} s, beam_search_one, "
                                f"{name} decoder, beam size {BEAM_SIZE})")
    report(f"beam_batched{suffix}", f"{batched_rate:.2f} images/s ({images} images in {batched_seconds:.2f} s, "
                                    f"beam_search in batches of {BEAM_BATCH})")
    report(f"beam_captions{suffix}", f"{min(lengths)} to {max(lengths)} words, mean {statistics.mean(lengths):.1f}, "
                                     f"{unfinished} without <end>, {mismatches} differ")
    report_ratio(f"beam_speedup{suffix}", batched_rate / one_rate)
    return {"training_steps": settings.beam_training_steps, "training_seconds": training_seconds,
            "training_loss": [first, last], "images": images,
            "one": {"seconds": one_seconds, "images_per_s": one_rate},
            "batched": {"seconds": batched_seconds, "images_per_s": batched_rate},
            "speedup": batched_rate / one_rate, "mismatches": mismatches,
            "caption_words": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
            "unfinished": unfinished}


def transformer_section(data, work, settings, cache):
    """The Transformer decoder (self-critical.pytorch's COCO sizes, width = the bench's dims): cached training
    steps per second, batched against one-image beam search, and one cached incremental decoding step
    against recomputing the whole prefix, as a decoder without a key/value cache must."""
    trainer = make_trainer(data, work, settings, "transformer", lr_warmup_steps=0,
                           transformer_layers=settings.transformer_layers,
                           transformer_encoder_layers=settings.transformer_layers)
    check_reads_cache(trainer, cache)
    steps = training_steps(trainer)
    totals = time_side_by_side({"cached": (steps, settings.cached_steps_per_round)}, settings.warmup_steps,
                               settings.timing_rounds, "cpu")
    captions, seconds = totals["cached"]
    report("train_samples_per_s_transformer", f"{captions / seconds:.2f} samples/s ({captions} captions in "
                                              f"{seconds:.1f} s; grouped, cached float16 features)")
    figures = {"train_samples_per_s": captions / seconds,
               "beam": beam_comparison(trainer, steps, read_cached_features(cache.paths[1]), settings)}
    figures["incremental"] = incremental_step_cost(trainer.decoder.eval(), read_cached_features(cache.paths[1]),
                                                   trainer.word_map["<start>"], settings)
    trainer.lock.release()
    return figures


def incremental_step_cost(decoder, encoder_out, start_id, settings, length=16):
    """Seconds to decode `length` words for a batch: one_step with the cached keys and values, against a
    teacher-forced pass over the whole prefix at every step (what a step costs without the cache)."""
    encoder_out = encoder_out[:BEAM_BATCH].reshape(min(BEAM_BATCH, len(encoder_out)), -1, encoder_out.size(-1))
    words = torch.full((len(encoder_out), length + 1), start_id, dtype=torch.long)

    def cached(memory, start_state):
        state = start_state
        for t in range(length):
            _, state, _ = decoder.one_step(decoder.embedding(words[:, t]), memory, state)

    def recomputed(memory, start_state):
        for t in range(1, length + 1):
            decoder.decode_teacher_forced(decoder.embedding(words[:, :t]), memory, start_state, [t] * len(words))

    with torch.inference_mode():  # the grid's encoder layers and memory keys (start) are outside the timing
        memory, start_state = decoder.start(encoder_out)
        fastest = fastest_alternately({"cached": cached, "recomputed": recomputed}, settings.beam_rounds, memory,
                                      start_state)
    ratio = fastest["recomputed"][1] / fastest["cached"][1]
    report("transformer_incremental_step", f"{length} steps of {len(words)} captions: {fastest['cached'][1]:.2f} s "
                                           f"with cached keys and values, {fastest['recomputed'][1]:.2f} s "
                                           f"recomputing the prefix ({ratio:.2f} x)")
    return {"steps": length, "captions": len(words), "cached_seconds": fastest["cached"][1],
            "recomputed_seconds": fastest["recomputed"][1], "ratio": ratio}


def scst_section(xe_trainer, data, work, settings, device="cpu", **overrides):
    """The real SCST training step (Trainer.train_step of the scst stage) from the attention decoder trained
    above: sampled captions per second, and the share of the step that computing the CIDEr-D rewards takes."""
    xe_trainer.save(is_best=True)
    trainer = make_trainer(data, work, settings, "attention", device, training="scst",
                           checkpoint=xe_trainer.paths.best, **overrides)
    reward = trainer.stage.reward
    real_scores, reward_seconds = reward.scores, [0.0]

    def timed_scores(*args):
        start = time.perf_counter()
        result = real_scores(*args)
        reward_seconds[0] += time.perf_counter() - start
        return result
    reward.scores = timed_scores
    trainer.decoder.train()
    batches = itertools.islice(itertools.cycle(trainer.train_loader), settings.scst_steps + 1)
    trainer.train_step(next(batches))  # warm-up
    reward_seconds[0], samples, start = 0.0, 0, time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
        samples += len(batch[0]) * trainer.cfg["scst_samples"]
    synchronize(device)
    seconds = time.perf_counter() - start
    share = reward_seconds[0] / seconds
    report("scst_samples_per_s", f"{samples / seconds:.2f} sampled captions/s ({samples} in {seconds:.1f} s, "
                                 f"{trainer.cfg['scst_samples']} per image, mean baseline, attention decoder)")
    report("cider_reward_share", f"{share:.4f} of the SCST step ({reward_seconds[0] * 1000:.1f} ms of CIDEr-D "
                                 f"rewards in {seconds:.1f} s)")
    trainer.lock.release()
    return {"samples_per_s": samples / seconds, "reward_share": share, "seconds": seconds, "samples": samples}


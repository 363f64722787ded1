"""create_input_files with one worker against all cores, each call in a fresh process."""
import os
import subprocess
import sys

from PIL import Image
from tqdm import tqdm

from benchmarks.common import CAPTIONS_PER_IMAGE, SEED, report, report_ratio
from shapes import IMAGE_FOLDER, JPEG_QUALITY, make_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def write_source_jpegs(folder, settings, images):
    """`images` shapes scenes as JPEGs of source_size (like COCO's ~640 x 480): rendered square at the
    height, then stretched to the width. Returns (Karpathy JSON path, image folder)."""
    val = test = max(1, images // 10)
    width, height = settings.source_size
    json_path = make_shapes_dataset(folder, images - val - test, val, test, seed=SEED + 1, image_size=height)
    image_folder = os.path.join(folder, IMAGE_FOLDER)
    for filename in tqdm(sorted(os.listdir(image_folder)), desc="stretch JPEGs", unit="img"):
        path = os.path.join(image_folder, filename)
        with Image.open(path) as image:
            stretched = image.resize((width, height), Image.Resampling.BICUBIC)
        stretched.save(path, quality=JPEG_QUALITY)
    return json_path, image_folder


def preprocess_section(work, settings):
    """create_input_files with one worker and with all cores, alternately (the fastest of the rounds
    counts), on preprocess_images JPEGs and on 3 JPEGs: the 3-image run's time is the per-call
    start-up (worker pool, JSON and word map) that a long run amortises. Each call runs in a fresh
    Python process, as from the command line: the workers of a call made here would first import
    this script, torch included (multiprocessing's rule for the main module), which no user pays."""
    sources = {count: write_source_jpegs(os.path.join(work, f"preprocess_source_{count}"), settings, count)
               for count in (settings.preprocess_images, 3)}
    output = os.path.join(work, "preprocess_output")

    def run(images, workers):
        json_path, image_folder = sources[images]
        return seconds_in_fresh_process(json_path, image_folder, output, settings.image_size, workers)

    cores = os.cpu_count()
    run(3, cores)  # warm-up: fills the page cache
    seconds = {(images, workers): [] for images in sources for workers in (1, cores)}
    for _ in range(settings.preprocess_rounds):
        for images, workers in seconds:
            seconds[images, workers].append(run(images, workers))
    best = {key: min(values) for key, values in seconds.items()}
    images, width, height = settings.preprocess_images, *settings.source_size
    one, every = best[images, 1], best[images, cores]
    startup_one, startup_every = best[3, 1], best[3, cores]
    report("preprocess_one_worker", f"{images / one:.1f} images/s ({images} JPEGs of {width} x {height} to "
                                    f"{settings.image_size} x {settings.image_size} in {one:.2f} s)")
    report("preprocess_all_workers", f"{images / every:.1f} images/s ({cores} workers, {every:.2f} s)")
    report_ratio("preprocess_speedup", one / every)
    report("preprocess_startup", f"{startup_every:.2f} s per call with {cores} workers, {startup_one:.2f} s with one "
                                 f"(create_input_files on 3 images)")
    steady_one = steady_rate(images - 3, one - startup_one)
    steady_every = steady_rate(images - 3, every - startup_every)
    steady_speedup = steady_every / steady_one if steady_one and steady_every else None
    if steady_speedup is None:
        report("preprocess_steady", "not measurable: the start-up is as long as the whole run")
    else:
        report("preprocess_steady", f"{steady_one:.1f} images/s with one worker, {steady_every:.1f} with {cores} "
                                    f"(start-up subtracted, as in a long run): {steady_speedup:.2f} x")
    return {"images": images, "source_size": [width, height], "workers": cores,
            "seconds": {f"{count}_images_{workers}_workers": values for (count, workers), values in seconds.items()},
            "images_per_s_one_worker": images / one, "images_per_s_all_workers": images / every,
            "speedup": one / every, "startup_seconds_one_worker": startup_one,
            "startup_seconds_all_workers": startup_every, "steady_images_per_s_one_worker": steady_one,
            "steady_images_per_s_all_workers": steady_every, "steady_speedup": steady_speedup}


def seconds_in_fresh_process(json_path, image_folder, output_folder, image_size, workers):
    """Seconds one create_input_files call takes in a new Python process (interpreter start-up excluded)."""
    code = ("import time; from create_input_files import create_input_files; start = time.perf_counter(); "
            f"create_input_files('shapes', {json_path!r}, {image_folder!r}, {CAPTIONS_PER_IMAGE}, 0, "
            f"{output_folder!r}, image_size={image_size}, workers={workers}, overwrite=True); "
            "print(time.perf_counter() - start)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"create_input_files failed in its process:\n{result.stderr[-3000:]}")
    return float(result.stdout.splitlines()[-1])


def steady_rate(images, seconds):
    """Images per second of the per-image part of a run; None when timing noise leaves no such part."""
    return images / seconds if seconds > 0 else None


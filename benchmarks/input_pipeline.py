"""Input pipeline throughput: images/s of the host side of the training pipeline (read the
enlarged index's examples, batch) on the prepared ISIC 2016 training set, with 0 (in-process),
1 and 2 grain worker processes. The enlargement transforms run in the train step since #12;
`benchmarks/throughput.py` measures the pipeline's cost against the step itself.

    python benchmarks/input_pipeline.py --manual_dir=../shared/data --data_dir=/tmp/tfds \
        [--size=192x256] [--batches=100]

Prints one row per worker count; the ratio is against 0 workers, measured in the same run.
"""

import time

from absl import app, flags
import ml_collections

from skinmtl_jax import input_pipeline

flags.DEFINE_string('manual_dir', '../shared/data', 'Folder with the downloads.')
flags.DEFINE_string('data_dir', '/tmp/skinmtl_tfds', 'Where the prepared dataset is kept.')
flags.DEFINE_string('size', '192x256', 'HxW.')
flags.DEFINE_integer('batches', 100, 'Batches timed per setting (after 5 warm-up batches).')
flags.DEFINE_integer('batch_size', 10, 'Batch size.')
flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker counts to time.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  size = tuple(int(v) for v in FLAGS.size.split('x'))
  cfg = ml_collections.ConfigDict({
      'name': 'isic2016', 'manual_dir': FLAGS.manual_dir, 'data_dir': FLAGS.data_dir,
      'image_size': size, 'extra_melanomas': '', 'paper_protocol_train_on_test_images': False,
      'eval_sets': (), 'enlarge_benign': 4, 'enlarge_melanoma': 16, 'num_workers': 0,
      'on_device': 'off', 'on_device_fraction': 0.25, 'prefetch_batches': 0})
  split = input_pipeline.get_split(cfg, 'train')
  rows = []
  for workers in (int(w) for w in FLAGS.workers):
    cfg.num_workers = workers
    ds, _ = input_pipeline.train_dataset(split, cfg, batch_size=FLAGS.batch_size, seed=0)
    it = iter(ds)
    for _ in range(5):
      next(it)
    t = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(it)
    rows.append((workers, FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - t)))
  base = rows[0][1]
  print(f'ISIC 2016 train ({len(split.source)} images) at {size[0]}x{size[1]}, batch '
        f'{FLAGS.batch_size}, {FLAGS.batches} batches per setting')
  print('| workers | images/s | ratio vs 0 workers |')
  print('| --- | --- | --- |')
  for workers, ips in rows:
    print(f'| {workers} | {ips:.0f} | {ips / base:.2f} |')


if __name__ == '__main__':
  app.run(main)

"""MONAI's DynUNet, the PyTorch reference of our benchmarks, and what they share.

`DynUNet` has nnU-Net's 2D widths and trains with Adam and Dice + cross-entropy, as
`benchmarks/vs_monai.py` describes. With `amp=True` on a GPU it runs as a PyTorch user would
run it fast: bfloat16 autocast, channels-last tensors and cuDNN's autotuner.
"""

import os
import platform
import time

import numpy as np


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}'


def random_batch(b, size, rng):
  return {'image': rng.integers(0, 256, (b, *size, 3), dtype=np.uint8),
          'mask': rng.integers(0, 2, (b, *size), dtype=np.uint8),
          'label': rng.integers(0, 2, (b,), dtype=np.int32)}


class DynUNet:
  """MONAI's DynUNet with nnU-Net's 2D widths, trained with Adam and Dice + cross-entropy."""

  def __init__(self, size, batch, rng, threads=None, *, seed=0, amp=False):
    import torch  # pylint: disable=g-import-not-at-top
    self.threads = threads or torch.get_num_threads()
    self.name = f'MONAI DynUNet ({self.threads} torch thread{"s" if self.threads > 1 else ""})'
    from monai.losses import DiceCELoss  # pylint: disable=g-import-not-at-top
    from monai.networks.nets import DynUNet as Net  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.amp = amp
    if self.amp:  # on a CPU, oneDNN's bfloat16 convolutions (AMX where the CPU has it)
      self.name = self.name[:-1] + ', bf16 autocast, channels-last)'
      torch.backends.cudnn.benchmark = True
    self.dtype = 'bfloat16 (autocast)' if self.amp else 'float32'
    torch.manual_seed(seed)
    self.net = Net(spatial_dims=2, in_channels=3, out_channels=2, kernel_size=[3] * 6,
                   strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5,
                   filters=[32, 64, 128, 256, 320, 320], norm_name='batch',
                   deep_supervision=False).to(self.device)
    layout = torch.channels_last if self.amp else torch.contiguous_format
    self.net = self.net.to(memory_format=layout)
    self.opt = torch.optim.Adam(self.net.parameters(), lr=3e-3)
    self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
    data = random_batch(batch, size, rng)
    self.images = self._images(data['image'])
    self.masks = torch.from_numpy(data['mask'])[:, None].to(self.device)
    self.size = size
    self.compile_s = 0.0

  def _images(self, images: np.ndarray):
    """NHWC uint8 -> the net's NCHW layout (channels-last in memory with amp: no copy)."""
    x = self.torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
    return x if self.amp else x.contiguous()

  def _autocast(self):
    return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.amp)

  def _sync(self):
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def train_steps(self, n):
    """n training steps, waiting for the device only after the last (and after the very first,
    whose time is `compile_s`): on a GPU the next step is queued while one runs, as in a
    training loop."""
    self.torch.set_num_threads(self.threads)
    self.net.train()
    for _ in range(n):
      t = time.perf_counter()
      self.opt.zero_grad(set_to_none=True)
      with self._autocast():
        out = self.net(self.images.float() / 255.0)
        loss = self.loss(out.float(), self.masks)
      loss.backward()
      self.opt.step()
      if not self.compile_s:
        self._sync()
        self.compile_s = time.perf_counter() - t
    self._sync()

  def infer_fn(self, b, rng):
    images = self._images(random_batch(b, self.size, rng)['image'])

    def run():
      self.torch.set_num_threads(self.threads)
      self.net.eval()
      with self.torch.inference_mode(), self._autocast():
        self.torch.softmax(self.net(images.float() / 255.0).float(), dim=1)
      self._sync()
    return run



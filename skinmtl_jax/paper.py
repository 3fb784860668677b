"""The paper's reported numbers (Tables 3 and 4), to print beside ours.

Classification in percent (TPR = support-weighted recall, TNR = benign recall, F1 = weighted
F1), segmentation in percent (per-image means), confusion matrices rows = truth (B, M).
One run per row in the paper; no spread.
"""

from __future__ import annotations

from typing import NamedTuple


class PaperRow(NamedTuple):
  params: float                     # millions
  confusion: list | None            # rows = truth (B, M), columns = prediction (B, M)
  tpr: float | None
  tnr: float | None
  f1: float | None
  mcc: float | None
  iou: float | None
  dsc: float | None

  @property
  def melanoma_recall(self) -> float | None:
    """Percent of the melanomas called melanoma, from the confusion matrix."""
    return None if self.confusion is None else 100 * self.confusion[1][1] / sum(self.confusion[1])


TABLE3_ISIC2016 = {
    'resnet50': PaperRow(23.84, [[261, 43], [40, 35]], 78.10, 85.86, 78.26, None, None, None),
    'unet': PaperRow(10.71, None, None, None, None, 87.06, 84.62, 91.04),
    'mtl0': PaperRow(10.76, [[274, 30], [53, 22]], 78.10, 90.13, 76.52, 86.10, 83.15, 90.03),
    'mtl1': PaperRow(10.80, [[274, 30], [49, 26]], 79.16, 90.13, 77.96, 84.89, 81.56, 88.86),
    'mtl2': PaperRow(10.86, [[277, 27], [43, 32]], 81.53, 91.12, 80.66, 84.74, 81.95, 89.15),
    'mtl3': PaperRow(10.90, [[277, 27], [42, 33]], 81.79, 91.12, 81.79, 85.07, 82.08, 89.37),
    'mtl4': PaperRow(10.90, [[248, 56], [17, 58]], 80.74, 81.58, 82.07, 85.46, 82.46, 89.48),
}

TABLE4_PH2 = {
    'resnet50': PaperRow(23.84, [[152, 8], [24, 16]], 84.0, 95.0, 82.38, None, None, None),
    'unet': PaperRow(10.71, None, None, None, None, 82.10, 80.44, 88.56),
    'mtl4': PaperRow(10.90, [[135, 25], [6, 34]], 84.50, 84.38, 85.50, 82.27, 81.0, 88.81),
}

PAPER_TABLES = {'isic2016_test': TABLE3_ISIC2016, 'ph2': TABLE4_PH2}

# Cells of the paper's tables that its own numbers contradict: (config, eval set, field) ->
# why. Tables print them with a dagger and this note beneath.
DOUBTFUL = {
    ('mtl3', 'isic2016_test', 'f1'): 'Table 3 prints 81.79 for MTL3\'s F1; its confusion matrix '
                                     'gives 81.00, as the paper\'s text says',
}


def doubtful(config_name: str, eval_set: str, field: str) -> str | None:
  """Why the paper's cell is doubtful, or None."""
  return DOUBTFUL.get((config_name, eval_set, field))


def paper_row(config_name: str, eval_set: str) -> PaperRow | None:
  """The paper's row for `config_name` on `eval_set`, or None when the paper has none."""
  return PAPER_TABLES.get(eval_set, {}).get(config_name)

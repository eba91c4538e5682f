"""NLVR2 (Suhr et al., 2019) fine-tuning of an ALBEF run: two images and a statement -> True/False.

The statement is fused with each image by the same fusion encoder; the two fused [CLS] states
(left, right) are concatenated into a new head (cls_head/: Linear(2W -> W) -> ReLU ->
Linear(2)) trained from scratch with cross-entropy. Labels: 0 False, 1 True. The encoders and
the tokenizer come from the ALBEF workdir `init=DIR`, as in configs/snli_ve.py, whose
finetune_config this file shares; pass the same `scale` (and `variant`) as that run. Reports
eval/nlvr2_accuracy on config.data.eval_classification.

Paper recipe (`scale=paper`, ALBEF's configs/NLVR.yaml): 384 px, batch 128 (16 x 8 GPUs), 10
epochs, AdamW lr 2e-5 with a one-epoch warm-up and cosine decay to 1e-6, weight decay 0.02
lr-coupled -> 0.02 * 2e-5 decoupled. ALBEF's NLVR2 model differs: it splits its fusion layers'
cross-attention between the two images inside one pass (after an extra text-assignment
pre-training stage) and distils from a momentum model; this config follows the issue's simpler
design (docs/fusion.md). Data at scale=paper: the official train.json / dev.json and images.

`scale=laptop` (default): the ALBEF laptop model on synthetic?task=nlvr2, 300 steps.

Arguments (comma-separated k=v): init=DIR (required), scale=laptop|tiny|paper, variant=B/16.
"""
from vljax import configlib


def get_config(arg=None):
  return configlib.sibling_config(__file__, "snli_ve.py").finetune_config("nlvr2", arg)

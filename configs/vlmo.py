"""VLMo (Bao et al., 2022): a Multiway transformer pre-trained in three stages.

  stage=image       masked image modelling in image-only mode (block-wise 40% of the patches;
                    normalised-pixel targets: there is no visual tokenizer yet);
  stage=text        masked language modelling in text-only mode, the self-attention and the V
                    experts frozen, from the image stage's weights (init=DIR);
  stage=image_text  ITC + ITM with hard negatives + MLM (the default), from the text stage's
                    weights (init=DIR) or from scratch.

Paper recipe (`scale=paper`, VLMo-Base): one Multiway transformer of ViT-B size (12 blocks,
width 768, 12 heads, MLP 3072) at 224 px with patch 16, the top 2 blocks with the
vision-language expert. Image-text stage (the released task_mlm_itm_itc_base config): 40 text
tokens; ITC (learned scale, init 1/0.07), ITM with hard negatives mined from the global batch,
MLM masking 15% of the tokens; batch 1024, 200k steps, AdamW (b2 0.98) at lr 2e-4 with 10%
linear warm-up and linear decay to 0, weight decay 0.01 in PyTorch's lr-coupled form: vljax's
decay is decoupled (docs/optim.md), so the equivalent is wd = 0.01 * 2e-4 = 2e-6. Text stage
(task_textmlm_base): 196 tokens, batch 1024, lr 2e-4, the same schedule. Image stage: VLMo
starts from BEiT-Base (800 epochs of ImageNet-1k at batch 2048, lr 1.5e-3, wd 0.05, 10 warm-up
epochs, cosine; here as steps: 500k, 6.25k warm-up).

Differences from the paper (docs/multiway.md): absolute position embeddings (VLMo: BEiT's
relative position bias), no stochastic depth, a learned [CLS] vector in place of a tokenizer
id, equal loss weights (the released code also adds an ITC through the VL experts and scales
MLM by 0.25), pixel targets in the image stage (BEiT: DALL-E tokens), and token-level rather
than whole-word masking in the text stage.

Nothing a stage leaves unused decays (UNUSED: wd_mults 0; with a zero gradient Adam does not
move it either).

Arguments (comma-separated k=v): stage=image_text|image|text, init=DIR (the previous stage's
workdir or export; required for stage=text), scale=laptop|tiny|paper (default laptop: each
stage trains on the embedded synthetic data on a 2-core CPU in minutes).
"""
from vljax import configlib
from vljax import model_sizes

STAGES = ("image", "text", "image_text")
# What a stage's loss does not reach is excluded from weight decay (wd_mults 0): with a zero
# gradient Adam leaves it as it is, whereas the decoupled decay would shrink an unused kernel
# for the whole stage (at the paper's 500k image-stage steps, to nothing).
_IMAGE_ONLY = r"^mw/(patch|img_cls|img_pos|img_mask_token)"
_TEXT_ONLY = r"^mw/(embedding|txt_cls|txt_pos)"
_HEADS = r"^(img_proj|txt_proj|pooler|itm_head|logit_scale)"
_MLM_HEAD = r"^(mlm_transform|mlm_norm|mlm_decoder)"
UNUSED = {
    "image": [_TEXT_ONLY, r"^mw/block_\d+/(ln_l|ffn_l|ln_vl|ffn_vl)/", _HEADS, _MLM_HEAD],
    "text": [_IMAGE_ONLY, r"^mw/block_\d+/(ln_vl|ffn_vl)/", _HEADS, r"^mim_head"],
    "image_text": [r"^mim_head", r"^mw/img_mask_token"],
}
# VLMo's text stage also freezes the shared self-attention (with its LayerNorm and layer scale)
# and the V experts: no optimizer state, no update, no decay (they come from the image stage).
TEXT_STAGE_FROZEN = [r"^mw/block_\d+/(LayerNorm_0|MultiHeadAttention_0|ln_v|ffn_v)/",
                     r"^mw/block_\d+/gamma_1$"]


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", stage="image_text", init="")
  if args.stage not in STAGES:
    raise configlib.ConfigError(f"vlmo.py: stage={args.stage!r}; choose one of {STAGES}.")
  if args.stage == "text" and not args.init:
    raise configlib.ConfigError("vlmo.py: stage=text starts from the image stage's weights; "
                                "pass init=DIR (that run's workdir or export).")
  c = configlib.base_train_config()
  c.objective = "vlmo"
  c.model.temperature_init = 0.07
  c.loss.stage = args.stage
  c.loss.mlm_prob = 0.15
  c.loss.mim_ratio = 0.4
  c.loss.itc_weight = 1.0
  c.loss.itm_weight = 1.0
  c.loss.mlm_weight = 1.0

  if args.scale == "paper":
    c.data.image_size = 224
    c.data.max_len = 196 if args.stage == "text" else 40
    c.model.transformer = dict(patch_size=16, width=768, depth=12, vl_depth=2, mlp_dim=3072,
                               num_heads=12)
    c.model.embed_dim = 768  # VLMo's ITC heads keep the width
    c.optim.b1 = 0.9
    c.log_every_steps = 50
    if args.stage == "image":
      c.batch_size = 2048
      c.total_steps = 500_000
      c.optim.lr = 1.5e-3
      c.optim.wd = 0.05 * 1.5e-3
      c.optim.b2 = 0.999
      c.optim.warmup_steps = 6_250
      c.optim.schedule = "cosine"
    else:
      c.batch_size = 1024
      c.total_steps = 200_000
      c.optim.lr = 2e-4
      c.optim.wd = 0.01 * 2e-4  # the lr-coupled 0.01, converted (docstring)
      c.optim.b2 = 0.98
      c.optim.warmup_steps = 20_000
      c.optim.schedule = "linear"
    c.eval.itm_rerank_k = 128
  else:
    model_sizes.small_vlmo(c, args.scale)
    c.eval.itm_rerank_k = 16
    if args.stage != "image_text" and args.scale == "laptop":
      c.total_steps = 300
      c.checkpoint.every_steps = 300
  if args.stage != "image_text":
    c.eval.every_steps = -1  # the unimodal stages print their masked-prediction metrics only
  c.optim.wd_mults = [[rule, 0.0] for rule in UNUSED[args.stage]] + list(c.optim.wd_mults)
  if args.stage == "text":
    c.optim.freeze = list(TEXT_STAGE_FROZEN)
  if args.init:
    c.init.path = args.init  # every parameter, by name: the stages share one model
  return c
